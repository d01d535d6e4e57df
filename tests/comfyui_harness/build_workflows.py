"""Writes the pack's workflow files (UI format in workflows/, API twins in workflows/api/) from one
description per graph, so a UI file and its twin can never disagree.

    python tests/comfyui_harness/build_workflows.py           # rewrite workflows/*.json
    python tests/comfyui_harness/build_workflows.py --check   # exit 1 if a file differs

tests/test_workflows.py checks that the committed files equal what this writes, and validates
the files themselves (formats, node types, widget values, link types, UI == API twin).
Widget inputs not named here take the node's default; model files are the official
Comfy-Org/Qwen-Image_ComfyUI release names (Comfy-Org/Qwen-Image-2.1 for the native 2.1 workflow) and the
pack's folder names documented in README "## Workflows" and docs/workflows.md. Seeds are fixed (seed widgets
carry "fixed"). A workflow that needs a newer ComfyUI than the tested releases (NEEDS_COMFYUI) is built
against that release's hand-written node definitions laid over the others (defs_for).
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
WORKFLOWS = ROOT / "workflows"
API_DIR = WORKFLOWS / "api"

# Official Comfy-Org release files (https://huggingface.co/Comfy-Org/Qwen-Image_ComfyUI, split_files/...), as
# ComfyUI's own current Qwen-Image templates use them (comfyui-workflow-templates 0.11.44:
# image_qwen_Image_2512.json): Qwen-Image-2512 (same architecture as the 2025 Qwen-Image, which stays
# named as the alternative), the fp8 text encoder and the VAE.
HF = "https://huggingface.co/Comfy-Org/Qwen-Image_ComfyUI/resolve/main/split_files"
UNET = "qwen_image_2512_fp8_e4m3fn.safetensors"
UNET_2025 = "qwen_image_fp8_e4m3fn.safetensors"   # the 2025 Qwen-Image: works the same in every workflow
TEXT_ENCODER = "qwen_2.5_vl_7b_fp8_scaled.safetensors"
VAE = "qwen_image_vae.safetensors"
# The template's 4-step Lightning LoRA for 2512 (LoraLoaderModelOnly, strength 1; KSampler 4 steps, CFG 1)
LIGHTNING_LORA = "Qwen-Image-2512-Lightning-4steps-V1.0-fp32.safetensors"
LIGHTNING_URL = f"https://huggingface.co/lightx2v/Qwen-Image-2512-Lightning/resolve/main/{LIGHTNING_LORA}"
# Qwen-Image 2.1 for ComfyUI (>= 0.38): Comfy-Org/Qwen-Image-2.1 (no split_files/ folder), as ComfyUI's own 2.1
# templates link them (Comfy-Org/workflow_templates: templates/image_qwen_image_2_1_t2i.json,
# templates/image_qwen_image_2_1_image_edit.json). The templates load the int8_convrot files; the bf16 ones are
# what the 2.1 workflow names (the bf16 text encoder is also a file LoadQwen3VL can read; int8_convrot is not).
HF_21 = "https://huggingface.co/Comfy-Org/Qwen-Image-2.1/resolve/main"
UNET_21 = "qwen_image_2.1_bf16.safetensors"
UNET_21_INT8 = "qwen_image_2.1_int8_convrot.safetensors"
TEXT_ENCODER_21 = "qwen3vl_8b_bf16.safetensors"
TEXT_ENCODER_21_INT8 = "qwen3vl_8b_int8_convrot.safetensors"
VAE_21 = "qwen_image_2.1_vae_bf16.safetensors"
MODEL_LINKS = {UNET: ("diffusion_models", f"{HF}/diffusion_models/{UNET}"),
               TEXT_ENCODER: ("text_encoders", f"{HF}/text_encoders/{TEXT_ENCODER}"),
               VAE: ("vae", f"{HF}/vae/{VAE}"),
               LIGHTNING_LORA: ("loras", LIGHTNING_URL),
               UNET_21: ("diffusion_models", f"{HF_21}/diffusion_models/{UNET_21}"),
               TEXT_ENCODER_21: ("text_encoders", f"{HF_21}/text_encoders/{TEXT_ENCODER_21}"),
               VAE_21: ("vae", f"{HF_21}/vae/{VAE_21}")}
# The pack's folders (README "Models: which files go where")
QWEN3VL = "Qwen3-VL-2B-Instruct"          # models/qwen3_vl/Qwen3-VL-2B-Instruct/ (hub Qwen/Qwen3-VL-2B-Instruct)
HEAD = "v1_head.safetensors"              # models/identity_heads/ (`qwen-identity train --out-dir runs/v1`)
DIFFUSERS = "Qwen-Image"                  # models/diffusers/Qwen-Image/ (hub Qwen/Qwen-Image)
# The example photos the pack ships (example_photos/, copied into ComfyUI/input/ when the pack loads;
# three crops of ONE public-domain NASA photograph: example_photos/SOURCES.md). Replace them with yours.
PHOTOS = ["qwen_identity_eileen_collins_1.jpg", "qwen_identity_eileen_collins_2.jpg",
          "qwen_identity_eileen_collins_3.jpg"]
# one photo of EACH of two people: person A the example person above, person B a crop of the public-domain U.S. Navy
# portrait of Grace Hopper that matplotlib ships (example_photos/SOURCES.md)
PERSON_B_PHOTO = "qwen_identity_grace_hopper_1.jpg"
PEOPLE_PHOTOS = [PHOTOS[0], PERSON_B_PHOTO]
SHIPPED_PHOTOS = PHOTOS + [PERSON_B_PHOTO]   # every photo in example_photos/, each named by a workflow

PROMPT = "a portrait photo of a person, studio lighting, 85mm"
NEGATIVE = "blurry, low quality, deformed, watermark"
SEEDS = "1234,5678,9999"
ALPHAS = "0.5,1.0,1.5"
SHIFT = 3.1  # ModelSamplingAuraFlow shift of ComfyUI's own Qwen-Image template
# ComfyUI's Qwen-Image-2512 template: 1328x1328 (1:1 preset), 50 steps, CFG 4, euler / simple
SIZE = (1328, 1328)
STEPS = 50
CFG = 4.0
SIZE_PRESETS = "1:1 1328x1328, 16:9 1664x928, 9:16 928x1664, 4:3 1472x1104, 3:4 1104x1472, 3:2 1584x1056, 2:3 1056x1584"
LIGHTNING_STEPS = 4

# (file stem, title for notes)
WORKFLOW_FILES = {
    "qwen_identity_alpha_grid": "α × seed grid (the POC as one graph)",
    "qwen_identity_native_ksampler": "one image, native loaders + KSampler, strength and step window",
    "qwen_identity_diffusers": "one image, diffusers Qwen-Image pipeline",
    "qwen_identity_multi_photo": "several photos of one person combined",
    "qwen_identity_two_people": "two people in one picture, one region each",
    "qwen_identity_lightning": "one image in 4 steps: the Lightning LoRA, CFG 1",
    "qwen_identity_accelerated": "one image, QwenImageAccelerate + QwenImageTrueCFG before KSampler",
    "qwen_identity_personalize": "a personal head trained on your photos, then an α grid",
    "qwen_identity_21_references": "Qwen-Image 2.1 (diffusers): its reference images beside the head, one grid",
    "qwen_identity_21_native": "Qwen-Image 2.1 (ComfyUI >= 0.38): TextEncodeQwenImage21 with the photos as references "
                               "+ the head, KSampler",
}
# Workflows that need a newer ComfyUI than the tested releases: stem -> (release, the nodes only it has). They are
# built and checked against that release's hand-written node definitions (workflow_format.SOURCE_SNAPSHOTS); a live
# server without those nodes skips loading them, saying why (tests/test_comfyui_integration.py).
NEEDS_COMFYUI = {"qwen_identity_21_native": ("0.38", ("TextEncodeQwenImage21",))}


def _import_pack():
    """Make `qwen_identity` THIS checkout (the test session already did; a plain script run does it here)."""
    mod = sys.modules.get("qwen_identity")
    if mod is None or Path(mod.__file__).resolve().parent != ROOT:
        sys.modules.pop("qwen_identity", None)
        pkg_root = Path(tempfile.mkdtemp(prefix="qwen_identity_pkg_"))
        atexit.register(shutil.rmtree, pkg_root, True)
        (pkg_root / "qwen_identity").symlink_to(ROOT, target_is_directory=True)
        sys.path.insert(0, str(pkg_root))
    if str(HERE.parent) not in sys.path:
        sys.path.insert(0, str(HERE.parent))


def node_defs() -> dict:
    _import_pack()
    from comfyui_harness.workflow_format import core_node_defs, pack_node_defs

    return {**core_node_defs(), **pack_node_defs()}


def defs_for(stem: str, defs: dict | None = None) -> dict:
    """The node definitions workflow `stem` is built and checked against: the tested releases' core nodes and the
    pack's, with those of the newer release it needs (NEEDS_COMFYUI) laid over them."""
    from comfyui_harness.workflow_format import source_node_defs

    defs = node_defs() if defs is None else defs
    if stem not in NEEDS_COMFYUI:
        return defs
    return {**defs, **source_node_defs(NEEDS_COMFYUI[stem][0])}


