"""How `./run test` finds and runs the real-ComfyUI tests (scripts/run_tests.sh, scripts/comfyui_env.sh,
scripts/test_summary.py, the marking in tests/conftest.py, comfyui_harness.env.require_comfyui)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from comfyui_harness import env as comfy_env

ROOT = Path(__file__).resolve().parent.parent


def _run_summary(*reports: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "test_summary.py"), *map(str, reports)],
                          capture_output=True, text=True, timeout=60)


def _junit(path: Path, tests: int, failures: int = 0, errors: int = 0, skipped: int = 0) -> Path:
    path.write_text(f'<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" tests="{tests}" '
                    f'failures="{failures}" errors="{errors}" skipped="{skipped}" time="1.0"/></testsuites>')
    return path


def test_summary_adds_both_sessions_into_one_closing_line(tmp_path):
    out = _run_summary(_junit(tmp_path / "pack.xml", 400, skipped=2), _junit(tmp_path / "comfyui.xml", 28))
    assert out.returncode == 0, out.stdout
    assert out.stdout.strip().splitlines()[-1] == "total: 426 passed, 0 failed, 2 skipped"


def test_summary_counts_errors_and_a_missing_report_as_failed(tmp_path):
    out = _run_summary(_junit(tmp_path / "pack.xml", 10, failures=1, errors=2), tmp_path / "never_written.xml")
    assert out.returncode == 1
    assert out.stdout.strip().splitlines()[-1] == "total: 7 passed, 4 failed, 0 skipped"
    assert "never_written.xml: no report" in out.stdout


def test_summary_of_nothing_run_is_a_failure(tmp_path):
    assert _run_summary(_junit(tmp_path / "pack.xml", 0)).returncode == 1


def test_tests_that_need_a_real_comfyui_are_marked_and_handed_to_the_comfyui_session(tmp_path):
    """The marking the second session relies on, seen as `./run test`'s first session sees it: a test
    calling require_comfyui() in its body (bench) or through a fixture (native sampling) is selected by
    `-m comfyui`, a plain test beside them is not, and the collection names their files for session 2."""
    handoff = tmp_path / "files.txt"
    env = {k: v for k, v in os.environ.items() if k not in ("COMFYUI_DIR", "PYTEST_ADDOPTS")}
    env["QWEN_IDENTITY_COMFYUI_TESTS_OUT"] = str(handoff)
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "comfyui",
                          "tests/test_native_sampling.py", "tests/test_bench.py"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    selected = {line.strip() for line in out.stdout.splitlines() if "::" in line}
    native = {n for n in selected if n.startswith("tests/test_native_sampling.py::")}
    assert len(native) >= 4 and all("sample_native" in n or "max_batch" in n for n in native), native
    assert "tests/test_bench.py::test_comfy_stage_times_comfyuis_sampler_and_the_pack_on_the_same_model" in selected
    assert "tests/test_native_sampling.py::test_stochastic_samplers_are_recognised" not in selected
    assert handoff.read_text().split() == ["tests/test_bench.py", "tests/test_native_sampling.py"]


class _Item:
    def __init__(self, marked: bool):
        self.nodeid, self.marked = "tests/test_x.py::test_y", marked

    def get_closest_marker(self, name):
        return object() if (self.marked and name == "comfyui") else None


def _require(monkeypatch, item, comfyui_dir=None, required=False):
    monkeypatch.setattr(comfy_env, "CURRENT_TEST", item)
    if comfyui_dir is None:
        monkeypatch.delenv("COMFYUI_DIR", raising=False)
    else:
        monkeypatch.setenv("COMFYUI_DIR", str(comfyui_dir))
    if required:
        monkeypatch.setenv(comfy_env.REQUIRE_ENV, "1")
    else:
        monkeypatch.delenv(comfy_env.REQUIRE_ENV, raising=False)
    getattr(comfy_env, "require_" + "comfyui")()   # spelled apart: this test itself must not be marked


def test_an_unmarked_test_needing_comfyui_fails_with_the_fix(monkeypatch):
    with pytest.raises(pytest.fail.Exception, match=r"tests/test_x.py::test_y .*not marked.*@pytest.mark.comfyui"):
        _require(monkeypatch, _Item(marked=False))


def test_without_comfyui_a_marked_test_skips_with_the_reason(monkeypatch):
    with pytest.raises(pytest.skip.Exception, match="COMFYUI_DIR is not set.*shared/vendor/ComfyUI"):
        _require(monkeypatch, _Item(marked=True))


def test_in_ci_s_comfyui_session_a_test_that_would_skip_fails(monkeypatch, tmp_path):
    with pytest.raises(pytest.fail.Exception, match="QWEN_IDENTITY_REQUIRE_COMFYUI is set.*not a ComfyUI checkout"):
        _require(monkeypatch, _Item(marked=True), comfyui_dir=tmp_path, required=True)


def _find_tarball(tmp_path, env_value=None):
    env = {k: v for k, v in os.environ.items() if k != "QWEN_IDENTITY_COMFYUI_TARBALL"}
    if env_value is not None:
        env["QWEN_IDENTITY_COMFYUI_TARBALL"] = env_value
    # a copy of the script in a checkout-shaped folder whose ../shared/vendor is under our control
    repo = tmp_path / "work" / "repo"
    (repo / "scripts").mkdir(parents=True, exist_ok=True)
    (repo / "scripts" / "comfyui_env.sh").write_bytes((ROOT / "scripts" / "comfyui_env.sh").read_bytes())
    return repo, subprocess.run(["bash", str(repo / "scripts" / "comfyui_env.sh"), "--find"], env=env,
                                capture_output=True, text=True, timeout=60)


def test_the_tarball_is_found_beside_the_checkout_as_ci_lays_out_shared(tmp_path):
    repo, out = _find_tarball(tmp_path)
    assert out.returncode != 0 and out.stdout == ""   # none there: ./run test runs one session, ComfyUI tests skip
    vendor = tmp_path / "work" / "shared" / "vendor"
    vendor.mkdir(parents=True)
    for name in ("ComfyUI-0.3.64-a125cd84.tar.xz", "README.md"):
        (vendor / name).write_bytes(b"x")
    repo, out = _find_tarball(tmp_path)
    assert out.returncode == 0 and out.stdout.strip() == str(vendor / "ComfyUI-0.3.64-a125cd84.tar.xz")


def test_every_vendored_comfyui_is_found_oldest_first_and_other_fixtures_are_not(tmp_path):
    """shared/vendor/ holds 0.3.64 at its top and newer releases in sub-folders (so the old single-tarball
    glob still finds 0.3.64 alone); node packs vendored for tests (ComfyUI-GGUF-*) are not ComfyUI."""
    vendor = tmp_path / "work" / "shared" / "vendor"
    for rel in ("comfyui-2026/ComfyUI-0.33.0-783545f6.tar.xz", "ComfyUI-0.3.64-a125cd84.tar.xz",
                "comfyui-2025b/ComfyUI-0.9.2-00000000.tar.xz", "comfyui-gguf/ComfyUI-GGUF-795e4515.tar.xz"):
        (vendor / rel).parent.mkdir(parents=True, exist_ok=True)
        (vendor / rel).write_bytes(b"x")
    _, out = _find_tarball(tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(vendor / "ComfyUI-0.3.64-a125cd84.tar.xz"),
                                  str(vendor / "comfyui-2025b" / "ComfyUI-0.9.2-00000000.tar.xz"),
                                  str(vendor / "comfyui-2026" / "ComfyUI-0.33.0-783545f6.tar.xz")]


def test_an_explicit_tarball_wins_and_a_wrong_one_is_named(tmp_path):
    tar = tmp_path / "mine.tar.xz"
    tar.write_bytes(b"x")
    _, out = _find_tarball(tmp_path, str(tar))
    assert out.returncode == 0 and out.stdout.strip() == str(tar)
    other = tmp_path / "other.tar.xz"
    other.write_bytes(b"x")
    _, out = _find_tarball(tmp_path, f"{tar}:{other}")   # several, in the order given
    assert out.returncode == 0 and out.stdout.split() == [str(tar), str(other)]
    _, out = _find_tarball(tmp_path / "b", str(tmp_path / "missing.tar.xz"))
    assert out.returncode != 0 and "missing.tar.xz: no such file" in out.stderr


_FAKE_PYTHON = r'''#!/usr/bin/env bash
# stands in for a venv's python: `-m pytest` records its call and writes a JUnit report; anything else
# (scripts/test_summary.py) runs in the real interpreter
if [ "$1" != "-m" ]; then exec "$REAL_PYTHON" "$@"; fi
xml=""
for a in "$@"; do case "$a" in --junitxml=*) xml=${a#--junitxml=} ;; esac; done
echo "COMFYUI_DIR=${COMFYUI_DIR:-} REQUIRE=${QWEN_IDENTITY_REQUIRE_COMFYUI:-} ARGS=$*" >> "$CALLS"
[ -n "${QWEN_IDENTITY_COMFYUI_TESTS_OUT:-}" ] && echo "tests/test_x.py" > "$QWEN_IDENTITY_COMFYUI_TESTS_OUT"
fail=0
[ -n "${COMFYUI_DIR:-}" ] && [ "$(basename "$COMFYUI_DIR")" = "${FAIL_VERSION:-none}" ] && fail=1
printf '<testsuites><testsuite name="pytest" tests="3" failures="%s" errors="0" skipped="0"/></testsuites>' "$fail" > "$xml"
exit $fail
'''

_FAKE_ENV = r'''#!/usr/bin/env bash
# scripts/comfyui_env.sh with two releases and nothing to build
if [ "$1" = "--find" ]; then echo /vendor/ComfyUI-0.3.64-a.tar.xz; echo /vendor/comfyui-2026/ComfyUI-0.33.0-b.tar.xz; exit 0; fi
v=$(basename "$1" .tar.xz); v=${v#ComfyUI-}; v=${v%-*}
echo "COMFYUI_DIR=/fake/$v"; echo "COMFYUI_PYTHON=$FAKE_PY"; echo "COMFYUI_VERSION=$v"
'''


def _run_tests_with_two_fake_releases(tmp_path, *args, fail_version="none"):
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    for name in ("run_tests.sh", "test_summary.py"):
        (repo / "scripts" / name).write_bytes((ROOT / "scripts" / name).read_bytes())
    (repo / "scripts" / "comfyui_env.sh").write_text(_FAKE_ENV)
    fake = tmp_path / "venv" / "bin" / "python"
    fake.parent.mkdir(parents=True)
    fake.write_text(_FAKE_PYTHON)
    fake.chmod(0o755)
    calls = tmp_path / "calls.txt"
    env = {k: v for k, v in os.environ.items() if k not in ("COMFYUI_DIR", "QWEN_IDENTITY_SKIP_COMFYUI",
                                                            "QWEN_IDENTITY_REQUIRE_COMFYUI", "PYTEST_ADDOPTS")}
    env.update(REAL_PYTHON=sys.executable, FAKE_PY=str(fake), CALLS=str(calls), FAIL_VERSION=fail_version)
    out = subprocess.run(["bash", str(repo / "scripts" / "run_tests.sh"), *args, str(tmp_path / "venv")],
                         env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    return out, calls.read_text().splitlines()


def test_run_tests_runs_the_comfyui_tests_once_per_release_and_sums_them(tmp_path):
    out, calls = _run_tests_with_two_fake_releases(tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert len(calls) == 3, calls
    assert calls[0].startswith("COMFYUI_DIR= REQUIRE= ARGS=-m pytest -m not comfyui")
    for call, version in zip(calls[1:], ("0.3.64", "0.33.0")):   # oldest first, each in its own tree
        assert call.startswith(f"COMFYUI_DIR=/fake/{version} REQUIRE=1 ARGS=-m pytest -m comfyui"), call
        assert f"comfyui-{version}.xml" in call and call.endswith("tests/test_x.py"), call
    # the tests of the pack's own tooling (the bench) run against the newest release only
    assert "-m comfyui and not newest_comfyui_only --junitxml" in calls[1], calls[1]
    assert "-m comfyui --junitxml" in calls[2], calls[2]
    lines = out.stdout.strip().splitlines()
    assert lines[-4:] == ["pack.xml: 3 passed, 0 failed, 0 skipped", "comfyui-0.3.64.xml: 3 passed, 0 failed, 0 skipped",
                          "comfyui-0.33.0.xml: 3 passed, 0 failed, 0 skipped", "total: 9 passed, 0 failed, 0 skipped"]


def test_one_failing_release_fails_the_run_and_the_others_still_run(tmp_path):
    out, calls = _run_tests_with_two_fake_releases(tmp_path, fail_version="0.3.64")
    assert out.returncode != 0
    assert len(calls) == 3 and "/fake/0.33.0" in calls[2]
    assert out.stdout.strip().splitlines()[-1] == "total: 8 passed, 1 failed, 0 skipped"


def test_test_comfyui_runs_only_the_comfyui_sessions_with_the_given_arguments(tmp_path):
    out, calls = _run_tests_with_two_fake_releases(tmp_path, "--comfyui-only")
    assert out.returncode == 0, out.stdout + out.stderr
    assert [c.split(" ")[0] for c in calls] == ["COMFYUI_DIR=/fake/0.3.64", "COMFYUI_DIR=/fake/0.33.0"]
    assert out.stdout.strip().splitlines()[-1] == "total: 6 passed, 0 failed, 0 skipped"
