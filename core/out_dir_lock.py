"""One writer per output folder: two CLI runs writing to one out-dir would corrupt each other's files.

`OutDirLock(out_dir)` takes an exclusive, non-blocking OS lock on `<out_dir>/.qwen-identity.lock`
(fcntl on POSIX, msvcrt on Windows). A second run gets a clear refusal naming the folder and the
holder's pid. The OS releases the lock when the process dies, so a crash never leaves a stale lock.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import UserInputError

LOCK_NAME = ".qwen-identity.lock"


class OutDirLock:
    def __init__(self, out_dir: str | os.PathLike):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> "OutDirLock":
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise UserInputError(f"--out-dir {self.out_dir} is a file, not a folder. Choose another output folder.")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            _lock(fd)
        except OSError:
            holder = ""
            try:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
            except OSError:
                pass
            os.close(fd)
            raise UserInputError(f"another qwen-identity run{f' (pid {holder})' if holder else ''} is writing to "
                                 f"{self.out_dir}; wait for it to finish or choose another --out-dir.") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            try:
                _unlock(self._fd)
            finally:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> "OutDirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


if os.name == "nt":  # pragma: no cover - exercised on Windows only
    import msvcrt

    def _lock(fd: int) -> None:
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)

    def _unlock(fd: int) -> None:
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
else:
    import fcntl

    def _lock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def _unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)
