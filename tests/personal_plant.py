"""A planted world for personal heads (tests only): people whose photos share a pattern the prompt cannot
express, seen through noisy non-linear features, denoised by a tiny frozen Qwen-Image transformer.

Every person has a code z ∈ R^Z. Their photos' latents [C, h, w] carry Σ_j z_j B_j inside a "face"
region (B_j: a random 2x2 sub-patch per channel repeated over the region, zero outside it - a texture
different per person, not a prompt-wide shift) plus per-photo noise; their Qwen3-VL "features" are normalise(tanh(A z + n·ξ)) with fresh ξ per
photo (a noisy, non-linear view of the code). The prompt embedding E is the same for everyone ("a photo
of a person"), so only the residual can tell the transformer who it is denoising.

`denoiser(transformer)` is the model family's Denoiser (x_t [B, C, h, w], σ [B], embeds, mask -> v) over the
tiny diffusers transformer.
"""

from __future__ import annotations

import torch

from qwen_identity.core.denoising.flow_matching import freeze_transformer, pack_latents
from qwen_identity.core.tuning import PersonalData
from qwen_identity.training.denoise import DenoiseData

H, D, Z, C = 32, 16, 8, 4
SIZE = (8, 8)
REGION = (slice(2, 8), slice(0, 8))  # the face: the lower 6 latent rows; the top 2 are background


def tiny_transformer(layers: int = 1, text_gain: float = 20.0):
    """A tiny random Qwen-Image transformer whose text values are scaled by `text_gain`: at random init the
    text tokens barely move the image tokens (the residual could lower the loss by ~0.1 %); a trained model
    listens to its prompt, and the amplified text pathway lets the tiny one do so too (gains of several %)."""
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    tr = QwenImageTransformer2DModel(
        patch_size=2, in_channels=4 * C, out_channels=C, num_layers=layers, attention_head_dim=16,
        num_attention_heads=3, joint_attention_dim=H, guidance_embeds=False, axes_dims_rope=(8, 4, 4))
    with torch.no_grad():
        for block in tr.transformer_blocks:
            block.attn.add_v_proj.weight.mul_(text_gain)
    return freeze_transformer(tr)


def denoiser(transformer):
    """The Denoiser contract over the tiny transformer, from the model family's own adapter."""
    from qwen_identity.core.families import family_named

    return family_named("qwen-image").denoiser(transformer)


class World:
    def __init__(self, seed: int = 42, view_noise: float = 0.3, feature_noise: float = 0.5, region=REGION,
                 cast: float = 0.0, tile: bool = True):
        g = torch.Generator().manual_seed(seed)
        r0, c0 = region
        self.B = torch.zeros(Z, C, *SIZE)
        rh, rw = r0.stop - r0.start, c0.stop - c0.start
        if tile:  # a texture: a random 2x2 sub-patch per channel, repeated over the region
            patch = torch.randn(Z, C, 2, 2, generator=g).repeat(1, 1, (rh + 1) // 2, (rw + 1) // 2)[..., :rh, :rw]
        else:
            patch = torch.randn(Z, C, rh, rw, generator=g)
        self.B[:, :, r0, c0] = patch + cast * torch.randn(Z, C, 1, 1, generator=g)
        self.A = torch.randn(D, Z, generator=g)
        self.E = torch.randn(6, H, generator=g)
        self.view_noise, self.feature_noise = view_noise, feature_noise

    def codes(self, n: int, seed: int) -> torch.Tensor:
        """n random codes (people drawn from the population)."""
        return torch.randn(n, Z, generator=torch.Generator().manual_seed(seed))

    def distinct_codes(self, n: int, seed: int, norm: float = 2.0) -> torch.Tensor:
        """n ≤ Z mutually orthogonal codes of one norm: people who share nothing (random codes in a few
        dimensions can be alike by chance, and an impostor who resembles the person is no impostor)."""
        q, _ = torch.linalg.qr(torch.randn(Z, n, generator=torch.Generator().manual_seed(seed)))
        return norm * q.T

    def photos(self, z: torch.Tensor, n: int, seed: int, size=SIZE) -> tuple[list[torch.Tensor], torch.Tensor]:
        """n photos (latents, features) of the person with code z."""
        g = torch.Generator().manual_seed(seed)
        pattern = torch.einsum("j,jchw->chw", z, self.B)
        if tuple(size) != SIZE:  # another aspect: the face pattern placed at the top left of a larger latent
            big = torch.zeros(C, *size)
            big[:, :SIZE[0], :SIZE[1]] = pattern[:, :size[0], :size[1]]
            pattern = big
        lat = [pattern + self.view_noise * torch.randn(pattern.shape, generator=g) for _ in range(n)]
        f = torch.tanh((self.A @ z)[None] + self.feature_noise * torch.randn(n, D, generator=g))
        return lat, torch.nn.functional.normalize(f, dim=-1)

    def personal(self, people: list[tuple[torch.Tensor, int, int]], prefix: str = "p") -> PersonalData:
        """PersonalData of the photos of `people` [(code, photos, seed)], all labelled as one person."""
        lat, feats, names = [], [], []
        for k, (z, n, seed) in enumerate(people):
            l_, f_ = self.photos(z, n, seed)
            lat += l_
            feats.append(f_)
            names += [f"{prefix}{k}_{j}" for j in range(n)]
        m = len(lat)
        return PersonalData(lat, torch.cat(feats), [self.E.clone()] * m, [torch.ones(6, dtype=torch.long)] * m,
                            names=names)

    def universal_data(self, n: int, views: int, seed: int) -> DenoiseData:
        """DenoiseData of n people for the project's universal (denoise objective) trainer."""
        z = self.codes(n, seed)
        lat, person, view, feats = [], [], [], []
        for p in range(n):
            l_, f_ = self.photos(z[p], views, seed * 1000 + p)
            lat += l_
            person += [p] * views
            view += list(range(views))
            feats.append(f_)
        packed, shapes = pack_latents(torch.stack(lat))
        return DenoiseData(packed, shapes[0], person, view, feats, self.E.expand(n, -1, -1).clone(),
                           torch.ones(n, 6, dtype=torch.long), names=[f"u{p}" for p in range(n)])

    def calibrate_prompt(self, denoiser, people: int = 24, steps: int = 150, lr: float = 3e-2,
                         seed: int = 999) -> None:
        """Fit the shared prompt embedding E to a population (as a trained model's "a photo of a person"
        already explains what all people have in common): afterwards, a residual can only gain by what is
        specific to a person, not by fixing the tiny random transformer's generic error."""
        from qwen_identity.core.denoising.flow_matching import sample_sigmas
        from qwen_identity.core.tuning.objective import denoiser_losses

        z = self.codes(people, seed)
        x0 = torch.stack([self.photos(z[p], 1, seed + p)[0][0] for p in range(people)])
        e = self.E.clone().requires_grad_(True)
        opt = torch.optim.Adam([e], lr=lr)
        g = torch.Generator().manual_seed(seed)
        mask = torch.ones(people, 6, dtype=torch.long)
        for _ in range(steps):
            sig = sample_sigmas(people, g)
            noise = torch.randn(x0.shape, generator=g)
            loss = denoiser_losses(denoiser, x0, noise, sig, e[None].expand(people, -1, -1), mask).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        self.E = e.detach()
