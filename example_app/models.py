"""The Storm classes of the notes application."""

import re
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


#: What a note may not contain: control characters (newline and tab are
#: allowed; CR only before LF, which becomes LF alone) and lone surrogates,
#: which no UTF-8 database can store. PostgreSQL refuses NUL in text.
FORBIDDEN = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")


def validate_body(value: object) -> tuple[str | None, str | None]:
    """Return ``(body, None)`` for a usable note body, else ``(None, error)``."""
    if value is None:
        return None, "body is missing"
    if not isinstance(value, str):
        return None, "body must be text"
    value = value.replace("\r\n", "\n")
    bad = FORBIDDEN.search(value)
    if bad:
        code_point = ord(bad.group())
        kind = "lone surrogate" if 0xD800 <= code_point <= 0xDFFF else "control character"
        return None, f"body must not contain the {kind} U+{code_point:04X}"
    body = value.strip()
    if not body:
        return None, "body must not be empty"
    if len(body) > MAX_LENGTH:
        return None, f"body must be at most {MAX_LENGTH} characters"
    return body, None
