"""Fan-out: split work over identities into chunks, run each chunk in its own process, merge the results.

Why: a sweep or an evaluation over many identities is independent per identity, so it spreads over
several GPUs (local `accelerate launch`, or one Modal container per chunk) with no communication.
The contract that makes the merged output *identical* to a one-process run:
- chunking is deterministic: contiguous blocks of the identity list in its given order, sizes differ
  by at most one (`split`), so concatenating chunk results in chunk order gives the original order;
- every chunk writes a complete output folder of its own (a *stage*, `OUT/.fanout/<command>/chunk-I-of-N/`)
  with the same relative file names a one-process run writes into OUT, then a `chunk.json` marker
  saying done (or failed, with the message) and the run key (a hash of the arguments, so a stage left
  by another run is never merged);
- `merge_stages` copies every staged file to OUT atomically. A file staged by one chunk only is
  copied; a file staged by several chunks (an aggregate such as eval.json) needs a combiner, unless
  all copies are byte-identical. Two different files under one name without a combiner are an error.

The launcher tells a process its chunk through the environment (`RANK`/`WORLD_SIZE`, as `torchrun` and
`accelerate launch` set them) or explicitly (`--chunk I/N` then `--merge-chunks N`, as the Modal runner does).
Nothing here knows about models: the unit of work and the combiners come from the caller.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence, TypeVar

from .errors import UserInputError
from .files.atomic import atomic_write, atomic_write_bytes, atomic_write_json
from .generation.cell_batches import contiguous_blocks

T = TypeVar("T")
STAGE_ROOT = ".fanout"
MARKER = "chunk.json"

# relative path -> combiner(staged copies in chunk order, destination tmp path) for files several chunks write
Combiner = Callable[[list[Path], Path], None]


def split(items: Sequence[T], chunks: int) -> list[list[T]]:
    """`chunks` contiguous blocks of `items` (order kept, sizes differ by at most one; empty when chunks > items)."""
    if chunks < 1:
        raise UserInputError(f"the number of chunks must be at least 1, got {chunks}.")
    return contiguous_blocks(items, chunks)


def parse_chunk(text: str) -> tuple[int, int]:
    """'I/N' (0-based I) -> (I, N), or UserInputError naming the expected form."""
    try:
        i, n = (int(x) for x in str(text).split("/"))
    except ValueError:
        raise UserInputError(f"--chunk must look like I/N (chunk I of N, counting from 0), got {text!r}.") from None
    if n < 1 or not 0 <= i < n:
        raise UserInputError(f"--chunk {text}: need 0 <= I < N and N >= 1.")
    return i, n


@dataclass(frozen=True)
class Plan:
    """This process's part: chunk `rank` of `world`; `merge`: it also waits for the others and merges."""

    rank: int
    world: int
    merge: bool
    wait_for_others: bool
    launch_id: str = ""


def plan_from(chunk: str | None, merge_chunks: int | None, environ: Mapping[str, str] | None = None) -> Plan | None:
    """The fan-out plan from the explicit flags, else from RANK/WORLD_SIZE; None for a plain one-process run."""
    env = os.environ if environ is None else environ
    if chunk and merge_chunks:
        raise UserInputError("--chunk and --merge-chunks are two steps: run every --chunk I/N first, then one "
                             "--merge-chunks N.")
    if merge_chunks is not None:
        if merge_chunks < 1:
            raise UserInputError(f"--merge-chunks must be at least 1, got {merge_chunks}.")
        return Plan(rank=-1, world=merge_chunks, merge=True, wait_for_others=False)
    if chunk:
        i, n = parse_chunk(chunk)
        return Plan(rank=i, world=n, merge=False, wait_for_others=False)
    try:
        world = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", env.get("LOCAL_RANK", "0")))
    except ValueError:
        raise UserInputError(f"RANK/WORLD_SIZE in the environment are not integers ({env.get('RANK')!r}, "
                             f"{env.get('WORLD_SIZE')!r}).") from None
    if world <= 1:
        return None
    if not 0 <= rank < world:
        raise UserInputError(f"RANK {rank} is outside WORLD_SIZE {world}.")
    # every process of one launch shares the launcher (its parent) and torchrun's run id
    launch = f"{env.get('TORCHELASTIC_RUN_ID', '')}:{env.get('MASTER_ADDR', '')}:{env.get('MASTER_PORT', '')}:{os.getppid()}"
    return Plan(rank=rank, world=world, merge=rank == 0, wait_for_others=True, launch_id=launch)


def run_key(arguments: Mapping[str, object], launch_id: str = "") -> str:
    """A hash of the run's arguments (and launch): chunks of one run share it, a stage of another run differs."""
    blob = json.dumps({k: v for k, v in sorted(arguments.items())}, sort_keys=True, default=str)
    return hashlib.sha256(f"{blob}\n{launch_id}".encode()).hexdigest()[:16]


