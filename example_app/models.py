"""The Storm classes of the notes application."""

from datetime import datetime, timezone

from storm.locals import DateTime, Int, Unicode

MAX_LENGTH = 500


class Note:
    __storm_table__ = "note"

    id = Int(primary=True)
    body = Unicode(allow_none=False)
    created = DateTime(allow_none=False)
    updated = DateTime()

    def __init__(self, body: str) -> None:
        self.body = body
        self.created = datetime.now(timezone.utc).replace(tzinfo=None)

    def as_json(self) -> dict:
        return {
            "id": self.id,
            "body": self.body,
            "created": self.created.isoformat(),
            "updated": self.updated.isoformat() if self.updated else None,
        }


def validate_body(value: object) -> tuple[str | None, str | None]:
    """Return ``(body, None)`` for a usable note body, else ``(None, error)``."""
    if not isinstance(value, str):
        return None, "body must be text"
    body = value.strip()
    if not body:
        return None, "body must not be empty"
    if len(body) > MAX_LENGTH:
        return None, f"body must be at most {MAX_LENGTH} characters"
    return body, None
