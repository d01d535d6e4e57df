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


def test_tiny_benchmark_runs_and_agrees_with_stock(tmp_path):
    bench = load_bench()
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


def test_unknown_stage_is_a_usage_error(capsys):
    bench = load_bench()
    with pytest.raises(SystemExit) as e:
        bench.main(["--stages", "nope"])
    assert e.value.code == 2
    assert "unknown stage" in capsys.readouterr().err
