"""Property-based tests over hostile input: decoding photos, reading head files, parsing seed dirs.

Every case ends in a result or a UserInputError with a message - never another exception, a hang,
or a modified input file.
"""

import hashlib
import io
import json
import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from qwen_identity.core.errors import UserInputError
from qwen_identity.core.residual.head import HeadMeta, ResidualHead, load_head, save_head
from qwen_identity.core.files.images import load_image
from qwen_identity.core.identity.seed_dirs import parse_seed_dir_args
from robustness_helpers import check_photo_decodes_or_fails_clearly

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _png_bytes(mode: str, w: int, h: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        im = Image.fromarray(rng.integers(0, 65535, (h, w), dtype=np.uint16))
    elif mode == "RGBA":
        im = Image.fromarray(rng.integers(0, 255, (h, w, 4), dtype=np.uint8), "RGBA")
    elif mode == "L":
        im = Image.fromarray(rng.integers(0, 255, (h, w), dtype=np.uint8), "L")
    elif mode == "P":
        im = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8), "RGB").quantize(16)
    elif mode == "1":
        im = Image.fromarray(rng.integers(0, 2, (h, w), dtype=np.uint8) * 255, "L").convert("1")
    else:
        im = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8), "RGB")
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


@FUZZ
@given(mode=st.sampled_from(["RGB", "RGBA", "L", "P", "1", "I;16"]), w=st.integers(1, 40), h=st.integers(1, 40),
       seed=st.integers(0, 2**16), cut=st.one_of(st.none(), st.integers(0, 400)))
def test_any_png_or_truncation_decodes_or_fails_clearly(tmp_path, mode, w, h, seed, cut):
    data = _png_bytes(mode, w, h, seed)
    if cut is not None:
        data = data[: min(cut, len(data) - 1)]
    check_photo_decodes_or_fails_clearly(tmp_path / "photo_view_0.png", data, (w, h))


@FUZZ
@given(data=st.binary(max_size=300))
def test_random_bytes_never_crash_the_decoder(tmp_path, data):
    path = tmp_path / "x.png"
    path.write_bytes(data)
    try:
        load_image(path)
    except UserInputError:
        pass


def test_huge_dimensions_are_refused_without_decoding(tmp_path):
    """A PNG header claiming 100000 x 100000 pixels is refused before any pixel is allocated."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    path = tmp_path / "bomb.png"
    path.write_bytes(png)
    with pytest.raises(UserInputError, match="too large|cannot decode"):
        load_image(path)


@pytest.fixture(scope="module")
def good_head_bytes(tmp_path_factory):
    head = ResidualHead(6, 2, 4)
    with torch.no_grad():
        head.proj.weight.normal_()
    return save_head(head, tmp_path_factory.mktemp("h") / "h.safetensors").read_bytes()


@FUZZ
@given(cut=st.integers(0, 2000), flip=st.one_of(st.none(), st.tuples(st.integers(0, 2000), st.integers(0, 255))))
def test_damaged_head_files_fail_clearly(tmp_path, good_head_bytes, cut, flip):
    data = bytearray(good_head_bytes[: cut or len(good_head_bytes)])
    if flip is not None and data:
        data[flip[0] % len(data)] = flip[1]
    path = tmp_path / "h.safetensors"
    path.write_bytes(bytes(data))
    before = _digest(path)
    try:
        head = load_head(path)
    except UserInputError as e:
        assert str(path) in str(e)
    else:  # a flip inside tensor data can still be a valid head: then it must be a usable one
        assert head(torch.randn(1, 6)).shape == (1, 2, 4)
    assert _digest(path) == before


_json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
                            lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                            max_leaves=6)


@FUZZ
@given(overrides=st.dictionaries(st.sampled_from(["format", "format_version", "feature_dim", "tokens", "hidden_size",
                                                  "metrics", "training_args", "base_prompt"]), _json_values, max_size=4))
def test_hostile_head_metadata_fails_clearly(tmp_path, overrides):
    from safetensors.torch import save_file

    meta = json.loads(HeadMeta(6, 2, 4).to_json())
    meta.update(overrides)
    path = tmp_path / "m.safetensors"
    save_file({"proj.weight": torch.zeros(8, 6), "proj.bias": torch.zeros(8), "scale": torch.ones(1)}, str(path),
              metadata={"qwen_identity": json.dumps(meta)})
    try:
        head = load_head(path)
    except UserInputError:
        pass
    else:
        assert (head.feature_dim, head.tokens, head.hidden_size) == (6, 2, 4)


@FUZZ
@given(text=st.text(alphabet=st.sampled_from(list("ab,*?[]/ .~-_")), max_size=30))
def test_seed_dir_arguments_parse_or_fail_clearly(tmp_path, text, monkeypatch):
    monkeypatch.chdir(tmp_path)
    try:
        paths = parse_seed_dir_args(text)
    except UserInputError:
        return
    assert paths and all(str(p) for p in paths)
