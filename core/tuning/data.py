"""One person's photos, encoded: what `tune_head` trains and measures on.

Photos keep their aspect ratio: each latent is [C, h, w] at the size its caller encoded it (an aspect
bucket), so latents of one person may differ in shape; batches only ever hold photos of one shape.
`sources` says which original photo each entry is a view of: mirrored or cropped views of one photo
share a source, and the head is conditioned on the features of photos of OTHER sources than the one it
denoises (only when a person has a single source do its other views stand in). The held-out photo is a
whole source.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import UserInputError


@dataclass
class PersonalData:
    latents: list[torch.Tensor]                  # per photo [C, h, w], the family's normalised latent space
    features: torch.Tensor                       # [M, D] per-photo Qwen3-VL features (unit norm)
    embeds: list[torch.Tensor]                   # per photo [S, H] prompt embeddings it is trained under
    masks: list[torch.Tensor]                    # per photo [S] 1 = real token
    face_maps: list[torch.Tensor | None] | None = None  # per photo [1, h, w] in 0..1 (1 = face) or None
    names: list[str] = field(default_factory=list)
    sources: list[int] | None = None             # per photo: the original photo it is a view of

    def __post_init__(self) -> None:
        m = len(self.latents)
        if m == 0:
            raise UserInputError("no photos to tune on: give at least one photo of the person.")
        if isinstance(self.features, (list, tuple)):
            self.features = torch.stack([torch.as_tensor(f) for f in self.features])
        if self.features.ndim != 2 or self.features.shape[0] != m:
            raise UserInputError(f"expected one feature vector per photo ({m}), got features of shape "
                                 f"{tuple(self.features.shape)}.")
        if len(self.embeds) != m or len(self.masks) != m:
            raise UserInputError(f"expected one prompt embedding and mask per photo ({m}), got {len(self.embeds)} "
                                 f"and {len(self.masks)}.")
        widths = {int(e.shape[-1]) for e in self.embeds}
        if len(widths) != 1:
            raise UserInputError(f"the photos' prompt embeddings have different widths {sorted(widths)}: encode "
                                 "every prompt with the same text encoder.")
        channels = {int(x.shape[0]) for x in self.latents}
        if any(x.ndim != 3 for x in self.latents) or len(channels) != 1:
            raise UserInputError("every latent must be [C, h, w] with the same C (one VAE); got shapes "
                                 + ", ".join(str(tuple(x.shape)) for x in self.latents[:4]))
        if self.face_maps is not None:
            if len(self.face_maps) != m:
                raise UserInputError(f"expected one face map (or None) per photo ({m}), got {len(self.face_maps)}.")
            for i, fm in enumerate(self.face_maps):
                if fm is not None and tuple(fm.shape[-2:]) != tuple(self.latents[i].shape[-2:]):
                    raise UserInputError(f"{self.name(i)}: its face map is {tuple(fm.shape)} but its latent is "
                                         f"{tuple(self.latents[i].shape)}; give the map at the latent's size.")
        if not self.names:
            self.names = [f"photo {i + 1}" for i in range(m)]
        if self.sources is None:
            self.sources = list(range(m))
        if len(self.names) != m or len(self.sources) != m:
            raise UserInputError(f"names and sources must have one entry per photo ({m}).")

    def __len__(self) -> int:
        return len(self.latents)

    @property
    def feature_dim(self) -> int:
        return int(self.features.shape[1])

    @property
    def hidden_size(self) -> int:
        return int(self.embeds[0].shape[-1])

    def name(self, i: int) -> str:
        return self.names[i] if self.names else f"photo {i + 1}"

    def source_ids(self) -> list[int]:
        return sorted(set(self.sources))

    def subset(self, photos: list[int]) -> "PersonalData":
        pick = lambda xs: [xs[i] for i in photos]  # noqa: E731
        return PersonalData(pick(self.latents), self.features[photos], pick(self.embeds), pick(self.masks),
                            None if self.face_maps is None else pick(self.face_maps), pick(self.names),
                            pick(self.sources))

    def conditioning_photos(self, i: int, allowed: list[int] | None = None) -> list[int]:
        """The photos whose features condition photo i: those of other sources (among `allowed`), or, when the
        person has a single source, that source's other views. Never photo i itself."""
        pool = list(range(len(self))) if allowed is None else list(allowed)
        other = [j for j in pool if self.sources[j] != self.sources[i]]
        if other:
            return other
        views = [j for j in pool if j != i]
        if not views:
            raise UserInputError(f"{self.name(i)} is the only view of the only photo: nothing else to condition "
                                 "on. Give a mirrored or cropped view of it as a second view (the CLI and the node "
                                 "do this for a single photo).")
        return views
