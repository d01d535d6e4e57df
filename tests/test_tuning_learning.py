"""THE learning claim of personal tuning, on a planted world (tests/personal_plant.py) through a tiny frozen
Qwen-Image transformer on the CPU, over 3 seeds (each seed: its own world, people, prompt and σ/ε draws).

The plant: each person's photos carry a texture (a 2x2 sub-patch per latent channel, from the person's
code) inside a face region of the latent, plus per-photo noise; the features are noisy non-linear views
of the code (tanh, fresh noise per photo); everyone shares one prompt embedding, fitted beforehand to a
population of other people (so a residual gains nothing by fixing what all people share). The person P
has 4 photos (one held out by `tune_head`); impostors are 3 other people (orthogonal codes) with 2 photos
each; "identity gap" = P's held-out own gain − the impostors' gain under P's residual, both relative to
the prompt-alone loss at the same fixed (σ, ε) pairs.

Claims and margins (measured on seeds 0-4, 60 steps, lr 5e-2: gap 0.089-0.158, own gain 0.076-0.127;
control gap -0.0001..0.0000 (its held-out loss never beat the untrained head's, so the kept head is the
untrained one); the universal start reached the zero start's best held-out loss at step 20-35 of 60 on
seeds 0-3, and NOT on seed 4, where it levelled off 1.5 % above it (4.053 vs 3.994) - so the claim is
tested on the pre-chosen seeds 0-2 and stated as "usually", not "always", in docs/personalize.md):
1. tuning on P's photos: gap > 0.04 and own gain > 0.03 (under half the smallest measured, so seed noise
   cannot flip it, while a head without identity - the control - stays below it);
2. control: 4 different people's photos tuned as "one person": gap < 0.04 (the same line the real person
   must clear: a method that only learned "photos of people" would pass 1 and fail here);
3. start from a universal head (the project's denoise trainer on 12 other people of the same plant):
   reaches the zero start's best held-out loss within 0.75x the zero start's steps.
"""

import pytest

from qwen_identity.core.residual.head import ResidualHead
from qwen_identity.core.tuning import TuneOptions, tune_head
from qwen_identity.training.denoise import DenoiseLoopConfig, train_denoise

from personal_plant import D, H, World, denoiser, tiny_transformer
from torch_threads import one_torch_thread

SEEDS = (0, 1, 2)
GAP = 0.04
OWN = 0.03
SPEEDUP = 0.75


@pytest.fixture(scope="module", autouse=True)
def one_thread():   # at module scope: the module's fixtures that train run on one thread too
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def transformer():
    return tiny_transformer()


def gap(m):
    return m["own_gain_relative"] - m["impostor_gain_relative"]


@pytest.fixture(scope="module")
def runs(transformer):
    den = denoiser(transformer)
    out = {}
    for seed in SEEDS:
        w = World(seed=seed)
        w.calibrate_prompt(den, people=12, steps=100)
        z = w.distinct_codes(8, seed + 100)
        me = w.personal([(z[0], 4, 1)])
        impostors = w.personal([(z[k], 2, 10 + k) for k in range(1, 4)], "i")
        mix = w.personal([(z[k], 1, 20 + k) for k in range(4, 8)], "m")
        opts = TuneOptions(steps=60, lr=5e-2, seed=seed, eval_every=5)
        universal = ResidualHead(D, 1, H)
        train_denoise(universal, transformer, w.universal_data(12, 3, seed + 7), None,
                      DenoiseLoopConfig(epochs=8, batch_size=4, lr=3e-2, seed=seed))
        out[seed] = {"own": tune_head(me, den, opts, impostors=impostors).metrics,
                     "mix": tune_head(mix, den, opts, impostors=impostors).metrics,
                     "universal": tune_head(me, den, opts, impostors=impostors, init_head=universal).metrics}
    return out


def test_tuning_on_a_person_helps_their_held_out_photo_more_than_impostors(runs):
    for seed, r in runs.items():
        m = r["own"]
        assert m["held_out_photos"] and m["impostor_photos"] == 6
        assert gap(m) > GAP and m["own_gain_relative"] > OWN, (seed, gap(m), m["own_gain_relative"])


def test_control_several_people_as_one_shows_no_such_gap(runs):
    for seed, r in runs.items():
        assert gap(r["mix"]) < GAP, (seed, gap(r["mix"]))
        assert gap(r["mix"]) < gap(r["own"]), seed


def test_a_universal_start_reaches_the_zero_starts_loss_in_fewer_steps(runs):
    for seed, r in runs.items():
        zero, uni = r["own"], r["universal"]
        target = zero["held_out_loss"]
        reached = [e["step"] for e in uni["held_out_evals"] if e["held_out_loss"] <= target]
        assert reached, (seed, target, uni["held_out_evals"])
        assert reached[0] <= SPEEDUP * zero["best_step"], (seed, reached[0], zero["best_step"])
