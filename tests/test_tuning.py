"""core/tuning: the personal tuning API on a tiny frozen transformer (CPU): determinism for a seed, the
held-out photo and the kept step, conditioning on the OTHER photos only, aspect buckets, face weighting,
interrupts keeping the best head, init heads and their mismatches, bad options. The learning proof is
tests/test_tuning_learning.py."""

import pytest
import torch

from qwen_identity.core.errors import ModelMismatchError, UserInputError
from qwen_identity.core.residual.head import ResidualHead
from qwen_identity.core.tuning import PersonalData, TuneOptions, tune_head
from qwen_identity.core.tuning.objective import denoiser_losses, position_weights

from personal_plant import D, H, World, denoiser, tiny_transformer
from torch_threads import one_torch_thread


@pytest.fixture(scope="module", autouse=True)
def one_thread():   # at module scope: the module's fixtures that train run on one thread too
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def den():
    return denoiser(tiny_transformer())


@pytest.fixture(scope="module")
def world():
    return World(seed=3)


def person(world, n=4, seed=1):
    return world.personal([(world.distinct_codes(1, seed)[0], n, seed)])


def opts(**kw):
    return TuneOptions(**{"steps": 6, "lr": 3e-2, "eval_every": 2, "seed": 5, **kw})


def test_same_seed_same_head_other_seed_other_head(world, den):
    data = person(world)
    a = tune_head(data, den, opts())
    b = tune_head(data, den, opts())
    c = tune_head(data, den, opts(seed=6))
    assert torch.equal(a.head.proj.weight, b.head.proj.weight) and a.history == b.history
    assert not torch.equal(a.head.proj.weight, c.head.proj.weight)
    assert a.metrics["objective"] == "personal" and a.head.meta.target == "personal"
    assert a.head.meta.training_args["objective"] == "personal" and a.head.meta.training_args["steps"] == 6
    assert len(a.history) == 6


def test_three_photos_hold_one_out_and_keep_the_best_evaluated_step(world, den):
    data = person(world, n=4)
    r = tune_head(data, den, opts(steps=8))
    m = r.metrics
    assert len(m["held_out_photos"]) == 1 and len(m["train_photos"]) == 3
    assert m["held_out_photos"][0] not in m["train_photos"]
    evals = m["held_out_evals"]
    assert [e["step"] for e in evals] == [0, 2, 4, 6, 8]
    best = min(evals, key=lambda e: e["held_out_loss"])
    assert m["best_step"] == best["step"] and m["held_out_loss"] == best["held_out_loss"]
    assert m["own_gain"] == pytest.approx(m["held_out_loss_none"] - m["held_out_loss"])
    # the kept head is that step's head: re-measuring it gives the same held-out loss
    from qwen_identity.core.tuning.tune import _Evaluator

    held = [data.names.index(m["held_out_photos"][0])]
    train = [i for i in range(len(data)) if i not in held]
    from qwen_identity.core.identity.features import combine_features

    with torch.no_grad():
        res = r.head(combine_features(data.features[train]))
    again = _Evaluator(den, data, opts(steps=8)).losses(held, res)
    assert again[0] == pytest.approx(m["held_out_loss"], rel=1e-5)


def test_two_photos_or_held_out_none_train_on_all(world, den):
    for data, o in ((person(world, n=2), opts()), (person(world, n=4), opts(held_out="none"))):
        m = tune_head(data, den, o).metrics
        assert m["held_out_photos"] == [] and m["held_out_loss"] is None and m["best_step"] == 6
        assert len(m["train_photos"]) == len(data)
    m = tune_head(person(world, n=4), den, opts(held_out="p0_2")).metrics
    assert m["held_out_photos"] == ["p0_2"]
    with pytest.raises(UserInputError, match="not among the photos"):
        tune_head(person(world, n=4), den, opts(held_out="nobody"))


