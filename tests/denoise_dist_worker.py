"""Both training loops on the planted world, alone or as one process of several (tests/test_denoise_identity.py
::test_two_processes_equal_one starts two of these the way torchrun and `accelerate launch` do: RANK,
WORLD_SIZE, MASTER_ADDR/PORT in the environment; Accelerate then joins a gloo group on the CPU).

`train_both(dist)` trains the denoise head (training.denoise.train_denoise) and the caption-objective head
(training.loop.train_head) from the same data and seeds; rank 0 of a launched run writes their weights.
"""

import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from planted_identity import D, H, PlantedWorld  # noqa: E402

from qwen_identity.core.residual.head import ResidualHead  # noqa: E402
from qwen_identity.training.denoise import DenoiseLoopConfig, train_denoise  # noqa: E402
from qwen_identity.training.loop import LoopConfig, TensorData, train_head  # noqa: E402

# odd counts on purpose: 15 photos in steps of 4, so the last step has 3 (one process gets 2, the other 1)
PEOPLE, VIEWS = 5, 3


def train_both(dist=None) -> dict:
    world = PlantedWorld(0)
    cohort = world.people(PEOPLE, VIEWS, seed=1)
    denoise = ResidualHead(D, 1, H)
    train_denoise(denoise, world.transformer(), cohort.data(), None,
                  DenoiseLoopConfig(epochs=2, batch_size=2, grad_accum=2, lr=3e-2), dist=dist)
    # the aspect-bucket path (batches from bucket_batches, noise drawn per micro-batch), shared out the same way
    data = cohort.data()
    bucketed = dataclasses.replace(data, latents=list(data.latents), shapes=[data.img_shape] * len(data),
                                   token_weights=None if data.token_weights is None else list(data.token_weights))
    buckets = ResidualHead(D, 1, H)
    train_denoise(buckets, world.transformer(), bucketed, None,
                  DenoiseLoopConfig(epochs=2, batch_size=2, grad_accum=2, lr=3e-2), dist=dist)
    feats = torch.cat(cohort.features)
    targets = torch.randn(PEOPLE, 1, H, generator=torch.Generator().manual_seed(3))[cohort.person]
    caption = ResidualHead(D, 1, H)
    train_head(caption, TensorData(feats, targets, torch.ones(len(feats), 1, dtype=torch.bool)), None,
               LoopConfig(epochs=2, batch_size=4, lr=1e-2), dist=dist)
    return {"denoise": denoise.proj.weight.detach().clone(), "caption": caption.proj.weight.detach().clone(),
            "denoise_buckets": buckets.proj.weight.detach().clone()}


if __name__ == "__main__":
    torch.set_num_threads(1)
    from qwen_identity.training.distributed import make_dist

    dist = make_dist(torch.device("cpu"), "accelerate")
    heads = train_both(dist)
    if dist.is_main:
        torch.save({**heads, "world": dist.world}, sys.argv[1])
    dist.barrier()
    import torch.distributed

    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
