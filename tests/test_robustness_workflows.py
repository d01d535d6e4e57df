"""Random mutations of the shipped workflows, through the validators and then through the pack's nodes.

Each example takes one API workflow (workflows/api/*.json), changes one widget input of one pack node
to a hostile value (NaN, ±inf, just outside min/max, huge, negative, empty or odd strings, a value not
in a combo list, the wrong type), and then:
1. the workflow validator (tests/comfyui_harness/workflow_format.check_widget_value, the rules ComfyUI
   applies before running a prompt) must flag every value outside the node's INPUT_TYPES; and
2. a value that passes validation is what a node really receives: the workflow is executed in-process
   with the pack's node classes on the tiny models (ComfyUI's own loaders and CLIPTextEncode are
   replaced by the tiny diffusers pipeline, ComfyUI 0.38's TextEncodeQwenImage21 by the tiny Qwen-Image 2.1
   pipeline's prompt encoding; the native KSampler chain is left out). Every run ends in
   images that are all finite, or in a UserInputError -- never another exception, never NaN pixels.
"""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from comfyui_harness.workflow_format import check_widget_value, is_widget, ordered_inputs, pack_node_defs
from qwen_identity.core.errors import UserInputError
from qwen_identity.core.residual.head import HeadMeta, ResidualHead

ROOT = Path(__file__).resolve().parents[1]
API_FILES = sorted((ROOT / "workflows" / "api").glob("*_api.json"))
EXAMPLES = int(os.environ.get("QWEN_IDENTITY_FUZZ_EXAMPLES", "30"))  # raise for a deep local run
DEFS = pack_node_defs()
LOADERS = {"LoadQwen3VL", "LoadQwenImageDiffusers", "LoadResidualHead"}
NATIVE_ONLY = {"KSampler", "EmptySD3LatentImage", "VAEDecode", "UNETLoader", "CLIPLoader", "VAELoader",
               "ModelSamplingAuraFlow", "LoraLoaderModelOnly",
               # the pack's MODEL -> MODEL nodes need ComfyUI's MODEL (tested on a real one elsewhere)
               "QwenImageAccelerate", "QwenImageTrueCFG"}
# inputs whose valid range would make a test run slow (big images, many steps): only small valid values
SMALL_POOLS = {("QwenImageSampleFromEmbeds", "width"): [16, 32, 15, 17, 0, 4097, 33.0],
               ("QwenImageSampleFromEmbeds", "height"): [16, 32, 31, -16, 4112],
               ("QwenImageSampleFromEmbeds", "steps"): [1, 2, 0, -3, 201, 2.5],
               ("QwenImageSampleFromEmbeds", "max_batch"): [1, 3, 0, 65, True]}
FLOATS = [float("nan"), float("inf"), float("-inf"), -0.0, 0.5, 2.0, 1e308, -1e308, 0.999999, 1.000001]
STRINGS = ["", " ", ",", "1,,2", "nan", "inf", "0,nan", "1e309", "-1", "0", "a\nb", "\x00", "é✓", "1" * 40,
           "99999999999999999999", "0.5,1.0,1.5", "1234,5678", "1,2,3,4,5,6", "1;2", "[1, 2]", "-0.5, 0 ,0.5",
           "../../etc/passwd", "/etc/passwd", "1e-320", "d=0.1\nd=0.2"]


def _api(path: Path) -> dict:
    return {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}


def _widget_targets():
    out = []
    for path in API_FILES:
        for nid, node in _api(path).items():
            d = DEFS.get(node["class_type"])
            if d is None:
                continue
            for name, type_, opts, _ in ordered_inputs(d):
                if is_widget(type_, opts) and name in node["inputs"]:
                    out.append((path.name, nid, node["class_type"], name))
    return out


TARGETS = _widget_targets()


def _pool(node_type, name, type_, opts):
    if (node_type, name) in SMALL_POOLS:
        return SMALL_POOLS[(node_type, name)]
    if isinstance(type_, list):
        return list(type_) + ["", "not_a_choice", "../x", 0, None]
    lo, hi = opts.get("min"), opts.get("max")
    if type_ == "INT":
        near = [v for v in (lo, hi) if v is not None]
        return near + [v - 1 for v in near if v == lo] + [v + 1 for v in near if v == hi] + [0, -1, 2, 2**63, 1.5,
                                                                                             "3", None, True]
    if type_ == "FLOAT":
        near = [v for v in (lo, hi) if v is not None]
        return FLOATS + near + [lo - 1e-6] * (lo is not None) + [hi + 1e-6] * (hi is not None) + ["1.0", None]
    if type_ == "BOOLEAN":
        return [True, False, "true", 1, None]
    return STRINGS + [None, 5, ["1", 0]]


