"""One writer per output folder: two CLI runs writing to one out-dir would corrupt each other's files.

`OutDirLock(out_dir)` takes an exclusive, non-blocking OS lock on `<out_dir>/.qwen-identity.lock`
(fcntl on POSIX, msvcrt on Windows). A second run gets a clear refusal naming the folder and the
holder's pid. The OS releases the lock when the process dies, so a crash never leaves a stale lock.

A run made of steps that each take the lock (`sweep --train`, `demo`: training, then sampling) holds
it for its whole length with `OutDirLock(out, allow_nested=True)`: inside that block, this process's
own `OutDirLock(out)` passes, so no other run can slip in between the steps.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import UserInputError

LOCK_NAME = ".qwen-identity.lock"
_NESTABLE: set[str] = set()  # folders this process holds with allow_nested=True


class OutDirLock:
    def __init__(self, out_dir: str | os.PathLike, allow_nested: bool = False):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / LOCK_NAME
        self.allow_nested = allow_nested
        self._fd: int | None = None
        self._nested = False

    def acquire(self) -> "OutDirLock":
        key = os.path.abspath(self.out_dir)
        if key in _NESTABLE:  # a step of the run that already holds this folder
            self._nested = True
            return self
        self._acquire_os_lock()
        if self.allow_nested:
            _NESTABLE.add(key)
        return self

    def _acquire_os_lock(self) -> None:
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

    def release(self) -> None:
        if self._nested:  # the outer holder releases the OS lock
            self._nested = False
            return
        if self._fd is not None:
            if self.allow_nested:
                _NESTABLE.discard(os.path.abspath(self.out_dir))
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
