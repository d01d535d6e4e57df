"""`qwen-identity`: the command line over the core (prepare, extract, train, sweep, demo, eval, similarity).

Each subcommand lives in its own module with `add_arguments(parser)` and `run(args) -> int`.
A `UserInputError` prints one line and exits 2; Ctrl-C exits 130; nothing prints a raw traceback
unless QWEN_IDENTITY_DEBUG=1.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys

from ..core.runtime import interrupts
from ..core.errors import UserInputError
from ..version import __version__

# name -> (module, one-line help); a subcommand is listed once it works.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("prepare", "seed directories (seed_*/photo_view_*.png + caption.txt) from photos grouped per person; "
                "photos without a usable face are skipped and counted"),
    "extract": ("extract", "Qwen3-VL identity features of seed directories into one .safetensors feature cache"),
    "tune": ("tune", "a personal identity head from a folder of one person's photos, in minutes"),
    "train": ("train", "train a residual head from seed directories (objective caption, zero or denoise)"),
    "sweep": ("sweep", "the POC's alpha x seed sweep: (train,) inject, sample, grid + meta per seed directory"),
    "demo": ("demo", "the main job on a fresh machine: tiny offline models (or real ones) end to end"),
    "eval": ("eval", "sweep α per identity: face distance, Qwen3-VL cosine, prompt proxy, diversity; JSON + plot"),
    "similarity": ("similarity", "face distance of two photos (dlib 128-d embeddings), same-person verdict, JSON"),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own exit code 2, with the usage line
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="qwen-identity", description="Qwen3-VL identity features -> residual head -> Qwen-Image.")
    parser.add_argument("--version", action="version", version=f"qwen-identity {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (module, help_text) in SUBCOMMANDS.items():
        mod = importlib.import_module(f".{module}", __name__)
        p = sub.add_parser(name, help=help_text, description=(mod.__doc__ or help_text).strip(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    with interrupts.catching_interrupts():   # a Ctrl-C is never lost, even one Python drops in a finalizer
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    try:  # importing the subcommands (torch, transformers, diffusers) takes seconds: Ctrl-C there is no bug
        parser = build_parser()
        args = parser.parse_args(argv)
        interrupts.raise_if_interrupted()
    except KeyboardInterrupt:
        interrupts.acknowledge()
        print("qwen-identity: interrupted while starting; nothing was written.", file=sys.stderr)
        return 130
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    code = _run_command(args)
    if interrupts.interrupted():   # a Ctrl-C Python swallowed in a finalizer after the last progress tick
        interrupts.acknowledge()
        return _report_interrupt(args)
    return code


def _report_interrupt(args) -> int:
    print(f"qwen-identity {args.command}: interrupted; finished outputs are kept, nothing half-written.",
          file=sys.stderr)
    return 130


def _run_command(args) -> int:
    try:
        return int(args._run(args) or 0)
    except UserInputError as e:
        print(f"qwen-identity {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        interrupts.acknowledge()
        return _report_interrupt(args)
    except OSError as e:
        where = f" ({e.filename})" if e.filename else ""
        if e.errno in _PATH_ERRNOS:  # a path argument the OS cannot use (too long, a loop, a file as a folder)
            print(f"qwen-identity {args.command}: error: cannot use the path{where}: {e.strerror or e}. "
                  "Check the path arguments.", file=sys.stderr)
            return 2
        if e.errno not in _WRITE_ERRNOS:
            return _internal_error(args, e)
        # a full disk or a read-only / forbidden folder is the user's to fix, not a bug
        print(f"qwen-identity {args.command}: error: cannot write{where}: {e.strerror or e}. Files finished "
              "before are complete (every output is written atomically); free space or choose another output "
              "folder, then rerun.", file=sys.stderr)
        return 2
    except Exception as e:  # a bug, not bad input: say so briefly
        return _internal_error(args, e)


_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}
_PATH_ERRNOS = {errno.ENAMETOOLONG, errno.ELOOP, errno.ENOTDIR, errno.EISDIR}


def _internal_error(args, e: Exception) -> int:
    if os.environ.get("QWEN_IDENTITY_DEBUG"):
        raise e
    print(f"qwen-identity {args.command}: internal error: {type(e).__name__}: {e}\n"
          "This is a bug; rerun with QWEN_IDENTITY_DEBUG=1 for the traceback and report it.", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
