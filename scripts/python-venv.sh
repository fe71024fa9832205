# Sourced by scripts/test-python.sh and scripts/bench-python.sh (from the repository root): cached
# venvs for the Python SDK and the framework integrations' tests.
#
# A venv lives under ${XDG_CACHE_HOME:-~/.cache}/bulkhead/venvs, named by a hash of its
# requirements file, the SDK's dependencies (from its pyproject.toml) and the Python version; it is built only when
# missing (a .complete file marks a finished build; a lock keeps two runs from building it at once).

SDK=$PWD/sdk/python
PY=${PYTHON:-python3}
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/bulkhead/venvs"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PYTHONDONTWRITEBYTECODE=1
mkdir -p "$CACHE"

PYVER=$("$PY" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])')
DEV_REQS=$SDK/requirements-dev.txt

key_of() { # files... -> a short hash of their contents, the SDK's dependencies and the Python version
  # Only the pyproject lines that decide what gets installed (not, say, the linters' settings).
  { echo "$PYVER"; cat "$@"; grep -E '^(requires|dependencies|requires-python) *=' "$SDK/pyproject.toml"; } |
    sha256sum | cut -c1-12
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

sdk_venv_path() { # -> the SDK's venv (pytest, ruff, mypy, the build backend)
  echo "$CACHE/sdk-$(key_of "$DEV_REQS")"
}
