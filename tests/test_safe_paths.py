"""Names from workflows cannot escape the models folder."""

from pathlib import Path

import pytest

from qwen_identity.core.errors import UserInputError
from qwen_identity.core.files.safe_paths import resolve_inside


def test_resolves_inside_and_rejects_escapes(tmp_path):
    base = tmp_path / "models" / "identity_heads"
    (base / "sub").mkdir(parents=True)
    (base / "sub" / "h.safetensors").write_bytes(b"x")
    (tmp_path / "secret.txt").write_text("s")
    assert resolve_inside("sub/h.safetensors", [base]) == base / "sub" / "h.safetensors"
    for bad in ("../../secret.txt", str(tmp_path / "secret.txt"), "sub/../../../secret.txt", ""):
        with pytest.raises(UserInputError):
            resolve_inside(bad, [base])
    with pytest.raises(UserInputError, match="not found"):
        resolve_inside("missing.safetensors", [base])


def test_user_symlinks_inside_the_folder_are_followed(tmp_path):
    """Users symlink big model files into ComfyUI/models; that is their choice, not an escape."""
    base = tmp_path / "heads"
    base.mkdir()
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "big.safetensors").write_bytes(b"x")
    (base / "link.safetensors").symlink_to(tmp_path / "store" / "big.safetensors")
    assert resolve_inside("link.safetensors", [base]).read_bytes() == b"x"
    with pytest.raises(UserInputError, match="outside"):
        resolve_inside("../store/big.safetensors", [base])


def test_an_unknown_home_folder_is_a_user_error():
    from qwen_identity.core.files.safe_paths import expand_user

    with pytest.raises(UserInputError, match="'~no_such_user_qi/x' starts with '~'.*full path"):
        expand_user("~no_such_user_qi/x", "model_path")
    assert expand_user("/a/b") == Path("/a/b")
