"""Per-worker log files, size-rotated, with the last lines kept in memory.

A worker's stdout and stderr come to the supervisor through a pipe (rather than straight to
a file) so that the file can be rotated while the worker runs -- SGLang is chatty and a node
stays up for weeks -- and so that the tail is at hand when a worker fails to start.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import deque
from pathlib import Path
from typing import BinaryIO


class RotatingLog:
    """Append-only log at ``path``; at ``max_bytes`` it becomes ``path.1`` (``.2`` ...).

    Written by one reader thread per child; :meth:`tail` may be called from any thread.
    """

    def __init__(
        self, path: Path, max_bytes: int = 50 * 2**20, backups: int = 3, tail_lines: int = 200
    ) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self._tail: deque[str] = deque(maxlen=tail_lines)
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file: BinaryIO | None = open(path, "ab")  # noqa: SIM115 - closed in close()
        self._size = self._file.tell()

    def write(self, data: bytes) -> None:
        """Append ``data`` (whole lines, as read from the pipe) and remember them for the tail."""
        with self._lock:
            if self._file is None:
                return
            if self._size + len(data) > self.max_bytes and self._size > 0:
                self._rotate()
            assert self._file is not None
            self._file.write(data)
            self._file.flush()
            self._size += len(data)
            for line in data.decode(errors="replace").splitlines():
                self._tail.append(line)

    def mark(self, text: str) -> None:
        """Write a supervisor note (start, exit) into the log so the file tells the whole story."""
        self.write(f"----- sglctl: {text} -----\n".encode())

    def tail(self, lines: int = 40) -> str:
        with self._lock:
            return "\n".join(list(self._tail)[-lines:])

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def _rotate(self) -> None:
        assert self._file is not None
        self._file.close()
        if self.backups > 0:
            for index in range(self.backups - 1, 0, -1):
                older = self.path.with_name(f"{self.path.name}.{index}")
                if older.exists():
                    os.replace(older, self.path.with_name(f"{self.path.name}.{index + 1}"))
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        self._file = open(self.path, "ab")  # noqa: SIM115
        self._size = 0
