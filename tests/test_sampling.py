"""Our denoising loop equals stock diffusers; seeds are batch-independent; windows, errors."""

import pytest
import torch

from qwen_identity.core.generation import acceleration, sampling
from qwen_identity.core.errors import UserInputError

NEG = sampling.DEFAULT_NEGATIVE_PROMPT
W, H, STEPS = 32, 48, 2


@pytest.fixture(scope="module")
def bundle(tiny_qwenimage_dir):
    return sampling.load_qwen_image_pipeline(str(tiny_qwenimage_dir), device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def conds(bundle):
    pos = sampling.encode_text(bundle, ["a portrait photo of a person, studio lighting, 85mm", "a man"])
    neg = sampling.encode_text(bundle, NEG)
    return pos, neg


def stock(bundle, embeds, mask, neg, seed, output_type, cfg=4.5, steps=STEPS):
    return bundle.pipeline(prompt_embeds=embeds, prompt_embeds_mask=mask, negative_prompt_embeds=neg[0][0],
                           negative_prompt_embeds_mask=torch.ones(neg[0][0].shape[:2], dtype=torch.long),
                           true_cfg_scale=cfg, height=H, width=W, num_inference_steps=steps,
                           generator=torch.Generator().manual_seed(seed), output_type=output_type).images


def test_equals_stock_diffusers(bundle, conds):
    pos, neg = conds
    assert "attention_mask" in pos[0][1]  # two prompts of different lengths: padded and masked
    res = sampling.sample(bundle, pos, neg, seeds=[1234, 5], steps=STEPS, width=W, height=H, max_batch=4,
                          return_latents=True)
    assert res.images.shape == (4, H, W, 3)
    assert res.cells == [(0, 1234), (0, 5), (1, 1234), (1, 5)]  # item-major, then seeds
    mask = pos[0][1]["attention_mask"]
    for k, (item, seed) in enumerate(res.cells):
        e, m = pos[0][0][item:item + 1], mask[item:item + 1]
        n = int(m.sum())
        e, m = e[:, :n], m[:, :n]  # stock on its own, unpadded prompt, cond and uncond in separate forwards
        lat = stock(bundle, e, m, neg, seed, "latent")
        assert torch.allclose(lat[0], res.latents[k], atol=1e-5), (lat[0] - res.latents[k]).abs().max()
        if k == 3:  # the decode too (one cell: the VAE is the slow part on CPU)
            img = torch.from_numpy(stock(bundle, e, m, neg, seed, "np")[0])
            assert torch.allclose(img, res.images[k], atol=1e-5)
    assert res.images.std() > 0


def test_without_cfg_equals_stock(bundle, conds):
    pos, _ = conds
    one = [[pos[0][0][1:2, :int(pos[0][1]["attention_mask"][1].sum())], {"pooled_output": None}]]
    res = sampling.sample(bundle, one, None, seeds=[7], steps=2, cfg=1.0, width=W, height=H, return_latents=True,
                          decode=False)
    lat = bundle.pipeline(prompt_embeds=one[0][0], true_cfg_scale=1.0, height=H, width=W, num_inference_steps=2,
                          generator=torch.Generator().manual_seed(7), output_type="latent").images
    assert torch.equal(lat[0], res.latents[0])  # same single forward per step: bitwise


def test_seed_alone_equals_seed_in_batch(bundle, conds):
    pos, neg = conds
    batch = sampling.sample(bundle, pos, neg, seeds=[11, 22, 33], steps=2, width=W, height=H, max_batch=6,
                            return_latents=True, decode=False)
    alone = sampling.sample(bundle, [[pos[0][0][1:2], {"pooled_output": None, "attention_mask":
                                                       pos[0][1]["attention_mask"][1:2]}]], neg,
                            seeds=[22], steps=2, width=W, height=H, max_batch=1, return_latents=True, decode=False)
    assert torch.allclose(alone.latents[0], batch.latents[4], atol=1e-5)  # item 1, seed 22
    assert not torch.allclose(batch.latents[1], batch.latents[4], atol=1e-3)  # the prompt matters
    assert not torch.allclose(batch.latents[3], batch.latents[4], atol=1e-3)  # the seed matters


def test_max_batch_does_not_change_images(bundle, conds):
    pos, neg = conds
    a = sampling.sample(bundle, pos, neg, seeds=[3, 4], steps=2, width=W, height=H, max_batch=1,
                        return_latents=True, decode=False)
    b = sampling.sample(bundle, pos, neg, seeds=[3, 4], steps=2, width=W, height=H, max_batch=3,
                        return_latents=True, decode=False)
    assert a.latents.shape == b.latents.shape and a.latents.shape[0] == 4
    assert torch.allclose(a.latents, b.latents, atol=1e-5)


def test_progress_and_interrupt(bundle, conds):
    pos, neg = conds
    seen = []
    sampling.sample(bundle, pos, neg, seeds=[1], steps=2, width=W, height=H, max_batch=1, decode=False,
                    progress=lambda d, t: seen.append((d, t)))
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]  # 2 cells × 2 steps, one cell per batch

    class Stop(Exception):
        pass

    calls = []

    def interrupt():
        calls.append(1)
        if len(calls) == 2:
            raise Stop

    with pytest.raises(Stop):
        sampling.sample(bundle, pos, neg, seeds=[1], steps=3, width=W, height=H, interrupt=interrupt)
    assert len(calls) == 2  # checked before every step


