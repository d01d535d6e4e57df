"""InjectResidual's core: α batches, masks, S != K, step windows, width checks, strength semantics."""

from types import SimpleNamespace

import pytest
import torch

from qwen_identity.core.residual import injection

from qwen_identity.core.generation import sampling
from qwen_identity.core.errors import ModelMismatchError, UserInputError
from qwen_identity.core.residual.head import HeadMeta, ResidualHead
from qwen_identity.core.residual.length_policy import pool_to_slots


def make_head(d=8, k=3, h=32, seed=0, metrics=None):
    torch.manual_seed(seed)
    head = ResidualHead(d, k, h, meta=HeadMeta(feature_dim=d, tokens=k, hidden_size=h, metrics=metrics or {}))
    with torch.no_grad():
        head.proj.weight.normal_(0, 0.5)
        head.proj.bias.normal_(0, 0.1)
    return head


def identity(d=8, seed=1):
    torch.manual_seed(seed)
    f = torch.nn.functional.normalize(torch.randn(d), dim=0)
    return SimpleNamespace(combined=f, meta={"feature_dim": d})


@pytest.fixture(scope="module")
def cond(tiny_text_encoder):
    from qwen_identity.core.residual.conditioning import make_conditioning
    from qwen_identity.core.generation.prompt_encoding import encode_prompts

    te, tok = tiny_text_encoder
    return make_conditioning(encode_prompts(te, tok, ["a portrait photo of a person, studio lighting, 85mm", "a man"]))


def clone(c):
    return [[e.clone(), {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in x.items()}] for e, x in c]


def same(a, b):
    return len(a) == len(b) and all(torch.equal(x[0], y[0]) and x[1].keys() == y[1].keys() for x, y in zip(a, b))


def test_alpha_list_is_alpha_major_and_inputs_untouched(cond):
    head = make_head()
    r = injection.compute_residual(head, identity())
    before = clone(cond)
    out = injection.inject(cond, r, [0.0, 0.5, 1.5])
    assert same(cond, before)  # never edited in place
    assert len(out) == 1
    e, extra = out[0]
    b, s, h = cond[0][0].shape
    assert e.shape == (3 * b, s, h)
    assert torch.equal(e[:b], cond[0][0])  # α = 0 is the input, bit for bit
    assert torch.equal(extra["attention_mask"], cond[0][1]["attention_mask"].repeat(3, 1))
    assert "start_percent" not in extra  # no window: no keys
    mask = cond[0][1]["attention_mask"].bool()
    d1 = e[b:2 * b] - cond[0][0]
    d2 = e[2 * b:] - cond[0][0]
    assert torch.allclose(d2, 3 * d1, atol=1e-5)  # linear in α, item by item
    assert torch.all(d1[~mask] == 0) and torch.all(d2[~mask] == 0)  # padded tokens unchanged
    assert (d1[mask].abs().sum(-1) > 0).all()  # every valid token moves