def _replace_once(text: str, old: str, new: str) -> str:
    """`text` with `old` replaced by `new`; `old` must occur exactly once (a note never silently keeps old text)."""
    assert text.count(old) == 1, old
    return text.replace(old, new)


def _models_property(name: str) -> dict:
    directory, url = MODEL_LINKS[name]
    return {"models": [{"name": name, "url": url, "directory": directory}]}


class _Builder:
    """Collects nodes and links; fills widget defaults from the node definitions."""

    def __init__(self, defs: dict):
        self.defs = defs
        self.nodes, self.links, self.notes = [], [], []

    def add(self, type_, pos, size=(320, 130), title=None, properties=None, **widgets):
        from comfyui_harness.workflow_format import Node, is_widget, ordered_inputs

        d = self.defs[type_]
        values = {}
        for name, t, opts, _ in ordered_inputs(d):
            if not is_widget(t, opts):
                continue
            if name in widgets:
                values[name] = widgets.pop(name)
            elif "default" in opts:
                values[name] = opts["default"]
            elif isinstance(t, list) and t:
                values[name] = t[0]
            else:
                raise ValueError(f"{type_}.{name} needs a value")
        if widgets:
            raise ValueError(f"{type_} has no widget inputs {sorted(widgets)}")
        node = Node(id=len(self.nodes) + 1, type=type_, pos=pos, widgets=values, title=title, size=size,
                    properties=properties or {})
        self.nodes.append(node)
        return node.id

    def node_widgets(self, node_id, **widgets):
        """Change widget values of a node added earlier (e.g. a shared loader's prompt)."""
        node = self.nodes[node_id - 1]
        unknown = set(widgets) - set(node.widgets)
        if unknown:
            raise ValueError(f"{node.type} has no widget inputs {sorted(unknown)}")
        node.widgets.update(widgets)

    def link(self, src, slot, dst, name):
        self.links.append((src, slot, dst, name))

    def note(self, text, pos, size=(420, 260)):
        self.notes.append((text, pos, size))

    def graph(self, stem):
        import uuid

        from comfyui_harness.workflow_format import Graph

        return Graph(nodes=self.nodes, links=self.links, notes=self.notes,
                     uid=str(uuid.uuid5(uuid.NAMESPACE_URL, f"qwen-identity/workflows/{stem}")))


