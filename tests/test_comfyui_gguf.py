"""The pack with a GGUF-quantized Qwen-Image loaded by city96's ComfyUI-GGUF, in a real ComfyUI.

Users with 16 GB or less load Qwen-Image as GGUF through ComfyUI-GGUF's `UnetLoaderGGUF`: its MODEL keeps
the weights as quantized blocks (`GGMLTensor` parameters) and dequantizes each layer's weight when the layer
runs. These tests load the one-layer full-width random Qwen-Image of comfyui_harness/tiny_native.py,
written as a Q8_0 GGUF file (comfyui_harness/tiny_gguf.py), through that pack, and check
- in a server with both packs linked in: InjectResidual's conditioning reaches the GGUF model under
  ComfyUI's KSampler, QwenImageSampleFromEmbeds samples the GGUF MODEL and gives KSampler's image, and the
  GGUF model gives the bf16 file's result up to quantization error;
- in this process: what QwenImageAccelerate does with GGUF weights.

ComfyUI-GGUF is a vendored test fixture (see comfyui_harness/tiny_gguf.py): without it these tests skip
and say where it goes.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import pytest

from comfyui_harness.env import comfyui_dir, import_comfy_in_process, require_comfyui
from comfyui_harness.prompt_queue import queue_prompt
from comfyui_harness import tiny_gguf

pytestmark = pytest.mark.comfyui

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
PACK_LINK = "comfyui-qwen-identity"
GGUF_LINK = "ComfyUI-GGUF"
TEST_PACK = HERE / "comfyui_harness" / "test_pack"
QTYPE = "Q8_0"
GGUF_FILE = f"qwen_image_tiny_{QTYPE}.gguf"
BF16_FILE = "qwen_image_tiny_bf16.safetensors"
VAE_FILE = "qwen_image_vae_random.safetensors"
TE_FILE = "qwen_image_te_tiny.safetensors"
QWEN3VL = "Qwen3-VL-tiny"
HEAD = "gguf_test_head.safetensors"
# one step at CFG 1 (the negative is skipped, as with a Lightning LoRA): every GGUF model call dequantizes
# the full-width layer's ~350 M weights on the CPU
SIZE, STEPS, CFG, SEED = 32, 1, 1.0, 77


@pytest.fixture(scope="module")
def gguf_pack(tmp_path_factory) -> Path:
    """The ComfyUI-GGUF folder (unpacked from the vendored tarball)."""
    require_comfyui()
    source = tiny_gguf.find_comfyui_gguf()
    if source is None:
        reason = f"ComfyUI-GGUF is not here: {tiny_gguf.HOW_TO_GET}"
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    return tiny_gguf.unpack_comfyui_gguf(source, tmp_path_factory.mktemp("comfyui_gguf"))


@pytest.fixture(scope="module")
def models_dir(gguf_pack, tmp_path_factory) -> Path:
    """models/ with the tiny transformer as GGUF and as bf16 safetensors, VAE, text encoder, Qwen3-VL, head."""
    import_comfy_in_process()
    from comfyui_harness.tiny_native import build_native_models
    from qwen_identity.tiny_models import build_tiny_models

    native = build_native_models()
    tiny = build_tiny_models(tmp_path_factory.mktemp("tiny_models"))
    root = tmp_path_factory.mktemp("gguf_models")
    counts = tiny_gguf.write_gguf(native.transformer, root / "diffusion_models" / GGUF_FILE, QTYPE)
    print(f"{GGUF_FILE}: {counts}, {(root / 'diffusion_models' / GGUF_FILE).stat().st_size / 2**20:.0f} MiB")
    assert counts.get(QTYPE, 0) >= 10, counts     # the block weights really are quantized
    for rel, target in {f"diffusion_models/{BF16_FILE}": native.transformer, f"vae/{VAE_FILE}": native.vae,
                        f"text_encoders/{TE_FILE}": native.text_encoder, f"qwen3_vl/{QWEN3VL}": tiny.qwen3vl}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).symlink_to(target)
    _random_head(root / "identity_heads" / HEAD, tiny.qwen3vl)
    return root


def _random_head(path: Path, qwen3vl: Path, tokens: int = 4) -> None:
    import json

    import torch

    from qwen_identity.core.residual.head import HeadMeta, ResidualHead, save_head

    d = int(json.loads((qwen3vl / "config.json").read_text())["text_config"]["hidden_size"])
    head = ResidualHead(d, tokens, 3584, HeadMeta(feature_dim=d, tokens=tokens, hidden_size=3584,
                                                  qwen3_vl_model="tiny-qwen3-vl"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        head.proj.weight.copy_(torch.randn(head.proj.weight.shape, generator=g) * 0.05)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_head(head, path)


@pytest.fixture
def server(gguf_pack, models_dir, tmp_path_factory):
    """A ComfyUI server with the pack, the test pack and ComfyUI-GGUF linked in (for one test: it is stopped
    before the in-process tests load their models)."""
    from comfyui_harness.server import start
    from qwen_identity.tiny_models.dataset import identity_photo

    base = tmp_path_factory.mktemp("comfy_base_gguf")
    (base / "input").mkdir(parents=True)
    identity_photo(0, 0, (64, 80)).save(base / "input" / "person.png")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE / "netguard"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["HF_HUB_OFFLINE"] = env["TRANSFORMERS_OFFLINE"] = "1"
    env["HOME"] = str(base)
    srv = start(comfyui_dir(), packs={PACK_LINK: ROOT, "qwen_identity_test_pack": TEST_PACK, GGUF_LINK: gguf_pack},
                base_dir=base, models_dir=models_dir, env=env)
    try:
        yield srv
    finally:
        srv.stop()


class Prompt:
    """An API prompt built node by node; inputs not given take their defaults from the live /object_info,
    so the test keeps up with new optional settings of the pack's nodes."""

    def __init__(self, object_info: dict):
        self.info, self.nodes = object_info, {}

    def add(self, class_type: str, **inputs) -> str:
        spec = self.info[class_type]["input"]
        for name, s in spec.get("required", {}).items():
            if name not in inputs and len(s) > 1 and isinstance(s[1], dict) and "default" in s[1]:
                inputs[name] = s[1]["default"]
        nid = str(len(self.nodes) + 1)
        self.nodes[nid] = {"class_type": class_type, "inputs": inputs}
        return nid


