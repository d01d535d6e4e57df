"""torch on one CPU thread, the previous count restored after: the tiny training runs are too small for threads,
and one thread keeps them byte-identical on a shared 2-core machine (the docs' planted figures depend on it)."""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def one_torch_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
