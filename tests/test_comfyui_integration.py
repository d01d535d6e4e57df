"""The pack inside a real ComfyUI (checkout in COMFYUI_DIR; skipped with a printed reason otherwise).

One server for the module: `main.py --cpu` on 127.0.0.1 with a fresh --base-directory, this checkout
symlinked into custom_nodes/ as `comfyui-qwen-identity` (plus the test-only pack in
comfyui_harness/test_pack), and a models/ folder of random-weight stand-ins written at test time
under the committed workflows' real file names:
  diffusion_models/qwen_image_fp8_e4m3fn.safetensors   1-layer full-width Qwen-Image transformer
  vae/qwen_image_vae.safetensors                       random Wan-2.1 VAE
  text_encoders/qwen_2.5_vl_7b_fp8_scaled.safetensors  1-layer full-width Qwen2.5-VL text tower
  qwen3_vl/Qwen3-VL-2B-Instruct/                       the pack's tiny Qwen3-VL
  diffusers/Qwen-Image/                                the pack's tiny diffusers pipeline
  identity_heads/v1_head.safetensors                   random head (tiny Qwen3-VL D -> H 3584)
  identity_heads/tiny_diffusers_head.safetensors       random head (tiny Qwen3-VL D -> tiny pipeline H)
Substitutions made in copies of the API workflows (the committed files keep the real names):
CLIPLoader -> TinyQwenImageCLIPLoader (CLIPLoader always builds the full 7B encoder), the diffusers
workflow's head -> tiny_diffusers_head.safetensors, 32x32 images with 2 steps, and TrainIdentityHead
at 64x64 pixels with 2 steps.
A workflow that needs a newer ComfyUI than the one under test (build_workflows.NEEDS_COMFYUI: the Qwen-Image 2.1
native workflow needs 0.38's TextEncodeQwenImage21) is not loaded into a server that lacks those nodes: those
tests skip with the reason, the template-browser test still serves it, and tests/test_workflows.py checks it
against the newer release's node definitions written from its source.
Run with the venv from scripts/setup_comfyui.sh (ComfyUI's requirements, playwright, comfy-cli) and
Debian's chromium.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from comfyui_harness import build_workflows as bw
from comfyui_harness.env import chromium_path, comfyui_dir, import_comfy_in_process, require_comfyui
from comfyui_harness.prompt_queue import QueueResult, load_api_workflow, queue_prompt
from comfyui_harness.workflow_format import core_node_defs, node_def_from_class, strip_meta
from readme_sections import all_sections, node_reference

pytestmark = pytest.mark.comfyui

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
PACK_LINK = "comfyui-qwen-identity"
TEST_PACK = HERE / "comfyui_harness" / "test_pack"
WF_DIR = ROOT / "workflows"
API_FILES = sorted((WF_DIR / "api").glob("*_api.json"))
UI_FILES = sorted(WF_DIR.glob("*.json"))
SIZE, STEPS = 32, 2
TINY_DIFFUSERS_HEAD = "tiny_diffusers_head.safetensors"
TINY_21_HEAD = "tiny_21_head.safetensors"   # for the tiny Qwen-Image 2.1 pipeline (its own text width and family)
EXPECTED_IMAGES = {"qwen_identity_alpha_grid": 1, "qwen_identity_native_ksampler": 1,
                   "qwen_identity_diffusers": 1, "qwen_identity_multi_photo": 2, "qwen_identity_two_people": 1,
                   "qwen_identity_lightning": 1, "qwen_identity_accelerated": 1, "qwen_identity_personalize": 1,
                   "qwen_identity_21_references": 1, "qwen_identity_21_native": 1}
TRAIN_RESOLUTION = "64x64"     # TrainIdentityHead's training size on the tiny stand-ins


# ---- fixtures ------------------------------------------------------------------------------------

def _tiny_lora(path: Path, width: int = 3072, rank: int = 4):
    """A LoRA on the one-layer native transformer's first attention query (ComfyUI's diffusers-style keys),
    standing in for the Lightning LoRA under its real file name."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(5)
    key = "diffusion_model.transformer_blocks.0.attn.to_q"
    save_file({f"{key}.lora_A.weight": torch.randn(rank, width, generator=g) * 0.01,
               f"{key}.lora_B.weight": torch.randn(width, rank, generator=g) * 0.01}, str(path))


