"""ComfyUI workflow files: node definitions, the UI (drag-and-drop) and API (/prompt) formats.

Node definitions use ComfyUI's `/object_info` layout: `{"input": {"required": {name: [type, opts]},
"optional": {...}}, "input_order": {...}, "output": [...], "output_name": [...]}`; `pack_node_defs()`
converts the pack's own INPUT_TYPES/RETURN_TYPES into it, `core_node_defs()` reads the snapshot of the
ComfyUI core nodes the workflows use (taken from ComfyUI 0.3.64's /object_info), `source_node_defs()` the
hand-written definitions of newer ComfyUI nodes no tested release has (read from that release's stored
source files, cited in the file).

Autogrow inputs (`COMFY_AUTOGROW_V3`, ComfyUI's V3 node API: a group of like sockets that grows as they are
connected) stand in /object_info as ONE entry, `[COMFY_AUTOGROW_V3, {"template": {"input": {"required":
{short: [TYPE, opts]}}, "names": [...] | "prefix": p, "max": n, "min": m}}]`; a prompt and a UI file address
each member as `<input>.<name>` (`images.image_1`). `ordered_inputs()` yields those members in the group's
place (the first `min` of a required template required, the others optional); a UI file lists the connected
members and one free one after them, as the frontend keeps them.

UI format (what Save/Export writes and drag-and-drop reads): `nodes` with `inputs` (sockets), `outputs`,
`widgets_values` (the widget inputs in definition order, plus the frontend's extra widgets: a
"control after generate" combo after seed-like inputs and an "upload" button value after image-upload
combos) and `links` `[id, from_node, from_slot, to_node, to_slot, type]`. API format:
`{id: {"class_type", "inputs": {name: value | [from_id, from_slot]}}}`.
Standard library only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

# The core nodes' definitions the workflows are built and checked against: those of the oldest ComfyUI tested
# (CORE_SNAPSHOT_VERSION). Newer releases each have comfyui_core_nodes_<version>.json beside it (written by
# comfyui_harness/core_snapshot.py), checked against their live server; tests/test_core_node_snapshots.py
# checks that what the workflows rely on is the same in all of them.
CORE_SNAPSHOT = Path(__file__).with_name("comfyui_core_nodes.json")
CORE_SNAPSHOT_VERSION = "0.3.64"
# Node definitions of ComfyUI releases that cannot run here, written by hand from their stored source
# (each entry cites its file and commit): version -> file. Workflows that need such a release are checked
# against these (tests/test_workflows.py), never against a live server.
SOURCE_SNAPSHOTS = {"0.38": Path(__file__).with_name("comfyui_0.38_nodes_from_source.json")}
AUTOGROW = "COMFY_AUTOGROW_V3"
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")


# ---- node definitions --------------------------------------------------------------------------

def _jsonable(value):
    return json.loads(json.dumps(value, default=str))


def node_def_from_class(cls) -> dict:
    """A V1 node class as /object_info describes it (INPUT_TYPES() is called)."""
    types = cls.INPUT_TYPES()
    inputs = {sec: {name: list(spec) for name, spec in types[sec].items()} for sec in ("required", "optional")
              if sec in types}
    out = list(cls.RETURN_TYPES)
    return _jsonable({
        "input": inputs,
        "input_order": {sec: list(v) for sec, v in types.items()},  # as /object_info builds it
        "output": out,
        "output_name": list(getattr(cls, "RETURN_NAMES", None) or out),
        "output_is_list": list(getattr(cls, "OUTPUT_IS_LIST", None) or [False] * len(out)),
        "output_node": bool(getattr(cls, "OUTPUT_NODE", False)),
    })


def pack_node_defs() -> dict:
    from qwen_identity.nodes import NODE_CLASS_MAPPINGS

    return {name: node_def_from_class(cls) for name, cls in NODE_CLASS_MAPPINGS.items()}


def snapshot_path(version: Optional[str] = None) -> Path:
    """The core-node snapshot file of ComfyUI `version` (None: the one the workflows are built against)."""
    if version is None or version == CORE_SNAPSHOT_VERSION:
        return CORE_SNAPSHOT
    return CORE_SNAPSHOT.with_name(f"comfyui_core_nodes_{version}.json")


def snapshot_versions() -> list[str]:
    """Every ComfyUI version with a core-node snapshot, the workflows' own first."""
    others = sorted(p.stem.removeprefix("comfyui_core_nodes_") for p in CORE_SNAPSHOT.parent.glob("comfyui_core_nodes_*.json"))
    return [CORE_SNAPSHOT_VERSION, *others]