MODELS_NOTE = f"""## Files this workflow needs
**ComfyUI/models/**
- `diffusion_models/{UNET}` (Qwen-Image-2512; the 2025 `{UNET_2025}` works the same: pick it in UNETLoader)
- `text_encoders/{TEXT_ENCODER}`
- `vae/{VAE}`

from [Comfy-Org/Qwen-Image_ComfyUI](https://huggingface.co/Comfy-Org/Qwen-Image_ComfyUI/tree/main/split_files)
- `qwen3_vl/{QWEN3VL}/` (the whole [Qwen/{QWEN3VL}](https://huggingface.co/Qwen/{QWEN3VL}) folder)
- `identity_heads/{HEAD}` (a head from `qwen-identity train`, trained on the same Qwen3-VL)

**ComfyUI/input/**: the example photos (three crops of one public-domain NASA portrait, copied there when
the pack loads); replace them with photos of ONE person, different angles and light.

Sizes of ComfyUI's Qwen-Image template: {SIZE_PRESETS}.
"""

DIFFUSERS_NOTE = f"""## Files this workflow needs
**ComfyUI/models/**
- `diffusers/{DIFFUSERS}/` (the whole [Qwen/Qwen-Image](https://huggingface.co/Qwen/Qwen-Image) folder, with model_index.json)
- `qwen3_vl/{QWEN3VL}/` (the whole [Qwen/{QWEN3VL}](https://huggingface.co/Qwen/{QWEN3VL}) folder)
- `identity_heads/{HEAD}` (a head from `qwen-identity train`)

**ComfyUI/input/**: a photo of the person.
"""


def _identity(b: _Builder, photos: list[str], y=0, weights=""):
    """LoadImage(s) -> (ImageBatch) -> ExtractIdentityFeatures; LoadResidualHead. Returns (features, head)."""
    loads = [b.add("LoadImage", (0, y + 330 * i), size=(280, 320), image=p) for i, p in enumerate(photos)]
    images, slot = loads[0], 0
    for k, nxt in enumerate(loads[1:]):
        batch = b.add("ImageBatch", (320, y + 200 + 120 * k), size=(200, 50))
        b.link(images, slot, batch, "image1")
        b.link(nxt, 0, batch, "image2")
        images, slot = batch, 0
    vl = b.add("LoadQwen3VL", (300, y - 340), size=(300, 220), model=QWEN3VL)
    feats = b.add("ExtractIdentityFeatures", (620, y - 60), size=(330, 200), weights=weights)
    b.link(vl, 0, feats, "qwen3vl")
    b.link(images, slot, feats, "images")
    head = b.add("LoadResidualHead", (620, y - 340), size=(330, 100), head_name=HEAD)
    return feats, head


def _native_loaders(b: _Builder, y=900):
    unet = b.add("UNETLoader", (0, y), size=(320, 90), properties=_models_property(UNET), unet_name=UNET)
    shift = b.add("ModelSamplingAuraFlow", (340, y), size=(260, 60), shift=SHIFT)
    b.link(unet, 0, shift, "model")
    clip = b.add("CLIPLoader", (0, y + 160), properties=_models_property(TEXT_ENCODER), clip_name=TEXT_ENCODER,
                 type="qwen_image")
    vae = b.add("VAELoader", (0, y + 320), size=(320, 60), properties=_models_property(VAE), vae_name=VAE)
    pos = b.add("CLIPTextEncode", (340, y + 100), size=(380, 120), title="Prompt", text=PROMPT)
    neg = b.add("CLIPTextEncode", (340, y + 250), size=(380, 100), title="Negative prompt", text=NEGATIVE)
    b.link(clip, 0, pos, "clip")
    b.link(clip, 0, neg, "clip")
    return shift, vae, pos, neg


def _inject(b: _Builder, pos, head, feats, **widgets):
    inj = b.add("InjectResidual", (980, 300), size=(340, 200), **widgets)
    b.link(pos, 0, inj, "conditioning")
    b.link(head, 0, inj, "head")
    b.link(feats, 0, inj, "identity")
    return inj


def _pack_sampler(b: _Builder, positive, negative, sources: dict, **widgets):
    """QwenImageSampleFromEmbeds fed by `sources` ({"model": id, "vae": id} or {"pipeline": id})."""
    samp = b.add("QwenImageSampleFromEmbeds", (1360, 300), size=(340, 330), steps=STEPS, cfg=CFG, width=SIZE[0],
                 height=SIZE[1], **widgets)
    b.link(positive, 0, samp, "positive")
    b.link(negative, 0, samp, "negative")
    for name, src in sources.items():
        b.link(src, 0, samp, name)
    return samp


