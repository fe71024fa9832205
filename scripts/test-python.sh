#!/usr/bin/env bash
# The Python SDK's checks and tests, then every framework integration's tests, each in its own venv.
#
#   bash scripts/test-python.sh
#
# Venvs live under ${XDG_CACHE_HOME:-~/.cache}/bulkhead/venvs, one per requirements file (keyed by
# a hash of it, the SDK's dependencies and the Python version) and are built only when missing.
# The SDK is reinstalled (non-editable) into each of them on every run.
#   - sdk-<hash>: sdk/python/requirements-dev.txt (pytest, ruff, mypy, the build backend): ruff,
#     mypy --strict and the SDK's tests (sdk/python/tests, without tests/frameworks).
#   - fw-<name>-<hash>: for every sdk/python/tests/frameworks/<name>/requirements.txt, pytest on that
#     directory. If the directory has an env.sh, it is sourced first (in a subshell).
# Tests run against target/debug/bulkhead ($BULKHEAD_BIN overrides), built here if it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SDK=$ROOT/sdk/python
# The MCP gateway's tests run on SQLite and on PostgreSQL (a fresh database on this server each).
export BULKHEAD_TEST_DATABASE_URL="${BULKHEAD_TEST_DATABASE_URL:-postgres://postgres:postgres@127.0.0.1:5432/postgres}"
# shellcheck source=scripts/python-venv.sh
source scripts/python-venv.sh

STAGE_START=0
stage() {
  echo
  echo "== $*"
  STAGE_START=$EPOCHREALTIME
}
stage_done() {
  python3 -c "import sys; print(f'   ({float(sys.argv[2]) - float(sys.argv[1]):.1f} s)')" "$STAGE_START" "$EPOCHREALTIME"
}

if [ -z "${BULKHEAD_BIN:-}" ] && [ ! -x target/debug/bulkhead ]; then
  stage "cargo build --bins (the tests run target/debug/bulkhead)"
  cargo build --bins --locked
  stage_done
fi

stage "Python SDK venv ($PY $PYVER)"
SDK_VENV=$(sdk_venv_path)
ensure_venv "$SDK_VENV" "$DEV_REQS"
install_sdk "$SDK_VENV"
stage_done

cd "$SDK"
stage "ruff check"
"$SDK_VENV/bin/ruff" check --no-cache src tests bench
stage_done

stage "ruff format --check"
"$SDK_VENV/bin/ruff" format --check --no-cache src tests bench
stage_done

stage "mypy --strict"
"$SDK_VENV/bin/mypy" --strict --cache-dir="$SDK_VENV/.mypy_cache" src/bulkhead
stage_done

stage "pytest sdk/python/tests (the SDK against a real bulkhead serve)"
"$SDK_VENV/bin/python" -m pytest -p no:cacheprovider tests --ignore=tests/frameworks
stage_done

shopt -s nullglob
for reqs in "$SDK"/tests/frameworks/*/requirements.txt; do
  dir=$(dirname "$reqs")
  name=$(basename "$dir")
  stage "framework $name: venv"
  venv="$CACHE/fw-$name-$(key_of "$reqs")"
  ensure_venv "$venv" "$reqs"
  install_sdk "$venv"
  stage_done
  stage "framework $name: pytest sdk/python/tests/frameworks/$name"
  (
    cd "$SDK"
    if [ -f "$dir/env.sh" ]; then
      # shellcheck disable=SC1091
      source "$dir/env.sh"
    fi
    "$venv/bin/python" -m pytest -p no:cacheprovider "tests/frameworks/$name"
  )
  stage_done
done
echo
echo "== Python: every stage passed"