def _outside(type_, opts, value) -> bool:
    """Independent of the validator: is `value` outside what INPUT_TYPES allows?"""
    if isinstance(type_, list):
        return value not in type_
    if type_ == "STRING":
        return not isinstance(value, str)
    if type_ == "BOOLEAN":
        return not isinstance(value, bool)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (type_ == "INT" and not isinstance(value, int)):
        return True
    if math.isnan(value):
        return False    # NaN compares false with min and max: ComfyUI lets it through, so must the node cope
    return ("min" in opts and value < opts["min"]) or ("max" in opts and value > opts["max"])


# ------------------------------------------------------------------------------- the mini executor
@pytest.fixture(scope="module")
def standins(tiny_qwen3vl_dir, tiny_qwenimage_dir, tiny_qwenimage21_dir):
    """Tiny models for each family: a workflow whose diffusers loader names Qwen-Image 2.1 gets the 2.1 ones."""
    from qwen_identity.nodes import NODE_CLASS_MAPPINGS as N

    (vl,) = N["LoadQwen3VL"]().load("(none)", str(tiny_qwen3vl_dir), dtype="fp32", device="cpu")
    d = vl.feature_dim
    out = {"vl": vl}
    for suffix, folder, family in (("", tiny_qwenimage_dir, "qwen-image"), ("21", tiny_qwenimage21_dir, "qwen-image-2.1")):
        (pipe,) = N["LoadQwenImageDiffusers"]().load("", str(folder), dtype="fp32", device="cpu")
        cfg = pipe.pipeline.transformer.config
        h = cfg.get("joint_attention_dim") or cfg.get("context_in_dim")
        torch.manual_seed(0)
        head = ResidualHead(d, 2, h, meta=HeadMeta(feature_dim=d, tokens=2, hidden_size=h, family=family))
        with torch.no_grad():
            head.proj.weight.normal_(0, 1.0)
        out["pipe" + suffix], out["head" + suffix] = pipe, head
    return out


def _for_family(api: dict, s: dict) -> dict:
    """The stand-ins of the family the workflow names (Qwen-Image 2.1 or 1.x): its diffusers loader's folder, or
    ComfyUI's Qwen-Image 2.1 text-encode node."""
    names_21 = any((n["class_type"] == "LoadQwenImageDiffusers" and "2.1" in json.dumps(n["inputs"]))
                   or n["class_type"] == "TextEncodeQwenImage21" for n in api.values())
    return {**s, "pipe": s["pipe21"], "head": s["head21"]} if names_21 else s


def _topo(api: dict) -> list[str]:
    order, seen = [], set()

    def visit(nid):
        if nid in seen:
            return
        seen.add(nid)
        for v in api[nid]["inputs"].values():
            if isinstance(v, list) and len(v) == 2 and isinstance(v[0], str) and v[0] in api:
                visit(v[0])
        order.append(nid)
    for nid in sorted(api, key=int):
        visit(nid)
    return order