def alpha_grid(defs):
    b = _Builder(defs)
    feats, head = _identity(b, PHOTOS[:2])
    model, vae, pos, neg = _native_loaders(b)
    inj = _inject(b, pos, head, feats, alphas=ALPHAS)
    samp = _pack_sampler(b, inj, neg, {"model": model, "vae": vae}, seeds=SEEDS, sampler_name="euler",
                         scheduler="simple")
    grid = b.add("AlphaGrid", (1740, 300), size=(300, 130))
    b.link(samp, 0, grid, "images")
    b.link(inj, 1, grid, "alphas")
    b.link(samp, 1, grid, "seeds")
    save = b.add("SaveImage", (2080, 300), size=(420, 480), filename_prefix="qwen_identity/alpha_grid")
    b.link(grid, 0, save, "images")
    b.note("## α × seed grid\nPhotos → Qwen3-VL features → residual head → InjectResidual with an α list → "
           "QwenImageSampleFromEmbeds (every α × every seed, α-major) → AlphaGrid (rows α, columns seeds).\n\n"
           + MODELS_NOTE, (980, -300), (520, 520))
    return b.graph("qwen_identity_alpha_grid")


def native_ksampler(defs):
    b = _Builder(defs)
    feats, head = _identity(b, PHOTOS[:1])
    model, vae, pos, neg = _native_loaders(b, y=700)
    inj = _inject(b, pos, head, feats, strength=1.0, start_at=0.0, end_at=0.6)
    latent = b.add("EmptySD3LatentImage", (980, 600), size=(300, 110), width=SIZE[0], height=SIZE[1], batch_size=1)
    ks = b.add("KSampler", (1360, 300), size=(320, 270), seed=1234, steps=STEPS, cfg=CFG, sampler_name="euler",
               scheduler="simple", denoise=1.0)
    b.link(model, 0, ks, "model")
    b.link(inj, 0, ks, "positive")
    b.link(neg, 0, ks, "negative")
    b.link(latent, 0, ks, "latent_image")
    dec = b.add("VAEDecode", (1720, 300), size=(200, 50))
    b.link(ks, 0, dec, "samples")
    b.link(vae, 0, dec, "vae")
    save = b.add("SaveImage", (1960, 300), size=(400, 560), filename_prefix="qwen_identity/native")
    b.link(dec, 0, save, "images")
    b.note("## One image with ComfyUI's own Qwen-Image loaders and KSampler\nInjectResidual adds the person "
           "at `strength` during the first 60 % of the steps (`start_at` 0, `end_at` 0.6); the prompt alone "
           "finishes the image. Raise strength for more likeness, lower end_at for more prompt freedom.\n\n"
           + MODELS_NOTE, (980, -300), (520, 520))
    return b.graph("qwen_identity_native_ksampler")


def diffusers_single(defs):
    b = _Builder(defs)
    feats, head = _identity(b, PHOTOS[:1])
    pipe = b.add("LoadQwenImageDiffusers", (0, 700), size=(340, 200), model=DIFFUSERS)
    pos = b.add("QwenImageTextEncodeDiffusers", (380, 700), size=(380, 130), title="Prompt", text=PROMPT)
    neg = b.add("QwenImageTextEncodeDiffusers", (380, 870), size=(380, 110), title="Negative prompt", text=NEGATIVE)
    b.link(pipe, 0, pos, "pipeline")
    b.link(pipe, 0, neg, "pipeline")
    inj = _inject(b, pos, head, feats, strength=1.0, start_at=0.0, end_at=0.6)
    samp = _pack_sampler(b, inj, neg, {"pipeline": pipe}, seeds="1234")
    save = b.add("SaveImage", (1740, 300), size=(400, 560), filename_prefix="qwen_identity/diffusers")
    b.link(samp, 0, save, "images")
    b.note("## One image with a diffusers Qwen-Image pipeline\nThe pack loads the pipeline and encodes the "
           "prompts itself; InjectResidual and the sampler are the same as on the native path.\n\n"
           + DIFFUSERS_NOTE, (980, -300), (520, 420))
    return b.graph("qwen_identity_diffusers")


def multi_photo(defs):
    b = _Builder(defs)
    feats, head = _identity(b, PHOTOS, weights="1,1,0.5")
    preview = b.add("PreviewImage", (620, 300), size=(330, 300), title="What Qwen3-VL sees")
    b.link(feats, 1, preview, "images")
    model, vae, pos, neg = _native_loaders(b, y=1050)
    inj = _inject(b, pos, head, feats, strength=1.0, start_at=0.0, end_at=1.0)
    samp = _pack_sampler(b, inj, neg, {"model": model, "vae": vae}, seeds="1234,5678", sampler_name="euler",
                         scheduler="simple")
    save = b.add("SaveImage", (1740, 300), size=(420, 560), filename_prefix="qwen_identity/multi_photo")
    b.link(samp, 0, save, "images")
    b.note("## Several photos of one person\nThe photos are batched (ImageBatch resizes to the first one) and "
           "ExtractIdentityFeatures averages their features with `weights` (here 1, 1, 0.5: the third photo "
           "counts half). Use views that differ (angle, light, expression) of the SAME person.\n\n"
           + MODELS_NOTE, (980, -300), (520, 560))
    return b.graph("qwen_identity_multi_photo")


PEOPLE_PROMPT = ("two people standing side by side in a park, the first person on the left, the second person "
                 "on the right, photo, 35mm")
PEOPLE_SIZE = (1664, 928)   # the template's 16:9 preset


