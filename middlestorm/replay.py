"""A request body that can be read again, so a failed request can be run again.

:class:`ReplayableInput` stands in for ``wsgi.input``: what the application
reads is kept (in memory up to a threshold, then in a temporary file), and
:meth:`~ReplayableInput.rewind` makes the next reads start over from the
beginning. Nothing is read ahead: an application that never reads the body
costs nothing, and one that stops early leaves the rest unread. A body longer
than the replay limit stops being kept, and cannot be rewound.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from typing import IO

__all__ = ["ReplayableInput"]


class ReplayableInput:
    """``wsgi.input`` that remembers what was read from it, up to ``limit`` bytes."""

    def __init__(self, stream: IO[bytes], *, limit: int, in_memory: int) -> None:
        self._stream = stream
        self._limit = limit
        # It lives as long as the request, not a block: close() or garbage collection ends it.
        kept = tempfile.SpooledTemporaryFile(max_size=in_memory)  # noqa: SIM115
        self._kept: tempfile.SpooledTemporaryFile[bytes] | None = kept
        self._kept_size = 0
        #: Where the next read starts in what was kept; at its end, the stream goes on.
        self._position = 0

    def rewind(self) -> bool:
        """Read from the beginning again; false when the body was too long to keep."""
        if self._kept is None:
            return False
        self._position = 0
        return True

    def close(self) -> None:
        """Drop what was kept (the server closes the stream itself)."""
        if self._kept is not None:
            self._kept.close()
            self._kept = None

    # -- the file-like API PEP 3333 asks of wsgi.input -------------------

    def read(self, size: int | None = -1) -> bytes:
        size = -1 if size is None else size
        kept = self._read_kept(size)
        if size >= 0 and len(kept) >= size:
            return kept
        fresh = self._stream.read(-1 if size < 0 else size - len(kept))
        self._keep(fresh)
        return kept + fresh

    def readline(self, size: int | None = -1) -> bytes:
        size = -1 if size is None else size
        kept = self._readline_kept(size)
        if kept.endswith(b"\n") or (size >= 0 and len(kept) >= size):
            return kept
        fresh = self._stream.readline(*([] if size < 0 else [size - len(kept)]))
        self._keep(fresh)
        return kept + fresh

    def readlines(self, hint: int = -1) -> list[bytes]:
        lines: list[bytes] = []
        total = 0
        while line := self.readline():
            lines.append(line)
            total += len(line)
            if 0 < hint <= total:
                break
        return lines

    def __iter__(self) -> Iterator[bytes]:
        while line := self.readline():
            yield line

    # -- what was kept ------------------------------------------------------

    def _read_kept(self, size: int) -> bytes:
        if self._kept is None or self._position >= self._kept_size:
            return b""
        self._kept.seek(self._position)
        data = self._kept.read(self._kept_size - self._position if size < 0 else size)
        self._position += len(data)
        return data

    def _readline_kept(self, size: int) -> bytes:
        if self._kept is None or self._position >= self._kept_size:
            return b""
        self._kept.seek(self._position)
        left = self._kept_size - self._position
        data = self._kept.readline(left if size < 0 else min(size, left))
        self._position += len(data)
        return data

    def _keep(self, data: bytes) -> None:
        """Keep fresh ``data`` read from the stream, or stop keeping past the limit."""
        if self._kept is None or not data:
            return
        if self._kept_size + len(data) > self._limit:
            self.close()
            return
        self._kept.seek(self._kept_size)
        self._kept.write(data)
        self._kept_size += len(data)
        self._position = self._kept_size