def _random_head(path: Path, feature_dim: int, hidden: int, tokens: int = 4, seed: int = 0, family: str = ""):
    import torch

    from qwen_identity.core.residual.head import HeadMeta, ResidualHead, save_head

    head = ResidualHead(feature_dim, tokens, hidden, HeadMeta(feature_dim=feature_dim, tokens=tokens,
                                                              hidden_size=hidden, qwen3_vl_model="tiny-qwen3-vl",
                                                              family=family))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.proj.weight.copy_(torch.randn(head.proj.weight.shape, generator=g) * 0.05)
    save_head(head, path)


def _config_width(folder: Path, *keys) -> int:
    cfg = json.loads((folder / "config.json").read_text())
    for k in keys:
        cfg = cfg[k] if isinstance(cfg, dict) and k in cfg else cfg
    return int(cfg["hidden_size"])


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    require_comfyui()
    import_comfy_in_process()
    from comfyui_harness.tiny_native import build_native_models
    from qwen_identity.tiny_models import build_tiny_models

    native = build_native_models()
    tiny = build_tiny_models(tmp_path_factory.mktemp("tiny_models"))
    root = tmp_path_factory.mktemp("models")
    links = {f"diffusion_models/{bw.UNET}": native.transformer, f"vae/{bw.VAE}": native.vae,
             f"text_encoders/{bw.TEXT_ENCODER}": native.text_encoder, f"qwen3_vl/{bw.QWEN3VL}": tiny.qwen3vl,
             f"diffusers/{bw.DIFFUSERS}": tiny.qwen_image}
    for rel, target in links.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).symlink_to(target)
    d = _config_width(tiny.qwen3vl, "text_config")
    h_tiny = _config_width(tiny.qwen_image / "text_encoder", "text_config")
    (root / "loras").mkdir()
    _tiny_lora(root / "loras" / bw.LIGHTNING_LORA)
    (root / "identity_heads").mkdir()
    _random_head(root / "identity_heads" / bw.HEAD, d, 3584)
    _random_head(root / "identity_heads" / TINY_DIFFUSERS_HEAD, d, h_tiny, seed=1)
    tiny21 = build_tiny_models(tmp_path_factory.mktemp("tiny_models_21"), family="qwen-image-2.1")
    (root / "diffusers" / bw.DIFFUSERS_21).symlink_to(tiny21.qwen_image)
    h21 = _config_width(tiny21.qwen_image / "text_encoder", "text_config")
    _random_head(root / "identity_heads" / TINY_21_HEAD, d, h21, seed=2, family="qwen-image-2.1")
    return root


def _photos(input_dir: Path):
    """Real face photos (the workflows crop the face, the default): Grace Hopper, as shipped by matplotlib,
    at 256x300 (face box about 107 px), flipped and shifted for the other views."""
    from PIL import Image

    from real_faces import grace_hopper

    input_dir.mkdir(parents=True, exist_ok=True)
    face = grace_hopper().resize((256, 300), Image.Resampling.LANCZOS)
    views = [face, face.transpose(Image.Transpose.FLIP_LEFT_RIGHT), face.crop((16, 0, 256, 300))]
    for view, name in zip(views, bw.PHOTOS):
        view.save(input_dir / name)
    # person A's name is written above (Grace Hopper); person B's name (the shipped Grace Hopper crop) gets another
    # real person instead: the shipped example photo of Eileen Collins
    other = Image.open(ROOT / "example_photos" / bw.PHOTOS[1]).convert("RGB")
    for name in bw.PEOPLE_PHOTOS:
        if name not in bw.PHOTOS:
            other.save(input_dir / name)