def two_people(defs):
    b = _Builder(defs)
    vl = b.add("LoadQwen3VL", (300, -340), size=(300, 220), model=QWEN3VL)
    head = b.add("LoadResidualHead", (620, -340), size=(330, 100), head_name=HEAD)
    feats = []
    for k, photo in enumerate(PEOPLE_PHOTOS):
        img = b.add("LoadImage", (0, 380 * k), size=(280, 320), title=f"Person {'AB'[k]}", image=photo)
        f = b.add("ExtractIdentityFeatures", (620, -100 + 380 * k), size=(330, 200),
                  title=f"Person {'AB'[k]} features")
        b.link(vl, 0, f, "qwen3vl")
        b.link(img, 0, f, "images")
        feats.append(f)
    model, vae, pos, neg = _native_loaders(b, y=900)
    injs = []
    for k, f in enumerate(feats):
        inj = b.add("InjectResidual", (980, 60 + 300 * k), size=(340, 200), title=f"Inject person {'AB'[k]}",
                    strength=1.0, start_at=0.0, end_at=1.0)
        b.link(pos, 0, inj, "conditioning")
        b.link(head, 0, inj, "head")
        b.link(f, 0, inj, "identity")
        injs.append(inj)
    width, height = PEOPLE_SIZE
    regions = b.add("TwoPersonRegions", (1360, 60), size=(320, 260), layout="left/right", split=0.5, width=width,
                    height=height, feather=64)
    b.link(injs[0], 0, regions, "conditioning_a")
    b.link(injs[1], 0, regions, "conditioning_b")
    preview = b.add("MaskPreview", (1720, -340), size=(300, 220), title="Person A's region")
    b.link(regions, 1, preview, "mask")
    latent = b.add("EmptySD3LatentImage", (1360, 700), size=(300, 110), width=width, height=height, batch_size=1)
    ks = b.add("KSampler", (1720, 60), size=(320, 270), seed=1234, steps=STEPS, cfg=CFG, sampler_name="euler",
               scheduler="simple", denoise=1.0)
    b.link(model, 0, ks, "model")
    b.link(regions, 0, ks, "positive")
    b.link(neg, 0, ks, "negative")
    b.link(latent, 0, ks, "latent_image")
    dec = b.add("VAEDecode", (2080, 60), size=(200, 50))
    b.link(ks, 0, dec, "samples")
    b.link(vae, 0, dec, "vae")
    save = b.add("SaveImage", (2320, 60), size=(520, 340), filename_prefix="qwen_identity/two_people")
    b.link(dec, 0, save, "images")
    b.node_widgets(pos, text=PEOPLE_PROMPT)
    b.note("## Two people in one picture\nOne InjectResidual per person on the same prompt; TwoPersonRegions "
           "uses person A's conditioning on the left and B's on the right (a 64-pixel soft border) and "
           "ComfyUI's own KSampler samples it. Each person's conditioning is run on the whole picture and the "
           "regions pick whose prediction is used where, so the prompt should place one person in each region. "
           "Keep TwoPersonRegions' width/height equal to the latent's. For a drawn layout choose layout `mask` "
           "and connect a MASK (white = person A). What the regions do and do not guarantee: "
           "docs/multi-person.md.\n\n" + _replace_once(
               MODELS_NOTE,
               "the example photos (three crops of one public-domain NASA portrait, copied there when\n"
               "the pack loads); replace them with photos of ONE person, different angles and light.",
               f"the example photos, copied there when the pack loads: person A `{PEOPLE_PHOTOS[0]}` (a "
               f"public-domain NASA portrait), person B `{PEOPLE_PHOTOS[1]}` (a public-domain U.S. Navy "
               "portrait); pick a photo of each of your two people in the LoadImage dropdowns."),
           (980, -420), (560, 440))
    return b.graph("qwen_identity_two_people")


# ---- the ways ComfyUI users run Qwen-Image today: a Lightning LoRA, the accelerator ------------------

def _native_ksampler_graph(b: _Builder, model, vae, positive, negative, steps, cfg, prefix, x=1360):
    """EmptySD3LatentImage -> KSampler -> VAEDecode -> SaveImage (one image, seed 1234)."""
    latent = b.add("EmptySD3LatentImage", (980, 600), size=(300, 110), width=SIZE[0], height=SIZE[1], batch_size=1)
    ks = b.add("KSampler", (x, 300), size=(320, 270), seed=1234, steps=steps, cfg=cfg, sampler_name="euler",
               scheduler="simple", denoise=1.0)
    b.link(model, 0, ks, "model")
    b.link(positive, 0, ks, "positive")
    b.link(negative, 0, ks, "negative")
    b.link(latent, 0, ks, "latent_image")
    dec = b.add("VAEDecode", (x + 360, 300), size=(200, 50))
    b.link(ks, 0, dec, "samples")
    b.link(vae, 0, dec, "vae")
    save = b.add("SaveImage", (x + 600, 300), size=(400, 560), filename_prefix=prefix)
    b.link(dec, 0, save, "images")
    return ks


def lightning(defs):
    """ComfyUI's 2512 template with its Lightning LoRA (4 steps, CFG 1) and the identity injected."""
    b = _Builder(defs)
    feats, head = _identity(b, PHOTOS[:1])
    model, vae, pos, neg = _native_loaders(b, y=700)
    lora = b.add("LoraLoaderModelOnly", (340, 560), size=(340, 90), properties=_models_property(LIGHTNING_LORA),
                 lora_name=LIGHTNING_LORA, strength_model=1.0)
    b.link(model, 0, lora, "model")
    inj = _inject(b, pos, head, feats, strength=1.0, start_at=0.0, end_at=1.0)
    _native_ksampler_graph(b, lora, vae, inj, neg, LIGHTNING_STEPS, 1.0, "qwen_identity/lightning")
    b.note("## One image in 4 steps (Lightning LoRA)\nAs ComfyUI's own Qwen-Image-2512 template runs it fast: "
           f"LoraLoaderModelOnly with [{LIGHTNING_LORA}]({LIGHTNING_URL}) (put it in `ComfyUI/models/loras/`), "
           "KSampler with 4 steps and CFG 1. At CFG 1 the negative prompt is not used. With only 4 steps the "
           "identity acts over the whole schedule (`end_at` 1.0).\n\n" + MODELS_NOTE, (980, -300), (560, 560))
    return b.graph("qwen_identity_lightning")


