"""User-facing docs make no claim the code or the measurements contradict.

1. Phrases that were once in the README or docs/ and are contradicted by the code or bench/RESULTS.md.
2. Every learning figure the docs quote from the planted test ("<label> A to B") is the range those tests
   measure over their seeds (tests/planted_claims.py, shared with tests/test_denoise_identity.py, so a
   full test run trains the planted heads once), and the docs state the margins the tests require.
The scan covers README.md and every docs/*.md page, whitespace collapsed so a line break cannot hide a claim.
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
WRONG = {
    "the POC's broadcast": "the seed's residual is per token [1, S, H]; K = 1 is this pack's choice",
    "the VQAScore recipe": "the proxy normalises P(yes) over yes and no; VQAScore reports P('Yes')",
    "qwen3vl_vqascore": "the key is qwen3vl_p_yes_normalised",
    "keyed by the directory's absolute path": "feature caches are keyed by content, model, settings, dtype",
    "(3.2x faster than stock diffusers": "quote the measured range 2.5-3.2x and the card",
    "ignored on CPU/MPS and on the native path": "speed=fast applies QwenImageAccelerate's defaults on the native path",
    "768x512 for portraits": "sizes are WIDTHxHEIGHT: 768x512 is landscape",
    "it runs at 768x512": "cli/demo.py's real size is width 512, height 768 (512x768)",
    "0.037 (95 % CI": "an old planted test's figure; the planted test measures other figures now",
    "gain > 3× the impostor's": "the planted test has no such threshold (it was implied by the others)",
}

# label in the docs -> (what the planted runs measure, how it is written: x100 for "% of the loss")
PLANTED_FIGURES = {
    "denoise head's identity gain": (lambda r: r["product"]["identity_gain_relative"], 100),
    "denoise head's own gain": (lambda r: r["product"]["own_gain_relative"], 100),
    "impostor gain": (lambda r: r["product"]["impostor_gain_relative"], 100),
    "shuffled control's identity gain": (lambda r: r["shuffled"]["identity_gain_relative"], 100),
    "random head's identity gain": (lambda r: r["random"]["identity_gain_relative"], 100),
    "caption head's identity gain": (lambda r: r["caption"]["identity_gain_relative"], 100),
    "caption targets: held-out loss": (lambda r: r["caption"]["val_loss"] / r["caption"]["val_loss_untrained"], 1),
    "leaky variant's advantage": (lambda r: r["leaky_advantage"]["advantage_relative"], 100),
    "product training's advantage": (lambda r: r["product_advantage"]["advantage_relative"], 100),
}
NUMBER = r"([−-]?\d+(?:\.\d+)?)"


def _user_docs() -> str:
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    return "\n".join(" ".join(p.read_text(encoding="utf-8").split()) for p in files if p.is_file())


def _number(text: str) -> float:
    return float(text.replace("−", "-"))


def test_docs_make_no_contradicted_claim():
    text = _user_docs()
    found = {claim: why for claim, why in WRONG.items() if claim in text}
    assert not found, found


# Project shorthand a reader of the docs cannot follow: issue/PR numbers, the proof of concept's own module
# paths, words about how the project is developed (branches being merged, worktrees).
INTERNAL = re.compile(
    r"\bissues? #?\d+|\bPR #?\d+|(?<![\w(\]/.#-])#\d+\b(?!-)|\bharald\.|\bworktrees?\b|\bother branches\b"
    r"|\bbranches (?:were|are) merged\b|\bthe lead\b", re.I)


def _internal_references(files) -> list[str]:
    found = []
    for p in files:
        text = " ".join(p.read_text(encoding="utf-8").split())
        found += [f"{p.relative_to(ROOT) if p.is_relative_to(ROOT) else p.name}: {m.group(0)!r}"
                  for m in INTERNAL.finditer(text)]
    return found


def test_user_docs_carry_no_issue_numbers_branch_talk_or_internal_module_paths():
    """README, docs/ and the node-info pages are for users: nothing that needs the project's tracker to read."""
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "web" / "docs").glob("*.md"))]
    found = _internal_references(files)
    assert not found, found


def test_internal_reference_check_can_fail(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("Fixed in issue 13 (see #12); the seed ran harald.modal_runner, after the branches were merged.\n"
                    "Links such as [step 1](training.md#1-prepare-the-dataset) and the α × seed grid are fine.\n")
    found = _internal_references([page])
    assert [f.split(": ", 1)[1] for f in found] == ["'issue 13'", "'#12'", "'harald.'", "'branches were merged'"]


@pytest.fixture(scope="module")
def planted_runs(tiny_text_encoder):
    from planted_claims import measured

    return measured(*tiny_text_encoder)


def test_planted_figures_in_the_docs_are_what_the_tests_measure(planted_runs):
    text = _user_docs()
    for label, (value, scale) in PLANTED_FIGURES.items():
        quoted = re.findall(re.escape(label) + rf" {NUMBER} to {NUMBER}", text)
        assert quoted, f"the docs no longer quote the {label} ('{label} A to B')"
        values = [scale * value(r) for r in planted_runs]
        lo, hi = round(min(values), 2), round(max(values), 2)
        for a, b in quoted:   # two decimals as written; 0.01 leaves room for the last digit across platforms
            assert abs(_number(a) - lo) <= 0.0100001 and abs(_number(b) - hi) <= 0.0100001, (label, (a, b), values)


def test_docs_state_the_margins_the_planted_tests_require():
    from test_denoise_identity import CAPTION_FIT, CONTROL_FRACTION, IDENTITY_MARGIN, LEAK_FRACTION

    text = _user_docs()
    assert f"identity gain at least {IDENTITY_MARGIN * 100:g} % of the loss" in text
    assert CONTROL_FRACTION == LEAK_FRACTION == CAPTION_FIT == 0.25   # the docs say "a quarter"
    assert "two controls below a quarter of it" in text
    assert "must profit less than a quarter of that" in text
    assert "loss below a quarter of the untrained head's" in text
