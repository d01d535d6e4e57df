"""Measuring a head: identity similarity, a prompt-adherence proxy and diversity over an α sweep.

`evaluate_alpha_sweep(generate, alphas, seeds, references, prompt, scorers)` calls a generic
`generate(alpha, seeds) -> list[PIL image]` (one image per seed; the CLI passes the diffusers sampler,
tests pass a stand-in) once per α, always including α = 0 (the baseline: the prompt without the
identity residual), and scores every image with the measures in `Scorers`, each optional:

- face: dlib's 128-d face embedding distance to the reference photos (`core.face_similarity`; lower is
  more alike, < 0.6 = same person by the model's operating point). Images without a face are counted,
  not scored.
- qwen3vl: cosine between each generated image's Qwen3-VL feature and the references' combined
  feature (`core.features.extract_features`, the same features a head is trained on). Model-internal:
  it says whether Qwen3-VL sees the identity, not whether a person would; it is not independent of
  the head, which was trained from these very features.
- prompt: a prompt-adherence PROXY (no CLIP weights are available offline), reported as
  `qwen3vl_p_yes_normalised`: Qwen3-VL is asked 'Does this image show "<prompt>"? Please answer yes or
  no.' and the score is P(yes) / (P(yes) + P(no)) from its answer log-likelihoods, i.e. P(yes) given
  that the answer is yes or no. This is NOT VQAScore (Lin et al. 2024 report the unnormalised P("Yes")
  of CLIP-FlanT5); the normalisation ignores the probability of any other answer. It is one VLM's
  judgement of the whole prompt, not CLIP-T; compare it between α values of one run, not across models.
- diversity across seeds, per α: the mean pairwise face distance between the generated images (with a
  face) and the mean pairwise Qwen3-VL feature distance (1 - cosine). Higher = more varied.

`plot_identity_vs_alpha` draws identity vs α, one curve per identity, with each identity's α = 0
baseline as a dashed line (matplotlib when installed, else PIL).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
from PIL import Image

from ..errors import UserInputError

Generate = Callable[[float, Sequence[int]], Sequence[Image.Image]]
ImageEmbedder = Callable[[Sequence[Image.Image]], torch.Tensor]      # images -> [N, D]
PromptScorer = Callable[[Sequence[Image.Image], str], Sequence[float]]
Progress = Callable[[int, int], None]

BASELINE_ALPHA = 0.0
PROMPT_QUESTION = 'Does this image show "{prompt}"? Please answer yes or no.'
PROMPT_ANSWERS = ("Yes", "No")
PROMPT_PROXY_NAME = "qwen3vl_p_yes_normalised"   # P(yes) / (P(yes) + P(no)); see the module docstring


def _mean(values) -> float | None:
    from .face_similarity import _mean as mean_of_present

    return mean_of_present(values)


def _round(v, nd: int = 4):
    return None if v is None else round(float(v), nd)


# --- Qwen3-VL measures ---------------------------------------------------------------------------
def qwen3vl_embedder(bundle, settings=None) -> ImageEmbedder:
    """images -> their unit-norm Qwen3-VL features [N, D] (`extract_features(...).per_image`). A generated
    image without a face is scored on its centre crop (with a logged note) instead of failing the sweep."""
    import dataclasses

    from ..identity.features import FeatureSettings, extract_features

    settings = settings or FeatureSettings()
    if settings.crop == "face" and settings.crop_fallback == "error":
        settings = dataclasses.replace(settings, crop_fallback="center")

    def embed(images: Sequence[Image.Image]) -> torch.Tensor:
        return extract_features(bundle, list(images), settings).per_image

    return embed


def cosine_to_reference(reference: torch.Tensor, features: torch.Tensor) -> list[float]:
    """Cosine of each row of `features` [N, D] with the (combined) reference vector [D]."""
    ref = torch.nn.functional.normalize(reference.to(torch.float32).reshape(-1), dim=0)
    feats = torch.nn.functional.normalize(features.to(torch.float32), dim=-1)
    if feats.shape[-1] != ref.shape[0]:
        raise UserInputError(f"feature widths differ: reference D={ref.shape[0]}, images D={feats.shape[-1]}.")
    return [float(v) for v in feats @ ref]


def mean_pairwise_cosine_distance(features: torch.Tensor) -> float | None:
    """Diversity of [N, D] features: mean of (1 - cosine) over all pairs (None below 2 rows)."""
    feats = torch.nn.functional.normalize(features.to(torch.float32), dim=-1)
    pairs = list(itertools.combinations(range(feats.shape[0]), 2))
    if not pairs:
        return None
    return sum(1.0 - float(feats[i] @ feats[j]) for i, j in pairs) / len(pairs)


@torch.inference_mode()
def _answer_logprob(model, processor, prefix: str, answer: str, image: Image.Image) -> float:
    """log P(answer | image, prefix) by teacher forcing (sum over the answer's tokens)."""
    from ..identity.features import _model_device

    device = _model_device(model)
    tokenizer = processor.tokenizer
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    inputs = processor(text=[prefix + answer], images=[image], return_tensors="pt", do_resize=False)
    ids = inputs["input_ids"][0]
    n = len(answer_ids)
    if n == 0 or ids[-n:].tolist() != list(answer_ids):
        raise RuntimeError(f"the answer {answer!r} does not tokenize at the end of the prompt")
    inputs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    logits = model(**inputs, use_cache=False).logits[0].to(torch.float32)
    logp = torch.log_softmax(logits[-n - 1:-1], dim=-1)
    return float(logp.gather(-1, torch.as_tensor(answer_ids, device=logp.device)[:, None]).sum())


def qwen3vl_prompt_scores(bundle, images: Sequence[Image.Image], prompt: str,
                          question: str = PROMPT_QUESTION, answers: tuple[str, str] = PROMPT_ANSWERS,
                          max_pixels: int = 448 * 448) -> list[float]:
    """The prompt-adherence proxy: P(yes) / (P(yes) + P(no)) per image, in [0, 1] (see module doc)."""
    from ..identity.features import FeatureSettings, prepare_images

    if not prompt or not prompt.strip():
        raise UserInputError("the prompt-adherence proxy needs a non-empty prompt.")
    processor, model = bundle.processor, bundle.model
    messages = [{"role": "user", "content": [{"type": "image"},
                                             {"type": "text", "text": question.format(prompt=prompt.strip())}]}]
    prefix = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if prefix.rstrip().endswith("<think>"):  # Thinking variants: answer right away, with an empty thought
        prefix = prefix.rstrip() + "\n\n</think>\n\n"
    seen = prepare_images(images, FeatureSettings(resolution="pixel_budget", max_pixels=max_pixels, crop="full"),
                          bundle.patch_multiple)
    scores = []
    for im in seen:
        yes, no = (_answer_logprob(model, processor, prefix, a, im) for a in answers)
        scores.append(float(torch.sigmoid(torch.tensor(yes - no))))   # = e^yes / (e^yes + e^no)
    return scores


def qwen3vl_prompt_scorer(bundle) -> PromptScorer:
    return lambda images, prompt: qwen3vl_prompt_scores(bundle, images, prompt)


# --- images over the diffusers sampler -----------------------------------------------------------
def sample_alpha_images(pipeline_bundle, head, identity, positive: list, negative: list | None,
                        alphas: Sequence[float], seeds: Sequence[int], steps: int, cfg: float, width: int,
                        height: int, max_batch: int = 4, mode: str = "absolute",
                        baseline: list[Image.Image] | None = None,
                        progress: Progress | None = None,
                        fast: bool = False) -> tuple[dict[float, list[Image.Image]], list[str]]:
    """({α: one image per seed}, warnings) from `core.sampling.sample`, the head's residual for `identity`
    injected into `positive` exactly as InjectResidual does (head/feature/width checks; a mismatch raises).

    All α are sampled in one batched call (α-major; at α = 0 the prompt is left as it is). With `baseline`
    (one image per seed) α = 0 is taken from it instead: it does not depend on the identity, so several
    identities can share one baseline.
    """
    from ..files.images import comfy_to_pil
    from ..residual.injection import inject_identity
    from ..generation.acceleration import speed_options
    from ..generation.sampling import sample

    alphas, seeds = alphas_with_baseline(alphas), [int(s) for s in seeds]
    batches = {int(item[0].shape[0]) for item in positive if isinstance(item[0], torch.Tensor)}
    if batches != {1}:
        raise UserInputError(f"the prompt conditioning holds {'/'.join(map(str, sorted(batches))) or 'no'} prompts: "
                             "an α sweep takes exactly one prompt (encode one prompt per sweep).")
    out: dict[float, list[Image.Image]] = {}
    if baseline is not None:
        if len(baseline) != len(seeds):
            raise UserInputError(f"the shared baseline has {len(baseline)} images for {len(seeds)} seeds.")
        out[BASELINE_ALPHA] = list(baseline)
    todo = [a for a in alphas if a not in out]
    cond, warnings = inject_identity(positive, head, identity, todo or [1.0], mode=mode)  # α = 0: the plain prompt
    if todo:
        result = sample(pipeline_bundle, cond, negative, seeds=seeds, steps=steps, cfg=cfg, width=width,
                        height=height, max_batch=max_batch, progress=progress,
                        **speed_options(pipeline_bundle, fast))
        images = comfy_to_pil(result.images)
        for i, a in enumerate(todo):
            out[a] = images[i * len(seeds):(i + 1) * len(seeds)]
    return out, warnings


# --- the sweep ---------------------------------------------------------------------------------
@dataclass
class Scorers:
    """Which measures to compute; each is optional (None = not measured, reported as null)."""

    face: object | None = None                  # a face_similarity.FaceEmbedder
    image_features: ImageEmbedder | None = None  # e.g. qwen3vl_embedder(bundle, settings)
    prompt: PromptScorer | None = None           # e.g. qwen3vl_prompt_scorer(bundle)
    threshold: float = 0.6

    def names(self) -> list[str]:
        return [n for n, v in (("face", self.face), ("qwen3vl_cosine", self.image_features),
                               (PROMPT_PROXY_NAME, self.prompt)) if v is not None]


@dataclass
class SweepEvaluation:
    """One identity's sweep: a row per α (baseline α = 0 first) and the generated images per α."""

    alphas: list[float]
    seeds: list[int]
    rows: list[dict]
    references: dict
    images: dict[float, list[Image.Image]] = field(default_factory=dict)

    def curve(self, key: str = "face_distance") -> list[float | None]:
        return [row["summary"].get(key) for row in self.rows]

    def to_json(self) -> dict:
        base = self.rows[self.alphas.index(BASELINE_ALPHA)]["summary"]
        deltas = []
        for row in self.rows:
            s = row["summary"]
            deltas.append({"alpha": row["alpha"], **{
                f"{k}_vs_baseline": (None if s.get(k) is None or base.get(k) is None else _round(s[k] - base[k]))
                for k in ("face_distance", "qwen3vl_cosine", PROMPT_PROXY_NAME)}})
        return {"alphas": self.alphas, "seeds": self.seeds, "baseline_alpha": BASELINE_ALPHA,
                "references": self.references, "rows": self.rows, "vs_baseline": deltas}


def alphas_with_baseline(alphas: Sequence[float]) -> list[float]:
    """Sorted unique finite α values, with the α = 0 baseline added when missing."""
    values = []
    for a in alphas:
        a = float(a)
        if not math.isfinite(a):
            raise UserInputError(f"alpha {a} is not a finite number.")
        values.append(a)
    return sorted(set(values) | {BASELINE_ALPHA})


@dataclass
class References:
    """The reference photos as the scorers see them (computed once per identity)."""

    faces: list | None           # FaceResult per photo, or None when the face measure is off
    vector: torch.Tensor | None  # normalised mean Qwen3-VL feature [D], or None
    photos: int

    def to_json(self) -> dict:
        return {"photos": self.photos,
                "with_face": None if self.faces is None else sum(r.has_face for r in self.faces)}


def prepare_references(references: Sequence[Image.Image], scorers: Scorers) -> References:
    if not references:
        raise UserInputError("no reference photos given: the identity needs at least one photo.")
    faces = scorers.face.analyze_many(references) if scorers.face is not None else None
    vector = None
    if scorers.image_features is not None:
        feats = scorers.image_features(list(references))
        vector = torch.nn.functional.normalize(feats.to(torch.float32).mean(dim=0), dim=0)
    return References(faces=faces, vector=vector, photos=len(references))


def score_images(images: Sequence[Image.Image], refs: References, scorers: Scorers,
                 prompt: str | None = None, progress: Progress | None = None) -> dict:
    """Every enabled measure for a set of images against one identity's references (see module doc)."""
    from . import face_similarity as fs

    images = list(images)
    row: dict = {"images": len(images)}
    summary: dict = {}
    if scorers.face is not None:
        faces = scorers.face.analyze_many(images, progress)
        scored = fs.score_against_references(faces, refs.faces, scorers.threshold)
        row["face"] = scored
        summary["face_distance"] = _round(scored["mean_distance"])
        summary["same_person_rate"] = _round(scored["same_person_rate"])
        summary["images_with_face"] = scored["images_with_face"]
        summary["face_diversity"] = _round(fs.mean_pairwise_distance(faces))
    if scorers.image_features is not None:
        feats = scorers.image_features(images)
        cos = cosine_to_reference(refs.vector, feats)
        row["qwen3vl_cosine"] = [_round(c) for c in cos]
        summary["qwen3vl_cosine"] = _round(_mean(cos))
        summary["qwen3vl_diversity"] = _round(mean_pairwise_cosine_distance(feats))
    if scorers.prompt is not None and prompt:
        p = [float(v) for v in scorers.prompt(images, prompt)]
        row[PROMPT_PROXY_NAME] = [_round(v) for v in p]
        summary[PROMPT_PROXY_NAME] = _round(_mean(p))
    row["summary"] = summary
    return row


def notes_for(row: dict) -> list[str]:
    """One short note per scored image: face distance (or "no face") and Qwen3-VL cosine."""
    face = row["face"]["per_image"] if "face" in row else None
    cos = row.get("qwen3vl_cosine")
    notes = []
    for i in range(row["images"]):
        parts = []
        if face is not None:
            d = face[i]["distance"]
            parts.append("no face" if not face[i]["has_face"] else "d=n/a" if d is None else f"d={d:.2f}")
        if cos is not None:
            parts.append(f"cos={cos[i]:.2f}")
        notes.append(" ".join(parts))
    return notes


def evaluate_alpha_sweep(generate: Generate, alphas: Sequence[float], seeds: Sequence[int],
                         references: Sequence[Image.Image], prompt: str, scorers: Scorers,
                         progress: Progress | None = None, keep_images: bool = True) -> SweepEvaluation:
    """Generate one image per seed at every α (plus the α = 0 baseline) and score them (see module doc)."""
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise UserInputError("no generation seeds given: pass at least one seed.")
    if not references:
        raise UserInputError("no reference photos given: the identity needs at least one photo.")
    alphas = alphas_with_baseline(alphas)
    total = len(alphas) + 1
    if progress:
        progress(0, total)
    refs = prepare_references(references, scorers)
    if progress:
        progress(1, total)
    rows, kept = [], {}
    for step, alpha in enumerate(alphas, start=2):
        images = list(generate(alpha, seeds))
        if len(images) != len(seeds):
            raise RuntimeError(f"generate(alpha={alpha}) returned {len(images)} images for {len(seeds)} seeds")
        row = {"alpha": alpha, "baseline": alpha == BASELINE_ALPHA, "seeds": seeds,
               **score_images(images, refs, scorers, prompt)}
        rows.append(row)
        if keep_images:
            kept[alpha] = images
        if progress:
            progress(step, total)
    return SweepEvaluation(alphas=alphas, seeds=seeds, rows=rows, references=refs.to_json(), images=kept)


def cell_notes_for(evaluation: SweepEvaluation) -> list[str]:
    """One note per grid cell (rows α, columns seeds), α-major like the grid."""
    return [note for row in evaluation.rows for note in notes_for(row)]


# --- the plot ----------------------------------------------------------------------------------
PANELS = (("face_distance", "face distance to references (lower = closer; < 0.6 same person)"),
          ("qwen3vl_cosine", "Qwen3-VL feature cosine to references (higher = closer)"))
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def _panels(curves: Mapping[str, SweepEvaluation]) -> list[tuple[str, str]]:
    out = [(k, t) for k, t in PANELS if any(v is not None for ev in curves.values() for v in ev.curve(k))]
    return out or [PANELS[0]]


def plot_identity_vs_alpha(curves: Mapping[str, SweepEvaluation], path: str | Path, backend: str = "auto") -> Path:
    """Identity vs α: one curve per identity, dashed line = that identity's α = 0 baseline.

    One panel per available identity measure (face distance, Qwen3-VL cosine). Written atomically as
    PNG. backend: "auto" (matplotlib when importable, else PIL), "matplotlib" or "pil".
    """
    from ..files.atomic import atomic_write

    if not curves:
        raise UserInputError("nothing to plot: no identity was evaluated.")
    if backend not in ("auto", "matplotlib", "pil"):
        raise UserInputError(f"unknown plot backend {backend!r}: use auto, matplotlib or pil.")
    if backend == "auto":
        try:
            import matplotlib  # noqa: F401
            backend = "matplotlib"
        except ImportError:
            backend = "pil"
    draw = _plot_matplotlib if backend == "matplotlib" else _plot_pil
    return atomic_write(path, lambda tmp: draw(curves, tmp))


def _plot_matplotlib(curves: Mapping[str, SweepEvaluation], out: Path) -> None:
    from matplotlib.figure import Figure   # no pyplot: no global backend state is touched

    panels = _panels(curves)
    fig = Figure(figsize=(6.4 * len(panels), 4.4), dpi=100)
    for p, (key, title) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), p + 1)
        for i, (name, ev) in enumerate(curves.items()):
            color = tuple(c / 255 for c in PALETTE[i % len(PALETTE)])
            pts = [(a, v) for a, v in zip(ev.alphas, ev.curve(key)) if v is not None]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o", color=color, label=name)
            base = ev.curve(key)[ev.alphas.index(BASELINE_ALPHA)]
            if base is not None:
                ax.axhline(base, color=color, linestyle="--", linewidth=1)
        if key == "face_distance":
            ax.axhline(0.6, color="black", linestyle=":", linewidth=1, label="same-person threshold 0.6")
        ax.set_xlabel("α (identity strength); dashed: α = 0 baseline")
        ax.set_title(title, fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, format="png")


