"""A minimal stand-in for ComfyUI's runtime (`comfy.model_management`, `comfy.utils.ProgressBar`), so the
node adapters' progress bars, Cancel checks and memory cooperation are tested without ComfyUI."""

from __future__ import annotations

import sys
import types

import torch


class InterruptProcessingException(Exception):
    """Stands in for comfy.model_management.InterruptProcessingException (the Cancel button)."""


def install_fake_comfy(monkeypatch, interrupt_at: int | None = None) -> list[tuple]:
    """Install the stand-in; returns its call log: ("bar", total), ("update", value, total),
    ("interrupt_check",), ("free_memory", device type), ("soft_empty_cache",).

    `interrupt_at=n`: the n-th interrupt check raises InterruptProcessingException, as ComfyUI does when
    the user presses Cancel in the middle of a node."""
    calls: list[tuple] = []

    def check():
        calls.append(("interrupt_check",))
        if interrupt_at is not None and calls.count(("interrupt_check",)) == interrupt_at:
            raise InterruptProcessingException()

    mm = types.SimpleNamespace(
        free_memory=lambda n, dev: calls.append(("free_memory", dev.type)),
        soft_empty_cache=lambda: calls.append(("soft_empty_cache",)),
        throw_exception_if_processing_interrupted=check, get_torch_device=lambda: torch.device("cpu"),
        InterruptProcessingException=InterruptProcessingException)

    class ProgressBar:
        def __init__(self, total):
            calls.append(("bar", total))

        def update_absolute(self, value, total=None):
            calls.append(("update", value, total))

    comfy = types.ModuleType("comfy")
    comfy.model_management = mm
    comfy.utils = types.SimpleNamespace(ProgressBar=ProgressBar)
    monkeypatch.setitem(sys.modules, "comfy", comfy)
    monkeypatch.setitem(sys.modules, "comfy.model_management", mm)
    monkeypatch.setitem(sys.modules, "comfy.utils", comfy.utils)
    return calls
