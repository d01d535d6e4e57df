"""A planted world in which identity is learnable only from the person's features (tests only).

Real weights cannot run in CI, and a tiny random Qwen3-VL or VAE cannot be made to carry a chosen
identity, so the world is built on tensors, in the form `training.denoise.DenoiseData` holds after the
caches, and denoised by a tiny frozen Qwen-Image transformer (1 block, text width H = 32).

Every person p has an identity code z_p ∈ R^Z; every photo i has its own code u_i ∈ R^U (pose, light).
A photo's latent [C, h, w] is

    x0_i = common·M  +  identity·Σ_j z_pj B_j  +  photo·Σ_k u_ik N_k  +  view_noise·ξ_i

- M: one pattern every photo shares ("a portrait"): what a person-independent push can learn, so a head
  that learned nothing about WHO gets an own gain as large as its impostor gain;
- B_j: random spatial patterns inside a face box of the latent, zero outside it, with each channel's
  mean over the box removed: the identity is a spatial pattern that differs per person and that no
  uniform (prompt-wide, person-independent) shift of the image can express;
- N_k: the same kind of patterns for the photo's own code: only a head that saw THIS photo could predict
  them (the leak test);
- ξ_i: pixel noise.

A photo's Qwen3-VL features are a noisy, non-linear view of both codes, different for every photo:

    f_i = normalise(tanh(A z_p + feature_photo·A_u u_i + feature_noise·η_i))      (D values)

Everyone is conditioned on the same prompt embedding E (the tiny text encoder's "a photo of a person"
when given, else a fixed random one), so only the residual can tell the transformer whom it denoises.
Training and held-out people come from different seeds: held-out people are never seen in training.

API (also for other tests, e.g. personal tuning):
- `PlantedWorld(seed, PlantSettings(...))`: the patterns, the feature map and `.transformer()` (the tiny
  frozen transformer, seeded by the world's seed);
- `world.people(n, views, seed)` -> `Cohort`: codes, per-photo latents [M, C, h, w], per-photo features,
  person/view indices; `cohort.data(embeds)` -> DenoiseData (what `train_denoise`/`head_gain` take),
  `cohort.leaky_data(embeds)` -> `OwnPhotoDenoiseData` (a DELIBERATELY leaky variant that conditions on
  the target photo's own features), `cohort.shuffled_data(seed, embeds)` -> DenoiseData with the
  person <-> photo pairs permuted (the shuffled control), `cohort.photos_of(p)` -> (latents [n, C, h, w],
  features [n, D]) for one person, `cohort.captions()` -> one caption per person naming coarse
  attributes of its code (what a description could say);
- `train_product_head(world, data, transformer, seed)`: the product's denoise training
  (`training.denoise.train_denoise`, the head conditioned on the person's OTHER photos);
- `random_head_like(head, seed)`: a random head with the same parameter norms;
- `own_photo_advantage(head, transformer, data)`: how much a head profits from seeing the photo it
  denoises (loss with the residual of the person's other photos minus loss with the residual of the
  photo's own features), with a bootstrap interval over persons.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from qwen_identity.core.denoising.flow_matching import freeze_transformer, pack_latents
from qwen_identity.core.denoising.latent_cache import Resolution, face_token_weights
from qwen_identity.core.identity.features import combine_features
from qwen_identity.core.residual.head import ResidualHead
from qwen_identity.training.denoise import DenoiseData, DenoiseLoopConfig, train_denoise

H, D, Z, U, C = 32, 16, 4, 2, 4
SIZE = (8, 8)             # latent h, w (16 packed tokens)
FACE = (2, 6, 2, 6)       # the face box in the latent: rows 2..5, columns 2..5 (2x2 packed tokens)
FACE_BOX_PIXELS = (16, 16, 48, 48)   # the same box in pixels (left, top, right, bottom; 8 pixels a latent cell)
FACE_WEIGHT = 3.0         # the loss weight of the face tokens (`--face-weight 3`, the recipe's)
PROMPT_TOKENS = 6
LAYERS = 2                # transformer blocks of the tiny Qwen-Image
ATTRIBUTES = (("fair hair", "dark hair"), ("no glasses", "glasses"), ("young", "older"), ("smiling", "serious"))


@dataclass(frozen=True)
class PlantSettings:
    identity: float = 1.0       # scale of the person's face pattern
    common: float = 0.5         # scale of the pattern every photo shares
    photo: float = 0.0          # scale of each photo's own pattern (0: none)
    view_noise: float = 0.3     # pixel noise of each latent
    feature_noise: float = 0.3  # noise of each photo's features
    feature_photo: float = 0.5  # how strongly the features carry the photo's own code


def _box_patterns(n: int, g: torch.Generator) -> torch.Tensor:
    """n random patterns [n, C, h, w]: zero outside the face box; inside it a random 2x2-pixel texture per
    channel (one latent token's worth) repeated over the box's tokens, each channel's mean removed (so no
    colour cast: the box's mean colour is the same for everyone)."""
    r0, r1, c0, c1 = FACE
    t = torch.randn(n, C, 2, 2, generator=g)
    t = t - t.mean(dim=(-1, -2), keepdim=True)
    out = torch.zeros(n, C, *SIZE)
    out[:, :, r0:r1, c0:c1] = t.repeat(1, 1, (r1 - r0) // 2, (c1 - c0) // 2)
    return out


class OwnPhotoDenoiseData(DenoiseData):
    """DELIBERATELY LEAKY (the leak test's positive control): the own-person residual of photo i is
    computed from photo i's OWN features instead of the person's other photos."""

    def other_view_features(self, i: int, person: int | None = None) -> torch.Tensor:
        p = self.person[i] if person is None else person
        if p == self.person[i]:
            v = self.view[i]
            return combine_features(self.features[p][v:v + 1].float())
        return super().other_view_features(i, person)

    def subset(self, photos: list[int]) -> "OwnPhotoDenoiseData":
        s = super().subset(photos)
        return OwnPhotoDenoiseData(s.latents, s.img_shape, s.person, s.view, s.features, s.embeds, s.mask,
                                   s.token_weights, s.names)


@dataclass
class Cohort:
    codes: torch.Tensor            # [P, Z] identity codes
    photo_codes: torch.Tensor      # [M, U] each photo's own code
    latents: torch.Tensor          # [M, C, h, w]
    features: list[torch.Tensor]   # per person [n_p, D]
    person: list[int]              # [M]
    view: list[int]                # [M]
    embeds: torch.Tensor           # [S, H] the prompt every photo is conditioned on
    names: list[str]

    def __len__(self) -> int:
        return len(self.person)

    def _data(self, cls, latents: torch.Tensor, embeds: torch.Tensor | None, face_weight: float) -> DenoiseData:
        e = self.embeds if embeds is None else embeds
        n = len(self.features)
        packed, shapes = pack_latents(latents)
        tw = None
        if face_weight:
            tw = face_token_weights(FACE_BOX_PIXELS, Resolution(SIZE[1] * 8, SIZE[0] * 8), face_weight)
            tw = tw[None].expand(len(self), -1).clone()
        return cls(packed, shapes[0], list(self.person), list(self.view), self.features,
                   e[None].expand(n, -1, -1).clone(), torch.ones(n, e.shape[0], dtype=torch.long), tw,
                   names=list(self.names))

    def data(self, embeds: torch.Tensor | None = None, face_weight: float = FACE_WEIGHT) -> DenoiseData:
        return self._data(DenoiseData, self.latents, embeds, face_weight)

    def leaky_data(self, embeds: torch.Tensor | None = None, face_weight: float = FACE_WEIGHT) -> OwnPhotoDenoiseData:
        return self._data(OwnPhotoDenoiseData, self.latents, embeds, face_weight)

    def shuffled_data(self, seed: int, embeds: torch.Tensor | None = None,
                      face_weight: float = FACE_WEIGHT) -> DenoiseData:
        """The shuffled control: the photos are dealt to the people at random (a permutation of the
        person <-> photo pairs) before training, so a person's features say nothing about the photos
        filed under them; everything else (counts, features, prompt) is unchanged."""
        perm = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        return self._data(DenoiseData, self.latents[perm], embeds, face_weight)

    def photos_of(self, p: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(latents [n, C, h, w], features [n, D]) of person p's photos, in view order."""
        idx = [i for i, q in enumerate(self.person) if q == p]
        return self.latents[idx], self.features[p]

    def captions(self) -> list[str]:
        """One caption per person: coarse attributes read off the signs of its identity code."""
        return [", ".join(ATTRIBUTES[j][int(z[j] > 0)] for j in range(min(Z, len(ATTRIBUTES)))) for z in self.codes]


class PlantedWorld:
    def __init__(self, seed: int, settings: PlantSettings = PlantSettings(), embeds: torch.Tensor | None = None):
        self.seed, self.settings = seed, settings
        g = torch.Generator().manual_seed(1000 + seed)
        self.B = _box_patterns(Z, g)
        self.N = _box_patterns(U, g)
        self.M = torch.randn(C, *SIZE, generator=g)
        self.A = torch.randn(D, Z, generator=g)
        self.A_u = torch.randn(D, U, generator=g)
        self.E = torch.randn(PROMPT_TOKENS, H, generator=g) if embeds is None else embeds.float()

    def transformer(self, layers: int = LAYERS):
        from diffusers import QwenImageTransformer2DModel

        torch.manual_seed(self.seed)
        return freeze_transformer(QwenImageTransformer2DModel(
            patch_size=2, in_channels=4 * C, out_channels=C, num_layers=layers, attention_head_dim=16,
            num_attention_heads=3, joint_attention_dim=H, guidance_embeds=False, axes_dims_rope=(8, 4, 4)))

    def people(self, n: int, views: int, seed: int) -> Cohort:
        s = self.settings
        g = torch.Generator().manual_seed(seed * 7919 + self.seed)
        z = torch.randn(n, Z, generator=g)
        u = torch.randn(n * views, U, generator=g)
        lat, feats, person, view = [], [], [], []
        for p in range(n):
            f = []
            for v in range(views):
                i = p * views + v
                lat.append(s.common * self.M + s.identity * torch.einsum("j,jchw->chw", z[p], self.B)
                           + s.photo * torch.einsum("k,kchw->chw", u[i], self.N)
                           + s.view_noise * torch.randn(C, *SIZE, generator=g))
                f.append(torch.tanh(self.A @ z[p] + s.feature_photo * self.A_u @ u[i]
                                    + s.feature_noise * torch.randn(D, generator=g)))
                person.append(p)
                view.append(v)
            feats.append(torch.nn.functional.normalize(torch.stack(f), dim=-1))
        return Cohort(z, u, torch.stack(lat), feats, person, view, self.E, [f"s{seed}p{p}" for p in range(n)])


def train_product_head(data: DenoiseData, transformer, seed: int, **cfg) -> ResidualHead:
    """The product's denoise training on `data` (the residual from the person's OTHER photos)."""
    head = ResidualHead(D, 1, H)
    train_denoise(head, transformer, data, None,
                  DenoiseLoopConfig(**{"epochs": 8, "batch_size": 4, "lr": 3e-2, "seed": seed, **cfg}))
    return head


def random_head_like(head: ResidualHead, seed: int) -> ResidualHead:
    """A head with random weight and bias directions of the same norms as `head`'s (and its scale)."""
    g = torch.Generator().manual_seed(seed)
    out = ResidualHead(head.proj.in_features, head.tokens, head.proj.out_features // head.tokens)
    with torch.no_grad():
        for mine, theirs in ((out.proj.weight, head.proj.weight), (out.proj.bias, head.proj.bias)):
            r = torch.randn(mine.shape, generator=g)
            mine.copy_(r * (theirs.norm() / r.norm()))
        out.scale.copy_(head.scale)
    return out.eval()


@torch.no_grad()
def own_photo_advantage(head, transformer, data: DenoiseData, alpha: float = 1.0, pairs: int = 4,
                        seed: int = 0) -> dict:
    """How much a head profits from seeing the photo it denoises: per photo, at fixed (σ, ε) pairs, the
    loss with the residual of ONE other photo of the person (the next view, cyclic) minus the loss with the
    residual of the photo's OWN features (one photo each, so both residuals are equally noisy). Returns the
    mean, the mean relative to the prompt-only loss and a 95 % bootstrap interval over persons. A head that
    reads the photo's own pattern from its features has a clearly positive advantage; one that learned only
    what a person's photos share has none."""
    from qwen_identity.core.measurement.identity_gain import _bootstrap_ci, photo_losses

    head.eval()

    def residuals(own_photo: bool) -> torch.Tensor:
        f = []
        for p, v in zip(data.person, data.view):
            n = data.features[p].shape[0]
            f.append(combine_features(data.features[p][v if own_photo else (v + 1) % n][None]))
        return head(torch.stack(f)).float()

    losses = photo_losses(transformer, data.latents, data.img_shape, data.embeds[data.person],
                          data.mask[data.person], [None, residuals(False), residuals(True)], alpha, pairs, seed,
                          token_weights=data.token_weights)
    adv = losses[1] - losses[2]
    groups: dict[int, list[float]] = {}
    for i, p in enumerate(data.person):
        groups.setdefault(p, []).append(float(adv[i]))
    lo, hi = _bootstrap_ci(list(groups.values()))
    mean = float(adv.mean())
    ln = float(losses[0].mean())
    return {"advantage": mean, "advantage_relative": mean / ln, "ci95": [lo, hi],
            "ci95_relative": [lo / ln, hi / ln]}


def settings_with(**kw) -> PlantSettings:
    return replace(PlantSettings(), **kw)