def _plot_pil(curves: Mapping[str, SweepEvaluation], out: Path) -> None:
    from PIL import ImageDraw, ImageFont

    panels = _panels(curves)
    pw, ph, m = 560, 400, 60
    img = Image.new("RGB", (pw * len(panels), ph + 30 + 16 * len(curves)), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    for p, (key, title) in enumerate(panels):
        x0, x1, y0, y1 = p * pw + m, (p + 1) * pw - 20, 30, ph - 40
        series = {name: [(a, v) for a, v in zip(ev.alphas, ev.curve(key)) if v is not None]
                  for name, ev in curves.items()}
        xs = [a for ev in curves.values() for a in ev.alphas]
        ys = [v for s in series.values() for _, v in s] + ([0.6] if key == "face_distance" else [])
        if not ys:
            ys = [0.0, 1.0]
        xlo, xhi = min(xs), max(xs)
        ylo, yhi = min(ys), max(ys)
        if xhi == xlo:
            xlo, xhi = xlo - 0.5, xhi + 0.5
        if yhi - ylo < 1e-6:
            ylo, yhi = ylo - 0.05, yhi + 0.05
        pad = (yhi - ylo) * 0.08
        ylo, yhi = ylo - pad, yhi + pad

        def px(a, v):
            return (x0 + (a - xlo) / (xhi - xlo) * (x1 - x0), y1 - (v - ylo) / (yhi - ylo) * (y1 - y0))

        d.text((p * pw + 10, 8), title, fill="black", font=font)
        d.rectangle((x0, y0, x1, y1), outline="black")
        for t in range(5):
            v = ylo + (yhi - ylo) * t / 4
            _, yy = px(xlo, v)
            d.line((x0 - 4, yy, x0, yy), fill="black")
            d.text((p * pw + 8, yy - 6), f"{v:.2f}", fill="black", font=font)
        for a in sorted(set(xs)):
            xx, _ = px(a, ylo)
            d.line((xx, y1, xx, y1 + 4), fill="black")
            d.text((xx - 10, y1 + 6), f"{a:g}", fill="black", font=font)
        d.text((x0 + 10, y1 + 20), "alpha (identity strength); dashed: alpha = 0 baseline", fill="black", font=font)
        if key == "face_distance":
            _dashed(d, px(xlo, 0.6), px(xhi, 0.6), (0, 0, 0), dash=2)
            d.text((x1 - 150, px(xlo, 0.6)[1] - 12), "same-person threshold 0.6", fill="black", font=font)
        for i, (name, ev) in enumerate(curves.items()):
            color = PALETTE[i % len(PALETTE)]
            base = ev.curve(key)[ev.alphas.index(BASELINE_ALPHA)]
            if base is not None:
                _dashed(d, px(xlo, base), px(xhi, base), color)
            pts = [px(a, v) for a, v in series[name]]
            if len(pts) > 1:
                d.line(pts, fill=color, width=2)
            for x, y in pts:
                d.ellipse((x - 3, y - 3, x + 3, y + 3), fill=color)
    for i, name in enumerate(curves):
        y = ph + 10 + 16 * i
        d.line((m, y + 6, m + 24, y + 6), fill=PALETTE[i % len(PALETTE)], width=3)
        d.text((m + 30, y), name, fill="black", font=font)
    img.save(out, format="PNG")


def _dashed(d, start, end, color, dash: int = 6) -> None:
    (xa, ya), (xb, yb) = start, end
    length = max(1.0, math.hypot(xb - xa, yb - ya))
    n = int(length // (2 * dash)) + 1
    for k in range(n):
        t0, t1 = (2 * k * dash) / length, min(1.0, (2 * k + 1) * dash / length)
        if t0 >= 1:
            break
        d.line((xa + (xb - xa) * t0, ya + (yb - ya) * t0, xa + (xb - xa) * t1, ya + (yb - ya) * t1), fill=color, width=1)
