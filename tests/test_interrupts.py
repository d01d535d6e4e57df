"""core/runtime/interrupts.py: a Ctrl-C Python drops inside a finalizer still stops the work (found by CI: `demo` ran on)."""

from __future__ import annotations

import gc
import signal
import sys

import pytest

from qwen_identity import cli
from qwen_identity.core.runtime import interrupts
from qwen_identity.core.runtime.progress import TqdmProgress


class _InterruptedWhileFreed:
    """Stands in for a model being freed when the user presses Ctrl-C: the signal lands inside __del__."""

    def __del__(self):
        signal.raise_signal(signal.SIGINT)


def _ctrl_c_inside_a_finalizer():
    obj = _InterruptedWhileFreed()
    del obj
    gc.collect()


@pytest.fixture(autouse=True)
def python_s_own_sigint_handler():
    """These tests are about what Python does with a Ctrl-C under its own handler, which Python installs
    only when SIGINT is not ignored at start-up. A suite started as a shell's background job (`... &`,
    `nohup`) inherits SIGINT ignored: install the handler for each test, as an interactive start would
    have it, and put back whatever was there."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


@pytest.fixture(autouse=True)
def dropped(monkeypatch):
    """What Python drops ("Exception ignored in ..."), recorded instead of printed."""
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(u.exc_type))
    return seen


def test_python_drops_a_ctrl_c_that_lands_in_a_finalizer(dropped):
    """The reason for the module: without the latch nothing ever raises."""
    _ctrl_c_inside_a_finalizer()   # the default handler: dropped, and the program goes on
    assert dropped == [KeyboardInterrupt]
    assert not interrupts.interrupted()


def test_the_dropped_ctrl_c_is_raised_at_the_next_check(dropped):
    with interrupts.catching_interrupts():
        _ctrl_c_inside_a_finalizer()
        assert dropped == [KeyboardInterrupt]
        assert interrupts.interrupted()
        with pytest.raises(KeyboardInterrupt):
            interrupts.raise_if_interrupted()
        interrupts.raise_if_interrupted()   # raised once, then it is the catcher's
        assert not interrupts.interrupted()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_progress_tick_raises_the_dropped_ctrl_c(capsys):
    bar = TqdmProgress("x", disable=True)
    with interrupts.catching_interrupts():
        bar(0, 3)
        _ctrl_c_inside_a_finalizer()
        with pytest.raises(KeyboardInterrupt):
            bar(1, 3)
    bar.close()


def test_a_shell_s_ignored_sigint_stays_ignored():
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with interrupts.catching_interrupts():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, old)


def _fake_command(monkeypatch, run):
    import argparse

    def build_parser():
        p = argparse.ArgumentParser(prog="qwen-identity")
        sub = p.add_subparsers(dest="command")
        sub.add_parser("work").set_defaults(_run=run)
        return p
    monkeypatch.setattr(cli, "build_parser", build_parser)


def test_cli_exits_130_when_the_ctrl_c_was_dropped_after_the_last_tick(monkeypatch, capsys):
    def run(args):
        _ctrl_c_inside_a_finalizer()
        return 0
    _fake_command(monkeypatch, run)
    assert cli.main(["work"]) == 130
    assert "interrupted" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not interrupts.interrupted()


def test_cli_stops_at_the_next_tick_after_a_dropped_ctrl_c(monkeypatch, capsys):
    ticks = []

    def run(args):
        bar = TqdmProgress("x", disable=True)
        for i in range(5):
            bar(i, 5)
            ticks.append(i)
            if i == 1:
                _ctrl_c_inside_a_finalizer()
        return 0
    _fake_command(monkeypatch, run)
    assert cli.main(["work"]) == 130
    assert ticks == [0, 1]


def test_cli_without_ctrl_c_is_unchanged(monkeypatch, capsys):
    _fake_command(monkeypatch, lambda args: 0)
    assert cli.main(["work"]) == 0