def _out(nid: str, i: int = 0) -> list:
    return [nid, i]


def _load_png(path: Path):
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def test_gguf_model_from_comfyui_gguf_runs_inject_residual_and_sample_from_embeds(server):
    """One prompt on the server: UnetLoaderGGUF's MODEL under ComfyUI's KSampler with and without
    InjectResidual's conditioning, and under QwenImageSampleFromEmbeds with it."""
    from safetensors.torch import load_file

    assert not [p for p in server.import_failures() if GGUF_LINK in p or PACK_LINK in p], server.log_text()[-3000:]
    assert GGUF_FILE in server.object_info["UnetLoaderGGUF"]["input"]["required"]["unet_name"][0]
    p = Prompt(server.object_info)
    photo = p.add("LoadImage", image="person.png")
    vl = p.add("LoadQwen3VL", model=QWEN3VL, device="cpu")
    # the test photo is a random pattern, not a face: crop the centre where the node has the face crop
    inputs = server.object_info["ExtractIdentityFeatures"]["input"]
    crop = {"crop": "center"} if any("crop" in inputs.get(sec, {}) for sec in ("required", "optional")) else {}
    ident = p.add("ExtractIdentityFeatures", qwen3vl=_out(vl), images=_out(photo), **crop)
    head = p.add("LoadResidualHead", head_name=HEAD)
    gguf = p.add("ModelSamplingAuraFlow", shift=3.1, model=_out(p.add("UnetLoaderGGUF", unet_name=GGUF_FILE)))
    clip = p.add("TinyQwenImageCLIPLoader", clip_name=TE_FILE, type="qwen_image")
    vae = p.add("VAELoader", vae_name=VAE_FILE)
    pos = p.add("CLIPTextEncode", text="a portrait photo of a person", clip=_out(clip))
    neg = p.add("CLIPTextEncode", text="blurry", clip=_out(clip))
    injected = p.add("InjectResidual", conditioning=_out(pos), head=_out(head), identity=_out(ident), strength=1.0)
    latent = p.add("EmptySD3LatentImage", width=SIZE, height=SIZE, batch_size=1)
    ksamplers = {}
    for name, cond in (("identity", injected), ("plain", pos)):
        ksamplers[name] = p.add("KSampler", model=_out(gguf), positive=_out(cond), negative=_out(neg),
                                latent_image=_out(latent), seed=SEED, steps=STEPS, cfg=CFG, sampler_name="euler",
                                scheduler="simple", denoise=1.0)
        p.add("SaveLatent", samples=_out(ksamplers[name]), filename_prefix=f"gguf/{name}")
    p.add("SaveImage", images=_out(p.add("VAEDecode", samples=_out(ksamplers["identity"]), vae=_out(vae))),
          filename_prefix="gguf/ksampler")
    sfe = p.add("QwenImageSampleFromEmbeds", positive=_out(injected), negative=_out(neg), model=_out(gguf),
                vae=_out(vae), seeds=str(SEED), steps=STEPS, cfg=CFG, width=SIZE, height=SIZE,
                sampler_name="euler", scheduler="simple", speed="standard")
    p.add("SaveImage", images=_out(sfe), filename_prefix="gguf/sample_from_embeds")

    res = queue_prompt(server.url, p.nodes, timeout=900)
    assert res.ok, res.summary()
    assert f"{QTYPE} (" in server.log_text(), "ComfyUI-GGUF did not report loading Q8_0 tensors"
    out = server.base_dir / "output" / "gguf"
    lat = {name: load_file(str(next(out.glob(f"{name}_*.latent"))))["latent_tensor"] for name in ksamplers}
    identity_effect = float((lat["identity"] - lat["plain"]).abs().mean())
    a, b = _load_png(next(out.glob("ksampler_*.png"))), _load_png(next(out.glob("sample_from_embeds_*.png")))
    image_diff = int(abs(a - b).max())
    print(f"GGUF {QTYPE} in the server: InjectResidual changes the latent by {identity_effect:.3g} (mean |diff|); "
          f"QwenImageSampleFromEmbeds vs KSampler image max diff {image_diff}/255")
    assert identity_effect > 1e-4, "InjectResidual's conditioning did not change the GGUF model's result"
    # the pack's own sampler on the GGUF MODEL gives ComfyUI's KSampler image (8-bit PNG rounding aside)
    assert a.shape == b.shape == (SIZE, SIZE, 3) and image_diff <= 2, image_diff


