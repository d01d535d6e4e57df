"""CI-side checks of workflows/ (no ComfyUI needed).

Every UI file (workflows/*.json, what the template browser lists and drag-and-drop loads) and API
twin (workflows/api/*_api.json, what /prompt and `comfy run` take): valid for its format; every node
type is the pack's or a ComfyUI core node from the snapshot the tests keep
(tests/comfyui_harness/comfyui_core_nodes.json, checked against a live server by the integration
suite); every widget value validates against the node's INPUT_TYPES (combo choices, INT/FLOAT
ranges; model/photo pickers against the documented file names); links connect matching types;
required inputs are connected; the UI file and its twin describe the same graph; seeds are fixed;
the files are exactly what tests/comfyui_harness/build_workflows.py writes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from comfyui_harness import build_workflows as bw
from comfyui_harness.workflow_format import (
    FRONTEND_ONLY_NODES, check_widget_value, core_node_defs, is_widget, ordered_inputs, pack_node_defs,
    socket_inputs, strip_meta, types_match, ui_to_api, ui_widget_values)

ROOT = Path(__file__).resolve().parents[1]
WF_DIR = ROOT / "workflows"
UI_FILES = sorted(WF_DIR.glob("*.json"))
API_FILES = sorted((WF_DIR / "api").glob("*.json"))

# Combos that ComfyUI fills from a folder listing: the values the workflows may use are the documented
# file names (README "## Workflows"), not whatever a snapshot server had on disk.
FILE_PICKERS = {
    ("UNETLoader", "unet_name"): {bw.UNET},
    ("LoraLoaderModelOnly", "lora_name"): {bw.LIGHTNING_LORA},
    ("CLIPLoader", "clip_name"): {bw.TEXT_ENCODER},
    ("VAELoader", "vae_name"): {bw.VAE},
    ("LoadImage", "image"): set(bw.PHOTOS) | set(bw.PEOPLE_PHOTOS),
    ("LoadQwen3VL", "model"): {bw.QWEN3VL},
    ("LoadResidualHead", "head_name"): {bw.HEAD, bw.HEAD_21},
    ("LoadQwenImageDiffusers", "model"): {bw.DIFFUSERS, bw.DIFFUSERS_21},
}


@pytest.fixture(scope="module")
def defs():
    core, pack = core_node_defs(), pack_node_defs()
    assert not set(core) & set(pack), "a pack node shadows a ComfyUI core node name"
    return {**core, **pack}


def _value_problems(node_type, name, type_, opts, value):
    picker = FILE_PICKERS.get((node_type, name))
    if picker is not None:
        return None if value in picker else f"{node_type}.{name}={value!r} is not a documented file {sorted(picker)}"
    return check_widget_value(node_type, name, type_, opts, value)


def test_every_ui_workflow_has_an_api_twin():
    assert {p.stem for p in UI_FILES} == set(bw.WORKFLOW_FILES)
    assert {p.name for p in API_FILES} == {f"{s}_api.json" for s in bw.WORKFLOW_FILES}


def test_files_are_what_the_builder_writes():
    stale = [str(p.relative_to(ROOT)) for p, text in bw.render_all().items()
             if not p.is_file() or p.read_text() != text]
    assert not stale, f"regenerate with `python tests/comfyui_harness/build_workflows.py`: {stale}"


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.name)
def test_ui_workflow_is_valid(path, defs):
    ui = json.loads(path.read_text())
    assert isinstance(ui.get("nodes"), list) and isinstance(ui.get("links"), list), "UI format needs nodes and links"
    assert ui.get("version") == 0.4 and ui.get("last_node_id") >= max(n["id"] for n in ui["nodes"])
    nodes = {n["id"]: n for n in ui["nodes"]}
    assert len(nodes) == len(ui["nodes"]), "duplicate node ids"
    problems = []
    for node in ui["nodes"]:
        t = node["type"]
        if t in FRONTEND_ONLY_NODES:
            continue
        if t not in defs:
            problems.append(f"node {node['id']}: unknown type {t!r} (neither the pack's nor a listed core node)")
            continue
        d = defs[t]
        values, p = ui_widget_values(node, d)
        problems += p
        for name, type_, opts, _ in ordered_inputs(d):
            if is_widget(type_, opts) and name in values:
                err = _value_problems(t, name, type_, opts, values[name])
                if err:
                    problems.append(f"node {node['id']}: {err}")
        linked = {i["name"] for i in node.get("inputs", []) if i.get("link") is not None}
        for name, _, required in socket_inputs(d):
            if required and name not in linked:
                problems.append(f"node {node['id']} ({t}): required input {name!r} is not connected")
        for i, out in enumerate(node.get("outputs", [])):
            if out["type"] != d["output"][i]:
                problems.append(f"node {node['id']} ({t}): output {i} is {out['type']}, the node says {d['output'][i]}")
    for lid, src, sslot, dst, dslot, ltype in ui["links"]:
        s, t = nodes.get(src), nodes.get(dst)
        if s is None or t is None:
            problems.append(f"link {lid}: missing node {src if s is None else dst}")
            continue
        out_type = defs[s["type"]]["output"][sslot]
        inp = t["inputs"][dslot]
        if inp.get("link") != lid:
            problems.append(f"link {lid}: target input {inp['name']} does not point back at it")
        if lid not in s["outputs"][sslot]["links"]:
            problems.append(f"link {lid}: source output does not list it")
        in_type = dict((n, ty) for n, ty, _, _ in ordered_inputs(defs[t["type"]]))[inp["name"]]
        if ltype != out_type or not types_match(out_type, in_type):
            problems.append(f"link {lid}: {s['type']} output {out_type} -> {t['type']}.{inp['name']} ({in_type})")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", API_FILES, ids=lambda p: p.name)
def test_api_workflow_is_valid(path, defs):
    api = json.loads(path.read_text())
    assert isinstance(api, dict) and "nodes" not in api, "API format is {id: {class_type, inputs}}"
    problems = []
    for nid, node in api.items():
        assert set(node) >= {"class_type", "inputs"}, f"node {nid} lacks class_type/inputs"
        t = node["class_type"]
        if t not in defs:
            problems.append(f"node {nid}: unknown type {t!r}")
            continue
        known = {n: (ty, o, r) for n, ty, o, r in ordered_inputs(defs[t])}
        for name, value in node["inputs"].items():
            if name not in known:
                problems.append(f"node {nid} ({t}): no input {name!r}")
                continue
            ty, opts, _ = known[name]
            if isinstance(value, list):  # a link [from_id, from_slot]
                src = api.get(value[0])
                if src is None:
                    problems.append(f"node {nid}.{name}: links to missing node {value[0]}")
                    continue
                out_type = defs[src["class_type"]]["output"][value[1]]
                if not types_match(out_type, ty):
                    problems.append(f"node {nid}.{name} ({ty}) fed by {src['class_type']} output {out_type}")
            else:
                err = _value_problems(t, name, ty, opts, value)
                if err:
                    problems.append(f"node {nid}: {err}")
        for name, (ty, opts, required) in known.items():
            if required and name not in node["inputs"]:
                problems.append(f"node {nid} ({t}): required input {name!r} missing")
    assert not problems, "\n".join(problems)
    assert any(n["class_type"] in ("SaveImage", "PreviewImage") for n in api.values()), "no output node"


@pytest.mark.parametrize("stem", sorted(bw.WORKFLOW_FILES))
def test_ui_file_and_api_twin_describe_the_same_graph(stem, defs):
    ui = json.loads((WF_DIR / f"{stem}.json").read_text())
    api = json.loads((WF_DIR / "api" / f"{stem}_api.json").read_text())
    assert ui_to_api(ui, defs) == strip_meta(api)


def test_seeds_are_fixed_and_model_files_are_documented():
    readme = "\n".join(p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])
    for path in API_FILES:
        for node in json.loads(path.read_text()).values():
            seed = node["inputs"].get("seed", node["inputs"].get("seeds"))
            if seed is not None and not isinstance(seed, list):
                assert re.fullmatch(r"\d+(,\d+)*", str(seed)), f"{path.name}: seed {seed!r} is not fixed"
    for (node_type, _), names in FILE_PICKERS.items():
        for name in names:
            assert name in readme, f"README/docs do not say where {name} ({node_type}) comes from"


def test_validator_catches_broken_files(defs, tmp_path):
    """The checks above can fail: a bad combo value, an out-of-range INT, a wrong link type."""
    ui = json.loads((WF_DIR / "qwen_identity_native_ksampler.json").read_text())
    ks = next(n for n in ui["nodes"] if n["type"] == "KSampler")
    values, _ = ui_widget_values(ks, defs["KSampler"])
    assert values["seed"] == 1234 and values["sampler_name"] == "euler"
    assert check_widget_value("KSampler", "sampler_name", defs["KSampler"]["input"]["required"]["sampler_name"][0],
                              {}, "not_a_sampler")
    assert check_widget_value("KSampler", "steps", "INT", defs["KSampler"]["input"]["required"]["steps"][1], 0)
    assert not types_match("IMAGE", "CONDITIONING")
    ks["widgets_values"][1] = "randomize"
    _, problems = ui_widget_values(ks, defs["KSampler"])
    assert problems and "fixed" in problems[0]
