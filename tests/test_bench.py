"""The GPU benchmark script keeps working: its tiny CPU mode runs stock vs the pack's sampler end to end."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_qwen_image", ROOT / "bench" / "bench_qwen_image.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_tiny_benchmark_runs_and_agrees_with_stock(tmp_path, monkeypatch):
    """Also: stock's batched grid gets the same courtesy as ours, a short call at the grid's batch shape
    first, so the timed call pays no first-use cost (cuBLAS plans, allocator growth) for that shape."""
    bench = load_bench()
    calls = []
    real = bench.stock_call

    def recording(b, embeds, seeds, steps=None, **kw):
        calls.append((len(seeds), steps))
        return real(b, embeds, seeds, steps=steps, **kw)

    monkeypatch.setattr(bench, "stock_call", recording)
    out = tmp_path / "r.json"
    rc = bench.main(["--tiny", "--device", "cpu", "--no-compile", "--steps", "2", "--stages", "stock,ours,inject",
                     "--out", str(out)])
    res = json.loads(out.read_text())
    assert rc == 0 and not res["errors"], res["errors"]
    stock, ours = res["stages"]["stock"], res["stages"]["ours"]
    assert stock["single"]["finite"] and stock["grid_9_calls"]["s"] > 0 and stock["grid_batched"]["s"] > 0
    assert res["config"]["flops"]["image"] == 2 * (res["config"]["flops"]["forward_pos"]
                                                   + res["config"]["flops"]["forward_neg"])
    for variant in ("eager", "graphs"):  # graphs are ignored on the CPU: the same loop
        single = ours[variant]["single"]
        assert single["finite"]
        agree = single["vs_stock_latents"]
        assert agree["max_abs"] < 0.05 * agree["ref_mean_abs"], agree  # same seeds, same latents
    assert "compiled" not in ours and "compiled_graphs" not in ours  # --no-compile skips them
    assert res["stages"]["inject"]["grid_injection_ms"] > 0
    grid = max(n for n, _ in calls)
    timed = calls.index((grid, None))  # the timed batched call (default steps)
    assert any(n == grid and s is not None for n, s in calls[:timed]), calls
    assert stock["grid_batched"]["warm_up_steps"] == 2


def test_unknown_stage_is_a_usage_error(capsys):
    bench = load_bench()
    with pytest.raises(SystemExit) as e:
        bench.main(["--stages", "nope"])
    assert e.value.code == 2
    assert "unknown stage" in capsys.readouterr().err


def test_comfy_stage_without_comfyui_says_what_it_needs(tmp_path, monkeypatch):
    monkeypatch.delenv("COMFYUI_DIR", raising=False)
    bench = load_bench()
    out = tmp_path / "r.json"
    assert bench.main(["--tiny", "--device", "cpu", "--stages", "comfy", "--out", str(out)]) == 1
    assert "--comfyui-dir" in json.loads(out.read_text())["errors"]["comfy"]


def _errors(tree, path=""):
    """Every measurement that recorded an error (the comfy stage keeps going past them)."""
    if isinstance(tree, dict):
        if "error" in tree:
            return [f"{path}: {tree['error']}"]
        return [e for k, v in tree.items() for e in _errors(v, f"{path}.{k}")]
    return []


@pytest.mark.newest_comfyui_only   # the bench is a measuring tool: checked against the newest ComfyUI
def test_comfy_stage_times_comfyuis_sampler_and_the_pack_on_the_same_model(tmp_path):
    """Against a real ComfyUI (COMFYUI_DIR): ComfyUI's KSampler path and the pack's nodes as ComfyUI loaded them
    (QwenImageSampleFromEmbeds, QwenImageAccelerate with the aot_eager backend on the CPU), the Lightning setting
    with a LoRA through ComfyUI's loader, and ComfyUI's TorchCompileModel killed at its time limit; in one run with
    the diffusers-path stages, on a one-layer full-width Qwen-Image at 64x64, 2 steps. bf16 weights only here
    (fp8 matmuls on a CPU take minutes; tests/test_native_acceleration.py covers fp8) and no 9-call grid."""
    from comfyui_harness.env import require_comfyui

    require_comfyui()
    bench = load_bench()
    out = tmp_path / "r.json"
    rc = bench.main(["--tiny", "--device", "cpu", "--steps", "2", "--stages", "stock,ours,comfy", "--ours-variants",
                     "eager", "--no-stock-grid", "--comfy-torch-compile-limit-s", "3", "--comfy-dtypes", "default",
                     "--no-comfy-grid-9-calls", "--out", str(out)])
    res = json.loads(out.read_text())
    assert rc == 0 and not res["errors"], res["errors"]
    assert list(res["stages"]["ours"]) == ["eager"] and "grid_9_calls" not in res["stages"]["stock"]
    c = res["stages"]["comfy"]
    assert not _errors(c), _errors(c)
    assert c["layers"] == 1 and c["comfyui_version"] and c["ksampler_one_image"]["finite"] and c["model_fully_loaded"]
    # the pack's native path is ComfyUI's own sampler: one cell gives KSampler's image exactly
    assert c["pack_one_image"]["vs_ksampler_image_max_abs"] == 0.0
    assert c["ksampler_grid_batched"]["s"] > 0 and "ksampler_grid_9_calls" not in c
    assert c["auto_max_batch"] == 9   # the whole 3x3 grid fits: one sampler call, as ComfyUI's batched one
    for key in ("pack_grid_max_batch_auto", "pack_grid_max_batch_4"):
        assert c[key]["images"] == 9 and c[key]["speedup_vs_ksampler_batched"] > 0
    assert c["ksampler_one_image_vs_stock_diffusers"] > 0 and c["ours_diffusers_one_image_speedup_vs_ksampler"] > 0
    # the accelerated MODEL (compiled blocks) gives eager's images; bf16 at the top level, fp8 beside it
    assert c["accelerate"]["backend"] == "aot_eager"
    for where in (c,):
        acc = where["accelerated"]
        one = acc["ksampler_one_image"]
        assert one["eager_fallback_calls"] == 0 and one["first_model_call_s"] > 0
        assert one["vs_eager_ksampler"]["max_abs"] < 2e-2, one
        assert acc["ksampler_grid_batched"]["vs_eager"]["max_abs"] < 2e-2
        assert acc["pack_node_grid_auto"]["images"] == 9
        light = where["lightning"]
        assert light["steps"] == 8 and light["cfg"] == 1.0 and light["ksampler_eager"]["s"] > 0
        assert light["ksampler_accelerated"]["vs_eager"]["max_abs"] < 2e-2
    assert "weights_fp8_e4m3fn" not in c and acc["pack_node_one_image"]["speed"] == "standard"   # (CPU)
    tcm = c["torch_compile_model"]
    assert tcm["limit_s"] == 3 and tcm["finished"] is False and "did not finish" in tcm["note"]


def _run_json(n):
    return json.loads((ROOT / "bench" / "results" / f"run{n}.json").read_text())


def test_fast_help_quotes_the_measured_range_and_the_card():
    """--fast's help quotes the fast configuration's measured range over the runs that had it (3-5), not the
    best run, and names the card they ran on."""
    from qwen_identity.cli import build_parser

    ratios, ours, stock = [], [], []
    for n in (3, 4, 5):
        st = _run_json(n)["stages"]
        stock.append(st["stock"]["single"]["s"])
        ours.append(st["ours"]["compiled_graphs"]["single"]["s"])
        ratios.append(stock[-1] / ours[-1])
        assert "H100" in _run_json(n)["stages"]["env"]["device_name"]
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for command in ("sweep", "eval"):
        text = " ".join(sub.choices[command].format_help().split())
        assert f"{min(ratios):.1f}-{max(ratios):.1f}x" in text and "H100" in text, text
        assert f"{min(ours):.2f}-{max(ours):.2f} s" in text


def test_results_md_injection_cost_is_run_5s():
    """The injection figure in bench/RESULTS.md's run-5 section is run 5's measurement."""
    import re

    inject = _run_json(5)["stages"]["inject"]
    text = (ROOT / "bench" / "RESULTS.md").read_text()
    section = text.split("### Injection cost", 1)[1].split("##", 1)[0]
    ms = float(re.search(r"([0-9.]+) ms per grid", section).group(1))
    share = float(re.search(r"([0-9.]+) % of one stock step", section).group(1))
    assert ms == round(inject["grid_injection_ms"], 2)
    assert share == round(100 * inject["fraction_of_one_stock_step"], 2)

