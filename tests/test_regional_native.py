"""Two people in one picture inside a real ComfyUI (COMFYUI_DIR), in this process, on CPU: a random-weight
one-layer full-width Qwen-Image (tests/comfyui_harness/tiny_native.py), 64x32 pictures (latent 8x4).

What ComfyUI does with masked conditionings, recorded from the model's own calls (a model_function_wrapper
sees every conditioning's denoised prediction, a post-CFG function sees the blended positive prediction):
- with TwoPersonRegions' left/right split, at EVERY step each region's positive prediction is exactly
  its own person's prediction, each person's pass runs on the whole latent;
- one step with a hard mask: each region of the result equals that person's single-person run there;
- a full-frame mask reproduces the single-person result;
- overlapping masks give the weighted average; pixels in no mask get a zero prediction;
- what the mask does NOT isolate: from the second step on, region A's prediction depends on person B
  (attention is global and the latent is shared): measured below;
- QwenImageSampleFromEmbeds batches regional conditionings (α rows x seeds) like KSampler runs them alone.
"""

from __future__ import annotations

import logging

import pytest
import torch

from qwen_identity.core.errors import UserInputError
from qwen_identity.nodes import native_sampling as ns
from qwen_identity.nodes.region_nodes import TwoPersonRegions

from comfyui_harness.env import import_comfy_in_process, require_comfyui

W, H = 64, 32            # latent [1, 16, 1, 4, 8]
LEFT = (slice(None),) * 4 + (slice(0, 4),)     # latent columns 0-3 (image x < 32)
RIGHT = (slice(None),) * 4 + (slice(4, 8),)
CFG = 2.5


def _embeds(seed: int, batch: int = 1, seq: int = 6):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(batch, seq, 3584, generator=g), {"pooled_output": None}]]


@pytest.fixture(scope="module")
def comfy():
    require_comfyui()
    import_comfy_in_process()
    import comfy.sd
    import comfy.utils
    import nodes as comfy_nodes  # ComfyUI's own nodes.py (COMFYUI_DIR is first on sys.path)

    from comfyui_harness.tiny_native import build_native_models

    assert hasattr(comfy_nodes, "ConditioningSetMask"), comfy_nodes.__file__
    files = build_native_models(text_encoder=False)
    model = comfy.sd.load_diffusion_model(str(files.transformer))
    vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(files.vae)))
    yield model, vae, comfy_nodes
    del model, vae


@pytest.fixture(scope="module")
def people():
    return {"A": _embeds(1), "B": _embeds(2), "B2": _embeds(4), "neg": _embeds(3)}


