"""A real ComfyUI stays usable after the pack's errors: the next prompt runs (needs COMFYUI_DIR, else skips).

One server with the pack and no model files. Prompts that fail in each way the pack can make them fail
(a runtime UserInputError in a node, a missing head file, a value ComfyUI's validation refuses) are
queued between prompts that must succeed; every good prompt after an error gives the same image as
the first, the queue drains, and the server keeps answering. The graphs use only ComfyUI's EmptyImage /
SaveImage and the pack's AlphaGrid / LoadResidualHead, so no model is needed and a run takes seconds.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from comfyui_harness.env import comfyui_dir, require_comfyui
from comfyui_harness.prompt_queue import queue_prompt

pytestmark = pytest.mark.comfyui
ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent


def _grid_prompt(batch: int, alphas: str, seeds: str) -> dict:
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 32, "batch_size": batch, "color": 0x336699}},
        "2": {"class_type": "AlphaGrid", "inputs": {"images": ["1", 0], "alphas": alphas, "seeds": seeds,
                                                    "cell_notes": ""}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "robustness"}},
    }


def _missing_head_prompt() -> dict:
    return {"1": {"class_type": "LoadResidualHead",
                  "inputs": {"head_name": "(no heads in models/identity_heads)",
                             "head_path": "/nonexistent/head.safetensors"}},
            "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 1]}}}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    require_comfyui()
    from comfyui_harness.server import start

    base = tmp_path_factory.mktemp("comfy_robust")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE / "netguard"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["HF_HUB_OFFLINE"] = env["TRANSFORMERS_OFFLINE"] = "1"
    env["HOME"] = str(base)
    srv = start(comfyui_dir(), packs={"comfyui-qwen-identity": ROOT}, base_dir=base, env=env)
    print(f"ComfyUI up in {srv.startup_s} s at {srv.url}")
    try:
        yield srv
    finally:
        srv.stop()


def test_the_next_prompt_runs_after_each_kind_of_pack_error(server):
    assert not server.import_failures(), server.import_failures()
    good = _grid_prompt(2, "0,1", "1")
    first = queue_prompt(server.url, good, timeout=120)
    assert first.ok, first.summary()
    reference = [(im["filename"], im.get("subfolder")) for im in first.images()]
    assert len(reference) == 1

    runtime_error = queue_prompt(server.url, _grid_prompt(1, "0,1", "1"), timeout=120)   # 1 image for 2 cells
    assert runtime_error.stage == "execution", runtime_error.summary()
    assert runtime_error.execution_error["node_type"] == "AlphaGrid"
    assert "needs 2 α × 1 seeds = 2 images but got 1" in runtime_error.error_message()

    bad_value = _grid_prompt(2, "0,1", "1")
    bad_value["1"]["inputs"]["width"] = -5                  # refused by ComfyUI's own validation
    refused = queue_prompt(server.url, bad_value, timeout=60)
    assert refused.stage == "validation", refused.summary()

    if "PreviewAny" in server.object_info:
        missing = queue_prompt(server.url, _missing_head_prompt(), timeout=120)
        assert not missing.ok and "head.safetensors" in missing.error_message(), missing.summary()

    again = queue_prompt(server.url, _grid_prompt(2, "0,1", "1"), timeout=120)
    assert again.ok, again.summary()
    out_dir = server.base_dir / "output"
    files = sorted(out_dir.glob("robustness*.png"))
    assert len(files) == 2 and files[0].read_bytes() == files[1].read_bytes()   # same image as before the errors
    queue = server.get_json("/queue")
    assert not queue["queue_running"] and not queue["queue_pending"]
    assert server.proc.poll() is None
