"""More hostile input (extends tests/test_fuzz_inputs.py, which covers PNG modes/truncation, random bytes,
a PNG bomb, damaged and hostile-metadata heads, and seed-dir argument strings).

- Photos: JPEG/TIFF/GIF/WebP/BMP in odd modes and bit depths (CMYK, 16-bit, float, 1-bit, LA, animated),
  truncated anywhere, EXIF orientation 1..8 (the result is upright: equal to PIL's exif_transpose), and
  bombs in other formats.
- Heads: absurd shapes in the metadata (refused without allocating), NaN/inf anywhere in the weights,
  other dtypes, extra tensors, a header that points past the end of the file.
- Feature caches and training states (files `train --resume` and `train --features` read): damaged
  bytes fail with a UserInputError naming the file.
- Seed-dir layouts: random trees of files, folders, symlinks (dangling, looping, to folders), empty and
  garbage photos, photo names that are folders, odd names; seed-dir lists from a file with junk lines.
  Every case gives identities or a UserInputError, and no file in the tree changes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageOps

from qwen_identity.core.errors import UserInputError
from qwen_identity.core.residual.head import HeadMeta, ResidualHead, load_head
from qwen_identity.core.files.images import load_image
from robustness_helpers import check_photo_decodes_or_fails_clearly

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------- photos
def _image(fmt: str, mode: str, w: int, h: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    base = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
    if mode == "I;16":
        im = Image.fromarray(rng.integers(0, 65535, (h, w), dtype=np.uint16))
    elif mode == "F":
        im = Image.fromarray(rng.normal(128, 200, (h, w)).astype(np.float32), "F")
    elif mode == "I":
        im = Image.fromarray(rng.integers(-5000, 70000, (h, w), dtype=np.int32), "I")
    else:
        im = base.convert(mode)
    buf = io.BytesIO()
    if fmt == "GIF":
        frames = [im.convert("P"), base.convert("P")]
        frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    else:
        im.save(buf, format=fmt)
    return buf.getvalue()


FORMAT_MODES = [("JPEG", "RGB"), ("JPEG", "L"), ("JPEG", "CMYK"), ("TIFF", "I;16"), ("TIFF", "F"), ("TIFF", "I"),
                ("TIFF", "CMYK"), ("TIFF", "LA"), ("TIFF", "1"), ("GIF", "P"), ("WEBP", "RGBA"), ("BMP", "RGB"),
                ("PNG", "LA"), ("PNG", "PA")]


@FUZZ
@given(fm=st.sampled_from(FORMAT_MODES), w=st.integers(1, 24), h=st.integers(1, 24), seed=st.integers(0, 999),
       cut=st.one_of(st.none(), st.floats(0, 0.999)))
def test_odd_formats_modes_and_truncations_decode_or_fail_clearly(tmp_path, fm, w, h, seed, cut):
    fmt, mode = fm
    try:
        data = _image(fmt, mode, w, h, seed)
    except (OSError, ValueError, KeyError):   # this PIL cannot write that combination: nothing to test
        return
    if cut is not None:
        data = data[: int(len(data) * cut)]
    # the name lies about the format, as users' files do
    check_photo_decodes_or_fails_clearly(tmp_path / "photo_view_0.png", data, (w, h))


@FUZZ
@given(orientation=st.integers(1, 8), w=st.integers(2, 20), h=st.integers(2, 20), seed=st.integers(0, 99),
       fmt=st.sampled_from(["JPEG", "PNG", "WEBP"]))
def test_exif_orientation_gives_an_upright_photo(tmp_path, orientation, w, h, seed, fmt):
    rng = np.random.default_rng(seed)
    im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    im.save(buf, format=fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))
    path = tmp_path / "photo_view_0.png"
    path.write_bytes(buf.getvalue())
    got = load_image(path)
    with Image.open(path) as raw:
        raw.load()
        expected = ImageOps.exif_transpose(raw).convert("RGB")
    assert got.size == ((h, w) if orientation >= 5 else (w, h))
    assert np.array_equal(np.asarray(got), np.asarray(expected))


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "JPEG"])
def test_bombs_in_other_formats_are_refused_without_decoding(tmp_path, fmt):
    """Headers that claim 60000 x 60000 pixels (3.6 G) with almost no data."""
    big = 60000
    if fmt == "GIF":
        data = b"GIF89a" + struct.pack("<HHBBB", big, big, 0, 0, 0) + b",\x00\x00\x00\x00" + \
            struct.pack("<HHB", big, big, 0) + b"\x02\x02\x44\x01\x00;"
    elif fmt == "BMP":
        data = b"BM" + struct.pack("<IHHI", 54, 0, 0, 54) + struct.pack("<IiiHHIIiiII", 40, big, big, 1, 24, 0, 0,
                                                                          2835, 2835, 0, 0)
    else:   # a real 8x8 JPEG whose SOF0 frame header claims the big size
        buf = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buf, format=fmt)
        data = bytearray(buf.getvalue())
        i = data.index(b"\xff\xc0")
        data[i + 5:i + 9] = struct.pack(">HH", big, big)
        data = bytes(data)
    path = tmp_path / "bomb.png"
    path.write_bytes(data)
    with pytest.raises(UserInputError, match="too large|cannot decode"):
        load_image(path)


# ---------------------------------------------------------------------------------------------- heads
def _head_file(path: Path, meta: dict, tensors: dict) -> Path:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"qwen_identity": json.dumps(meta)})
    return path


@FUZZ
@given(d=st.sampled_from([0, -1, 1, 6, 10**9, 2**62]), k=st.sampled_from([0, 1, 2, 10**7]),
       h=st.sampled_from([0, 4, 10**8, -4]))
def test_absurd_shapes_in_metadata_are_refused_without_allocating(tmp_path, d, k, h):
    meta = json.loads(HeadMeta(6, 2, 4).to_json())
    meta.update(feature_dim=d, tokens=k, hidden_size=h)
    path = _head_file(tmp_path / "h.safetensors", meta,
                      {"proj.weight": torch.zeros(8, 6), "proj.bias": torch.zeros(8), "scale": torch.ones(1)})
    try:
        head = load_head(path)
    except UserInputError as e:
        assert str(path) in str(e) or "head" in str(e).lower()
    else:
        assert (d, k, h) == (6, 2, 4) and head(torch.zeros(1, 6)).shape == (1, 2, 4)


@FUZZ
@given(which=st.sampled_from(["proj.weight", "proj.bias", "scale"]), pos=st.integers(0, 10**6),
       bad=st.sampled_from([float("nan"), float("inf"), float("-inf")]),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]))
def test_non_finite_weights_are_refused_in_any_dtype(tmp_path, which, pos, bad, dtype):
    head = ResidualHead(6, 2, 4)
    tensors = {"proj.weight": head.proj.weight.detach().clone(), "proj.bias": head.proj.bias.detach().clone(),
               "scale": head.scale.detach().clone()}
    t = tensors[which].view(-1)
    t[pos % t.numel()] = bad
    tensors = {k: v.to(dtype) for k, v in tensors.items()}
    path = _head_file(tmp_path / "h.safetensors", json.loads(HeadMeta(6, 2, 4).to_json()), tensors)
    with pytest.raises(UserInputError, match="NaN or infinite"):
        load_head(path)


def test_integer_weights_extra_tensors_and_a_header_past_the_end(tmp_path):
    meta = json.loads(HeadMeta(6, 2, 4).to_json())
    ok = {"proj.weight": torch.zeros(8, 6), "proj.bias": torch.zeros(8), "scale": torch.ones(1)}
    head = load_head(_head_file(tmp_path / "extra.safetensors", meta, {**ok, "junk": torch.zeros(3)}))
    assert head.proj.weight.shape == (8, 6)          # an extra tensor is ignored
    ints = {k: v.to(torch.int32) for k, v in ok.items()}
    try:
        load_head(_head_file(tmp_path / "int.safetensors", meta, ints))
    except UserInputError:
        pass
    header = json.dumps({"proj.weight": {"dtype": "F32", "shape": [8, 6], "data_offsets": [0, 10**12]},
                         "__metadata__": {"qwen_identity": json.dumps(meta)}}).encode()
    path = tmp_path / "past_end.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\x00" * 16)
    with pytest.raises(UserInputError, match="not a readable safetensors"):
        load_head(path)


# ---------------------------------------------------------------------------- other files the pack reads
@pytest.fixture(scope="module")
def good_files(tmp_path_factory):
    from qwen_identity.core.identity.features import IdentityFeatures, save_feature_cache

    root = tmp_path_factory.mktemp("files")
    feats = IdentityFeatures(per_image=torch.randn(2, 6), combined=torch.randn(6), weights=torch.ones(2) / 2,
                             meta={"model": "tiny", "n_images": 2})
    save_feature_cache(root / "features.safetensors", {"seed_0": feats})
    head = ResidualHead(6, 1, 4)
    opt = torch.optim.Adam(head.parameters())
    head(torch.randn(1, 6)).sum().backward()
    opt.step()
    from qwen_identity.training.checkpoint import save_train_state

    save_train_state(root / "train_state.safetensors", head, opt, torch.Generator().manual_seed(0), 1, {"x": 1})
    return {n: (root / n).read_bytes() for n in ("features.safetensors", "train_state.safetensors")}


@FUZZ
@given(name=st.sampled_from(["features.safetensors", "train_state.safetensors"]), cut=st.floats(0, 1),
       flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=3))
def test_damaged_feature_caches_and_training_states_fail_clearly(tmp_path, good_files, name, cut, flips):
    from qwen_identity.core.identity.features import load_feature_cache
    from qwen_identity.training.checkpoint import load_train_state

    data = bytearray(good_files[name][: max(0, int(len(good_files[name]) * cut)) or len(good_files[name])])
    for pos, val in flips:
        if data:
            data[pos % len(data)] = val
    path = tmp_path / name
    path.write_bytes(bytes(data))
    before = _digest(path)
    loader = load_feature_cache if name.startswith("features") else load_train_state
    try:
        loader(path)
    except UserInputError as e:
        assert path.name in str(e)
    assert _digest(path) == before


# ---------------------------------------------------------------------------------------------- seed dirs
NAMES = st.sampled_from(["seed_0", "seed_1", "seed_é ü", "seed_10", "seed_2", "photo_view_0.png", "photo_view_1.png",
                         "photo_view_10.png", "photo_view_a.png", "caption.txt", "x", ".hidden", "photo_view_0.PNG"])
KINDS = st.sampled_from(["good_png", "empty", "garbage", "dir", "symlink_dir", "dangling", "loop", "unreadable",
                         "caption"])


def _make_tree(root: Path, entries) -> None:
    good = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(good, format="PNG")
    for parent, name, kind in entries:
        folder = root / parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:            # an earlier entry made that name a file or a link
            continue
        if not folder.is_dir():
            continue
        p = folder / name
        if p.exists() or p.is_symlink():
            continue
        if kind == "good_png":
            p.write_bytes(good.getvalue())
        elif kind == "empty":
            p.write_bytes(b"")
        elif kind == "garbage":
            p.write_bytes(os.urandom(32))
        elif kind == "dir":
            p.mkdir()
        elif kind == "symlink_dir":
            p.symlink_to(root, target_is_directory=True)
        elif kind == "dangling":
            p.symlink_to(root / "does_not_exist")
        elif kind == "loop":
            p.symlink_to(p)
        elif kind == "unreadable":
            p.write_bytes(good.getvalue())
            p.chmod(0)
        else:
            p.write_bytes(b"\xff\xfe caption \x00 bytes")


def _snapshot(root: Path) -> dict:
    out = {}
    for dirpath, dirnames, files in os.walk(root):
        for f in files + dirnames:
            p = Path(dirpath) / f
            if p.is_symlink():
                out[str(p)] = ("link", os.readlink(p))
            elif p.is_file():
                p_mode = p.stat().st_mode
                try:
                    out[str(p)] = ("file", _digest(p), p_mode)
                except OSError:
                    out[str(p)] = ("unreadable", p_mode)
            else:
                out[str(p)] = ("dir",)
    return out


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(entries=st.lists(st.tuples(st.sampled_from(["seed_0", "seed_1", "seed_é ü", "seed_0/sub", "."]), NAMES, KINDS),
                        max_size=10),
       args=st.lists(st.sampled_from(["seed_*", "seed_0", "seed_1", "seed_é ü", "seed_0/photo_view_0.png", "missing",
                                      "seed_[", "*", "seed_0/sub"]), min_size=1, max_size=3),
       single_view=st.booleans(), via_file=st.booleans())
def test_random_seed_dir_trees_give_identities_or_a_clear_error(tmp_path_factory, monkeypatch, entries, args,
                                                                single_view, via_file):
    from qwen_identity.cli.extract import readable_photos
    from qwen_identity.core.identity.seed_dirs import load_seed_dirs, parse_seed_dir_args
    from qwen_identity.training.data import load_identities

    root = tmp_path_factory.mktemp("tree")
    monkeypatch.chdir(root)
    _make_tree(root, entries)
    before = _snapshot(root)
    warnings = []
    try:
        if via_file:
            (root / "list.txt").write_text("# seed dirs\n" + "\n".join(args) + "\n\n", encoding="utf-8")
            before = _snapshot(root)
            paths = parse_seed_dir_args(None, "list.txt")
        else:
            paths = parse_seed_dir_args(",".join(args))
        dirs = load_seed_dirs(paths, single_view=single_view)
        for d in dirs:
            assert d.photos and all(p.name.startswith("photo_view_") for p in d.photos)
            try:
                good, skipped = readable_photos(d)
                assert good and len(good) + len(skipped) == len(d.photos)
            except UserInputError as e:
                assert str(d.path) in str(e)
        ids = load_identities(paths, single_view=single_view, warn=warnings.append)
        assert ids and all(i.photos for i in ids)
    except UserInputError as e:
        assert str(e).strip() and "\n" not in str(e).strip()
    finally:
        for p in root.rglob("*"):
            if not p.is_symlink() and p.exists():
                p.chmod(0o755 if p.is_dir() else 0o644) if p.stat().st_mode & 0o777 == 0 else None
    after = {k: v for k, v in _snapshot(root).items()}
    assert {k: v[:2] for k, v in after.items()} == {k: v[:2] for k, v in before.items()}, "the tree changed"


def test_seed_dirs_file_with_nul_bytes_and_bad_encoding(tmp_path, monkeypatch):
    """Found by this test: a Latin-1 --seed-dirs-file was an 'internal error' (UnicodeDecodeError)."""
    from qwen_identity.core.identity.seed_dirs import load_seed_dirs, parse_seed_dir_args

    monkeypatch.chdir(tmp_path)
    (tmp_path / "list.txt").write_bytes(b"seed_0\x00evil\n")
    with pytest.raises(UserInputError):
        load_seed_dirs(parse_seed_dir_args(None, "list.txt"))
    (tmp_path / "latin1.txt").write_bytes("seed_\xe9\n".encode("latin-1"))
    with pytest.raises(UserInputError, match="UTF-8 text file"):
        load_seed_dirs(parse_seed_dir_args(None, "latin1.txt"))