def core_node_defs(version: Optional[str] = None) -> dict:
    """The core nodes' /object_info entries of ComfyUI `version` (None: the workflows' own snapshot)."""
    return {k: v for k, v in json.loads(snapshot_path(version).read_text()).items() if not k.startswith("_")}


def source_node_defs(version: str) -> dict:
    """The hand-written /object_info entries of ComfyUI `version`'s nodes (SOURCE_SNAPSHOTS)."""
    return {k: v for k, v in json.loads(SOURCE_SNAPSHOTS[version].read_text()).items() if not k.startswith("_")}


def autogrow_members(name: str, opts: dict, required: bool) -> list[tuple[str, Any, dict, bool]]:
    """The sockets of the Autogrow input `name`: (`name.member`, type, options, required), in order.
    ComfyUI's comfy_api Autogrow: a `names` template offers those names, a `prefix` one prefix0..prefix{max-1};
    the first `min` are required when the input and its template input are."""
    template = opts.get("template") or {}
    inner = template.get("input") or {}
    sec, specs = next(((s, v) for s in ("required", "optional") for v in [inner.get(s) or {}] if v), (None, {}))
    if not specs:
        raise ValueError(f"Autogrow input {name!r} has no template input")
    short, spec = next(iter(specs.items()))
    if "names" in template:
        names = list(template["names"])
    else:
        names = [f"{template.get('prefix', short)}{i}" for i in range(int(template.get("max", 10)))]
    low = int(template.get("min", 1))
    opts_ = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return [(f"{name}.{n}", spec[0], opts_, required and sec == "required" and i < low) for i, n in enumerate(names)]


def ordered_inputs(node_def: dict) -> Iterator[tuple[str, Any, dict, bool]]:
    """(name, type, options, required) in the order ComfyUI shows them; an Autogrow input as its members."""
    for sec in ("required", "optional"):
        specs = node_def.get("input", {}).get(sec, {})
        for name in node_def.get("input_order", {}).get(sec, list(specs)):
            spec = specs[name]
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            if spec[0] == AUTOGROW:
                yield from autogrow_members(name, opts, sec == "required")
            else:
                yield name, spec[0], opts, sec == "required"


def autogrow_group(node_def: dict, name: str) -> Optional[str]:
    """The Autogrow input `name` (`images.image_1`) belongs to, or None."""
    group = name.partition(".")[0]
    for sec in ("required", "optional"):
        spec = node_def.get("input", {}).get(sec, {}).get(group)
        if spec is not None and spec[0] == AUTOGROW and "." in name:
            return group
    return None


def is_widget(type_, opts: dict) -> bool:
    if opts.get("forceInput"):
        return False
    return isinstance(type_, list) or type_ in WIDGET_TYPES


def widget_slots(node_def: dict) -> list[tuple[str, str]]:
    """The entries of a UI node's `widgets_values`: (input name, "value" | "control" | "upload")."""
    slots = []
    for name, type_, opts, _ in ordered_inputs(node_def):
        if not is_widget(type_, opts):
            continue
        slots.append((name, "value"))
        combo = isinstance(type_, list) or type_ == "COMBO"
        if opts.get("control_after_generate") or (type_ == "INT" and name in ("seed", "noise_seed")):
            if combo or type_ in ("INT", "FLOAT"):
                slots.append((name, "control"))
        if combo and opts.get("image_upload"):
            slots.append((name, "upload"))
    return slots


def socket_inputs(node_def: dict) -> list[tuple[str, str, bool]]:
    """Non-widget inputs (sockets): (name, type, required)."""
    return [(n, t, r) for n, t, o, r in ordered_inputs(node_def) if not is_widget(t, o)]