def test_step_windows_switch_conditioning(bundle, conds):
    """Entries are active where start <= i/N <= end; a full split equals the right conditioning per step."""
    pos, neg = conds
    a = [[pos[0][0][0:1], {"pooled_output": None, "attention_mask": pos[0][1]["attention_mask"][0:1]}]]
    b = [[pos[0][0][1:2], {"pooled_output": None, "attention_mask": pos[0][1]["attention_mask"][1:2]}]]
    steps = 4
    # a for steps 0,1 (p = 0, .25), b for steps 2,3 (p = .5, .75)
    split = [[a[0][0], {**a[0][1], "start_percent": 0.0, "end_percent": 0.3}],
             [b[0][0], {**b[0][1], "start_percent": 0.3, "end_percent": 1.0}]]
    got = sampling.sample(bundle, split, neg, seeds=[5], steps=steps, width=W, height=H, return_latents=True, decode=False)
    only_a = sampling.sample(bundle, a, neg, seeds=[5], steps=steps, width=W, height=H, return_latents=True, decode=False)
    only_b = sampling.sample(bundle, b, neg, seeds=[5], steps=steps, width=W, height=H, return_latents=True, decode=False)
    assert not torch.allclose(got.latents, only_a.latents, atol=1e-4)
    assert not torch.allclose(got.latents, only_b.latents, atol=1e-4)
    assert [sampling.active_entries(sampling._entries(split, "p", "cpu", torch.float32, None)[0], i, steps)
            for i in range(steps)] == [(0,), (0,), (1,), (1,)]
    # a window over all steps is the same as no window
    full = [[a[0][0], {**a[0][1], "start_percent": 0.0, "end_percent": 1.0}]]
    same = sampling.sample(bundle, full, neg, seeds=[5], steps=steps, width=W, height=H, return_latents=True, decode=False)
    assert torch.equal(same.latents, only_a.latents)


def test_overlapping_entries_average_like_comfyui(bundle, conds):
    pos, neg = conds
    e = [[pos[0][0][0:1], {"pooled_output": None, "attention_mask": pos[0][1]["attention_mask"][0:1]}]]
    twice = e + [[e[0][0].clone(), dict(e[0][1])]]
    one = sampling.sample(bundle, e, neg, seeds=[9], steps=2, width=W, height=H, return_latents=True, decode=False)
    two = sampling.sample(bundle, twice, neg, seeds=[9], steps=2, width=W, height=H, return_latents=True, decode=False)
    assert torch.allclose(one.latents, two.latents, atol=1e-5)  # the mean of two equal predictions


def test_gap_in_windows_is_an_error(bundle, conds):
    pos, neg = conds
    gap = [[pos[0][0], {**pos[0][1], "start_percent": 0.5, "end_percent": 1.0}]]
    with pytest.raises(UserInputError, match="no positive conditioning is active at step 1"):
        sampling.sample(bundle, gap, neg, seeds=[1], steps=2, width=W, height=H)


@pytest.mark.parametrize("kw,match", [
    (dict(width=40), "width=40 is not a multiple of 16.*32 or 48"),
    (dict(height=100), "height=100 is not a multiple of 16"),
    (dict(seeds=""), "seed list is empty"),
    (dict(seeds="12,abc"), "cannot read 'abc' in the seed list"),
    (dict(seeds="1,,2"), "empty item"),
    (dict(seeds="-3"), "out of range"),
    (dict(steps=0), "steps=0"),
    (dict(max_batch=0), "max_batch=0"),
])
def test_bad_inputs(bundle, conds, kw, match):
    pos, neg = conds
    args = dict(seeds=[1], steps=2, width=W, height=H) | kw
    with pytest.raises(UserInputError, match=match):
        sampling.sample(bundle, pos, neg, **args)