def test_the_head_is_conditioned_on_the_other_photos_never_its_own():
    data = PersonalData([torch.zeros(4, 8, 8)] * 4, torch.eye(4, D), [torch.zeros(6, H)] * 4,
                        [torch.ones(6)] * 4, sources=[0, 0, 1, 2])
    assert data.conditioning_photos(2) == [0, 1, 3]
    assert data.conditioning_photos(0) == [2, 3]          # its own mirrored view (same source) is not "other"
    assert data.conditioning_photos(0, allowed=[0, 1, 2]) == [2]
    single = PersonalData([torch.zeros(4, 8, 8)] * 2, torch.eye(2, D), [torch.zeros(6, H)] * 2,
                          [torch.ones(6)] * 2, sources=[0, 0])
    assert single.conditioning_photos(0) == [1] and single.conditioning_photos(1) == [0]
    alone = PersonalData([torch.zeros(4, 8, 8)], torch.eye(1, D), [torch.zeros(6, H)], [torch.ones(6)])
    with pytest.raises(UserInputError, match="only view"):
        alone.conditioning_photos(0)


def test_photos_of_different_aspects_train_in_their_own_batches(world, den):
    z = world.distinct_codes(1, 9)[0]
    lat8, f8 = world.photos(z, 2, 1)
    lat_w, fw = world.photos(z, 2, 2, size=(8, 12))
    data = PersonalData(lat8 + lat_w, torch.cat([f8, fw]), [world.E] * 4, [torch.ones(6)] * 4)
    seen = []

    class Spy:
        dtype, device = den.dtype, den.device

        def __call__(self, x_t, sigma, embeds, mask):
            seen.append(tuple(x_t.shape))
            return den(x_t, sigma, embeds, mask)

    tune_head(data, Spy(), opts(batch_size=2, held_out="none", steps=4))
    assert set(seen) == {(2, 4, 8, 8), (2, 4, 8, 12)}


def test_face_map_weights_the_loss_where_the_face_is(den):
    x0 = torch.zeros(1, 4, 8, 8)
    x0[:, :, :2] = 3.0                                      # a large error only in the top rows
    noise, sig, e, m = torch.zeros_like(x0), torch.tensor([0.5]), torch.zeros(1, 6, H), torch.ones(1, 6)
    face = torch.zeros(1, 8, 8)
    face[:, :2] = 1
    plain = denoiser_losses(den, x0, noise, sig, e, m)
    on_face = denoiser_losses(den, x0, noise, sig, e, m, position_weights([face], (8, 8), 5.0, "cpu"))
    off_face = denoiser_losses(den, x0, noise, sig, e, m, position_weights([1 - face], (8, 8), 5.0, "cpu"))
    assert float(on_face) > float(plain) > float(off_face)
    assert position_weights([None], (8, 8), 5.0, "cpu") is None       # no map: unweighted
    assert position_weights([face], (8, 8), 0.0, "cpu") is None       # weighting off


def test_interrupt_keeps_the_best_head_so_far(world, den):
    data = person(world, n=4)
    calls = []

    def stop():
        calls.append(1)
        return len(calls) > 3

    r = tune_head(data, den, opts(steps=50, eval_every=10), should_stop=stop)
    m = r.metrics
    assert m["interrupted"] and m["steps_done"] == 3
    assert [e["step"] for e in m["held_out_evals"]] == [0, 3]       # the interrupted step is evaluated too
    assert m["held_out_loss"] == min(e["held_out_loss"] for e in m["held_out_evals"])


def test_progress_reports_every_step(world, den):
    got = []
    tune_head(person(world, n=2), den, opts(steps=3), progress=lambda s, t, loss: got.append((s, t, loss)))
    assert [(s, t) for s, t, _ in got] == [(1, 3), (2, 3), (3, 3)] and all(loss > 0 for _, _, loss in got)