# ---- the same GGUF model in this process: against its bf16 file, and under QwenImageAccelerate ---------------

def _import_gguf_pack(folder: Path):
    """ComfyUI-GGUF imported as ComfyUI imports a custom node folder (a package named after the folder)."""
    import importlib.util

    name = "comfyui_gguf_under_test"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, folder / "__init__.py", submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _sdpa(model):
    """A clone attending with SDPA, as on a GPU: on a CPU ComfyUI's sub-quadratic attention reads the free
    memory on every call, and compiled code would guard on that number (tests/test_native_acceleration.py)."""
    from comfy.ldm.modules.attention import attention_pytorch

    m = model.clone()
    m.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = (
        lambda func, *args, **kwargs: attention_pytorch(*args, **kwargs))
    return m


@pytest.fixture(scope="module")
def in_process(gguf_pack, models_dir):
    """(GGUF MODEL loaded by ComfyUI-GGUF's UnetLoaderGGUF, the bf16 file's MODEL, VAE, two conditionings)."""
    import comfy.sd
    import comfy.utils
    import folder_paths
    import torch

    pack = _import_gguf_pack(gguf_pack)
    folder_paths.add_model_folder_path("diffusion_models", str(models_dir / "diffusion_models"))
    (gguf,) = pack.NODE_CLASS_MAPPINGS["UnetLoaderGGUF"]().load_unet(GGUF_FILE)
    bf16 = comfy.sd.load_diffusion_model(str(models_dir / "diffusion_models" / BF16_FILE))
    vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(models_dir / "vae" / VAE_FILE)))
    g = torch.Generator().manual_seed(0)
    conds = [[[torch.randn(1, 6, 3584, generator=g), {"pooled_output": None}]] for _ in range(2)]
    yield _sdpa(gguf), _sdpa(bf16), vae, conds
    torch._dynamo.reset()