def accelerated(defs):
    """The template's 50-step CFG 4 run with QwenImageAccelerate (compiled, on a CUDA GPU) and true CFG."""
    b = _Builder(defs)
    feats, head = _identity(b, PHOTOS[:1])
    model, vae, pos, neg = _native_loaders(b, y=700)
    fast = b.add("QwenImageAccelerate", (340, 560), size=(320, 130))
    b.link(model, 0, fast, "model")
    true_cfg = b.add("QwenImageTrueCFG", (680, 560), size=(260, 60))
    b.link(fast, 0, true_cfg, "model")
    inj = _inject(b, pos, head, feats, strength=1.0, start_at=0.0, end_at=0.6)
    _native_ksampler_graph(b, true_cfg, vae, inj, neg, STEPS, CFG, "qwen_identity/accelerated")
    b.note("## One image, accelerated\nQwenImageAccelerate compiles the transformer blocks on a CUDA GPU (the "
           "first image of each size pays the compilation; elsewhere it runs as is), and QwenImageTrueCFG gives "
           "Qwen-Image's own true CFG (the guided prediction rescaled to the norm of the conditional one) in "
           "ComfyUI's KSampler. Both change only this workflow's MODEL.\n\n" + MODELS_NOTE, (980, -300), (560, 560))
    return b.graph("qwen_identity_accelerated")


# ---- Qwen-Image 2.1 ----------------------------------------------------------------------------------
DIFFUSERS_21 = "Qwen-Image-2.1"           # models/diffusers/Qwen-Image-2.1/ (hub Qwen/Qwen-Image-2.1)
HEAD_21 = "v1_21_head.safetensors"        # a head trained with --qwen-image-model Qwen/Qwen-Image-2.1 (H = 4096)
STEPS_21, CFG_21, SIZE_21 = 40, 1.0, (1024, 1024)   # QwenImage21Pipeline's defaults: guidance off

DIFFUSERS_21_NOTE = f"""## Files this workflow needs
**ComfyUI/models/**
- `diffusers/{DIFFUSERS_21}/` (the whole [Qwen/Qwen-Image-2.1](https://huggingface.co/Qwen/Qwen-Image-2.1) folder, with model_index.json)
- `qwen3_vl/{QWEN3VL}/` (the whole [Qwen/{QWEN3VL}](https://huggingface.co/Qwen/{QWEN3VL}) folder)
- `identity_heads/{HEAD_21}` (a Qwen-Image 2.1 head: `qwen-identity train --qwen-image-model Qwen/Qwen-Image-2.1`;
  a 1.x head is refused)

**ComfyUI/input/**: photos of ONE person; the same photos go to the features and to 2.1 as references.
"""


def references_21(defs):
    """Qwen-Image 2.1 on the diffusers path: the person's photos as 2.1's own reference images AND through the
    head, one grid: a 'references only' row, 'head α' rows, 'both α' rows, for the same seeds."""
    b = _Builder(defs)
    feats, head = _identity(b, PHOTOS[:2])
    photos = next(n.id for n in b.nodes if n.type == "ImageBatch")   # the photos, batched for the features
    b.node_widgets(head, head_name=HEAD_21)
    pipe = b.add("LoadQwenImageDiffusers", (0, 1000), size=(340, 200), model=DIFFUSERS_21)
    pos = b.add("QwenImageTextEncodeDiffusers", (380, 1000), size=(380, 130), title="Prompt", text=PROMPT)
    neg = b.add("QwenImageTextEncodeDiffusers", (380, 1170), size=(380, 110), title="Negative prompt", text=NEGATIVE)
    b.link(pipe, 0, pos, "pipeline")
    b.link(pipe, 0, neg, "pipeline")
    inj = _inject(b, pos, head, feats, alphas=ALPHAS)
    samp = b.add("QwenImageSampleFromEmbeds", (1360, 300), size=(340, 380), seeds=SEEDS, steps=STEPS_21, cfg=CFG_21,
                 width=SIZE_21[0], height=SIZE_21[1], reference_rows="compare")
    b.link(inj, 0, samp, "positive")
    b.link(neg, 0, samp, "negative")
    b.link(pipe, 0, samp, "pipeline")
    b.link(photos, 0, samp, "reference_images")
    grid = b.add("AlphaGrid", (1740, 300), size=(300, 160), rows="compare")
    b.link(samp, 0, grid, "images")
    b.link(inj, 1, grid, "alphas")
    b.link(samp, 1, grid, "seeds")
    save = b.add("SaveImage", (2080, 300), size=(420, 480), filename_prefix="qwen_identity/references_21")
    b.link(grid, 0, save, "images")
    b.note("## Qwen-Image 2.1: its reference images beside the head\nThe same photos go to the features (→ head → "
           "InjectResidual) and to Qwen-Image 2.1 as its own reference images. With reference_rows `compare` the "
           "sampler makes, for the same seeds, a 'references only' row, one 'head α' row per α (no references) and "
           "one 'both α' row per α; AlphaGrid's `rows` is set to `compare` to label them. 2.1's defaults: 1024x1024, "
           "40 steps, guidance off (cfg 1: the negative is not used).\n\n" + DIFFUSERS_21_NOTE, (980, -300),
           (560, 560))
    return b.graph("qwen_identity_21_references")


