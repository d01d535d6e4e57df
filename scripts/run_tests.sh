#!/usr/bin/env bash
# The whole test suite, as `./run test` (and so CI's .ci/run) runs it with no arguments.
#
#   scripts/run_tests.sh VENV
#
# Without the vendored ComfyUI tarball (a user's machine): one pytest session in VENV; the tests that
# need a real ComfyUI skip, printing why.
# With it (CI, or a developer with the project's shared/ beside the checkout): two sessions, then one
# combined closing line:
#   1. the pack's suite in VENV (the pack's own pins), the tests marked `comfyui` deselected; while
#      collecting, tests/conftest.py writes the files that hold `comfyui`-marked tests;
#   2. those files' `comfyui` tests in the ComfyUI venv (scripts/comfyui_env.sh) with COMFYUI_DIR set
#      and QWEN_IDENTITY_REQUIRE_COMFYUI=1, so a test that would skip for want of ComfyUI fails instead;
#   3. `total: N passed, N failed, N skipped` over both (scripts/test_summary.py reads their JUnit XML).
# Exit status: 0 only when both sessions passed.
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=${1:?usage: scripts/run_tests.sh VENV}
PACK_PY="$VENV/bin/python"

if [ -n "${QWEN_IDENTITY_SKIP_COMFYUI:-}" ] || ! tarball=$(bash scripts/comfyui_env.sh --find 2>/dev/null); then
  echo "[run] no vendored ComfyUI (../shared/vendor/ComfyUI-*.tar.xz): the real-ComfyUI tests skip with the reason" >&2
  exec "$PACK_PY" -m pytest
fi

echo "[run] real-ComfyUI tests against $tarball" >&2
env_out=$(bash scripts/comfyui_env.sh) || { echo "[run] could not make the ComfyUI test environment (see above)" >&2; exit 1; }
COMFYUI_DIR=$(sed -n 's/^COMFYUI_DIR=//p' <<<"$env_out")
COMFYUI_PYTHON=$(sed -n 's/^COMFYUI_PYTHON=//p' <<<"$env_out")

reports=.comfyui/reports
rm -rf "$reports" && mkdir -p "$reports"

echo "[run] 1/2 the pack's suite ($VENV)" >&2
env -u COMFYUI_DIR QWEN_IDENTITY_COMFYUI_TESTS_OUT="$reports/comfyui_files.txt" \
  "$PACK_PY" -m pytest -m "not comfyui" --junitxml="$reports/pack.xml"
rc_pack=$?

rc_comfy=0
summary=("$reports/pack.xml")
mapfile -t files < <(grep -v '^$' "$reports/comfyui_files.txt" 2>/dev/null || true)
if [ ${#files[@]} -gt 0 ]; then
  echo "[run] 2/2 the real-ComfyUI tests (${#files[@]} files; COMFYUI_DIR=$COMFYUI_DIR, $COMFYUI_PYTHON)" >&2
  COMFYUI_DIR="$COMFYUI_DIR" QWEN_IDENTITY_REQUIRE_COMFYUI=1 \
    "$COMFYUI_PYTHON" -m pytest -m comfyui --junitxml="$reports/comfyui.xml" "${files[@]}"
  rc_comfy=$?
  summary+=("$reports/comfyui.xml")
else
  echo "[run] 2/2 no test is marked comfyui" >&2
fi

"$PACK_PY" scripts/test_summary.py "${summary[@]}"
rc_sum=$?
[ $rc_pack -eq 0 ] && [ $rc_comfy -eq 0 ] && [ $rc_sum -eq 0 ]