def execute(api: dict, s: dict, mutated: str | None = None) -> list[torch.Tensor]:
    s = _for_family(api, s)
    """Run a prompt with the pack's nodes; returns the IMAGE tensors that reach Save/PreviewImage."""
    from qwen_identity.nodes import NODE_CLASS_MAPPINGS as N

    results, saved = {}, []

    def val(v):
        if isinstance(v, list) and len(v) == 2 and isinstance(v[0], str) and v[0] in api:
            return results[v[0]][v[1]]
        return v

    for nid in _topo(api):
        node = api[nid]
        t, raw = node["class_type"], node["inputs"]
        if t in NATIVE_ONLY:
            results[nid] = (None,)
            continue
        inputs = {k: val(v) for k, v in raw.items()}
        if t == "LoadImage":
            g = torch.Generator().manual_seed(sum(map(ord, str(raw.get("image")))))
            results[nid] = (torch.rand(1, 32, 32, 3, generator=g), torch.zeros(1, 32, 32))
        elif t == "ImageBatch":
            results[nid] = (torch.cat([inputs["image1"], inputs["image2"]]),)
        elif t == "CLIPTextEncode":
            results[nid] = N["QwenImageTextEncodeDiffusers"]().encode(s["pipe"], inputs["text"])
        elif t == "TextEncodeQwenImage21":   # ComfyUI 0.38's node: (positive, negative, latent); no latent here
            encode = N["QwenImageTextEncodeDiffusers"]().encode
            results[nid] = (encode(s["pipe"], inputs["prompt"])[0], encode(s["pipe"], inputs["negative_prompt"])[0],
                            None)
        elif t in ("SaveImage", "PreviewImage"):
            saved.append(inputs["images"])   # None when it came from the (absent) native chain
            results[nid] = ()
        elif t == "MaskPreview":
            assert torch.isfinite(inputs["mask"]).all()
            results[nid] = ()
        elif t == "TrainIdentityHead":   # needs ComfyUI's MODEL: trained on a real one in tests/test_tune_nodes.py
            results[nid] = (s["head"], torch.zeros(1, 32, 32, 3))
        elif t in LOADERS:
            if nid == mutated:   # the loader must cope with the value; the tiny stand-in is used either way
                cls = N[t]
                try:
                    getattr(cls(), cls.FUNCTION)(**inputs)
                except UserInputError:
                    pass
            results[nid] = {"LoadQwen3VL": (s["vl"],), "LoadQwenImageDiffusers": (s["pipe"],),
                            "LoadResidualHead": (s["head"], "tiny head")}[t]
        else:
            if t == "QwenImageSampleFromEmbeds" and "pipeline" not in inputs:   # native MODEL+VAE -> tiny diffusers
                inputs.pop("model", None)
                inputs.pop("vae", None)
                inputs["pipeline"] = s["pipe"]
            cls = N[t]
            results[nid] = getattr(cls(), cls.FUNCTION)(**inputs)
    return [x for x in saved if x is not None]


def _small(api: dict) -> dict:
    api = copy.deepcopy(api)
    for node in api.values():
        if node["class_type"] == "QwenImageSampleFromEmbeds":
            node["inputs"].update(width=32, height=32, steps=2)
        if node["class_type"] == "ExtractIdentityFeatures" and node["inputs"].get("crop") == "face":
            node["inputs"]["crop"] = "center"   # the stand-in photos are noise: no face to find
        if node["class_type"] == "InjectResidual" and not node["inputs"].get("alphas"):
            node["inputs"]["strength"] = 1.0
    return api


def test_unmutated_workflows_run_on_the_stand_ins(standins):
    ran = 0
    for path in API_FILES:
        images = execute(_small(_api(path)), standins)
        for im in images:
            assert torch.isfinite(im).all()
        ran += bool(images)
    assert ran >= 3    # the native KSampler workflow saves what the (absent) native chain makes


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                         HealthCheck.too_slow])
@given(target=st.sampled_from(TARGETS), data=st.data())
def test_mutated_workflow_is_refused_by_validation_or_handled_by_the_nodes(standins, target, data):
    fname, nid, node_type, name = target
    api = _small(_api(ROOT / "workflows" / "api" / fname))
    spec = next((t, o) for n, t, o, _ in ordered_inputs(DEFS[node_type]) if n == name)
    type_, opts = spec
    value = data.draw(st.sampled_from(_pool(node_type, name, type_, opts)) | (
        st.text(max_size=12) if type_ == "STRING" else st.nothing()), label="value")
    problem = check_widget_value(node_type, name, type_, opts, value)
    if _outside(type_, opts, value):
        assert problem, f"the validator let {node_type}.{name}={value!r} through"
        return                                                  # ComfyUI refuses the prompt before running it
    assert problem is None or node_type in LOADERS, problem     # loader combos list files on the server only
    api[nid]["inputs"][name] = value
    try:
        images = execute(api, standins, mutated=nid)
    except UserInputError as e:
        assert str(e).strip()
        return
    for im in images:
        assert torch.isfinite(im).all(), f"{node_type}.{name}={value!r} gave NaN/inf pixels"
