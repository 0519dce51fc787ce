"""The Storm classes the tests store."""

from storm.locals import Int, Unicode


class Note:
    __storm_table__ = "note"
    id = Int(primary=True)
    body = Unicode()

    def __init__(self, body: str) -> None:
        self.body = body


class Tag:
    """Points at a note through a deferred foreign key: a bad one fails at COMMIT."""

    __storm_table__ = "tag"
    id = Int(primary=True)
    note_id = Int()

    def __init__(self, note_id: int) -> None:
        self.note_id = note_id


class Counter:
    """A shared number that requests increment: they conflict under REPEATABLE READ."""

    __storm_table__ = "counter"
    id = Int(primary=True)
    value = Int()