def _sample(model, positive, negative, steps=1, seed=5):
    import comfy.sample

    latent = comfy.sample.fix_empty_latent_channels(model, torch.zeros(1, 16, H // 8, W // 8))
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, steps, CFG, "euler", "simple", positive, negative, latent,
                               denoise=1.0, disable_pbar=True, seed=seed)


class Recorder:
    """A clone of the MODEL that records, per step, every conditioning's denoised prediction (by whose
    text it was) with the latent it saw, and the blended positive prediction ComfyUI's CFG received."""

    def __init__(self, model, people: dict):
        self.people = {k: v[0][0][0] for k, v in people.items()}
        self.calls: list[dict] = []      # per step: {name: (input, output)}
        self.cond: list[torch.Tensor] = []
        self.model = model.clone()
        self.model.set_model_unet_function_wrapper(self._wrap)
        self.model.set_model_sampler_post_cfg_function(self._post)

    def _who(self, text: torch.Tensor) -> str:
        hits = [k for k, e in self.people.items() if torch.allclose(text.float(), e, atol=1e-3)]
        assert len(hits) == 1, hits
        return hits[0]

    def _wrap(self, apply_model, args):
        out = apply_model(args["input"], args["timestep"], **args["c"])
        n = len(args["cond_or_uncond"])
        while len(self.calls) <= len(self.cond):
            self.calls.append({})
        for x, text, o in zip(args["input"].chunk(n), args["c"]["c_crossattn"].chunk(n), out.chunk(n)):
            self.calls[len(self.cond)][self._who(text[0])] = (x.detach().clone(), o.detach().clone())
        return out

    def _post(self, args):
        self.cond.append(args["cond_denoised"].detach().clone())
        return args["denoised"]


def _pair(people, a="A", b="B", **kw):
    kw = {"layout": "left/right", "split": 0.5, "width": W, "height": H, "feather": 0} | kw
    return TwoPersonRegions().combine(people[a], people[b], **kw)[0]


def test_each_region_is_its_own_persons_prediction_at_every_step(comfy, people):
    model, _, _ = comfy
    rec = Recorder(model, people)
    _sample(rec.model, _pair(people), people["neg"], steps=3)
    assert len(rec.cond) == 3 and len(rec.calls) == 3
    for step, (calls, blended) in enumerate(zip(rec.calls, rec.cond)):
        assert set(calls) == {"A", "B", "neg"}, step         # one pass per person + the negative
        (xa, pa), (xb, pb) = calls["A"], calls["B"]
        assert xa.shape == blended.shape and torch.equal(xa, xb)  # both passes see the whole, same latent
        assert (pa - pb)[LEFT].abs().mean() > 0.01 and (pa - pb)[RIGHT].abs().mean() > 0.01
        assert torch.allclose(blended[LEFT], pa[LEFT], atol=1e-6), (step, (blended - pa)[LEFT].abs().max())
        assert torch.allclose(blended[RIGHT], pb[RIGHT], atol=1e-6), (step, (blended - pb)[RIGHT].abs().max())


def test_one_step_hard_mask_each_region_equals_that_persons_single_run(comfy, people):
    model, _, comfy_nodes = comfy
    pair = _pair(people)
    got = _sample(model, pair, people["neg"])
    alone_a, alone_b = _sample(model, people["A"], people["neg"]), _sample(model, people["B"], people["neg"])
    assert (alone_a - alone_b)[LEFT].abs().mean() > 0.01
    assert torch.allclose(got[LEFT], alone_a[LEFT], atol=1e-5) and torch.allclose(got[RIGHT], alone_b[RIGHT], atol=1e-5)
    # the same pair built with ComfyUI's own nodes (an image-size mask) samples identically
    mask = torch.zeros(1, H, W)
    mask[..., : W // 2] = 1
    setm = comfy_nodes.ConditioningSetMask()
    own = comfy_nodes.ConditioningCombine().combine(setm.append(people["A"], mask, "default", 1.0)[0],
                                                    setm.append(people["B"], 1 - mask, "default", 1.0)[0])[0]
    assert torch.equal(_sample(model, own, people["neg"]), got)


def test_full_frame_mask_reproduces_the_single_person_image(comfy, people):
    model, vae, comfy_nodes = comfy
    setm = comfy_nodes.ConditioningSetMask()
    full, empty = torch.ones(1, H, W), torch.zeros(1, H, W)
    alone = _sample(model, people["A"], people["neg"], steps=2)
    masked = _sample(model, setm.append(people["A"], full, "default", 1.0)[0], people["neg"], steps=2)
    pair = comfy_nodes.ConditioningCombine().combine(setm.append(people["A"], full, "default", 1.0)[0],
                                                     setm.append(people["B"], empty, "default", 1.0)[0])[0]
    paired = _sample(model, pair, people["neg"], steps=2)
    assert torch.allclose(masked, alone, atol=1e-5) and torch.allclose(paired, alone, atol=1e-5)
    img_alone, img_paired = vae.decode(alone), vae.decode(paired)
    assert img_alone.std() > 0.02 and torch.allclose(img_paired, img_alone, atol=1e-4)
    # TwoPersonRegions refuses that layout: person B would not appear at all
    with pytest.raises(UserInputError, match="person B's region is empty"):
        _pair(people, layout="mask", mask=full)


def test_overlap_is_a_weighted_average_and_uncovered_pixels_predict_zero(comfy, people):
    model, _, comfy_nodes = comfy
    setm = comfy_nodes.ConditioningSetMask()
    ma, mb = torch.zeros(1, 4, 8), torch.zeros(1, 4, 8)
    ma[..., :6] = 1.0
    mb[..., 2:] = 0.5                                       # overlap: columns 2-5
    rec = Recorder(model, people)
    both = comfy_nodes.ConditioningCombine().combine(setm.append(people["A"], ma, "default", 1.0)[0],
                                                     setm.append(people["B"], mb, "default", 1.0)[0])[0]
    _sample(rec.model, both, people["neg"])
    (_, pa), (_, pb), blended = rec.calls[0]["A"], rec.calls[0]["B"], rec.cond[0]
    cols = (slice(None),) * 4
    assert torch.allclose(blended[cols + (slice(2, 6),)], ((pa + 0.5 * pb) / 1.5)[cols + (slice(2, 6),)], atol=1e-6)
    assert torch.allclose(blended[cols + (slice(0, 2),)], pa[cols + (slice(0, 2),)], atol=1e-6)
    assert torch.allclose(blended[cols + (slice(6, 8),)], pb[cols + (slice(6, 8),)], atol=1e-6)
    rec = Recorder(model, people)
    _sample(rec.model, setm.append(people["A"], ma, "default", 1.0)[0], people["neg"])   # nothing on columns 6-7
    assert float(rec.cond[0][cols + (slice(6, 8),)].abs().max()) == 0.0
    assert float(rec.calls[0]["A"][1][cols + (slice(6, 8),)].abs().mean()) > 0.05


def test_the_mask_does_not_isolate_identities_after_the_first_step(comfy, people):
    """Region A's prediction with partner B vs partner B2: identical at step 1 (A's pass sees only A's
    text), different from step 2 on (A's pass attends to the whole latent, whose right half B shaped)."""
    model, _, _ = comfy
    runs = []
    for partner in ("B", "B2"):
        rec = Recorder(model, people)
        _sample(rec.model, _pair(people, b=partner), people["neg"], steps=3)
        runs.append(rec.cond)
    scale = float((runs[0][1] - runs[1][1])[RIGHT].abs().mean())   # how much the partner's own region moved
    leak = [float((x - y)[LEFT].abs().mean()) for x, y in zip(*runs)]
    print(f"region A's prediction moved by a different partner: steps 1-3 {leak}; the partner's region: {scale}")
    assert leak[0] == 0.0
    assert leak[1] > 1e-4 and leak[2] > 1e-4
    assert scale > leak[1]   # the partner changes its own region more than A's


def test_sample_native_batches_regional_rows_and_seeds_like_ksampler_alone(comfy, people, caplog):
    model, vae, _ = comfy
    # two rows of person A as InjectResidual's α list gives them (E + α·R; a plain scale of E would not
    # change anything: Qwen-Image RMS-normalises text tokens)
    e = people["A"][0][0]
    two_alphas = [[torch.cat([e, e + 0.5 * people["B2"][0][0]]), {"pooled_output": None}]]
    pair = TwoPersonRegions().combine(two_alphas, people["B"], "left/right", 0.5, W, H, 0)[0]
    out = ns.sample_native(model, vae, pair, people["neg"], [7, 8], 1, CFG, W, H, max_batch=4)
    assert out.shape == (4, H, W, 3)
    for i, (row, seed) in [(1, (0, 8)), (2, (1, 7))]:   # batched with the others; reference: alone
        ref = vae.decode(_sample(model, ns.select_conditioning(pair, [row]), people["neg"], seed=seed))
        assert torch.allclose(out[i], ref.reshape(-1, H, W, 3)[0].float(), atol=2e-3), i
    assert not torch.allclose(out[0], out[2], atol=1e-2)      # the α rows differ
    # a mask drawn for another size is resized by ComfyUI: the sampler says so; a MASK batch is refused
    odd = [[people["A"][0][0], {"pooled_output": None, "mask": torch.ones(1, 10, 10)}]]
    with caplog.at_level(logging.WARNING):
        ns.sample_native(model, vae, odd, people["neg"], [1], 1, CFG, W, H)
    assert any("10x10" in m and "resizes it to the latent size 8x4" in m for m in caplog.messages)
    batch = [[people["A"][0][0], {"pooled_output": None, "mask": torch.ones(2, 4, 8)}]]
    with pytest.raises(UserInputError, match="give ONE mask"):
        ns.sample_native(model, vae, batch, people["neg"], [1], 1, CFG, W, H)
