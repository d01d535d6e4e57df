"""nodes/native_sampling.py: argument checks (no ComfyUI needed) and sampling through a real ComfyUI
in this process (COMFYUI_DIR; random-weight one-layer full-width Qwen-Image + random Wan-2.1 VAE, 32x32,
one step)."""

from __future__ import annotations

import pytest
import torch

from qwen_identity.core.errors import ModelMismatchError, UserInputError
from qwen_identity.nodes import native_sampling as ns

from comfyui_harness.env import import_comfy_in_process, require_comfyui


def _cond(batch: int, seq: int = 6, width: int = 3584, seed: int = 0, mask: bool = False):
    g = torch.Generator().manual_seed(seed)
    extra = {"pooled_output": None}
    if mask:
        m = torch.ones(batch, seq, dtype=torch.long)
        m[0, -2:] = 0
        extra["attention_mask"] = m
    return [[torch.randn(batch, seq, width, generator=g), extra]]


def test_select_conditioning_indexes_rows_and_masks_and_never_edits_input():
    cond = _cond(3, mask=True) + [[torch.randn(1, 4, 8), {"pooled_output": None, "start_percent": 0.5}]]
    before = [c.clone() for c, _ in cond]
    out = ns.select_conditioning(cond, [2, 0, 0])
    assert torch.equal(out[0][0], cond[0][0][[2, 0, 0]])
    assert torch.equal(out[0][1]["attention_mask"], cond[0][1]["attention_mask"][[2, 0, 0]])
    assert out[1][0].shape[0] == 3 and torch.equal(out[1][0][1], cond[1][0][0])  # batch 1 repeated
    assert out[1][1]["start_percent"] == 0.5
    assert all(torch.equal(b, c) for b, (c, _) in zip(before, cond))
    assert cond[0][1]["attention_mask"].shape[0] == 3


def test_conditioning_batch_broadcasts_one_and_rejects_disagreeing_batches():
    assert ns.conditioning_batch(_cond(3), _cond(1)) == 3
    assert ns.conditioning_batch(_cond(1), _cond(2)) == 2
    with pytest.raises(UserInputError, match="batch sizes"):
        ns.conditioning_batch(_cond(3), _cond(2))
    with pytest.raises(UserInputError, match="empty"):
        ns.conditioning_batch([], _cond(1))


@pytest.mark.parametrize("kw, match", [
    (dict(seeds=[]), "no generation seeds"),
    (dict(seeds=[-1]), "out of range"),
    (dict(width=100), "width 100 is not a positive multiple of 16.*96"),
    (dict(height=0), "height 0"),
    (dict(steps=0), "steps must be at least 1"),
    (dict(denoise=0.0), "denoise"),
])
def test_bad_arguments_say_the_fix(kw, match):
    args = dict(seeds=[1], steps=2, width=64, height=64, denoise=1.0)
    args.update(kw)
    with pytest.raises(UserInputError, match=match):
        ns._check_args(**args)


def test_stochastic_samplers_are_recognised():
    assert ns.is_stochastic_sampler("euler_ancestral") and ns.is_stochastic_sampler("dpmpp_2m_sde_gpu")
    assert not ns.is_stochastic_sampler("euler") and not ns.is_stochastic_sampler("dpmpp_2m")


def test_auto_max_batch_falls_back_to_one_for_an_unknown_model():
    class NotAModelPatcher:
        pass

    assert ns._auto_max_batch(NotAModelPatcher(), (1, 16, 1, 4, 4), cells=6) == 1


class _Patcher:
    """The ModelPatcher surface `_auto_max_batch` reads, as newer ComfyUI has it (get_free_memory, is_dynamic)."""
    load_device = "cuda:0"

    def __init__(self, dynamic):
        self.dynamic = dynamic

    def memory_required(self, shape):
        return 10 * shape[0] // 2    # 10 bytes a cell (cond + uncond)

    def get_free_memory(self, device):
        return 100

    def model_size(self):
        return 50

    def loaded_size(self):
        return 0

    def is_dynamic(self):
        return self.dynamic


def test_auto_max_batch_reads_newer_comfyuis_patcher_memory_view():
    """ComfyUI 2026's patchers answer free memory themselves; weights of a dynamic (streamed) model are not
    reserved, those of a classic one are."""
    assert ns._auto_max_batch(_Patcher(dynamic=False), (1, 16, 1, 4, 4), cells=12) == 5    # (100 - 50) // 10
    assert ns._auto_max_batch(_Patcher(dynamic=True), (1, 16, 1, 4, 4), cells=12) == 10    # 100 // 10
    assert ns._auto_max_batch(_Patcher(dynamic=True), (1, 16, 1, 4, 4), cells=3) == 3      # never more than cells


# ---- against a real ComfyUI, in this process -------------------------------------------------------

@pytest.fixture(scope="module")
def comfy_native():
    require_comfyui()
    import_comfy_in_process()
    import comfy.sd
    import comfy.utils

    from comfyui_harness.tiny_native import build_native_models

    files = build_native_models(text_encoder=False)
    model = comfy.sd.load_diffusion_model(str(files.transformer))
    vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(files.vae)))
    yield model, vae
    del model, vae