def stage_dir(out_dir: str | os.PathLike, command: str, rank: int, world: int) -> Path:
    return Path(out_dir) / STAGE_ROOT / command / f"chunk-{rank}-of-{world}"


def stage_dirs(out_dir: str | os.PathLike, command: str, world: int) -> list[Path]:
    return [stage_dir(out_dir, command, r, world) for r in range(world)]


def reset_stage(stage: Path) -> None:
    """Empty a stage before its chunk runs (an earlier run's files must not be merged)."""
    if stage.is_symlink() or (stage.exists() and not stage.is_dir()):
        raise UserInputError(f"{stage} is not a folder: remove it.")
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir(parents=True)


def mark(stage: Path, key: str, identities: Sequence[str], error: str | None = None) -> None:
    atomic_write_json(stage / MARKER, {"key": key, "ok": error is None, "error": error,
                                       "identities": list(identities)})


def read_marker(stage: Path) -> dict | None:
    try:
        data = json.loads((stage / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def run_chunk(stage: Path, key: str, identities: Sequence[str], work: Callable[[Path], None]) -> None:
    """Reset `stage`, run `work(stage)`, and mark it done, or failed with the error's message (then re-raise)."""
    reset_stage(stage)
    try:
        work(stage)
    except BaseException as e:
        mark(stage, key, identities, error=f"{type(e).__name__}: {e}" if not isinstance(e, UserInputError) else str(e))
        raise
    mark(stage, key, identities)


def wait_for_chunks(stages: Sequence[Path], key: str, timeout_s: float | None = None, poll_s: float = 0.2,
                    sleep: Callable[[float], None] = time.sleep) -> list[dict]:
    """Block until every stage holds a marker of this run (`key`); a failed chunk is a UserInputError naming it.

    timeout_s None waits without limit (torchrun/accelerate stop every rank when one dies).
    """
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        markers = [read_marker(s) for s in stages]
        for s, m in zip(stages, markers):
            if m and m.get("key") == key and not m.get("ok"):
                raise UserInputError(f"chunk {s.name} failed: {m.get('error')}")
        if all(m and m.get("key") == key for m in markers):
            return markers
        if deadline is not None and time.monotonic() > deadline:
            missing = [s.name for s, m in zip(stages, markers) if not (m and m.get("key") == key)]
            raise UserInputError(f"chunks not finished for this run: {', '.join(missing)} (in {stages[0].parent}). "
                                 "Run every --chunk I/N with the same arguments first.")
        sleep(poll_s)


def staged_files(stage: Path) -> list[str]:
    """Relative POSIX paths of the files a chunk staged (its marker and lock files excluded), sorted."""
    out = []
    for p in sorted(stage.rglob("*")):
        if p.is_file() and p.name != MARKER and not p.name.startswith(".qwen-identity.lock"):
            out.append(p.relative_to(stage).as_posix())
    return out


def merge_stages(stages: Sequence[Path], out_dir: str | os.PathLike,
                 combiners: Mapping[str, Combiner] | None = None) -> list[Path]:
    """Copy every staged file into `out_dir` (atomically), combining the ones several chunks wrote; return them."""
    combiners = dict(combiners or {})
    out_dir = Path(out_dir)
    by_name: dict[str, list[Path]] = {}
    for s in stages:
        for rel in staged_files(s):
            by_name.setdefault(rel, []).append(s / rel)
    for rel, copies in sorted(by_name.items()):   # every conflict is found before anything is written
        if rel not in combiners and any(c.read_bytes() != copies[0].read_bytes() for c in copies[1:]):
            raise UserInputError(f"two chunks wrote different files named {rel} and nothing says how to combine "
                                 f"them ({', '.join(str(c) for c in copies)}).")
    written = []
    for rel in sorted(by_name):
        copies, dest = by_name[rel], out_dir / rel
        if rel in combiners:
            atomic_write(dest, lambda tmp, c=copies, f=combiners[rel]: f(c, tmp))
        else:
            atomic_write_bytes(dest, copies[0].read_bytes())
        written.append(dest)
    return written


def remove_stages(stages: Sequence[Path]) -> None:
    """Delete merged stages (and their parents when empty)."""
    for s in stages:
        if s.is_dir() and not s.is_symlink():
            shutil.rmtree(s)
    parents = {s.parent for s in stages} | {s.parent.parent for s in stages}
    for parent in sorted(parents, key=lambda p: len(p.parts), reverse=True):   # deepest first
        try:
            parent.rmdir()
        except OSError:
            pass
