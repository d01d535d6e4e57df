"""The server owner's switch for shared workflows (docs/security.md): at security level `strong` the
free-path inputs (`model_path`, `head_path`) and hub downloads are off, and a refused free path gets the
same message whether or not it exists, so a workflow cannot probe the server's disk."""

from __future__ import annotations

import pytest

from qwen_identity.core.errors import UserInputError
from qwen_identity.core.runtime import security
from qwen_identity.core.runtime.model_sources import resolve_model_dir
from qwen_identity.nodes.head_nodes import LoadResidualHead
from qwen_identity.nodes.qwen3vl_nodes import LoadQwen3VL
from qwen_identity.nodes.sampling_nodes import LoadQwenImageDiffusers


@pytest.fixture
def strong(monkeypatch, tmp_path):
    monkeypatch.setenv(security.ENV, "strong")
    monkeypatch.setenv("QWEN_IDENTITY_MODELS_DIR", str(tmp_path / "models"))
    return tmp_path


def _message(call) -> str:
    with pytest.raises(UserInputError) as e:
        call()
    return str(e.value)


def test_default_is_normal_and_config_file_and_env_set_it(monkeypatch, tmp_path):
    monkeypatch.delenv(security.ENV, raising=False)
    monkeypatch.setattr(security, "CONFIG_FILE", tmp_path / "qwen_identity.ini")
    assert security.security_level() == "normal" and security.free_paths_allowed() and security.downloads_allowed()
    (tmp_path / "qwen_identity.ini").write_text("[security]\nlevel = strong\n")
    assert security.security_level() == "strong"
    assert not security.free_paths_allowed() and not security.downloads_allowed()
    monkeypatch.setenv(security.ENV, "normal")  # the environment wins over the file
    assert security.security_level() == "normal"
    monkeypatch.setenv(security.ENV, "paranoid")
    with pytest.raises(UserInputError, match="normal or strong"):
        security.security_level()


def test_a_broken_config_file_fails_closed(monkeypatch, tmp_path):
    monkeypatch.delenv(security.ENV, raising=False)
    monkeypatch.setattr(security, "CONFIG_FILE", tmp_path / "qwen_identity.ini")
    (tmp_path / "qwen_identity.ini").write_text("[security\nlevel = ???\n")
    assert security.security_level() == "strong"


@pytest.mark.parametrize("existing", [True, False])
def test_free_paths_are_refused_without_saying_whether_they_exist(strong, existing):
    target = strong / ("real_folder" if existing else "no_such_folder")
    if existing:
        target.mkdir()
        (target / "config.json").write_text("{}")
        (target / "head.safetensors").write_bytes(b"x")
    messages = [
        _message(lambda: LoadQwen3VL().load("(none)", str(target))),
        _message(lambda: LoadQwenImageDiffusers().load("(none)", str(target))),
        _message(lambda: LoadResidualHead().load("(none)", str(target / "head.safetensors"))),
    ]
    for m in messages:
        assert "turned off on this server" in m and str(strong) not in m and "no_such" not in m
        assert "not found" not in m and "exist" not in m
    assert LoadResidualHead.IS_CHANGED("(none)", str(target / "head.safetensors")) == "free paths off"


def test_the_refusal_is_the_same_for_an_existing_and_a_missing_path(strong):
    real = strong / "real"
    real.mkdir()
    a = _message(lambda: LoadQwen3VL().load("(none)", str(real)))
    b = _message(lambda: LoadQwen3VL().load("(none)", str(strong / "missing")))
    assert a == b


def test_hub_downloads_are_off(strong, monkeypatch):
    called = []
    monkeypatch.setattr("qwen_identity.core.runtime.model_sources._download", lambda *a, **k: called.append(a))
    m = _message(lambda: resolve_model_dir("Qwen/Qwen-Image", search_dirs=[strong / "models"]))
    assert "downloads are turned off" in m and called == []


def test_dropdown_choices_still_load_at_strong(strong):
    """The dropdowns (names inside the models folders) keep working: only free paths are off."""
    m = _message(lambda: LoadResidualHead().load("(no heads in models/identity_heads)", ""))
    assert "no head selected" in m