# ComfyUI's own Qwen-Image 2.1 templates (above): no ModelSamplingAuraFlow (the model's own sampling settings),
# KSampler 25 steps, CFG 1 (guidance off: the negative prompt is not used), euler / simple; TextEncodeQwenImage21
# at its default resolution 1024, its latent output (the first reference's aspect) as the KSampler's latent.
STEPS_21_NATIVE, CFG_21_NATIVE, RESOLUTION_21 = 25, 1.0, 1024
PROMPT_21 = "a portrait photo of the person in <image1> and <image2>, studio lighting, 85mm"

NATIVE_21_NOTE = f"""## Needs ComfyUI 0.38 or newer
`TextEncodeQwenImage21` (ComfyUI's Qwen-Image 2.1 text encoder node) first ships in ComfyUI 0.38. Older
ComfyUIs show it as a missing node. This file is checked against ComfyUI 0.38's source files only: it has
not been run in a ComfyUI that has the node.

## Files this workflow needs
**ComfyUI/models/** from [Comfy-Org/Qwen-Image-2.1](https://huggingface.co/Comfy-Org/Qwen-Image-2.1)
- `diffusion_models/{UNET_21}` ([download]({HF_21}/diffusion_models/{UNET_21}); the smaller
  `{UNET_21_INT8}` works the same: pick it in UNETLoader)
- `text_encoders/{TEXT_ENCODER_21}` ([download]({HF_21}/text_encoders/{TEXT_ENCODER_21}); CLIPLoader type
  `qwen_image`; the smaller `{TEXT_ENCODER_21_INT8}` works for CLIPLoader, but LoadQwen3VL cannot read it)
- `vae/{VAE_21}` ([download]({HF_21}/vae/{VAE_21}))
- `qwen3_vl/{QWEN3VL}/` (the whole [Qwen/{QWEN3VL}](https://huggingface.co/Qwen/{QWEN3VL}) folder)
- `identity_heads/{HEAD_21}` (a Qwen-Image 2.1 head: `qwen-identity train --qwen-image-model Qwen/Qwen-Image-2.1`;
  a 1.x head is refused)

**ComfyUI/input/**: the example photos; replace them with photos of ONE person.
"""


def native_21(defs):
    """Qwen-Image 2.1 in ComfyUI's own nodes (0.38+): the person's photos go to the features (-> head ->
    InjectResidual on TextEncodeQwenImage21's positive) AND to TextEncodeQwenImage21 as 2.1 reference images."""
    b = _Builder(defs)
    feats, head = _identity(b, PHOTOS[:2])
    loads = [n.id for n in b.nodes if n.type == "LoadImage"]
    b.node_widgets(head, head_name=HEAD_21)
    unet = b.add("UNETLoader", (0, 1000), size=(340, 90), properties=_models_property(UNET_21), unet_name=UNET_21)
    clip = b.add("CLIPLoader", (0, 1130), size=(340, 110), properties=_models_property(TEXT_ENCODER_21),
                 clip_name=TEXT_ENCODER_21, type="qwen_image")
    vae = b.add("VAELoader", (0, 1280), size=(340, 60), properties=_models_property(VAE_21), vae_name=VAE_21)
    te = b.add("TextEncodeQwenImage21", (380, 1000), size=(420, 420), title="Prompt + reference photos",
               prompt=PROMPT_21, negative_prompt=NEGATIVE, resolution=RESOLUTION_21)
    b.link(clip, 0, te, "clip")
    b.link(vae, 0, te, "vae")
    for k, photo in enumerate(loads, start=1):
        b.link(photo, 0, te, f"images.image_{k}")
    inj = _inject(b, te, head, feats, strength=1.0, start_at=0.0, end_at=1.0)
    ks = b.add("KSampler", (1360, 300), size=(320, 270), seed=1234, steps=STEPS_21_NATIVE, cfg=CFG_21_NATIVE,
               sampler_name="euler", scheduler="simple", denoise=1.0)
    b.link(unet, 0, ks, "model")
    b.link(inj, 0, ks, "positive")
    b.link(te, 1, ks, "negative")
    b.link(te, 2, ks, "latent_image")
    dec = b.add("VAEDecode", (1720, 300), size=(200, 50))
    b.link(ks, 0, dec, "samples")
    b.link(vae, 0, dec, "vae")
    save = b.add("SaveImage", (1960, 300), size=(400, 560), filename_prefix="qwen_identity/native_21")
    b.link(dec, 0, save, "images")
    b.note("## Qwen-Image 2.1 with ComfyUI's own nodes\nThe same photos go to the features (→ head → InjectResidual "
           "on TextEncodeQwenImage21's `positive`) and to TextEncodeQwenImage21 as 2.1's own reference images "
           "(`<image1>`, `<image2>` in the prompt; connect more LoadImage nodes to its free `image_N` socket, up to "
           "10). With the VAE connected, the references' vision tokens leave the conditioning, so the head's "
           "residual goes to the prompt's own tokens. The image takes the first reference's aspect (the node's "
           "`latent` output) at about `resolution`² pixels. Settings of ComfyUI's own 2.1 templates: KSampler 25 "
           "steps, CFG 1 (the negative prompt is not used), euler / simple; 2.1's own pipeline uses 40 steps. "
           "Lower InjectResidual's `strength` when the references already carry the likeness.\n\n" + NATIVE_21_NOTE,
           (980, -420), (600, 680))
    return b.graph("qwen_identity_21_native")