def test_wrong_text_width_and_batch_mismatch(bundle, conds):
    pos, neg = conds
    wide = [[torch.zeros(1, 5, 3584), {"pooled_output": None}]]
    with pytest.raises(UserInputError, match="H=3584.*Qwen-Image.*H=32"):
        sampling.sample(bundle, wide, neg, seeds=[1], steps=1, width=W, height=H)
    neg3 = [[neg[0][0].repeat(3, 1, 1), {"pooled_output": None}]]
    with pytest.raises(UserInputError, match="negative conditioning has batch 3 but the positive has 2"):
        sampling.sample(bundle, pos, neg3, seeds=[1], steps=1, width=W, height=H)


def test_loader_errors(tmp_path, tiny_qwen3vl_dir):
    with pytest.raises(UserInputError, match="not found"):
        sampling.load_qwen_image_pipeline(str(tmp_path / "nope"), device="cpu")
    with pytest.raises(UserInputError, match="not a QwenImagePipeline"):
        sampling.load_qwen_image_pipeline(str(tiny_qwen3vl_dir), device="cpu")
    with pytest.raises(UserInputError, match="offload"):
        sampling.load_qwen_image_pipeline(str(tiny_qwen3vl_dir), device="cpu", offload="sequential")


def test_speed_options_keep_outputs(bundle, conds):
    """compile (dynamo with the eager backend here: inductor's CPU build is too slow for the suite) and
    cuda_graphs (ignored off CUDA) give the same latents as the plain loop."""
    import copy

    pos, neg = conds
    plain = sampling.sample(bundle, pos, neg, seeds=[5], steps=2, width=W, height=H, return_latents=True,
                            decode=False)
    fast_pipe = copy.deepcopy(bundle.pipeline)
    assert acceleration.compile_transformer(fast_pipe.transformer, backend="eager") is True
    assert acceleration.compile_transformer(fast_pipe.transformer) is False  # once only
    fast = sampling.sample(fast_pipe, pos, neg, seeds=[5], steps=2, width=W, height=H, return_latents=True,
                           decode=False, compile=True, cuda_graphs=True)
    assert torch.allclose(plain.latents, fast.latents, atol=1e-5)
    blocks = fast_pipe.transformer.transformer_blocks
    assert all(isinstance(b.img_mod, torch.nn.Sequential) and isinstance(b.txt_mod, torch.nn.Sequential)
               for b in blocks)  # the per-call modulation lookups are gone again
    assert len(fast_pipe.transformer._qwen_identity_mod_lookups) == len(blocks)  # (kept for the next call)
    again = sampling.sample(fast_pipe, pos, neg, seeds=[5], steps=2, width=W, height=H, return_latents=True,
                            decode=False, compile=True)
    assert torch.allclose(plain.latents, again.latents, atol=1e-5)
    torch._dynamo.reset()


def test_offload_hooks_are_detected(bundle):
    from diffusers.hooks import HookRegistry, ModelHook

    tr = copy_module(bundle.pipeline.transformer)
    HookRegistry.check_if_exists_or_initialize(tr)  # an empty registry (diffusers pipelines leave one) is no hook
    assert not acceleration.has_offload_hooks(tr)
    HookRegistry.check_if_exists_or_initialize(tr.transformer_blocks[0]).register_hook(ModelHook(), "probe")
    assert acceleration.has_offload_hooks(tr)


def copy_module(m):
    import copy

    return copy.deepcopy(m)


def test_capturable_text_lengths_matches_diffusers(bundle):
    """The stand-in used while recording CUDA graphs returns what the forward uses from diffusers' own."""
    from diffusers.models.transformers import transformer_qwenimage as mod

    hidden = torch.randn(3, 5, 8)
    for mask in (None, torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])):
        ref = mod.compute_text_seq_len_from_mask(hidden, mask)
        with acceleration._capturable_text_lengths():
            got = mod.compute_text_seq_len_from_mask(hidden, mask)
        assert got[0] == ref[0]
        assert (got[2] is None and ref[2] is None) or torch.equal(got[2], ref[2])
    assert mod.compute_text_seq_len_from_mask is not None and "text_lengths" not in repr(mod.compute_text_seq_len_from_mask)


@pytest.mark.parametrize("family", ["qwen-image", "qwen-image-2.1"])
def test_rope_real_equals_diffusers_complex_rope(family):
    """real_rope() swaps the complex RoPE of every family's transformer module (each has its own copy)."""
    import importlib

    from qwen_identity.core.families import family_named

    (name,) = family_named(family).rope_modules
    mod = importlib.import_module(name)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 3, 16, generator=g).to(torch.bfloat16)
    freqs = torch.polar(torch.ones(7, 8), torch.randn(7, 8, generator=g))
    ref = mod.apply_rotary_emb_qwen(x, freqs, use_real=False)
    with acceleration.real_rope():
        assert mod.apply_rotary_emb_qwen is acceleration.rope_real
        got = mod.apply_rotary_emb_qwen(x, freqs, use_real=False)
    assert mod.apply_rotary_emb_qwen is not acceleration.rope_real  # restored
    assert got.dtype == ref.dtype and got.shape == ref.shape
    assert (got.float() - ref.float()).abs().max() <= 2 ** -7 * ref.float().abs().max()  # bf16 rounding at most
    xf = x.float()
    assert torch.allclose(acceleration.rope_real(xf, freqs, use_real=False), mod.apply_rotary_emb_qwen(xf, freqs, use_real=False),
                          atol=1e-6)


