"""Progress callbacks: core functions take `progress(done, total)`; the CLI passes a tqdm bar.

`tqdm_progress(desc)` returns a callable that drives one tqdm bar (on stderr) and a `close()`; it is
also a context manager. `offset_progress(cb, offset, grand_total)` lets several calls (one per
identity) share one bar.
"""

from __future__ import annotations

from typing import Callable

from .interrupts import raise_if_interrupted

Progress = Callable[[int, int], None]


class TqdmProgress:
    """A `progress(done, total)` callback backed by tqdm; the bar is created on the first call."""

    def __init__(self, desc: str, unit: str = "img", disable: bool | None = None):
        self.desc, self.unit, self.disable = desc, unit, disable
        self._bar = None

    def __call__(self, done: int, total: int) -> None:
        raise_if_interrupted()   # a Ctrl-C Python dropped inside a finalizer stops the work here
        if self._bar is None:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=self.desc, unit=self.unit, disable=self.disable, dynamic_ncols=True)
        if self._bar.total != total:
            self._bar.total = total
        self._bar.n = done
        self._bar.refresh()

    def set_postfix(self, **values) -> None:
        """Show values (e.g. the loss) after the bar."""
        if self._bar is not None:
            self._bar.set_postfix(values, refresh=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "TqdmProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def tqdm_progress(desc: str, unit: str = "img", disable: bool | None = None) -> TqdmProgress:
    return TqdmProgress(desc, unit, disable)


def offset_progress(progress: Progress | None, offset: int, grand_total: int) -> Progress | None:
    """Report a sub-task's (done, total) as (offset + done, grand_total) on a shared callback."""
    if progress is None:
        return None
    return lambda done, total: progress(offset + done, grand_total)