def _server_env(base: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE / "netguard"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["HF_HUB_OFFLINE"] = env["TRANSFORMERS_OFFLINE"] = "1"
    env["HOME"] = str(base)  # comfy-cli / HF caches stay inside the test
    return env


@pytest.fixture(scope="module")
def server(models_dir, tmp_path_factory):
    from comfyui_harness.server import start

    base = tmp_path_factory.mktemp("comfy_base")
    _photos(base / "input")
    srv = start(comfyui_dir(), packs={PACK_LINK: ROOT, "qwen_identity_test_pack": TEST_PACK}, base_dir=base,
                models_dir=models_dir, env=_server_env(base))
    print(f"ComfyUI up in {srv.startup_s} s at {srv.url} (log {srv.log})")
    try:
        yield srv
    finally:
        srv.stop()


def _pack_defs() -> dict:
    from qwen_identity.nodes import NODE_CLASS_MAPPINGS

    return NODE_CLASS_MAPPINGS


def tiny_api(path: Path) -> dict:
    """A copy of a committed API workflow made runnable on the tiny stand-ins."""
    wf = copy.deepcopy(load_api_workflow(path))
    for node in wf.values():
        t, inputs = node["class_type"], node["inputs"]
        if t == "CLIPLoader":
            node["class_type"] = "TinyQwenImageCLIPLoader"
            inputs.pop("device", None)
        if t in ("QwenImageSampleFromEmbeds", "EmptySD3LatentImage", "TwoPersonRegions"):
            inputs["width"] = inputs["height"] = SIZE
        if "steps" in inputs:
            inputs["steps"] = STEPS
        if t == "TrainIdentityHead":
            inputs["resolution"] = TRAIN_RESOLUTION
        if t == "QwenImageAccelerate":
            inputs["backend"] = "eager"   # compiling on 2 CPU cores costs minutes; the hook path stays the same
    if any(n["class_type"] == "LoadQwenImageDiffusers" for n in wf.values()):
        is_21 = any(n["inputs"].get("model") == bw.DIFFUSERS_21 for n in wf.values()
                    if n["class_type"] == "LoadQwenImageDiffusers")
        for node in wf.values():
            if node["class_type"] == "LoadResidualHead":
                node["inputs"]["head_name"] = TINY_21_HEAD if is_21 else TINY_DIFFUSERS_HEAD
    return wf


def _assert_ok(res: QueueResult):
    assert res.ok, res.summary()


def skip_if_server_lacks_what_it_needs(server, stem: str):
    """Skip, saying why, when workflow `stem` needs a newer ComfyUI (build_workflows.NEEDS_COMFYUI) whose nodes
    this server does not have. Only those workflows may skip: for any other, a missing node is a failure."""
    if stem not in bw.NEEDS_COMFYUI:
        return
    from comfyui_harness.core_snapshot import comfyui_version

    release, nodes = bw.NEEDS_COMFYUI[stem]
    missing = [n for n in nodes if n not in server.object_info]
    if missing:
        reason = (f"{stem} needs ComfyUI >= {release}: this ComfyUI {comfyui_version(comfyui_dir())} has no "
                  f"{', '.join(missing)}, so it is not loaded here; tests/test_workflows.py checks it against "
                  f"ComfyUI {release}'s node definitions written from its source")
        print(reason)
        pytest.skip(reason)


# ---- the server and the pack ----------------------------------------------------------------------

def test_pack_imports_without_failure(server):
    log = server.log_text()
    failed = [p for p in server.import_failures() if PACK_LINK in p or "test_pack" in p]
    assert not failed, log[-4000:]
    assert f"Cannot import {server.base_dir}" not in log, log[-4000:]
    assert f"custom_nodes/{PACK_LINK}" in log  # listed under "Import times for custom nodes"


def test_all_pack_nodes_in_object_info_with_documented_inputs(server):
    secs = all_sections()  # README.md and every docs/*.md page
    info = server.object_info
    undocumented = []
    for name, cls in _pack_defs().items():
        assert name in info, f"{name} missing from /object_info"
        live, ours = info[name], node_def_from_class(cls)
        assert live["category"] == "Qwen Identity"
        assert live["input_order"] == ours["input_order"] and live["output"] == ours["output"]
        assert live["output_name"] == ours["output_name"]
        assert live.get("description"), f"{name} has no DESCRIPTION"
        for sec in ("required", "optional"):
            for inp, spec in live["input"].get(sec, {}).items():
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{name}.{inp} has no tooltip"
        primary, extra = node_reference(name, secs)
        if len(primary) != 1:
            undocumented.append(f"{name}: needs exactly one '## {name}' section in docs/*.md")
            continue
        section = "".join(s.body for s in primary + extra)
        for sec in ("required", "optional"):
            undocumented += [f"{name}.{inp}" for inp in live["input"].get(sec, {}) if f"`{inp}`" not in section]
    assert not undocumented, "docs/ does not document: " + "; ".join(undocumented)


def test_core_node_snapshot_matches_the_live_server(server):
    """This ComfyUI release's core-node snapshot is what its server really serves (file lists aside); the
    first release's snapshot is the one the offline workflow checks validate against, and
    tests/test_core_node_snapshots.py checks the others agree with it where the workflows rely on them."""
    from comfyui_harness.core_snapshot import comfyui_version
    from comfyui_harness.workflow_format import snapshot_path

    version = comfyui_version(comfyui_dir())
    assert snapshot_path(version).is_file(), (
        f"no core-node snapshot for ComfyUI {version}: write it with `cd tests && COMFYUI_DIR=... "
        f"<that ComfyUI's venv>/bin/python -m comfyui_harness.core_snapshot` and commit it")
    for name, snap in core_node_defs(version).items():
        live = server.object_info[name]
        for key in ("input_order", "output", "output_name"):
            assert live[key] == snap[key], (name, key)
        for sec, specs in snap["input"].items():
            for inp, spec in specs.items():
                got = live["input"][sec][inp]
                if isinstance(spec[0], list) and (not spec[0] or name.endswith("Loader")):
                    # a folder listing (the snapshot server had no models; this one has): same options,
                    # the snapshot's fixed entries (e.g. VAELoader's pixel_space) still there
                    assert isinstance(got[0], list) and set(spec[0]) <= set(got[0]), (name, inp)
                    assert got[1:] == spec[1:], (name, inp)
                    continue
                assert got == spec, (name, inp)


def test_autogrow_input_of_the_0_38_definitions_is_laid_out_as_a_live_server_serves_one(server):
    """The hand-written TextEncodeQwenImage21 (comfyui_0.38_nodes_from_source.json) describes its Autogrow
    `images` input as ComfyUI's /object_info does: where this server has TextEncodeQwenImage21 itself, the whole
    entry must match; else every Autogrow input built from the same template (IMAGE sockets image_1..image_16,
    min 0: in ComfyUI 0.33.0 TextEncodeMageFlowEdit.images and TextEncodeBooguEdit.images) must be served exactly as
    written there, tooltip aside. A ComfyUI without Autogrow inputs (0.3.64) skips, saying so."""
    from comfyui_harness.workflow_format import AUTOGROW, source_node_defs

    ours = source_node_defs("0.38")["TextEncodeQwenImage21"]
    info = server.object_info
    if "TextEncodeQwenImage21" in info:
        live = info["TextEncodeQwenImage21"]
        for key in ("input_order", "output", "output_name", "output_is_list"):
            assert live[key] == ours[key], key
        assert live["input"] == ours["input"]
        return
    spec = ours["input"]["required"]["images"]
    grow = {(name, inp): (sec, live_spec) for name, d in info.items() for sec in ("required", "optional")
            for inp, live_spec in (d.get("input", {}).get(sec) or {}).items() if live_spec[0] == AUTOGROW}
    if not grow:
        pytest.skip("this ComfyUI has no Autogrow (COMFY_AUTOGROW_V3) input to compare the 0.38 definitions with")
    same = {k: v for k, v in grow.items() if len(v[1]) > 1 and v[1][1].get("template") == spec[1]["template"]}
    assert same, f"no live Autogrow input has the template {spec[1]['template']}; live ones: {sorted(grow)}"
    print(f"Autogrow inputs with TextEncodeQwenImage21.images' template here: {sorted(same)}")
    for (name, inp), (sec, live_spec) in same.items():
        assert sec == "required" and live_spec[0] == spec[0], (name, inp, sec)
        assert {k: v for k, v in live_spec[1].items() if k != "tooltip"} == {
            k: v for k, v in spec[1].items() if k != "tooltip"}, (name, inp)


def test_ui_workflows_are_in_the_template_browser_and_api_twins_are_not(server):
    listed = server.get_json("/workflow_templates")
    assert sorted(listed.get(PACK_LINK, [])) == sorted(bw.WORKFLOW_FILES)
    for stem in bw.WORKFLOW_FILES:
        served = server.get_json(f"/api/workflow_templates/{PACK_LINK}/{stem}.json")
        assert served == json.loads((WF_DIR / f"{stem}.json").read_text())


# ---- API workflows -------------------------------------------------------------------------------

@pytest.mark.parametrize("path", API_FILES, ids=lambda p: p.stem)
def test_api_workflow_runs_and_writes_images(server, path):
    skip_if_server_lacks_what_it_needs(server, path.stem.removesuffix("_api"))
    res = queue_prompt(server.url, tiny_api(path), timeout=600)
    _assert_ok(res)
    stem = path.stem.removesuffix("_api")
    images = [i for i in res.images() if i["type"] == "output"]  # PreviewImage writes temp files
    assert len(images) == EXPECTED_IMAGES[stem], res.summary()
    for img in images:
        f = server.base_dir / "output" / img["subfolder"] / img["filename"]
        assert f.is_file() and f.stat().st_size > 0
    if stem == "qwen_identity_alpha_grid":  # 3 α rows x 3 seed columns of 32 px cells, plus labels
        from PIL import Image

        with Image.open(server.base_dir / "output" / images[0]["subfolder"] / images[0]["filename"]) as im:
            assert im.width >= 3 * SIZE and im.height >= 3 * SIZE


def test_personalize_saves_the_head_and_a_requeue_does_not_train_again(server, models_dir):
    """TrainIdentityHead writes models/identity_heads/my_person.safetensors, LoadResidualHead lists it, and the
    same prompt queued again is answered from ComfyUI's cache (the node is not run, the file not rewritten)."""
    wf = tiny_api(WF_DIR / "api" / "qwen_identity_personalize_api.json")
    train_id = next(k for k, n in wf.items() if n["class_type"] == "TrainIdentityHead")
    _assert_ok(queue_prompt(server.url, wf, timeout=600))
    saved = models_dir / "identity_heads" / f"{bw.PERSONAL_HEAD}.safetensors"
    assert saved.is_file()
    stamp = saved.stat().st_mtime_ns
    again = queue_prompt(server.url, copy.deepcopy(wf), timeout=600)
    _assert_ok(again)
    cached = [n for m in again.body["status"]["messages"] if m[0] == "execution_cached" for n in m[1]["nodes"]]
    assert train_id in cached, again.body["status"]["messages"]
    assert saved.stat().st_mtime_ns == stamp
    info = json.loads(urllib.request.urlopen(server.url + "/object_info/LoadResidualHead", timeout=30).read())
    names = info["LoadResidualHead"]["input"]["required"]["head_name"][0]
    assert f"{bw.PERSONAL_HEAD}.safetensors" in names


def _comfy_cli(server, args: list, cwd: Path, timeout: int = 400) -> subprocess.CompletedProcess:
    comfy = Path(sys.executable).with_name("comfy")
    assert comfy.is_file(), "comfy-cli is not installed in this venv (scripts/setup_comfyui.sh installs it)"
    return subprocess.run([str(comfy), "--skip-prompt", "--no-json", "--workspace", str(comfyui_dir()), "run",
                           *args, "--host", "127.0.0.1", "--port", str(server.port)],
                          capture_output=True, text=True, timeout=timeout, env=_server_env(cwd), cwd=cwd)


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_comfy_cli_converts_each_ui_file_to_its_api_twin(server, path, tmp_path):
    skip_if_server_lacks_what_it_needs(server, path.stem)
    out = _comfy_cli(server, ["--workflow", str(path), "--print-prompt"], tmp_path, timeout=120)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    printed = json.loads(out.stdout[out.stdout.index("{"):])
    assert strip_meta(printed) == strip_meta(load_api_workflow(WF_DIR / "api" / f"{path.stem}_api.json"))


def test_comfy_cli_runs_a_workflow_headless(server, tmp_path):
    wf = tiny_api(WF_DIR / "api" / "qwen_identity_native_ksampler_api.json")
    next(n for n in wf.values() if n["class_type"] == "KSampler")["inputs"]["seed"] = 4321  # not a cache hit
    f = tmp_path / "wf.json"
    f.write_text(json.dumps(wf))
    before = set((server.base_dir / "output").rglob("*.png"))
    out = _comfy_cli(server, ["--workflow", str(f), "--wait", "--timeout", "300"], tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert set((server.base_dir / "output").rglob("*.png")) - before, out.stdout[-2000:]


def test_readme_curl_command_queues_a_workflow(server, tmp_path):
    """README's `curl -X POST .../prompt -d "{\"prompt\": $(cat FILE)}"`, then /history with curl."""
    if shutil.which("curl") is None:
        pytest.fail("curl is not installed")
    wf = tiny_api(WF_DIR / "api" / "qwen_identity_native_ksampler_api.json")
    next(n for n in wf.values() if n["class_type"] == "KSampler")["inputs"]["seed"] = 999  # not a cache hit
    (tmp_path / "wf.json").write_text(json.dumps(wf))
    cmd = (f"curl -s -X POST {server.url}/prompt -H 'Content-Type: application/json' "
           "-d \"{\\\"prompt\\\": $(cat wf.json)}\"")
    out = subprocess.run(["bash", "-c", cmd], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    answer = json.loads(out.stdout)
    assert answer.get("node_errors") == {} and answer.get("prompt_id"), out.stdout
    from comfyui_harness.prompt_queue import wait_for

    res = wait_for(server.url, answer["prompt_id"], time.time(), 300)
    _assert_ok(res)
    hist = subprocess.run(["curl", "-s", f"{server.url}/history/{answer['prompt_id']}"], capture_output=True,
                          text=True, timeout=60)
    assert json.loads(hist.stdout)[answer["prompt_id"]]["status"]["status_str"] == "success"


def _latent_of(server, wf: dict, prefix: str):
    """Run `wf` with its KSampler's latent saved (SaveLatent) instead of decoded (and no mask preview);
    return the latent."""
    from safetensors.torch import load_file

    wf = copy.deepcopy(wf)
    for nid in [k for k, n in wf.items() if n["class_type"] in ("VAEDecode", "SaveImage", "MaskPreview")]:
        del wf[nid]
    ks = next(k for k, n in wf.items() if n["class_type"] == "KSampler")
    wf["900"] = {"class_type": "SaveLatent", "inputs": {"samples": [ks, 0], "filename_prefix": f"regions/{prefix}"}}
    _assert_ok(queue_prompt(server.url, wf, timeout=600))
    files = sorted((server.base_dir / "output" / "regions").glob(f"{prefix}_*.latent"))
    assert files, prefix
    return load_file(str(files[-1]))["latent_tensor"]


def test_two_people_workflow_puts_each_person_in_their_region(server):
    """The shipped two-people workflow at one step with a hard border: the left half of the result is
    exactly person A's single-person run there, the right half person B's."""
    wf = tiny_api(WF_DIR / "api" / "qwen_identity_two_people_api.json")
    ks = next(n for n in wf.values() if n["class_type"] == "KSampler")
    ks["inputs"]["steps"] = 1
    regions_id = next(k for k, n in wf.items() if n["class_type"] == "TwoPersonRegions")
    wf[regions_id]["inputs"]["feather"] = 0
    pair = _latent_of(server, wf, "pair")
    alone = {}
    for who, slot in (("a", "conditioning_a"), ("b", "conditioning_b")):
        single = copy.deepcopy(wf)
        k = next(k for k, n in single.items() if n["class_type"] == "KSampler")
        single[k]["inputs"]["positive"] = single[regions_id]["inputs"][slot]   # that person's InjectResidual
        del single[regions_id]
        alone[who] = _latent_of(server, single, who)
    half = SIZE // 16                                   # latent columns of the left half
    left, right = (..., slice(0, half)), (..., slice(half, None))
    assert pair.shape == alone["a"].shape and pair.shape[-1] == SIZE // 8
    off = [float((pair[h] - alone[w][h]).abs().max()) for h, w in ((left, "a"), (right, "b"))]
    apart = [float((alone["a"] - alone["b"])[h].abs().mean()) for h in (left, right)]
    print(f"two people in the server: region vs own single run max |diff| {off}; A vs B mean |diff| {apart}")
    # batched differently (A, B, negative vs A, negative): rounding-level differences (measured ~2e-5)
    # against people that differ by far more in the same place (~0.045)
    assert max(off) < 2e-4 and min(apart) > 50 * 2e-4, (off, apart)


# ---- UI workflows in the browser ------------------------------------------------------------------

@pytest.fixture(scope="module")
def frontend(server):
    chromium = chromium_path()
    if chromium is None:
        pytest.fail("no system chromium: apt-get install -y chromium (never `playwright install`)")
    from comfyui_harness.browser import Frontend

    with Frontend(server.url, chromium) as fe:
        yield fe


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_ui_workflow_drops_onto_the_canvas_without_missing_nodes(server, frontend, path, tmp_path):
    skip_if_server_lacks_what_it_needs(server, path.stem)
    rep = frontend.load_workflow(path, via="drop", screenshot=tmp_path / f"{path.stem}.png", export_api=True)
    summary = {k: rep.get(k) for k in ("missing_node_types", "missing_dialog", "schema_alert", "dialogs",
                                       "toasts", "unexpected_errors")}
    assert rep["missing_node_types"] == [] and not rep["missing_dialog"] and not rep["schema_alert"], summary
    assert not rep["unexpected_errors"], summary
    ui = json.loads(path.read_text())
    assert sorted(rep["graph_nodes"]) == sorted(n["type"] for n in ui["nodes"])
    # the frontend's own UI -> API conversion gives exactly the committed API twin
    twin = load_api_workflow(WF_DIR / "api" / f"{path.stem}_api.json")
    assert strip_meta(rep["exported_api"]) == strip_meta(twin)


def test_ui_workflow_is_queued_from_the_page(frontend):
    edits = {"LoadResidualHead": {"head_name": TINY_DIFFUSERS_HEAD},
             "QwenImageSampleFromEmbeds": {"steps": STEPS, "width": SIZE, "height": SIZE}}
    rep = frontend.load_workflow(WF_DIR / "qwen_identity_diffusers.json", via="drop", queue=True, edits=edits)
    assert rep["queue_http_status"] == 200, rep.get("queue_response")
    assert rep["run_status"] == "success", rep.get("run_error")
    assert any(o.get("images") for o in rep["run_outputs"].values())


# ---- errors users will meet ------------------------------------------------------------------------

def test_missing_head_file_says_where_heads_go(server):
    wf = tiny_api(WF_DIR / "api" / "qwen_identity_native_ksampler_api.json")
    head = next(n for n in wf.values() if n["class_type"] == "LoadResidualHead")
    head["inputs"]["head_path"] = "/nonexistent/my_head.safetensors"
    res = queue_prompt(server.url, wf, timeout=300)
    assert not res.ok
    msg = res.error_message()
    assert "my_head.safetensors" in msg and "identity_heads" in msg, msg


def test_head_not_matching_the_model_names_both_sizes(server):
    wf = tiny_api(WF_DIR / "api" / "qwen_identity_native_ksampler_api.json")
    next(n for n in wf.values() if n["class_type"] == "LoadResidualHead")["inputs"]["head_name"] = TINY_DIFFUSERS_HEAD
    res = queue_prompt(server.url, wf, timeout=300)
    assert res.stage == "execution", res.summary()
    msg = res.error_message()
    assert "3584" in msg and "head" in msg, msg
    assert res.execution_error["node_type"] == "InjectResidual"


def test_node_info_pages_are_served_and_shown(server, frontend, tmp_path):
    """ComfyUI's node info panel: the server serves web/docs/<Node>.md at the URL the frontend (1.27.x)
    derives from the node's python_module, and pressing a node's info button shows that page. (It uses the
    module's browser: Playwright's sync API cannot start a second one while the fixture's is open.)"""
    import urllib.request

    srv = server
    web_docs = ROOT / "web" / "docs"
    for name in _pack_defs():
        # the frontend's extractCustomNodeName: python_module "custom_nodes.<folder>" -> <folder>
        module = srv.object_info[name]["python_module"]
        assert module == f"custom_nodes.{PACK_LINK}", module
        with urllib.request.urlopen(f"{srv.url}/extensions/{PACK_LINK}/docs/{name}.md", timeout=30) as r:
            assert r.status == 200
            assert r.read().decode("utf-8") == (web_docs / f"{name}.md").read_text(encoding="utf-8"), name
    rep = frontend.node_help("InjectResidual", screenshot=tmp_path / "node_info.png")
    summary = {k: rep.get(k) for k in ("docs_requests", "unexpected_errors")}
    assert f"200 {srv.url}/extensions/{PACK_LINK}/docs/InjectResidual.md" in rep["docs_requests"], summary
    text = rep["panel_text"]
    # sentences only the generated page has (not the node's DESCRIPTION, the panel's fallback)
    assert "To push away from a person, use the same node on the negative conditioning instead." in text, text[:800]
    assert "Strength (α) semantics and the step window" in text, text[:800]
    assert not rep["unexpected_errors"], summary


def test_empty_models_folder_names_every_missing_file(tmp_path):
    """A fresh ComfyUI with nothing in models/: queuing a shipped workflow as is fails validation, and each
    loader's error names the file it wanted and where the pack looks."""
    require_comfyui()
    from comfyui_harness.server import start_server

    (tmp_path / "input").mkdir()
    _photos(tmp_path / "input")
    with start_server(comfyui_dir(), packs={PACK_LINK: ROOT}, base_dir=tmp_path, env=_server_env(tmp_path)) as srv:
        res = queue_prompt(srv.url, load_api_workflow(WF_DIR / "api" / "qwen_identity_alpha_grid_api.json"))
    assert res.stage == "validation" and res.body["error"]["type"] == "prompt_outputs_failed_validation", res.summary()
    msg = res.error_message()
    for wanted in (bw.UNET, bw.TEXT_ENCODER, bw.VAE, bw.QWEN3VL, bw.HEAD):
        assert wanted in msg, (wanted, msg)
    assert "models/identity_heads" in msg and "model_path" in msg, msg
    print(msg)


def test_a_fresh_comfyui_lists_the_example_photos_the_workflows_open_with(tmp_path):
    """First start with an empty input folder: the pack copies its example photos there, so LoadImage lists
    every photo the workflows name (both people of the two-people workflow included) and none shows missing."""
    from comfyui_harness.server import start

    require_comfyui()
    base = tmp_path / "fresh"
    srv = start(comfyui_dir(), packs={PACK_LINK: ROOT}, base_dir=base, env=_server_env(base))
    try:
        listed = srv.object_info["LoadImage"]["input"]["required"]["image"][0]
        assert set(bw.SHIPPED_PHOTOS) <= set(listed), listed
        for name in bw.SHIPPED_PHOTOS:
            assert (base / "input" / name).read_bytes() == (ROOT / "example_photos" / name).read_bytes()
    finally:
        srv.stop()
