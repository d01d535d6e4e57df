"""Rows that compare Qwen-Image 2.1's own reference images with the identity head, for the same seeds.

One implementation for `qwen-identity sweep --references compare` (core/pipeline/run.py) and
QwenImageSampleFromEmbeds' `reference_rows` (nodes/sampling_nodes.py). The caller says how to sample a
(positive, negative) pair, how to encode the prompts with the person's photos as reference images, and
how to add the head's residual to a conditioning; this module picks the rows and their order:

- "references only": the prompt read with the photos, no residual (one row);
- "head": the prompt alone plus the residual E + α·R (one row per α);
- "both": the prompt read with the photos plus the residual (one row per α).

Reference images are encoded first, so a model that takes none (Qwen-Image 1.x) is refused before
anything is sampled.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..errors import UserInputError

# which row groups each choice samples, in grid order
ROW_CHOICES = {
    "compare": ("references only", "head", "both"),
    "head only": ("head",),
    "references only": ("references only",),
    "both": ("both",),
}
PROMPT_KEY = "qwen_identity_prompt"   # in a CONDITIONING entry's dict: the prompt text it was encoded from


def row_groups(rows: str) -> tuple[str, ...]:
    if rows not in ROW_CHOICES:
        raise UserInputError(f"reference rows must be one of {', '.join(ROW_CHOICES)} (got {rows!r}).")
    return ROW_CHOICES[rows]


def comparison_labels(rows: str, alphas: Sequence[float]) -> tuple[list[float], list[str]]:
    """(α per grid row, row labels) of `comparison_rows` for these rows and α list ("references only": α 0)."""
    row_alphas, labels = [], []
    for group in row_groups(rows):
        if group == "references only":
            row_alphas.append(0.0)
            labels.append("references only")
        else:
            row_alphas += list(alphas)
            labels += [f"{group} α={a:g}" for a in alphas]
    return row_alphas, labels


def comparison_rows(run: Callable[[list, list | None], torch.Tensor], head_positive: list, negative: list | None,
                    encode_with_references: Callable[[], tuple[list, list | None]],
                    inject: Callable[[list], list], alphas: Sequence[float], rows: str = "compare"
                    ) -> tuple[torch.Tensor, list[float], list[str]]:
    """(images [N, H, W, 3] α-major per row group, α per grid row, row labels).

    run(positive, negative) -> images for every conditioning item × seed; head_positive: the prompt with the
    residual already added (α-major, one item per α); encode_with_references() -> (positive, negative) read
    with the reference images; inject(conditioning) -> it plus the residual, one item per α."""
    groups = row_groups(rows)
    alphas = list(alphas)
    refs = encode_with_references() if {"references only", "both"} & set(groups) else None
    images = []
    for group in groups:
        if group == "references only":
            images.append(run(*refs))
        elif group == "head":
            images.append(run(head_positive, negative))
        else:
            images.append(run(inject(refs[0]), refs[1]))
    return (torch.cat(images), *comparison_labels(rows, alphas))
