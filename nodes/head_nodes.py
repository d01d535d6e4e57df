"""LoadResidualHead: a trained head from ComfyUI/models/identity_heads/ (dropdown) or a path."""

from __future__ import annotations

from pathlib import Path

from ..core.errors import UserInputError
from ..core.residual.head import head_summary, load_head
from ..core.files.safe_paths import resolve_inside
from ..core.runtime.model_folders import list_model_files, model_dirs
from ..core.runtime.security import check_free_path, free_paths_allowed

NO_HEADS = "(no heads in models/identity_heads)"


def resolve_head_file(head_name: str, head_path: str = "") -> Path:
    """The path input wins when non-empty; a dropdown name must resolve inside a heads folder."""
    check_free_path(head_path, "head_path", "a head from the list")
    if head_path and head_path.strip():
        return Path(head_path.strip()).expanduser()
    if not head_name or head_name == NO_HEADS:
        raise UserInputError("no head selected: put a .safetensors head from `qwen-identity train` into "
                             "ComfyUI/models/identity_heads/ and refresh, or type its path into head_path.")
    path = resolve_inside(head_name, model_dirs("identity_heads"), what="head")
    if not path.is_file():
        raise UserInputError(f"head {head_name!r} is a folder, not a .safetensors file; pick a file from the list.")
    return path


class LoadResidualHead:
    DESCRIPTION = ("Loads a residual head trained with `qwen-identity train` (one .safetensors file) and checks it. "
                   "Outputs the head for InjectResidual and a summary of what it was trained on.")
    CATEGORY = "Qwen Identity"
    RETURN_TYPES = ("QWEN_IDENTITY_HEAD", "STRING")
    RETURN_NAMES = ("head", "summary")
    OUTPUT_TOOLTIPS = ("the loaded residual head (D -> K x H)", "what the head was trained on (metadata)")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        names = list_model_files("identity_heads") or [NO_HEADS]
        return {
            "required": {
                "head_name": (names, {"tooltip": "a head in ComfyUI/models/identity_heads/ (.safetensors)"}),
            },
            "optional": {
                "head_path": ("STRING", {"default": "", "tooltip": "a head file anywhere on disk; when not empty it "
                                                                   "is used instead of head_name (refused when the server's "
                                                                   "owner set the security level to strong)"}),
            },
        }

    @classmethod
    def IS_CHANGED(cls, head_name, head_path=""):
        if (head_path or "").strip() and not free_paths_allowed():
            return "free paths off"  # nothing about the path is looked at
        try:
            p = resolve_head_file(head_name, head_path)
            st = p.stat()
            return f"{p}:{st.st_mtime_ns}:{st.st_size}"
        except (UserInputError, OSError):
            return f"{head_name}:{head_path}"

    def load(self, head_name, head_path=""):
        head = load_head(resolve_head_file(head_name, head_path))
        return (head, head_summary(head))


NODE_CLASS_MAPPINGS = {"LoadResidualHead": LoadResidualHead}
NODE_DISPLAY_NAME_MAPPINGS = {"LoadResidualHead": "Load Residual Head (Qwen Identity)"}