def test_fast_switch_means_compile_and_graphs_only_on_cuda():
    from qwen_identity.core.generation.acceleration import speed_options
    from qwen_identity.core.generation.sampling import QwenImageBundle

    cpu = QwenImageBundle(pipeline=None, model_id="x", device=torch.device("cpu"), dtype=torch.float32)
    cuda = QwenImageBundle(pipeline=None, model_id="x", device=torch.device("cuda"), dtype=torch.bfloat16)
    assert speed_options(cpu, True) == {"compile": False, "cuda_graphs": False}
    assert speed_options(cuda, True) == {"compile": True, "cuda_graphs": True}
    assert speed_options(cuda, False) == {"compile": False, "cuda_graphs": False}


def test_fp8_weight_storage_samples_close_to_full_precision(tiny_qwenimage_dir):
    """fp8 storage (the 24 GB option) loads, runs and stays near the full-precision images."""
    from qwen_identity.core.generation.sampling import encode_text, load_qwen_image_pipeline, sample

    full = load_qwen_image_pipeline(str(tiny_qwenimage_dir), device="cpu", dtype="fp32")
    fp8 = load_qwen_image_pipeline(str(tiny_qwenimage_dir), device="cpu", dtype="fp32", fp8_storage=True)
    assert fp8.fp8_storage and fp8.pipeline.transformer.transformer_blocks[0].attn.to_q.weight.dtype == torch.float8_e4m3fn
    # loaded straight into fp8 storage (never whole in the compute dtype): the same weights as casting after loading
    cast = load_qwen_image_pipeline(str(tiny_qwenimage_dir), device="cpu", dtype="fp32").pipeline.transformer
    cast.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    for (name, p), (_, q) in zip(fp8.pipeline.transformer.named_parameters(), cast.named_parameters()):
        assert p.dtype == q.dtype and torch.equal(p.float(), q.float()), name
    pos, neg = encode_text(full, "a portrait photo"), encode_text(full, "blurry")
    a = sample(full, pos, neg, [7], steps=2, width=32, height=32).images
    b = sample(fp8, pos, neg, [7], steps=2, width=32, height=32).images
    assert torch.isfinite(b).all() and not torch.equal(a, b)
    assert (a - b).abs().mean() < 0.05


def test_offload_needs_cuda_and_names_the_choices(tiny_qwenimage_dir):
    from qwen_identity.core.errors import UserInputError
    from qwen_identity.core.generation.sampling import load_qwen_image_pipeline

    with pytest.raises(UserInputError, match="CUDA"):
        load_qwen_image_pipeline(str(tiny_qwenimage_dir), device="cpu", offload="group")
    with pytest.raises(UserInputError, match="group"):
        load_qwen_image_pipeline(str(tiny_qwenimage_dir), device="cpu", offload="bogus")


def test_out_of_memory_says_what_to_lower_and_frees_the_batch(bundle, conds, monkeypatch):
    """A CUDA out-of-memory in a forward is an error naming max_batch and the offload options (the CLI exits 2
    with it), and the batch's tensors are not kept alive by the error."""
    import gc
    import weakref

    from qwen_identity.core.errors import NotEnoughMemoryError

    pos, neg = conds
    seen = []

    def oom(transformer, plan, rows, timestep):
        seen.append(weakref.ref(rows))
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    monkeypatch.setattr(sampling, "_forward", oom)
    with pytest.raises(NotEnoughMemoryError, match=r"4 image\(s\) of 32x48 at once: set max_batch lower \(now 4;"
                                                   r".*offload 'group' or fp8_storage") as e:
        sampling.sample(bundle, pos, neg, seeds=[1, 2], steps=2, width=W, height=H, max_batch=4)
    assert e.value.__context__ is None and e.value.__cause__ is None
    gc.collect()
    assert seen and seen[0]() is None   # the batch's latents went with the failed denoise
    with pytest.raises(NotEnoughMemoryError, match="max_batch is already 1"):
        sampling.sample(bundle, pos, neg, seeds=[1], steps=2, width=W, height=H, max_batch=1)
