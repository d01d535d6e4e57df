"""Worker for tests/test_denoise_identity.py::test_two_processes_equal_one: trains the planted world's
head under a 2-process launcher (torchrun; AccelerateDist) and writes the head's weight (rank 0)."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
torch.set_num_threads(1)

from test_denoise_identity import D, H, World, tiny_transformer  # noqa: E402

from qwen_identity.core.residual.head import ResidualHead  # noqa: E402
from qwen_identity.training.denoise import DenoiseLoopConfig, train_denoise  # noqa: E402
from qwen_identity.training.distributed import make_dist  # noqa: E402

if __name__ == "__main__":
    dist = make_dist(torch.device("cpu"), "accelerate")
    train, _ = World().people(16, 3, seed=1)
    small = train.subset(list(range(16)))
    head = ResidualHead(D, 1, H)
    train_denoise(head, tiny_transformer(), small, None, DenoiseLoopConfig(epochs=2, batch_size=4, lr=3e-2), dist=dist)
    if dist.is_main:
        torch.save({"w": head.proj.weight.detach().clone(), "world": dist.world}, sys.argv[1])
    dist.barrier()
    import torch.distributed

    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
