"""`sweep`/`eval` over many identities on several processes: the CLI side of core/fanout.py.

Three ways a run is split (same outputs as one process, see core/fanout.py):
- `accelerate launch --num_processes N -m qwen_identity.cli sweep ...` (or torchrun): every process
  reads RANK/WORLD_SIZE, runs its chunk of the identities into OUT/.fanout/<command>/chunk-R-of-N/,
  and rank 0 then waits for the others and merges into OUT;
- `--chunk I/N`: run chunk I of N only (one Modal container each), then
- `--merge-chunks N`: merge the N finished chunks into OUT (the Modal runner's last step).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Mapping, Sequence

_PRIVATE = {"chunk", "merge_chunks", "_run", "command", "train"}   # sweep: only chunk 0 trains


def add_fanout_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--chunk", default=None, metavar="I/N",
                       help="run only chunk I of N of the identities (0-based; contiguous blocks in the given "
                            "order) into OUT/.fanout/; merge later with --merge-chunks N. Under accelerate "
                            "launch / torchrun the chunk comes from RANK/WORLD_SIZE and rank 0 merges")
    group.add_argument("--merge-chunks", type=int, default=None, metavar="N",
                       help="merge the N chunks finished with --chunk (same other arguments) into OUT")


def plan(args):
    from ..core import fanout

    return fanout.plan_from(getattr(args, "chunk", None), getattr(args, "merge_chunks", None))


def _use_local_gpu() -> None:
    """Under a launcher, process LOCAL_RANK works on GPU LOCAL_RANK ('cuda' then means that device)."""
    import os

    import torch

    if torch.cuda.is_available() and os.environ.get("LOCAL_RANK", "").isdigit():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())


def run_fanned(args, command: str, seed_dirs: Sequence[Path], out_dir: Path,
               work: Callable[[list[Path], Path], None], combiners: Mapping[str, Callable] | None = None,
               say: Callable[[str], None] = print, the_plan=None) -> int:
    """Run this process's chunk of `seed_dirs` with `work(subset, stage)`, and merge when it is this process's job."""
    from ..core import fanout
    from ..core.errors import UserInputError
    from ..core.files.out_dir_lock import OutDirLock

    p = the_plan or plan(args)
    names = [Path(d).name for d in seed_dirs]
    if len(set(names)) != len(names):
        raise UserInputError(f"two seed directories share a folder name ({', '.join(sorted(names))}); the outputs "
                             "are named after it: rename one.")
    key = fanout.run_key({k: v for k, v in vars(args).items() if k not in _PRIVATE}, p.launch_id)
    if p.rank >= 0:
        if p.wait_for_others:
            _use_local_gpu()
        subset = fanout.split(list(seed_dirs), p.world)[p.rank]
        stage = fanout.stage_dir(out_dir, command, p.rank, p.world)
        with OutDirLock(stage):
            fanout.run_chunk(stage, key, [Path(d).name for d in subset],
                             lambda s: work(subset, s) if subset else None)
        say(f"chunk {p.rank + 1} of {p.world}: {len(subset)} identities staged in {stage}")
        if not p.merge:
            return 0
        print(f"rank 0: waiting for the other {p.world - 1} chunk(s)", file=sys.stderr)
    stages = fanout.stage_dirs(out_dir, command, p.world)
    markers = fanout.wait_for_chunks(stages, key, timeout_s=None if p.wait_for_others else 0)
    staged = [n for m in markers for n in m["identities"]]
    if staged != names:
        raise UserInputError(f"the chunks in {stages[0].parent} hold {staged}, not the identities of this run "
                             f"({names}): rerun the chunks with the same --seed-dirs.")
    with OutDirLock(out_dir):
        written = fanout.merge_stages(stages, out_dir, combiners)
        fanout.remove_stages(stages)
    say(f"merged {p.world} chunk(s): {len(written)} file(s) in {out_dir}")
    return 0