def check_widget_value(node_type: str, name: str, type_, opts: dict, value, file_choices=None) -> Optional[str]:
    """None when `value` is valid for the input, else the problem. `file_choices`: allowed values for a
    combo ComfyUI fills from a folder listing (empty in a snapshot taken without models)."""
    where = f"{node_type}.{name}={value!r}"
    if isinstance(type_, list) or type_ == "COMBO":
        choices = type_ if isinstance(type_, list) else opts.get("options", [])
        if not choices and file_choices is not None:
            choices = file_choices
        if value not in choices:
            return f"{where} is not one of {list(choices)[:12]}"
        return None
    if type_ == "INT":
        if isinstance(value, bool) or not isinstance(value, int):
            return f"{where} is not an integer"
    elif type_ == "FLOAT":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"{where} is not a number"
    elif type_ == "BOOLEAN":
        return None if isinstance(value, bool) else f"{where} is not a boolean"
    elif type_ == "STRING":
        return None if isinstance(value, str) else f"{where} is not a string"
    if type_ in ("INT", "FLOAT"):
        if "min" in opts and value < opts["min"]:
            return f"{where} is below the minimum {opts['min']}"
        if "max" in opts and value > opts["max"]:
            return f"{where} is above the maximum {opts['max']}"
    return None


def types_match(output_type: str, input_type) -> bool:
    if isinstance(input_type, list):
        input_type = "COMBO"
    if "*" in (output_type, input_type):
        return True
    return set(str(output_type).split(",")) & set(str(input_type).split(",")) != set()


# ---- building both formats from one description --------------------------------------------------

@dataclass
class Node:
    id: int
    type: str
    pos: tuple[int, int]
    widgets: dict = field(default_factory=dict)        # input name -> value (every widget input)
    title: Optional[str] = None
    size: tuple[int, int] = (320, 120)
    properties: dict = field(default_factory=dict)     # e.g. {"models": [{name, url, directory}]}


@dataclass
class Graph:
    nodes: list[Node]
    links: list[tuple[int, int, int, str]]             # (from_id, from_slot, to_id, to_input_name)
    uid: str = "00000000-0000-4000-8000-000000000000"
    notes: list[tuple[str, tuple[int, int], tuple[int, int]]] = field(default_factory=list)  # MarkdownNote


def to_api(graph: Graph, defs: dict) -> dict:
    api = {}
    for n in graph.nodes:
        d = defs[n.type]
        inputs = {}
        for name, type_, opts, _ in ordered_inputs(d):
            if is_widget(type_, opts) and name in n.widgets:
                inputs[name] = n.widgets[name]
        for src, slot, dst, name in graph.links:
            if dst == n.id:
                inputs[name] = [str(src), slot]
        api[str(n.id)] = {"class_type": n.type, "inputs": inputs, "_meta": {"title": n.title or n.type}}
    return api


def to_ui(graph: Graph, defs: dict) -> dict:
    by_id = {n.id: n for n in graph.nodes}
    links, ui_nodes = [], []
    link_of = {}  # (dst, input name) -> link id
    out_links: dict[tuple[int, int], list[int]] = {}
    for i, (src, slot, dst, name) in enumerate(graph.links, start=1):
        out_type = defs[by_id[src].type]["output"][slot]
        link_of[(dst, name)] = i
        out_links.setdefault((src, slot), []).append(i)
        links.append([i, src, slot, dst, None, out_type])  # to_slot filled below
    for order, n in enumerate(graph.nodes):
        d = defs[n.type]
        inputs = []
        for name, type_, _ in socket_inputs(d):
            lid = link_of.get((n.id, name))
            group = autogrow_group(d, name)
            if group is not None:   # the frontend shows the connected members and one free one after them
                if lid is None and not _group_reaches(n.id, group, name, d, link_of):
                    continue
                inputs.append({"name": name, "type": type_, "label": name.partition(".")[2], "link": lid})
            else:
                inputs.append({"name": name, "type": type_, "link": lid})
            if lid is not None:
                links[lid - 1][4] = len(inputs) - 1
        for name, type_, opts, _ in ordered_inputs(d):  # widgets fed by a link become input sockets
            lid = link_of.get((n.id, name))
            if lid is not None and is_widget(type_, opts):
                inputs.append({"name": name, "type": "COMBO" if isinstance(type_, list) else type_,
                               "widget": {"name": name}, "link": lid})
                links[lid - 1][4] = len(inputs) - 1
        outputs = [{"name": oname, "type": otype, "links": out_links.get((n.id, s), []), "slot_index": s}
                   for s, (otype, oname) in enumerate(zip(d["output"], d["output_name"]))]
        values = []
        for name, kind in widget_slots(d):
            if kind == "value":
                values.append(n.widgets[name])
            elif kind == "control":
                values.append("fixed")  # shared files reproduce: seeds never change by themselves
            else:
                values.append("image")
        node = {"id": n.id, "type": n.type, "pos": list(n.pos), "size": list(n.size), "flags": {}, "order": order,
                "mode": 0, "inputs": inputs, "outputs": outputs,
                "properties": {"Node name for S&R": n.type, **n.properties}, "widgets_values": values}
        if n.title:
            node["title"] = n.title
        ui_nodes.append(node)
    next_id = max(by_id) + 1
    for text, pos, size in graph.notes:
        ui_nodes.append({"id": next_id, "type": "MarkdownNote", "pos": list(pos), "size": list(size), "flags": {},
                         "order": len(ui_nodes), "mode": 0, "inputs": [], "outputs": [],
                         "properties": {}, "widgets_values": [text], "color": "#432", "bgcolor": "#653"})
        next_id += 1
    return {"id": graph.uid, "revision": 0, "last_node_id": next_id - 1, "last_link_id": len(links),
            "nodes": ui_nodes, "links": links, "groups": [], "config": {},
            "extra": {"ds": fit_view(ui_nodes)}, "version": 0.4}