def _sample(model, vae, cond):
    """One image, in inference mode as ComfyUI runs every node."""
    import torch

    from qwen_identity.nodes import native_sampling as ns

    with torch.inference_mode():
        return ns.sample_native(model, vae, cond, cond, [SEED], STEPS, CFG, SIZE, SIZE, progress=lambda d, t: None)


_EAGER: dict = {}


def _eager_gguf_image(in_process):
    """The GGUF model's eager image for the first conditioning (made once: each GGUF call is slow on a CPU)."""
    if "a" not in _EAGER:
        gguf, _, vae, (cond_a, _) = in_process
        _EAGER["a"] = _sample(gguf, vae, cond_a)
    return _EAGER["a"]


def test_gguf_model_is_its_bf16_file_up_to_quantization(in_process):
    """The GGUF weights are the ones used (the image differs from the bf16 file's) and they are the same
    model up to Q8_0 rounding: far closer to the bf16 image than another prompt's image is."""
    gguf, bf16, vae, (cond_a, cond_b) = in_process
    a_gguf, a_bf16, b_gguf = _eager_gguf_image(in_process), _sample(bf16, vae, cond_a), _sample(gguf, vae, cond_b)
    quantization = float((a_gguf - a_bf16).abs().mean())
    prompt_effect = float((a_gguf - b_gguf).abs().mean())
    print(f"GGUF {QTYPE} vs bf16 file: mean |image diff| {quantization:.3g}; another prompt: {prompt_effect:.3g}")
    assert 0 < quantization < prompt_effect / 4, (quantization, prompt_effect)


def test_accelerator_on_gguf_weights(in_process, caplog):
    """What QwenImageAccelerate does with ComfyUI-GGUF's quantized weights (docs/comfyui-compat.md quotes it):
    the blocks are compiled, dequantization included (torch >= 2.8; ComfyUI-GGUF then allows it), with no
    eager fallback and the eager image. Dynamo's graph is run as is (backend "eager"): tracing is what GGUF
    could break; Inductor's code generation is the GPU bench's business."""
    import torch

    from qwen_identity.nodes import native_acceleration as na

    gguf, _, vae, (cond, _) = in_process
    eager = _eager_gguf_image(in_process)
    torch._dynamo.reset()
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    accelerated = na.accelerate(gguf, backend=counting_backend)
    torch._dynamo.utils.counters.clear()
    with caplog.at_level(logging.WARNING, logger="qwen_identity"):
        fast = _sample(accelerated, vae, cond)
    state = na.acceleration_state(accelerated)
    breaks = dict(torch._dynamo.utils.counters["graph_break"])
    diff = float((fast - eager).abs().max())
    print(f"QwenImageAccelerate on GGUF {QTYPE}: {state.calls} compiled calls, {state.eager_calls} eager, "
          f"{len(graphs)} graphs, graph breaks {breaks}, fallback {state.fallback_reason!r}, max |image diff| vs eager {diff:.2g}")
    torch._dynamo.reset()
    assert state.calls >= STEPS and state.eager_calls == 0 and graphs, state
    assert not [r for r in caplog.records if "runs eager" in r.getMessage()]
    assert diff < 2e-3, diff
