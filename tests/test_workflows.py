"""CI-side checks of workflows/ (no ComfyUI needed).

Every UI file (workflows/*.json, what the template browser lists and drag-and-drop loads) and API
twin (workflows/api/*_api.json, what /prompt and `comfy run` take): valid for its format; every node
type is the pack's or a ComfyUI core node from the snapshot the tests keep
(tests/comfyui_harness/comfyui_core_nodes.json, checked against a live server by the integration
suite) or, for a workflow that needs a newer ComfyUI (build_workflows.NEEDS_COMFYUI), from the hand-written
definitions of that release's nodes (comfyui_0.38_nodes_from_source.json, read from its stored source; an
input either snapshot lacks fails the check); every widget value validates against the node's INPUT_TYPES (combo choices, INT/FLOAT
ranges; model/photo pickers against the documented file names); links connect matching types;
required inputs are connected; the UI file and its twin describe the same graph; seeds are fixed;
the files are exactly what tests/comfyui_harness/build_workflows.py writes.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest

from comfyui_harness import build_workflows as bw
from comfyui_harness.workflow_format import (
    AUTOGROW, FRONTEND_ONLY_NODES, check_widget_value, core_node_defs, is_widget, ordered_inputs, pack_node_defs,
    socket_inputs, source_node_defs, strip_meta, to_api, to_ui, types_match, ui_to_api, ui_widget_values)

ROOT = Path(__file__).resolve().parents[1]
WF_DIR = ROOT / "workflows"
UI_FILES = sorted(WF_DIR.glob("*.json"))
API_FILES = sorted((WF_DIR / "api").glob("*.json"))

# Combos that ComfyUI fills from a folder listing: the values the workflows may use are the documented
# file names (README "## Workflows"), not whatever a snapshot server had on disk.
FILE_PICKERS = {
    ("UNETLoader", "unet_name"): {bw.UNET, bw.UNET_21},
    ("LoraLoaderModelOnly", "lora_name"): {bw.LIGHTNING_LORA},
    ("CLIPLoader", "clip_name"): {bw.TEXT_ENCODER, bw.TEXT_ENCODER_21},
    ("VAELoader", "vae_name"): {bw.VAE, bw.VAE_21},
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


def ui_problems(ui: dict, defs: dict) -> list[str]:
    """What is wrong with a UI-format workflow against the node definitions `defs` (empty when nothing)."""
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
        known = {n for n, _, _, _ in ordered_inputs(d)}
        for inp in node.get("inputs", []):
            if inp["name"] not in known:
                problems.append(f"node {node['id']} ({t}): no input {inp['name']!r}")
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
        if s["type"] not in defs or t["type"] not in defs:
            continue   # reported above
        out_type = defs[s["type"]]["output"][sslot]
        inp = t["inputs"][dslot]
        if inp.get("link") != lid:
            problems.append(f"link {lid}: target input {inp['name']} does not point back at it")
        if lid not in s["outputs"][sslot]["links"]:
            problems.append(f"link {lid}: source output does not list it")
        in_type = dict((n, ty) for n, ty, _, _ in ordered_inputs(defs[t["type"]])).get(inp["name"])
        if in_type is None:
            continue   # reported above
        if ltype != out_type or not types_match(out_type, in_type):
            problems.append(f"link {lid}: {s['type']} output {out_type} -> {t['type']}.{inp['name']} ({in_type})")
    return problems


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.name)
def test_ui_workflow_is_valid(path, defs):
    problems = ui_problems(json.loads(path.read_text()), bw.defs_for(path.stem, defs))
    assert not problems, "\n".join(problems)


def api_problems(api: dict, defs: dict) -> list[str]:
    """What is wrong with an API-format workflow against the node definitions `defs` (empty when nothing)."""
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
                if src["class_type"] not in defs:
                    continue   # reported as unknown
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
    return problems


@pytest.mark.parametrize("path", API_FILES, ids=lambda p: p.name)
def test_api_workflow_is_valid(path, defs):
    api = json.loads(path.read_text())
    problems = api_problems(api, bw.defs_for(path.stem.removesuffix("_api"), defs))
    assert not problems, "\n".join(problems)
    assert any(n["class_type"] in ("SaveImage", "PreviewImage") for n in api.values()), "no output node"


@pytest.mark.parametrize("stem", sorted(bw.WORKFLOW_FILES))
def test_ui_file_and_api_twin_describe_the_same_graph(stem, defs):
    ui = json.loads((WF_DIR / f"{stem}.json").read_text())
    api = json.loads((WF_DIR / "api" / f"{stem}_api.json").read_text())
    assert ui_to_api(ui, bw.defs_for(stem, defs)) == strip_meta(api)


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


# ---- workflows for a newer ComfyUI, checked against its hand-written node definitions ------------------

NATIVE_21 = "qwen_identity_21_native"


def _files(stem):
    return (json.loads((WF_DIR / f"{stem}.json").read_text()),
            json.loads((WF_DIR / "api" / f"{stem}_api.json").read_text()))


def test_newer_comfyui_workflows_name_exactly_the_nodes_they_need(defs):
    """A workflow in NEEDS_COMFYUI uses nodes beyond the tested releases' snapshots and the pack's only as listed
    there (what the live tests' skip names), each defined in that release's hand-written definitions; every other
    workflow uses none."""
    for stem in bw.WORKFLOW_FILES:
        _, api = _files(stem)
        beyond = {n["class_type"] for n in api.values()} - set(defs)
        if stem in bw.NEEDS_COMFYUI:
            release, nodes = bw.NEEDS_COMFYUI[stem]
            assert beyond == set(nodes), (stem, beyond)
            assert set(nodes) <= set(source_node_defs(release)), (stem, nodes)
        else:
            assert beyond == set(), (stem, beyond)


def test_native_21_workflow_is_wired_as_comfyuis_own_21_templates_with_the_head(defs):
    """UNETLoader straight to KSampler (no ModelSamplingAuraFlow in ComfyUI's 2.1 templates); CLIPLoader type
    qwen_image with the 2.1 text encoder; the person's photos feed the features AND TextEncodeQwenImage21's
    reference sockets; InjectResidual on its positive; its negative and latent to KSampler (25 steps, CFG 1,
    euler / simple)."""
    ui, api = _files(NATIVE_21)
    by_type = {}
    for nid, n in api.items():
        by_type.setdefault(n["class_type"], []).append(nid)
    assert "ModelSamplingAuraFlow" not in by_type
    (te,), (inj,), (ks,), (feats,) = (by_type[t] for t in ("TextEncodeQwenImage21", "InjectResidual", "KSampler",
                                                             "ExtractIdentityFeatures"))
    (unet,), (clip,), (vae,) = by_type["UNETLoader"], by_type["CLIPLoader"], by_type["VAELoader"]
    assert api[unet]["inputs"]["unet_name"] == bw.UNET_21
    assert api[clip]["inputs"]["clip_name"] == bw.TEXT_ENCODER_21 and api[clip]["inputs"]["type"] == "qwen_image"
    assert api[vae]["inputs"]["vae_name"] == bw.VAE_21
    t = api[te]["inputs"]
    refs = sorted(k for k in t if k.startswith("images."))
    assert refs == ["images.image_1", "images.image_2"] and t["vae"] == [vae, 0] and t["clip"] == [clip, 0]
    photos = [t[k][0] for k in refs]
    assert all(api[p]["class_type"] == "LoadImage" for p in photos)
    batch = api[feats]["inputs"]["images"][0]
    assert sorted(v[0] for v in api[batch]["inputs"].values()) == sorted(photos)   # the same photos, both ways
    assert api[inj]["inputs"]["conditioning"] == [te, 0]
    k = api[ks]["inputs"]
    assert (k["model"], k["positive"], k["negative"], k["latent_image"]) == ([unet, 0], [inj, 0], [te, 1], [te, 2])
    assert (k["steps"], k["cfg"], k["sampler_name"], k["scheduler"]) == (25, 1.0, "euler", "simple")
    note = next(n["widgets_values"][0] for n in ui["nodes"] if n["type"] == "MarkdownNote")
    assert "ComfyUI 0.38 or newer" in note
    for name in (bw.UNET_21, bw.TEXT_ENCODER_21, bw.VAE_21):
        assert f"{bw.HF_21}/" in note and name in note
    # the UI shows the two connected reference sockets and one free one, as ComfyUI's frontend keeps them
    node = next(n for n in ui["nodes"] if n["type"] == "TextEncodeQwenImage21")
    assert [(i["name"], i["link"] is not None) for i in node["inputs"]] == [
        ("clip", True), ("images.image_1", True), ("images.image_2", True), ("images.image_3", False), ("vae", True)]


def test_autogrow_inputs_are_their_members():
    """An Autogrow input stands for its members `<input>.<name>` (the first `min` required), in its place."""
    d = source_node_defs("0.38")["TextEncodeQwenImage21"]
    names = [(n, t, r) for n, t, _, r in ordered_inputs(d)]
    assert names[:4] == [("clip", "CLIP", True), ("prompt", "STRING", True), ("negative_prompt", "STRING", True),
                         ("resolution", "INT", True)]
    assert names[4:20] == [(f"images.image_{i}", "IMAGE", False) for i in range(1, 17)]
    assert names[20:] == [("vae", "VAE", False)] and d["input"]["required"]["images"][0] == AUTOGROW
    grown = copy.deepcopy(d)
    grown["input"]["required"]["images"][1]["template"] = {"input": {"required": {"img": ["IMAGE", {}]}},
                                                          "prefix": "img", "min": 1, "max": 3}
    assert [(n, r) for n, _, _, r in ordered_inputs(grown) if n.startswith("images.")] == [
        ("images.img0", True), ("images.img1", False), ("images.img2", False)]


def test_an_input_the_0_38_definitions_lack_fails_the_checks(defs):
    """The native 2.1 workflow passes only against the 0.38 definitions it was written from: without them its
    node is unknown; a definition that lacks an input the workflow uses, or a workflow input the definition does
    not have, is reported in both formats."""
    ui, api = _files(NATIVE_21)
    full = bw.defs_for(NATIVE_21, defs)
    assert ui_problems(ui, full) == [] and api_problems(api, full) == []
    assert any("unknown type 'TextEncodeQwenImage21'" in p for p in api_problems(api, defs))
    assert any("unknown type 'TextEncodeQwenImage21'" in p for p in ui_problems(ui, defs))

    def lacking(change):
        d = copy.deepcopy(full)
        change(d["TextEncodeQwenImage21"])
        return d

    for change, missing in (
            (lambda d: d["input"]["required"].pop("images") and d["input_order"]["required"].remove("images"),
             "images.image_1"),
            (lambda d: d["input"]["required"]["images"][1]["template"].update(names=["image_1"]), "images.image_2"),
            (lambda d: d["input"]["optional"].pop("vae") and d["input_order"]["optional"].remove("vae"), "vae"),
            (lambda d: d["input"]["required"].pop("resolution") and d["input_order"]["required"].remove("resolution"),
             "resolution")):
        d = lacking(change)
        assert any(f"no input {missing!r}" in p for p in api_problems(api, d)), missing
        if missing != "resolution":   # a widget: the UI file holds its value by position (reported as a count)
            assert any(f"no input {missing!r}" in p for p in ui_problems(ui, d)), missing
        else:
            assert any("widget values for" in p for p in ui_problems(ui, d))
    bad_api = copy.deepcopy(api)
    te = next(n for n in bad_api.values() if n["class_type"] == "TextEncodeQwenImage21")
    te["inputs"]["images.image_17"] = te["inputs"].pop("images.image_2")
    te["inputs"]["image"] = te["inputs"]["images.image_1"]
    found = api_problems(bad_api, full)
    assert any("no input 'images.image_17'" in p for p in found) and any("no input 'image'" in p for p in found)
    bad_ui = copy.deepcopy(ui)
    node = next(n for n in bad_ui["nodes"] if n["type"] == "TextEncodeQwenImage21")
    node["inputs"][2]["name"] = "images.image_17"
    assert any("no input 'images.image_17'" in p for p in ui_problems(bad_ui, full))


def test_ui_autogrow_sockets_follow_the_connections():
    """to_ui lists an Autogrow group's connected members and the one after the last (the first when none)."""
    from comfyui_harness.workflow_format import Graph, Node

    d = {"T": source_node_defs("0.38")["TextEncodeQwenImage21"],
         "I": {"input": {}, "input_order": {}, "output": ["IMAGE"], "output_name": ["IMAGE"]}}
    te = Node(id=1, type="T", pos=(0, 0), widgets={"prompt": "", "negative_prompt": "", "resolution": 1024})
    for linked, shown in (([], ["images.image_1"]), ([1], ["images.image_1", "images.image_2"]),
                          ([1, 2, 3], ["images.image_1", "images.image_2", "images.image_3", "images.image_4"])):
        nodes = [te] + [Node(id=10 + k, type="I", pos=(0, 0)) for k in linked]
        links = [(10 + k, 0, 1, f"images.image_{k}") for k in linked]
        ui = to_ui(Graph(nodes=nodes, links=links), d)
        names = [i["name"] for i in ui["nodes"][0]["inputs"] if i["name"].startswith("images.")]
        assert names == shown, (linked, names)
        assert to_api(Graph(nodes=nodes, links=links), d)["1"]["inputs"].keys() >= {f"images.image_{k}" for k in linked}
