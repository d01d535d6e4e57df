"""ComfyUI's runtime services for node adapters, imported lazily (None / no-ops outside ComfyUI)."""

from __future__ import annotations


def model_management():
    """`comfy.model_management`, or None outside ComfyUI."""
    try:
        import comfy.model_management as mm  # type: ignore[import-not-found]
    except ImportError:
        return None
    return mm


def comfy_progress(total: int):
    """A progress(done, total) callback driving ComfyUI's progress bar and honouring its Cancel button."""
    mm = model_management()
    if mm is None:
        return None
    import comfy.utils  # type: ignore[import-not-found]

    bar = comfy.utils.ProgressBar(total)

    def progress(done: int, total_: int) -> None:
        mm.throw_exception_if_processing_interrupted()
        bar.update_absolute(done, total_)

    return progress