TRAIN_PROMPT = "a photo of a person"
PERSONAL_HEAD = "my_person"               # saved as models/identity_heads/my_person.safetensors


def personalize(defs):
    """Photos -> TrainIdentityHead (through the loaded Qwen-Image) -> InjectResidual -> α grid."""
    b = _Builder(defs)
    loads = [b.add("LoadImage", (0, 330 * i), size=(280, 320), image=p) for i, p in enumerate(PHOTOS)]
    images = loads[0]
    for k, nxt in enumerate(loads[1:]):
        batch = b.add("ImageBatch", (320, 200 + 120 * k), size=(200, 50))
        b.link(images, 0, batch, "image1")
        b.link(nxt, 0, batch, "image2")
        images = batch
    vl = b.add("LoadQwen3VL", (300, -340), size=(300, 220), model=QWEN3VL)
    model, vae, pos, neg = _native_loaders(b, y=1050)
    train_prompt = b.add("CLIPTextEncode", (340, 1500), size=(380, 100), title="Training prompt", text=TRAIN_PROMPT)
    clip = next(src for src, _, dst, name in b.links if dst == pos and name == "clip")
    b.link(clip, 0, train_prompt, "clip")
    train = b.add("TrainIdentityHead", (620, 300), size=(340, 330), save_name=PERSONAL_HEAD)
    b.link(model, 0, train, "model")
    b.link(vae, 0, train, "vae")
    b.link(train_prompt, 0, train, "conditioning")
    b.link(images, 0, train, "photos")
    b.link(vl, 0, train, "qwen3vl")
    curve = b.add("PreviewImage", (620, 700), size=(330, 260), title="Loss curve")
    b.link(train, 1, curve, "images")
    feats = b.add("ExtractIdentityFeatures", (620, -60), size=(330, 200))
    b.link(vl, 0, feats, "qwen3vl")
    b.link(images, 0, feats, "images")
    inj = _inject(b, pos, train, feats, alphas=ALPHAS)
    samp = _pack_sampler(b, inj, neg, {"model": model, "vae": vae}, seeds=SEEDS, sampler_name="euler",
                         scheduler="simple")
    grid = b.add("AlphaGrid", (1740, 300), size=(300, 130))
    b.link(samp, 0, grid, "images")
    b.link(inj, 1, grid, "alphas")
    b.link(samp, 1, grid, "seeds")
    save = b.add("SaveImage", (2080, 300), size=(420, 480), filename_prefix="qwen_identity/personalize")
    b.link(grid, 0, save, "images")
    b.note("## Your photos → a personal head → an α grid\n"
           "TrainIdentityHead trains a head on the photos through the Qwen-Image model loaded below (no "
           "other download), saves it as `identity_heads/my_person.safetensors` (then LoadResidualHead lists "
           "it after a refresh) and hands it to InjectResidual; the sampler draws every α with the same noise "
           "per seed, so the rows compare strengths fairly.\n\n"
           "**Photos**: 3 to 20 of ONE person, different angles and light (with 3 or more one is held out to "
           "pick the best step); add LoadImage nodes to the ImageBatch chain. One photo works too.\n\n"
           "**Steps**: 200 is a good start (a few minutes on a recent GPU); watch the loss curve: the orange "
           "held-out loss should fall. Queue again with the same inputs and the head comes from the cache.\n\n"
           "**Memory**: training runs through the same weights the sampler uses. On a 24 GB card use the fp8 "
           "model, turn `gradient_checkpointing` on and keep `resolution` at 512.\n\n"
           + MODELS_NOTE.replace("- `identity_heads/" + HEAD + "` (a head from `qwen-identity train`, trained on "
                                 "the same Qwen3-VL)\n", ""),
           (980, -420), (560, 640))
    return b.graph("qwen_identity_personalize")


BUILDERS = {"qwen_identity_alpha_grid": alpha_grid, "qwen_identity_native_ksampler": native_ksampler,
            "qwen_identity_diffusers": diffusers_single, "qwen_identity_multi_photo": multi_photo,
            "qwen_identity_two_people": two_people, "qwen_identity_lightning": lightning,
            "qwen_identity_accelerated": accelerated, "qwen_identity_personalize": personalize,
            "qwen_identity_21_references": references_21, "qwen_identity_21_native": native_21}


def render_all() -> dict[Path, str]:
    """{path: file text} for every workflow file (UI in workflows/, API twin in workflows/api/)."""
    _import_pack()
    from comfyui_harness.workflow_format import to_api, to_ui

    base = node_defs()
    out = {}
    for stem, build in BUILDERS.items():
        defs = defs_for(stem, base)
        graph = build(defs)
        out[WORKFLOWS / f"{stem}.json"] = json.dumps(to_ui(graph, defs), indent=1, ensure_ascii=False) + "\n"
        out[API_DIR / f"{stem}_api.json"] = json.dumps(to_api(graph, defs), indent=1, ensure_ascii=False) + "\n"
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    os.environ.pop("QWEN_IDENTITY_MODELS_DIR", None)  # dropdown contents must not leak into defaults
    files = render_all()
    if "--check" in argv:
        stale = [str(p.relative_to(ROOT)) for p, text in files.items() if not p.is_file() or p.read_text() != text]
        print("stale: " + ", ".join(stale) if stale else "workflows up to date")
        return 1 if stale else 0
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
