"""The personal-tuning benchmark (bench/bench_personal_tuning.py) keeps working before its one GPU call: its tiny
CPU mode runs the real tune_head loop (the CLI's options, held-out evaluation included) through the same
stages as on the GPU, writes what it measured, and honours its time budget (a stage that would not fit is
skipped with its reason; a running one is stopped through tune_head's own should_stop). No timing
assertions: the benchmark measures, the test checks its behaviour."""

import importlib.util
import json
import math
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_personal_tuning", ROOT / "bench" / "bench_personal_tuning.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_tiny_personal_tuning_benchmark_runs_both_stages(tmp_path):
    bench = load_bench()
    out = tmp_path / "r.json"
    # 40 steps: the CLI's held-out evaluation every steps/20 = 2 steps leaves training-only steps to time
    rc = bench.main(["--tiny", "--device", "cpu", "--steps", "40", "--out", str(out)])
    res = json.loads(out.read_text())
    assert rc == 0 and not res["errors"], res["errors"]
    assert list(res["stages"]) == ["bf16", "fp8_24gb"]
    assert set(res["inputs"]["skipped_models"]) == {"vae", "vlm", "text_encoder", "face_detector"}
    assert all(v.startswith("skipped") for v in res["inputs"]["skipped_models"].values())
    for name, r in res["stages"].items():
        assert r["status"] == "done" and r["steps_done"] == r["steps"] == 40, (name, r)
        assert r["interrupted"] is False and r["stopped_by_budget"] is False
        for key in ("tune_head_s", "step_s_median", "first_step_s", "eval_step_s_median", "step_s_median_all"):
            assert positive(r[key]), (name, key, r.get(key))
        assert len(r["step_s_all"]) == 40 and all(positive(d) for d in r["step_s_all"])
        # the CLI's defaults, through its own parser: 1e-3, warm-up + cosine, K=1, face weight 2, one photo held out
        assert r["options"]["lr"] == 1e-3 and r["options"]["schedule"] == "warmup_cosine"
        assert r["options"]["face_weight"] == 2.0 and r["head_tokens"] == 1 and r["eval_interval"] == 2
        assert len(r["held_out_photos"]) == 1 and r["held_out_evals"] == 21   # step 0 and every 2nd step
        assert positive(r["held_out_loss"]) and positive(r["held_out_loss_none"])
        assert r["held_out_loss"] <= r["held_out_loss_none"] + 1e-9   # the kept head is the best, step 0 included
        assert positive(r["train_loss_first"]) and positive(r["train_loss_last"])
        assert r["family"] == "qwen-image" and r["compute_dtype"] == "bfloat16"
        assert r["transformer_freed"] is True
    bf, fp8 = res["stages"]["bf16"], res["stages"]["fp8_24gb"]
    assert bf["cli_flags"] == [] and not bf["gradient_checkpointing"] and not bf["fp8_storage"]
    assert bf["weight_dtypes"] == ["bfloat16"]
    assert fp8["cli_flags"] == ["--fp8-storage", "--gradient-checkpointing"]
    assert fp8["gradient_checkpointing"] and fp8["fp8_storage"] and "float8_e4m3fn" in fp8["weight_dtypes"]
    assert fp8["cap_gib"] is None and "CPU" in fp8["cap_note"]   # the cap is a CUDA allocator setting
    assert positive(fp8["estimate_s"])


def test_budget_skips_a_stage_and_stops_a_running_one(tmp_path, monkeypatch):
    bench = load_bench()
    cls = bench.PersonalTuningBench
    out = tmp_path / "skip.json"
    # the budget is spent once bf16 is done: fp8_24gb must not start, and says why
    original = cls.stage

    def stage_then_spend(self, name, rec):
        original(self, name, rec)
        self.args.budget_s = self.elapsed() + 1.0

    monkeypatch.setattr(cls, "stage", stage_then_spend)
    rc = bench.main(["--tiny", "--device", "cpu", "--steps", "4", "--budget-s", "1000", "--min-stage-s", "30",
                     "--out", str(out)])
    res = json.loads(out.read_text())
    assert rc == 0 and not res["errors"]
    assert res["stages"]["bf16"]["status"] == "done" and res["stages"]["bf16"]["steps_done"] == 4
    skipped = res["stages"]["fp8_24gb"]
    assert skipped["status"] == "skipped" and "budget" in skipped["reason"] and "steps_done" not in skipped
    monkeypatch.setattr(cls, "stage", original)

    # a run whose budget ends mid-stage: tune_head's should_stop ends it, the best head so far is evaluated
    calls = {"n": 0}

    def left(self):
        calls["n"] += 1        # 1: the stage-start check, then one call per step's should_stop
        return 100.0 if calls["n"] <= 6 else -1.0

    monkeypatch.setattr(cls, "left", left)
    out2 = tmp_path / "partial.json"
    rc = bench.main(["--tiny", "--device", "cpu", "--steps", "40", "--stages", "bf16", "--out", str(out2)])
    r = json.loads(out2.read_text())["stages"]["bf16"]
    assert rc == 0
    assert r["status"] == "partial" and r["stopped_by_budget"] and r["interrupted"]
    assert r["steps_done"] == 5 and r["steps"] == 40 and len(r["step_s_all"]) == 5
    assert positive(r["held_out_loss"]) and positive(r["tune_head_s"])
    assert positive(r["full_run_s_estimate"]) and r["full_run_s_estimate"] > r["tune_head_s"]


def test_no_stage_starts_with_no_budget_and_the_json_is_still_written(tmp_path):
    bench = load_bench()
    out = tmp_path / "none.json"
    rc = bench.main(["--tiny", "--device", "cpu", "--steps", "4", "--budget-s", "0", "--out", str(out)])
    res = json.loads(out.read_text())
    assert rc == 0 and [r["status"] for r in res["stages"].values()] == ["skipped", "skipped"]
    assert all("budget" in r["reason"] for r in res["stages"].values())
    assert res["env"]["torch"] and res["inputs"]["latent"] == [4, 6, 8]