def _group_reaches(node_id: int, group: str, name: str, d: dict, link_of: dict) -> bool:
    """True when `name` comes right after the last connected member of its Autogrow group (or is the first)."""
    members = [m for m, _, _ in socket_inputs(d) if autogrow_group(d, m) == group]
    connected = [i for i, m in enumerate(members) if (node_id, m) in link_of]
    return members.index(name) == (connected[-1] + 1 if connected else 0)


def fit_view(ui_nodes: list, view=(1400, 860), margin: int = 20) -> dict:
    """Canvas scale/offset that shows the graph from its top-left corner, all of it when it fits."""
    x0 = min(n["pos"][0] for n in ui_nodes)
    y0 = min(n["pos"][1] for n in ui_nodes) - 30  # title bar
    x1 = max(n["pos"][0] + n["size"][0] for n in ui_nodes)
    y1 = max(n["pos"][1] + n["size"][1] for n in ui_nodes)
    scale = min(1.0, (view[0] - 2 * margin) / (x1 - x0), (view[1] - 2 * margin) / (y1 - y0))
    scale = round(max(scale, 0.6), 3)  # below 0.6 the canvas drops widget text (low-quality rendering)
    return {"scale": scale, "offset": [round(margin / scale - x0, 1), round(margin / scale - y0, 1)]}


# ---- reading UI files back -------------------------------------------------------------------------

FRONTEND_ONLY_NODES = {"MarkdownNote", "Note"}  # shown in the UI, never sent to /prompt


def ui_widget_values(node: dict, node_def: dict) -> tuple[dict, list[str]]:
    """{input name: value} of a UI node's widgets_values, and problems (count, control values)."""
    slots = widget_slots(node_def)
    values = node.get("widgets_values", [])
    if isinstance(values, dict):  # some V3 nodes save a dict
        return dict(values), []
    problems = []
    if len(values) != len(slots):
        problems.append(f"node {node['id']} ({node['type']}): {len(values)} widget values for "
                        f"{len(slots)} widget slots {slots}")
    out = {}
    for (name, kind), value in zip(slots, values):
        if kind == "value":
            out[name] = value
        elif kind == "control" and value != "fixed":
            problems.append(f"node {node['id']} ({node['type']}): '{name}' control is {value!r}; "
                            f"use 'fixed' so the seed in the shared file is the one used")
    return out, problems


def ui_to_api(ui: dict, defs: dict) -> dict:
    """The API prompt the frontend would send for a UI workflow (no hidden/bypassed nodes)."""
    links = {l[0]: l for l in ui["links"]}
    api = {}
    for node in ui["nodes"]:
        if node["type"] in FRONTEND_ONLY_NODES or node.get("mode", 0) != 0:
            continue
        d = defs[node["type"]]
        values, _ = ui_widget_values(node, d)
        inputs = {}
        for name, type_, opts, _ in ordered_inputs(d):
            if is_widget(type_, opts) and name in values:
                inputs[name] = values[name]
        for inp in node.get("inputs", []):
            if inp.get("link") is not None:
                l = links[inp["link"]]
                inputs[inp["name"]] = [str(l[1]), l[2]]
        api[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return api


def strip_meta(api: dict) -> dict:
    return {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()}