@pytest.mark.parametrize("k", [1, 3, 40])  # fewer, and more, slots than the prompts' tokens
def test_any_prompt_length_against_k(cond, k):
    head = make_head(k=k)
    r = injection.compute_residual(head, identity())
    out = injection.inject(cond, r, [1.0])
    mask = cond[0][1]["attention_mask"]
    diff = out[0][0] - cond[0][0]
    for i in range(diff.shape[0]):
        n = int(mask[i].sum())
        if n >= k:  # absolute α=1: the pooled prompt moves by exactly the head's output
            assert torch.allclose(pool_to_slots(diff[i], mask[i], k), r[0], atol=1e-5)
        else:  # each token gets the mean of the slots it spans
            for t in range(n):
                seg = r[0][t * k // n:(t + 1) * k // n]
                assert torch.allclose(diff[i, t], seg.mean(0), atol=1e-5)
        assert torch.all(diff[i, n:] == 0)


def test_step_window_uses_comfyui_keys(cond):
    r = injection.compute_residual(make_head(), identity())
    out = injection.inject(cond, r, [1.0, 2.0], start_at=0.2, end_at=0.7)
    windows = [(x["start_percent"], x["end_percent"]) for _, x in out]
    assert windows == [(0.2, 0.7), (0.0, 0.2), (0.7, 1.0)]
    assert not torch.equal(out[0][0], cond[0][0].repeat(2, 1, 1))
    assert torch.equal(out[1][0], cond[0][0].repeat(2, 1, 1))  # the original, batched like the injected one
    assert torch.equal(out[2][0], cond[0][0].repeat(2, 1, 1))
    assert all(x["attention_mask"].shape[0] == out[0][0].shape[0] for _, x in out)
    # a window that starts at 0 has no leading original part; an existing window is intersected
    nested = injection.inject(out[:1], r, [1.0], start_at=0.0, end_at=0.5)
    assert [(x["start_percent"], x["end_percent"]) for _, x in nested] == [(0.2, 0.5), (0.5, 0.7)]


def test_errors(cond):
    r = injection.compute_residual(make_head(), identity())
    for bad in ("", " , ", "1,,2", "0.5,abc", "nan"):
        with pytest.raises(UserInputError):
            injection.inject(cond, r, injection.parse_alphas(bad))
    with pytest.raises(UserInputError, match="empty"):
        injection.parse_alphas("")
    with pytest.raises(UserInputError, match="step window is empty"):
        injection.inject(cond, r, [1.0], start_at=0.5, end_at=0.5)
    with pytest.raises(UserInputError, match="0..1"):
        injection.inject(cond, r, [1.0], start_at=-0.1)
    wide = injection.compute_residual(make_head(h=3584), identity())
    with pytest.raises(ModelMismatchError) as e:
        injection.inject(cond, wide, [1.0])
    msg = str(e.value)
    assert "H=3584" in msg and "Qwen-Image / Qwen-Image-Edit" in msg and "H=32" in msg and "unknown" in msg
    with pytest.raises(ModelMismatchError, match="D=5"):
        injection.compute_residual(make_head(), identity(d=5))


def _txt_norm(tiny_qwenimage_dir):
    from diffusers import QwenImageTransformer2DModel

    return QwenImageTransformer2DModel.from_pretrained(tiny_qwenimage_dir, subfolder="transformer").txt_norm


def test_strength_semantics_after_txt_norm(cond, tiny_qwenimage_dir):
    """What the transformer sees: RMSNorm(E') per token. Scaling a prompt's embeddings by c changes nothing
    for the transformer; an absolute residual is then c times weaker, a relative one (with the head's
    recorded reference RMS ρ) is not. On tokens whose RMS is ρ both modes agree."""
    txt_norm = _txt_norm(tiny_qwenimage_dir)
    e, extra = cond[0]
    mask = extra["attention_mask"].bool()
    rms = e.float().pow(2).mean(-1).sqrt()
    rho = float(rms[mask].mean())
    head = make_head(metrics={injection.REFERENCE_RMS_KEY: rho})
    r = injection.compute_residual(head, identity())
    assert injection.reference_rms(head.meta) == pytest.approx(rho)

    def seen(embeds, mode):
        c = [[embeds, dict(extra)]]
        out = injection.inject(c, r, [1.0], mode=mode, rho=injection.reference_rms(head.meta))[0][0]
        return txt_norm(out)[mask], txt_norm(embeds)[mask]

    changes = {}
    for mode in ("absolute", "relative"):
        for c in (1.0, 4.0):
            after, before = seen(e * c, mode)
            changes[mode, c] = (after - before).norm(dim=-1).mean().item()
    assert torch.allclose(txt_norm(e * 4.0)[mask], txt_norm(e)[mask], atol=1e-5)  # the transformer ignores scale
    assert changes["absolute", 4.0] < 0.4 * changes["absolute", 1.0]  # absolute: same α, much weaker effect
    assert changes["relative", 4.0] == pytest.approx(changes["relative", 1.0], rel=1e-4)  # relative: invariant
    rel_1 = seen(e, "relative")[0]
    rel_4 = seen(e * 4.0, "relative")[0]
    assert torch.allclose(rel_1, rel_4, atol=1e-5)  # identical transformer input, token by token
    # tokens whose RMS equals ρ: relative == absolute
    unit = e * (rho / rms.clamp_min(1e-12))[..., None]
    a = injection.inject([[unit, dict(extra)]], r, [1.0], mode="absolute")[0][0]
    b = injection.inject([[unit, dict(extra)]], r, [1.0], mode="relative", rho=rho)[0][0]
    assert torch.allclose(a, b, atol=1e-5)


def test_relative_without_reference_uses_prompt_mean(cond):
    """No recorded ρ: each token's residual is the absolute one times rms(E_t) / (mean valid-token RMS of
    that prompt), checked against the absolute mode's residual, token by token."""
    r = injection.compute_residual(make_head(), identity())
    e, extra = cond[0]
    e = e * torch.linspace(0.5, 3.0, e.shape[1])[None, :, None]  # planted: token RMS from 0.5x to 3x
    cond = [[e, extra]]
    out = injection.inject(cond, r, [1.0], mode="relative")[0][0]
    absolute = injection.inject(cond, r, [1.0], mode="absolute")[0][0] - e
    mask = extra["attention_mask"].bool()
    assert torch.all((out - e)[~mask] == 0)
    rms = e.float().pow(2).mean(-1).sqrt()
    for b in range(e.shape[0]):
        prompt_mean = rms[b][mask[b]].mean()
        expected = absolute[b] * (rms[b] / prompt_mean)[:, None]
        assert torch.allclose((out - e)[b][mask[b]], expected[mask[b]], rtol=1e-4, atol=1e-5)
    assert not torch.allclose((out - e)[mask], absolute[mask], rtol=0.1)  # the scaling did something
    with pytest.raises(UserInputError, match="strength mode"):
        injection.inject(cond, r, [1.0], mode="weird")


@pytest.fixture(scope="module")
def bundle(tiny_qwenimage_dir):
    return sampling.load_qwen_image_pipeline(str(tiny_qwenimage_dir), device="cpu", dtype="fp32")


def test_alpha_zero_reproduces_the_base_image_exactly(bundle):
    pos = sampling.encode_text(bundle, "a portrait photo of a person")
    neg = sampling.encode_text(bundle, sampling.DEFAULT_NEGATIVE_PROMPT)
    r = injection.compute_residual(make_head(), identity())
    swept = injection.inject(pos, r, [0.0, 1.0])
    kw = dict(seeds=[1234], steps=2, width=32, height=32, max_batch=1)
    base = sampling.sample(bundle, pos, neg, **kw)
    got = sampling.sample(bundle, swept, neg, **kw)
    assert torch.equal(got.images[0], base.images[0])
    assert not torch.allclose(got.images[1], base.images[0], atol=1e-4)  # α = 1 changes the image


def test_absurd_alphas_are_refused_before_they_become_nan_images():
    """Found by the workflow fuzzer: α = 1.1e39 overflowed to inf embeddings and NaN images."""
    from qwen_identity.core.errors import UserInputError
    from qwen_identity.core.residual.injection import MAX_ABS_ALPHA, parse_alphas

    assert parse_alphas(f"0,{MAX_ABS_ALPHA:g},-{MAX_ABS_ALPHA:g}") == [0.0, MAX_ABS_ALPHA, -MAX_ABS_ALPHA]
    for bad in ("1" * 40, "101", "-1e6"):
        with pytest.raises(UserInputError, match="outside"):
            parse_alphas(bad)
