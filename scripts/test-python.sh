#!/usr/bin/env bash
# The Python SDK's checks and tests, then every framework integration's tests, each in its own venv.
#
#   bash scripts/test-python.sh
#
# Venvs live under ${XDG_CACHE_HOME:-~/.cache}/bulkhead/venvs, one per requirements file (keyed by
# a hash of it, the SDK's pyproject.toml and the Python version) and are built only when missing.
# The SDK is reinstalled (non-editable) into each of them on every run.
#   - sdk-<hash>: sdk/python/requirements-dev.txt (pytest, ruff, mypy, the build backend): ruff,
#     mypy --strict and the SDK's tests (sdk/python/tests, without tests/frameworks).
#   - fw-<name>-<hash>: for every sdk/python/tests/frameworks/<name>/requirements.txt, pytest on that
#     directory. If the directory has an env.sh, it is sourced first (in a subshell).
# Tests run against target/debug/bulkhead ($BULKHEAD_BIN overrides); build it first.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SDK=$ROOT/sdk/python
PY=${PYTHON:-python3}
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/bulkhead/venvs"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PYTHONDONTWRITEBYTECODE=1
mkdir -p "$CACHE"

PYVER=$("$PY" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])')
DEV_REQS=$SDK/requirements-dev.txt

key_of() { # files... -> a short hash of their contents, the SDK's pyproject.toml and the Python version
  { echo "$PYVER"; cat "$@" "$SDK/pyproject.toml"; } | sha256sum | cut -c1-12
}

STAGE_START=0
stage() {
  echo
  echo "== $*"
  STAGE_START=$EPOCHREALTIME
}
stage_done() {
  python3 -c "import sys; print(f'   ({float(sys.argv[2]) - float(sys.argv[1]):.1f} s)')" "$STAGE_START" "$EPOCHREALTIME"
}

pin_of() { # package -> its pinned line in requirements-dev.txt
  grep -E "^$1==" "$DEV_REQS"
}

ensure_venv() { # dir requirements-file -> builds the venv when missing; .complete marks a finished build
  local dir=$1 reqs=$2
  exec 9>"$dir.lock"
  flock 9 # another run building the same venv: wait for it
  if [ -f "$dir/.complete" ] && [ -x "$dir/bin/python" ]; then
    echo "   reusing $dir"
  else
    echo "   building $dir"
    rm -rf "$dir"
    "$PY" -m venv "$dir"
    "$dir/bin/python" -m pip install -q --upgrade pip
    "$dir/bin/python" -m pip install -q -r "$reqs" "$(pin_of hatchling)"
    # The SDK's own dependencies, so that each run can reinstall it with --no-deps.
    "$dir/bin/python" -m pip install -q "$SDK"
    "$dir/bin/python" -m pytest --version >/dev/null 2>&1 || "$dir/bin/python" -m pip install -q "$(pin_of pytest)"
    touch "$dir/.complete"
  fi
  exec 9>&-
}

install_sdk() { # venv -> the SDK from the working tree, non-editable, rebuilt every run
  "$1/bin/python" -m pip install -q --no-deps --no-build-isolation --force-reinstall "$SDK"
}

stage "Python SDK venv ($PY $PYVER)"
SDK_VENV="$CACHE/sdk-$(key_of "$DEV_REQS")"
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
"$SDK_VENV/bin/mypy" --strict --cache-dir=/dev/null src/bulkhead
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
