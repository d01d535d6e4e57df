"""Paths that come from workflows stay inside the folders they are meant for.

A workflow file is data from someone else: a head name like `../../.ssh/id_rsa` or an absolute path
typed into a dropdown value must not reach outside ComfyUI's models/output folders. Symlinks that
the user placed inside those folders are theirs and are followed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from ..errors import UserInputError


def resolve_inside(name: str, base_dirs: Iterable[str | os.PathLike], what: str = "file") -> Path:
    """The existing `base/name` for the first base that has it; `name` may not escape its base."""
    if not name or "\x00" in name:
        raise UserInputError(f"no {what} selected")
    rel = Path(name)
    if rel.is_absolute() or rel.drive:
        raise UserInputError(f"{what} {name!r} must be a name inside the models folder, not an absolute path.")
    bases = [Path(b) for b in base_dirs]
    for base in bases:
        # Lexical containment: `..` cannot climb out, but a symlink the user put in their own models
        # folder (a common way to share big files) is followed, as ComfyUI itself does.
        base_abs = Path(os.path.abspath(base))
        candidate = Path(os.path.normpath(base_abs / rel))
        if candidate != base_abs and base_abs not in candidate.parents:
            raise UserInputError(f"{what} {name!r} points outside {base}; pick a file from the list.")
        if candidate.exists():
            return candidate
    where = ", ".join(map(str, bases)) or "(no folder registered)"
    raise UserInputError(f"{what} {name!r} not found in {where}. Put it there, or refresh the node list (press R).")


def expand_user(text: str, what: str = "path") -> Path:
    """`Path(text).expanduser()`, with a user error for a `~name` whose home cannot be found (pathlib
    raises RuntimeError for an unknown user, or for `~` when HOME is unset)."""
    try:
        return Path(text).expanduser()
    except RuntimeError:
        raise UserInputError(f"{what} {text!r} starts with '~' but that home folder cannot be found; write the "
                             "full path instead.") from None