def test_init_head_is_the_start_and_mismatches_are_refused(world, den):
    data = person(world, n=4)
    init = ResidualHead(D, 2, H)
    with torch.no_grad():
        init.proj.weight.normal_(0, 0.1)
    init.meta.qwen3_vl_model = "some/Qwen3-VL"
    r = tune_head(data, den, opts(steps=2, pull_back=0.5, lr=1e-6), init_head=init)
    assert r.head.tokens == 2 and r.head.meta.qwen3_vl_model == "some/Qwen3-VL"
    assert torch.allclose(r.head.proj.weight, init.proj.weight, atol=1e-4)   # lr ~0: still the init head
    assert r.head.meta.training_args["init_head"] is not None
    with pytest.raises(ModelMismatchError, match="D=8"):
        tune_head(data, den, opts(), init_head=ResidualHead(8, 1, H))
    with pytest.raises(ModelMismatchError, match="H=64"):
        tune_head(data, den, opts(), init_head=ResidualHead(D, 1, 64))
    with pytest.raises(UserInputError, match="K=3"):
        tune_head(data, den, opts(tokens=3), init_head=init)
    with pytest.raises(UserInputError, match="pull_back"):
        tune_head(data, den, opts(pull_back=1.0))


@pytest.mark.parametrize("bad", [dict(steps=0), dict(steps=-3), dict(lr=0.0), dict(lr=float("nan")),
                                 dict(schedule="linear"), dict(tokens=0), dict(face_weight=0.5),
                                 dict(alpha_train=-1.0), dict(pull_back=-1.0)])
def test_bad_options_are_clear_errors(world, den, bad):
    with pytest.raises(UserInputError):
        tune_head(person(world, n=2), den, opts(**bad))


def test_no_photos_is_a_clear_error():
    with pytest.raises(UserInputError, match="no photos"):
        PersonalData([], torch.zeros(0, D), [], [])


def test_warmup_cosine_and_constant_schedules():
    o = TuneOptions(steps=100, warmup_fraction=0.1)
    f = [o.lr_factor(s) for s in range(100)]
    assert f[0] < f[5] < f[9] <= 1.0 and f[10] == pytest.approx(1.0) and f[99] < 0.01
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    c = TuneOptions(steps=100, schedule="constant")
    assert {c.lr_factor(s) for s in range(100)} == {1.0}


def test_impostor_gain_uses_the_persons_residual_on_their_photos(world, den):
    data = person(world, n=4)
    imp = world.personal([(world.distinct_codes(3, 1)[2], 2, 7)], "i")
    m = tune_head(data, den, opts(), impostors=imp).metrics
    assert m["impostor_photos"] == 2
    assert m["impostor_gain"] == pytest.approx(m["impostor_loss_none"] - m["impostor_loss"])
    assert m["identity_gain_relative"] == pytest.approx(m["own_gain_relative"] - m["impostor_gain_relative"])


def test_during_tuning_the_head_never_sees_the_photo_it_denoises(den, monkeypatch):
    """Behavioural leak check: each photo has its own one-hot feature and its own prompt length, so every
    step shows which photo the denoiser got (its mask) and which photos' features the head got (the
    non-zero components). The denoised photo's own component is always zero; the others are present."""
    from qwen_identity.core.tuning import tune as tune_module

    heads_saw, denoiser_got = [], []

    class SpyHead(ResidualHead):
        def forward(self, features):
            heads_saw.append(features.detach().clone())
            return super().forward(features)

    class SpyDenoiser:
        dtype, device = den.dtype, den.device

        def __call__(self, x_t, sigma, embeds, mask):
            denoiser_got.append([int(m.sum()) for m in mask])
            return den(x_t, sigma, embeds, mask)

    monkeypatch.setattr(tune_module, "ResidualHead", SpyHead)
    n = 4
    masks = [torch.tensor([1] * (2 + i) + [0] * (6 - 2 - i)) for i in range(n)]
    data = PersonalData([torch.randn(4, 8, 8) for _ in range(n)], torch.eye(n, D), [torch.randn(6, H)] * n, masks)
    tune_head(data, SpyDenoiser(), opts(steps=8, held_out="none"))
    assert len(heads_saw) == len(denoiser_got) == 8
    for feats, lens in zip(heads_saw, denoiser_got):
        photo = lens[0] - 2
        row = feats[0]
        assert float(row[photo]) == 0.0, (photo, row[:n])
        assert all(float(row[j]) > 0 for j in range(n) if j != photo), (photo, row[:n])
