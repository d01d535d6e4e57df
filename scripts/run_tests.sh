#!/usr/bin/env bash
# The whole test suite, as `./run test` (and so CI's .ci/run) runs it with no arguments.
#
#   scripts/run_tests.sh VENV                       everything
#   scripts/run_tests.sh --comfyui-only VENV [ARGS] `./run test-comfyui`: only `pytest -m comfyui ARGS`,
#                                                   once per vendored ComfyUI
#
# Without a vendored ComfyUI tarball (a user's machine): one pytest session in VENV; the tests that need a
# real ComfyUI skip, printing why.
# With them (CI, or a developer with the project's shared/ beside the checkout; every release that
# scripts/comfyui_env.sh --find lists, oldest first): one session for the pack, then one per ComfyUI, then
# one combined closing line:
#   1. the pack's suite in VENV (the pack's own pins), the tests marked `comfyui` deselected; while
#      collecting, tests/conftest.py writes the files that hold `comfyui`-marked tests;
#   2. for each ComfyUI release: those files' `comfyui` tests in that release's venv (those also marked
#      `newest_comfyui_only`, which test the pack's tooling rather than its nodes, only on the newest release)
#      (scripts/comfyui_env.sh TARBALL) with COMFYUI_DIR set and QWEN_IDENTITY_REQUIRE_COMFYUI=1, so a test
#      that would skip for want of ComfyUI fails instead;
#   3. `total: N passed, N failed, N skipped` over all of them (scripts/test_summary.py reads their JUnit XML).
# Exit status: 0 only when every session passed.
set -uo pipefail
cd "$(dirname "$0")/.."
only_comfyui=
if [ "${1:-}" = "--comfyui-only" ]; then
  only_comfyui=1
  shift
fi
VENV=${1:?usage: scripts/run_tests.sh [--comfyui-only] VENV [PYTEST ARGS]}
shift
PACK_PY="$VENV/bin/python"

tarballs=()
if [ -z "${QWEN_IDENTITY_SKIP_COMFYUI:-}" ]; then
  mapfile -t tarballs < <(bash scripts/comfyui_env.sh --find 2>/dev/null || true)
fi
if [ ${#tarballs[@]} -eq 0 ]; then
  if [ -n "$only_comfyui" ]; then
    echo "[run] no vendored ComfyUI (../shared/vendor/ComfyUI-*.tar.xz, ../shared/vendor/*/ComfyUI-*.tar.xz or \$QWEN_IDENTITY_COMFYUI_TARBALL)" >&2
    exit 2
  fi
  echo "[run] no vendored ComfyUI (../shared/vendor/ComfyUI-*.tar.xz): the real-ComfyUI tests skip with the reason" >&2
  exec "$PACK_PY" -m pytest
fi

# every ComfyUI environment first: a broken set-up stops the run before any test
dirs=() pythons=() versions=()
for tarball in "${tarballs[@]}"; do
  echo "[run] ComfyUI test environment for $tarball" >&2
  env_out=$(QWEN_IDENTITY_BASE_VENV="$VENV" bash scripts/comfyui_env.sh "$tarball") || { echo "[run] could not make the ComfyUI test environment for $tarball (see above)" >&2; exit 1; }
  dirs+=("$(sed -n 's/^COMFYUI_DIR=//p' <<<"$env_out")")
  pythons+=("$(sed -n 's/^COMFYUI_PYTHON=//p' <<<"$env_out")")
  versions+=("$(sed -n 's/^COMFYUI_VERSION=//p' <<<"$env_out")")
done
n=${#tarballs[@]}

reports=.comfyui/reports
rm -rf "$reports" && mkdir -p "$reports"
summary=()
rc_all=0

if [ -n "$only_comfyui" ]; then
  files=("$@")
else
  echo "[run] 1/$((n + 1)) the pack's suite ($VENV)" >&2
  env -u COMFYUI_DIR QWEN_IDENTITY_COMFYUI_TESTS_OUT="$reports/comfyui_files.txt" \
    "$PACK_PY" -m pytest -m "not comfyui" --junitxml="$reports/pack.xml"
  [ $? -eq 0 ] || rc_all=1
  summary+=("$reports/pack.xml")
  mapfile -t files < <(grep -v '^$' "$reports/comfyui_files.txt" 2>/dev/null || true)
  if [ ${#files[@]} -eq 0 ]; then
    echo "[run] no test is marked comfyui" >&2
    n=0
  fi
fi

for ((i = 0; i < n; i++)); do
  echo "[run] $((i + 2 - ${only_comfyui:-0}))/$((n + 1 - ${only_comfyui:-0})) the real-ComfyUI tests on ComfyUI ${versions[$i]}" \
       "(COMFYUI_DIR=${dirs[$i]}, ${pythons[$i]})" >&2
  # tests of the pack's own tooling against ComfyUI (marked newest_comfyui_only) run on the newest release only
  marks=comfyui
  [ "$i" -eq $((n - 1)) ] || marks="comfyui and not newest_comfyui_only"
  COMFYUI_DIR="${dirs[$i]}" QWEN_IDENTITY_REQUIRE_COMFYUI=1 \
    "${pythons[$i]}" -m pytest -m "$marks" --junitxml="$reports/comfyui-${versions[$i]}.xml" "${files[@]}"
  [ $? -eq 0 ] || rc_all=1
  summary+=("$reports/comfyui-${versions[$i]}.xml")
done

"$PACK_PY" scripts/test_summary.py "${summary[@]}" || rc_all=1
exit $rc_all
