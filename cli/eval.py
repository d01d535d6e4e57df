"""Evaluate a head: sweep α per identity and measure identity, prompt adherence and diversity.

For every seed directory (one identity) its photos give the Qwen3-VL identity features, the head turns
them into a residual, and Qwen-Image (diffusers) generates one image per --gen-seeds seed at every α,
plus α = 0 (the baseline without the identity, sampled once and shared by all identities). Each image is
scored against that identity's photos:
- face distance (dlib 128-d embeddings; lower = more alike, < --threshold = same person) and the share
  of images judged the same person; images without a face are counted, not scored;
- Qwen3-VL feature cosine to the photos (the features the head was trained on; --no-qwen3vl-cosine off);
- a prompt-adherence PROXY: Qwen3-VL's P(yes) / (P(yes) + P(no)) to 'Does this image show "<prompt>"?'
  (`qwen3vl_p_yes_normalised`; --no-prompt-proxy off);
- diversity across seeds per α: mean pairwise face distance and Qwen3-VL feature distance.
Writes OUT/eval.json, OUT/identity_vs_alpha.png (one curve per identity, dashed: α = 0 baseline) and
OUT/<identity>_eval_grid.png (α × seed grid with each cell's face distance under it), all atomically.
See docs/measuring.md for how to read the numbers and their limits.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
import sys
from pathlib import Path

from ..core.errors import UserInputError
from ..core.files.atomic import atomic_write, atomic_write_json
from ..core.files.images import load_image
from ..core.files.out_dir_lock import OutDirLock
from ..core.generation.grid import make_grid
from ..core.generation.sampling import check_size, encode_text, parse_seeds
from ..core.identity.features import settings_from_meta
from ..core.identity.seed_dirs import load_seed_dirs, parse_seed_dir_args
from ..core.measurement.evaluation import (PROMPT_PROXY_NAME, Scorers, alphas_with_baseline, cell_notes_for,
                                           evaluate_alpha_sweep, plot_identity_vs_alpha, qwen3vl_embedder,
                                           qwen3vl_prompt_scorer, sample_alpha_images)
from ..core.measurement.face_similarity import DETECTORS, THRESHOLD, FaceEmbedder
from ..core.pipeline.defaults import (DEFAULT_ALPHAS, DEFAULT_BASE_PROMPT, DEFAULT_NEGATIVE_PROMPT, DEFAULT_QWEN3_VL,
                                      DEFAULT_QWEN_IMAGE)
from ..core.pipeline.run import Models, check_unique_names, identity_features, release_memory
from ..core.families import find_family
from ..core.residual.head import check_head_family, load_head
from ..core.residual.injection import parse_alphas
from ..core.runtime.progress import offset_progress, tqdm_progress
from .common_args import (add_crop_arguments, add_generation_arguments, add_system_arguments, finite_float,
                          qwen_image_load_kwargs)
from .fanout import add_fanout_arguments

DEFAULT_OUT = "eval_output"


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--seed-dirs", default=None, help="comma-separated seed_* folders with photo_view_*.png (globs "
                   "allowed) - required unless --seed-dirs-file is given")
    g.add_argument("--seed-dirs-file", default=None, help="a text file with one seed folder (or glob) per line")
    g.add_argument("--head", required=True, help="the head to evaluate (.safetensors from `qwen-identity train`)")
    g.add_argument("--out-dir", default=DEFAULT_OUT, help=f"output folder (default: ./{DEFAULT_OUT})")
    g = p.add_argument_group("models")
    g.add_argument("--qwen3-vl-model", default=None, help="Qwen3-VL folder, models-folder name or hub id (default: "
                   f"the one recorded in the head, else {DEFAULT_QWEN3_VL})")
    g.add_argument("--qwen-image-model", default=DEFAULT_QWEN_IMAGE,
                   help=f"diffusers Qwen-Image folder, models-folder name or hub id (default: {DEFAULT_QWEN_IMAGE})")
    add_crop_arguments(g, head_default=True)
    g = p.add_argument_group("sweep")
    add_generation_arguments(g, DEFAULT_ALPHAS, alphas_note="; 0 is always added as the baseline")
    g.add_argument("--base-prompt", default=DEFAULT_BASE_PROMPT,
                   help=f'the prompt, also what the prompt proxy asks about (default: "{DEFAULT_BASE_PROMPT}")')
    g.add_argument("--negative-prompt", default=DEFAULT_NEGATIVE_PROMPT, help=f'default: "{DEFAULT_NEGATIVE_PROMPT}"')
    g = p.add_argument_group("measures")
    g.add_argument("--threshold", type=finite_float, default=THRESHOLD,
                   help=f"same-person face distance (default: {THRESHOLD})")
    g.add_argument("--detector", choices=DETECTORS, default="hog", help="face detector: hog or cnn (default: hog)")
    g.add_argument("--no-qwen3vl-cosine", action="store_true", help="skip the Qwen3-VL feature cosine")
    g.add_argument("--no-prompt-proxy", action="store_true", help="skip the Qwen3-VL prompt-adherence proxy")
    g.add_argument("--plot-backend", choices=("auto", "matplotlib", "pil"), default="auto",
                   help="auto = matplotlib when installed, else PIL (default: auto)")
    g = p.add_argument_group("held-out denoising gain (docs/denoise-training.md)")
    g.add_argument("--denoise-gain", action="store_true",
                   help="also measure the held-out denoising gain on these seed dirs' photos (own vs impostor "
                        "residual, through the frozen transformer; no sampling needed); written to eval.json "
                        "under denoise_gain")
    g.add_argument("--denoise-gain-only", action="store_true",
                   help="measure only the held-out denoising gain (skip the α sweep and its scores)")
    g.add_argument("--gain-resolution", default=None,
                   help="WIDTHxHEIGHT of the photos for the gain (default: the head's training resolution, else 512x512)")
    g.add_argument("--gain-alpha", type=finite_float, default=None,
                   help="α of the residual for the gain (default: the head's --alpha-train, else 1.0)")
    g.add_argument("--gain-pairs", type=int, default=4, help="fixed (σ, ε) pairs per photo (default: 4)")
    g.add_argument("--gain-prompt", default=None,
                   help="the prompt the photos are conditioned on (default: the head's template, else --base-prompt)")
    g = p.add_argument_group("system")
    add_system_arguments(g)
    g = p.add_argument_group("fan-out over several processes (see docs/modal.md)")
    add_fanout_arguments(g)


def _warn(message: str) -> None:
    print(f"qwen-identity eval: warning: {message}", file=sys.stderr)


def eval_feature_settings(args, head):
    """The head's feature settings, with --crop / --crop-fallback when given (another crop than the head's
    is warned about: the head then sees other features than it learned from)."""
    settings = settings_from_meta(head.meta.feature_settings or {})
    crop = getattr(args, "crop", None) or settings.crop
    if crop != settings.crop:
        _warn(f"--crop {crop}: the head was trained on crop {settings.crop}; its residuals may not carry the identity.")
    return dataclasses.replace(settings, crop=crop, crop_fallback=getattr(args, "crop_fallback", None)
                               or settings.crop_fallback)


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "identity"


def _validate(args):
    alphas = alphas_with_baseline(parse_alphas(args.alphas))
    seeds = parse_seeds(args.gen_seeds)
    check_size(args.width, args.height)
    if args.steps < 1:
        raise UserInputError(f"--steps must be at least 1, got {args.steps}.")
    if not args.seed_dirs and not args.seed_dirs_file:
        raise UserInputError("--seed-dirs is required: pass DIR[,DIR...] (globs allowed) or --seed-dirs-file.")
    if args.max_batch < 1:
        raise UserInputError(f"--max-batch must be at least 1, got {args.max_batch}.")
    if not 0 < args.threshold < 4:
        raise UserInputError(f"--threshold must be between 0 and 4, got {args.threshold}.")
    if not args.base_prompt.strip():
        raise UserInputError("--base-prompt is empty.")
    return alphas, seeds


def _denoise_gain(args, head_path, out: Path) -> dict:
    """The held-out denoising gain section of eval.json (training/denoise_pipeline.measure_head_gain)."""
    from ..core.identity.features import settings_from_meta
    from ..core.identity.seed_dirs import parse_seed_dir_args
    from ..core.residual.head import load_head
    from ..training.denoise import DenoiseLoopConfig
    from ..training.denoise_pipeline import DenoiseOptions, measure_head_gain
    from ..training.pipeline import DEFAULT_QWEN3_VL, TrainConfig

    head = load_head(head_path)
    trained = head.meta.training_args or {}
    settings = eval_feature_settings(args, head)
    prompt = args.gain_prompt or (head.meta.base_prompt if head.meta.target in ("denoise", "personal") and head.meta.base_prompt
                                  else args.base_prompt)
    alpha = args.gain_alpha if args.gain_alpha is not None else float(trained.get("alpha_train") or 1.0)
    opts = DenoiseOptions(loop=DenoiseLoopConfig(), resolution=args.gain_resolution or trained.get("resolution") or "512x512",
                          caption_source="template", template=prompt, gain_pairs=args.gain_pairs,
                          # a head trained with aspect buckets is measured at each photo's bucket; older heads at one size
                          aspect_buckets="on" if trained.get("aspect_buckets") == "on" or trained.get("buckets") else "off")
    cfg = TrainConfig(seed_dirs=parse_seed_dir_args(args.seed_dirs, args.seed_dirs_file), out_dir=out,
                      qwen3_vl_model=args.qwen3_vl_model or head.meta.qwen3_vl_model or DEFAULT_QWEN3_VL,
                      qwen_image_model=args.qwen_image_model,
                      feature_settings=dataclasses.asdict(settings),
                      device=args.device, dtype=args.dtype,
                      hf_token=args.hf_token or os.environ.get("HUGGINGFACE_TOKEN") or os.environ.get("HF_TOKEN"),
                      cache_dir=args.cache_dir or os.environ.get("HF_HUB_CACHE"))
    gain = measure_head_gain(head, cfg, opts, alpha)
    o = gain["overall"]
    print(f"held-out denoising gain ({o['persons']} people, {o['photos']} photos): own {o['own_gain']:.4g}, impostor "
          f"{o['impostor_gain']:.4g}, identity gain {o['identity_gain']:.4g} (95% CI {o['identity_gain_ci95'][0]:.4g}"
          f"..{o['identity_gain_ci95'][1]:.4g}; {100 * o['identity_gain_relative']:.2f}% of the loss)")
    return gain


def run(args) -> int:
    if args.denoise_gain_only:
        from ..core.errors import UserInputError
        from ..core.files.atomic import atomic_write_json
        from ..core.files.out_dir_lock import OutDirLock

        if not args.seed_dirs and not args.seed_dirs_file:
            raise UserInputError("--seed-dirs is required: pass DIR[,DIR...] (globs allowed) or --seed-dirs-file.")
        out = Path(args.out_dir)
        with OutDirLock(out):
            gain = _denoise_gain(args, args.head, out)
            atomic_write_json(out / "eval.json", {"head": str(args.head), "denoise_gain": gain})
        print(f"wrote {out / 'eval.json'}")
        return 0

    with contextlib.ExitStack() as stack:  # holds the out-dir lock that _run takes once the inputs are checked
        return _run(args, stack)


def _run(args, stack) -> int:
    from .fanout import plan, run_fanned

    alphas, seeds = _validate(args)
    paths = parse_seed_dir_args(args.seed_dirs, args.seed_dirs_file)
    out = Path(args.out_dir)
    fan = plan(args)
    if fan is not None and args.denoise_gain:
        raise UserInputError("--denoise-gain pairs every person with another as the impostor, so it cannot be split "
                             "into chunks: run it in one process (or alone with --denoise-gain-only).")
    if fan is not None:   # one chunk of the identities per process, merged into OUT (cli/fanout.py)
        combiners = {"eval.json": _combine_reports,
                     "identity_vs_alpha.png": lambda copies, tmp: _redraw_plot(copies, tmp, args.plot_backend)}
        return run_fanned(args, "eval", paths, out,
                          lambda subset, stage: _evaluate(args, subset, alphas, seeds, out, stage, lambda: None),
                          combiners=combiners, say=lambda m: print(m, file=sys.stderr), the_plan=fan)
    results = _evaluate(args, paths, alphas, seeds, out, out, lambda: stack.enter_context(OutDirLock(out)))
    _print_summary(results)
    print(f"wrote {out / 'eval.json'}, {out / 'identity_vs_alpha.png'} and {len(results)} grid(s) in {out}")
    return 0


def _combine_reports(copies: list[Path], tmp: Path) -> None:
    """eval.json of several chunks -> the one-process report: identities and warnings in chunk order."""
    import json

    reports = [json.loads(c.read_text(encoding="utf-8")) for c in copies]
    merged = dict(reports[0])
    merged["identities"], merged["warnings"] = {}, []
    shared = {k: v for k, v in reports[0].items() if k not in ("identities", "warnings")}
    for c, r in zip(copies, reports):
        if {k: v for k, v in r.items() if k not in ("identities", "warnings")} != shared:
            raise UserInputError(f"{c} was made with other settings than {copies[0]}: rerun every chunk with the "
                                 "same arguments.")
        merged["identities"].update(r["identities"])
        merged["warnings"] += r["warnings"]
    tmp.write_text(json.dumps(merged, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")


def _redraw_plot(copies: list[Path], tmp: Path, backend: str) -> None:
    """identity_vs_alpha.png over every chunk's identities, drawn from the chunks' eval.json (same numbers)."""
    import json
    import shutil

    from ..core.measurement.evaluation import SweepEvaluation

    curves = {}
    for c in copies:
        for name, r in json.loads((c.parent / "eval.json").read_text(encoding="utf-8"))["identities"].items():
            curves[name] = SweepEvaluation(alphas=r["alphas"], seeds=r["seeds"], rows=r["rows"],
                                           references=r["references"])
    drawn = plot_identity_vs_alpha(curves, tmp.with_name(tmp.name + ".png"), backend=backend)
    shutil.move(drawn, tmp)


def _evaluate(args, seed_dir_paths, alphas, seeds, out: Path, write_dir: Path, take_lock) -> dict:
    """Evaluate these identities: grids + eval.json + plot into `write_dir` (paths in the report name `out`)."""
    seed_dirs = load_seed_dirs(seed_dir_paths)
    check_unique_names(seed_dirs)
    names = [d.name for d in seed_dirs]
    photos = {d.name: [load_image(p) for p in d.photos] for d in seed_dirs}   # fail fast, before models load
    head = load_head(args.head)
    settings = eval_feature_settings(args, head)
    take_lock()  # one writer per output folder (as train, sweep and extract)
    face = FaceEmbedder(detector=args.detector)
    models = Models(args.qwen3_vl_model or head.meta.qwen3_vl_model or DEFAULT_QWEN3_VL, args.qwen_image_model,
                    args.device, args.dtype, args.hf_token, args.cache_dir, **qwen_image_load_kwargs(args))

    # 1. Qwen3-VL: identity features of every identity; then it waits on the CPU while Qwen-Image runs
    features = dict(zip(names, identity_features(seed_dirs, settings, models)))
    vl = models.qwen3vl()
    vl.model.to("cpu")
    release_memory()

    # 2. Qwen-Image: every α × seed image of every identity; the α = 0 baseline once for all
    qi = models.qwen_image()
    family = find_family(getattr(qi, "pipeline", qi))
    if family is not None:
        check_head_family(head, family)
    positive = encode_text(qi, args.base_prompt)
    negative = encode_text(qi, args.negative_prompt) if args.guidance > 1 else None
    print(f"Qwen3-VL {vl.model_id} and Qwen-Image {qi.model_id} on {qi.device}; {len(names)} identities, "
          f"α {alphas} (0 = baseline), seeds {seeds}", file=sys.stderr)
    generated, warnings_all = {}, []
    with tqdm_progress("generate", unit="step") as bar:
        # the α = 0 baseline (identity-free) on its own: every identity's batch is then the same whichever
        # identities share the process, so a fanned-out run gives the one-process images bit for bit
        baseline = sample_alpha_images(qi, head, features[names[0]], positive, negative, [0.0], seeds, args.steps,
                                       args.guidance, args.width, args.height, args.max_batch, args.strength_mode,
                                       progress=bar, fast=args.fast)[0][0.0]
        for name in names:
            generated[name], warnings = sample_alpha_images(
                qi, head, features[name], positive, negative, alphas, seeds, args.steps, args.guidance, args.width,
                args.height, args.max_batch, args.strength_mode, baseline=baseline, progress=bar, fast=args.fast)
            for w in warnings:
                _warn(f"{name}: {w}")
                warnings_all.append(f"{name}: {w}")
    qi_id, qi_device = qi.model_id, str(qi.device)
    del qi, positive, negative
    models.drop_qwen_image()

    # 3. scores: faces on the CPU, Qwen3-VL measures back on its device
    vl.model.to(vl.device)
    scorers = Scorers(face=face, threshold=args.threshold,
                      image_features=None if args.no_qwen3vl_cosine else qwen3vl_embedder(vl, settings),
                      prompt=None if args.no_prompt_proxy else qwen3vl_prompt_scorer(vl))
    results, curves = {}, {}
    steps_per_identity = len(alphas) + 1
    with tqdm_progress("score", unit="step") as bar:
        for i, name in enumerate(names):
            ev = evaluate_alpha_sweep(lambda a, s, n=name: generated[n][a], alphas, seeds, photos[name],
                                      args.base_prompt, scorers,
                                      progress=offset_progress(bar, i * steps_per_identity, steps_per_identity * len(names)))
            if ev.references["with_face"] == 0:
                _warn(f"{name}: no face found in any of its {len(photos[name])} photos; face distances are null.")
            grid = make_grid([im for a in ev.alphas for im in ev.images[a]], ev.alphas, seeds,
                             cell_notes=cell_notes_for(ev), extra_meta={"identity": name})
            grid_path = out / f"{_safe_name(name)}_eval_grid.png"
            atomic_write(write_dir / grid_path.name, lambda tmp, g=grid: g.image.save(tmp, format="PNG"))
            seed_dir = next(d for d in seed_dirs if d.name == name)
            results[name] = {"seed_dir": str(seed_dir.path), "grid": str(grid_path), **ev.to_json()}
            curves[name] = ev
    plot_identity_vs_alpha(curves, write_dir / "identity_vs_alpha.png", backend=args.plot_backend)
    plot_path = out / "identity_vs_alpha.png"
    report = {
        "head": str(args.head), "qwen3_vl_model": vl.model_id, "qwen_image_model": qi_id, "device": qi_device,
        "feature_settings": settings.to_meta(), "base_prompt": args.base_prompt,
        "negative_prompt": args.negative_prompt if args.guidance > 1 else None,
        "alphas": alphas, "seeds": seeds, "steps": args.steps, "guidance": args.guidance, "width": args.width,
        "height": args.height, "strength_mode": args.strength_mode,
        "measures": {
            "face": {"model": "dlib_face_recognition_resnet_model_v1", "detector": args.detector,
                     "threshold": args.threshold, "distance": "Euclidean, mean over the reference faces"},
            "qwen3vl_cosine": None if args.no_qwen3vl_cosine else "cosine of Qwen3-VL features to the mean reference feature",
            PROMPT_PROXY_NAME: None if args.no_prompt_proxy else
            "PROXY: Qwen3-VL's P(yes) / (P(yes) + P(no)) to 'Does this image show \"<prompt>\"? Please answer yes "
            "or no.' (normalised over the two answers; not VQAScore's unnormalised P(\"Yes\"))",
            "diversity": "mean pairwise distance across seeds (face: Euclidean; qwen3vl: 1 - cosine)",
        },
        "warnings": warnings_all, "plot": str(plot_path), "identities": results,
    }
    if args.denoise_gain:
        del vl, scorers
        release_memory()
        report["denoise_gain"] = _denoise_gain(args, args.head, out)
    atomic_write_json(write_dir / "eval.json", report)
    return results


def _fmt(v) -> str:
    return "  -  " if v is None else f"{v:5.3f}"


def _print_summary(results: dict) -> None:
    print(f"{'identity':24s} {'alpha':>6s} {'face_d':>6s} {'same%':>6s} {'qvl_cos':>7s} {'prompt':>6s} {'div_f':>6s}")
    for name, res in results.items():
        for row in res["rows"]:
            s = row["summary"]
            same = s.get("same_person_rate")
            print(f"{name[:24]:24s} {row['alpha']:6g} {_fmt(s.get('face_distance')):>6s} "
                  f"{'  -  ' if same is None else f'{100 * same:5.0f}%':>6s} {_fmt(s.get('qwen3vl_cosine')):>7s} "
                  f"{_fmt(s.get(PROMPT_PROXY_NAME)):>6s} {_fmt(s.get('face_diversity')):>6s}")
    sys.stdout.flush()
