"""The core ComfyUI nodes the pack's workflows use mean the same in every ComfyUI release tested.

The workflows are built and checked against the first release's snapshot (comfyui_core_nodes.json); each
newer release has its own (comfyui_core_nodes_<version>.json, checked against that release's live server by
tests/test_comfyui_integration.py). Releases may add outputs, search aliases or combo options; what a
committed workflow relies on must not change: the inputs and their order (a UI file's `widgets_values` are
positional), their types, widget defaults, the combo options the workflows may use, and the outputs at the
indices links point to.

A workflow that needs a newer ComfyUI than the tested releases is checked against that release's hand-written
node definitions (comfyui_0.38_nodes_from_source.json); where they define a core node the snapshots also have,
they must keep what the other workflows rely on too."""

from __future__ import annotations

import copy

import pytest

from comfyui_harness.workflow_format import SOURCE_SNAPSHOTS, core_node_defs, snapshot_versions, source_node_defs


def _combo(spec):
    return spec[0] if isinstance(spec[0], list) else None


def relied_on_differences(base: dict, other: dict) -> list[str]:
    """What a workflow built against `base` would find different in `other` (empty when it works there)."""
    out = []
    for name, b in base.items():
        o = other.get(name)
        if o is None:
            out.append(f"{name}: missing")
            continue
        for sec in ("required", "optional"):
            if b.get("input_order", {}).get(sec, []) != o.get("input_order", {}).get(sec, []):
                out.append(f"{name}: {sec} inputs {b['input_order'].get(sec)} -> {o['input_order'].get(sec)}")
            for inp, bspec in b["input"].get(sec, {}).items():
                ospec = o["input"].get(sec, {}).get(inp)
                if ospec is None:
                    continue   # reported through input_order
                bc, oc = _combo(bspec), _combo(ospec)
                if (bc is None) != (oc is None) or (bc is None and bspec[0] != ospec[0]):
                    out.append(f"{name}.{inp}: type {bspec[0]!r} -> {ospec[0]!r}")
                elif bc is not None and not set(bc) <= set(oc):
                    out.append(f"{name}.{inp}: options {sorted(set(bc) - set(oc))} gone")
                bopt = bspec[1] if len(bspec) > 1 and isinstance(bspec[1], dict) else {}
                oopt = ospec[1] if len(ospec) > 1 and isinstance(ospec[1], dict) else {}
                if bopt.get("default") != oopt.get("default"):
                    out.append(f"{name}.{inp}: default {bopt.get('default')!r} -> {oopt.get('default')!r}")
        if o["output"][:len(b["output"])] != b["output"]:
            out.append(f"{name}: outputs {b['output']} -> {o['output']}")
    return out


@pytest.mark.parametrize("version", snapshot_versions()[1:])
def test_what_the_workflows_rely_on_is_the_same_in_every_release(version):
    assert snapshot_versions()[0] == "0.3.64"
    assert relied_on_differences(core_node_defs(), core_node_defs(version)) == []


def test_a_change_a_workflow_would_meet_is_found():
    base = core_node_defs()
    assert relied_on_differences(base, base) == []
    grown = copy.deepcopy(base)
    grown["SaveImage"]["output"] = ["IMAGE"]                      # a new output, as 0.33 added: fine
    grown["KSampler"]["input"]["required"]["sampler_name"][0].append("new_sampler")   # a new option: fine
    assert relied_on_differences(base, grown) == []
    for change, expected in (
            (lambda d: d["KSampler"]["input_order"]["required"].reverse(), "KSampler: required inputs"),
            (lambda d: d["KSampler"]["input"]["required"]["steps"][1].update(default=30), "KSampler.steps: default"),
            (lambda d: d["KSampler"]["input"]["required"]["sampler_name"][0].remove("euler"), "options ['euler'] gone"),
            (lambda d: d["CLIPTextEncode"]["input"]["required"]["text"].__setitem__(0, "INT"), "CLIPTextEncode.text: type"),
            (lambda d: d["VAEDecode"].__setitem__("output", ["LATENT"]), "VAEDecode: outputs"),
            (lambda d: d.pop("ImageBatch"), "ImageBatch: missing")):
        changed = copy.deepcopy(base)
        change(changed)
        found = relied_on_differences(base, changed)
        assert any(expected in f for f in found), (expected, found)


@pytest.mark.parametrize("release", sorted(SOURCE_SNAPSHOTS))
def test_hand_written_definitions_of_a_newer_release_keep_the_shared_core_nodes(release):
    base, newer = core_node_defs(), source_node_defs(release)
    shared = {name: base[name] for name in newer if name in base}
    assert shared, "no core node in common: nothing ties these definitions to the tested releases"
    assert relied_on_differences(shared, newer) == []
    first = next(iter(base.values()))
    for name, d in newer.items():   # written in the snapshots' own layout
        assert set(d) == set(first), (name, sorted(set(d) ^ set(first)))