def _reference_ksampler(model, vae, positive, negative, seed, steps=1, cfg=2.5, size=32):
    """What ComfyUI's own EmptySD3LatentImage -> KSampler -> VAEDecode computes for one seed (batch 1)."""
    import comfy.sample

    latent = comfy.sample.fix_empty_latent_channels(model, torch.zeros(1, 16, size // 8, size // 8))
    noise = comfy.sample.prepare_noise(latent, seed)
    samples = comfy.sample.sample(model, noise, steps, cfg, "euler", "simple", positive, negative, latent,
                                  denoise=1.0, disable_pbar=True, seed=seed)
    img = vae.decode(samples)
    return img.reshape(-1, *img.shape[-3:]).float()


def test_sample_native_order_batching_and_seed_alone_equals_seed_in_batch(comfy_native):
    model, vae = comfy_native
    pos, neg = _cond(2, seed=1, mask=True), _cond(1, seed=2)
    calls = []
    out = ns.sample_native(model, vae, pos, neg, [7, 8], 1, 2.5, 32, 32, progress=lambda d, t: calls.append((d, t)),
                           max_batch=3)
    assert out.shape == (4, 32, 32, 3) and out.dtype == torch.float32
    assert torch.isfinite(out).all() and 0.0 <= out.min() and out.max() <= 1.0
    assert out.std() > 0.05  # not a saturated/constant image: the comparisons below mean something
    # α-major (conditioning rows, then seeds); each cell equals ComfyUI's KSampler run for that seed
    # ALONE (batch 1), although cells (0,7),(0,8),(1,7) were sampled together in one batch of 3
    for i, (row, seed) in [(1, (0, 8)), (2, (1, 7))]:
        ref = _reference_ksampler(model, vae, ns.select_conditioning(pos, [row]), neg, seed)
        assert torch.allclose(out[i:i + 1], ref, atol=2e-3), f"cell {i} (row {row}, seed {seed}) differs"
    assert not torch.allclose(out[0], out[1], atol=1e-2)  # seeds differ
    assert not torch.allclose(out[0], out[2], atol=1e-2)  # conditioning rows differ
    # 4 cells in batches of 3 -> 2 sampler calls x 1 step, reported in order up to (2, 2)
    assert calls[-1] == (2, 2) and [d for d, _ in calls] == sorted(d for d, _ in calls)


def test_sample_native_errors_name_the_fix(comfy_native):
    model, vae = comfy_native
    with pytest.raises(ModelMismatchError, match="3584 wide.*qwen_image"):
        ns.sample_native(model, vae, _cond(1, width=64), _cond(1, width=64), [1], 1, 1.0, 32, 32)
    with pytest.raises(UserInputError, match="unknown sampler_name 'nope'"):
        ns.sample_native(model, vae, _cond(1), _cond(1), [1], 1, 1.0, 32, 32, sampler_name="nope")
    with pytest.raises(UserInputError, match="batch sizes"):
        ns.sample_native(model, vae, _cond(2), _cond(3), [1], 1, 1.0, 32, 32)


def test_auto_max_batch_uses_comfyuis_memory_estimate(comfy_native):
    model, _ = comfy_native
    n = ns._auto_max_batch(model, (1, 16, 1, 4, 4), cells=5)
    assert 1 <= n <= 5
    assert ns._auto_max_batch(model, (1, 16, 1, 4, 4), cells=1) == 1


def test_sample_native_honours_interrupt(comfy_native):
    import comfy.model_management as mm

    model, vae = comfy_native

    def interrupt_after_first_step(done, total):
        mm.interrupt_current_processing(True)

    try:
        with pytest.raises(mm.InterruptProcessingException):
            ns.sample_native(model, vae, _cond(1), _cond(1), [1, 2], 1, 1.0, 32, 32,
                             progress=interrupt_after_first_step, max_batch=1)
    finally:
        mm.interrupt_current_processing(False)


def test_one_seed_range_for_both_sampling_paths():
    """The sampler node takes one seed list for both paths: a seed KSampler accepts (up to 2**64 - 1) is
    accepted by the diffusers path's parser too, and the largest one draws noise there."""
    from qwen_identity.core.generation import sampling

    assert ns.MAX_SEED == sampling.MAX_SEED == 0xFFFFFFFFFFFFFFFF
    assert sampling.parse_seeds(str(2**64 - 1)) == [2**64 - 1]
    assert ns._check_args([2**64 - 1], 1, 16, 16, 1.0) == [2**64 - 1]
    with pytest.raises(UserInputError, match="out of range"):
        sampling.parse_seeds(str(2**64))
    torch.randn(2, generator=torch.Generator("cpu").manual_seed(2**64 - 1))  # the diffusers path's noise draw


def test_one_auto_max_batch_name():
    """AUTO_MAX_BATCH is the native path's cap for max_batch 0 (auto); the node's "auto" widget value has
    its own name, so the two can no longer be confused."""
    from qwen_identity.nodes import sampling_nodes

    assert not hasattr(sampling_nodes, "AUTO_MAX_BATCH")
    assert sampling_nodes.MAX_BATCH_AUTO == 0 and ns.AUTO_MAX_BATCH == 16
