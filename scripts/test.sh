#!/usr/bin/env bash
# The whole test suite: formatting, lints, and every Rust test on SQLite and PostgreSQL.
# Starts (or installs) PostgreSQL when it is missing, so it works on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."

# With trust auth the password is ignored; on a fresh install we set it, so one URL fits both.
export BULKHEAD_TEST_PG="${BULKHEAD_TEST_PG:-postgres://postgres:postgres@127.0.0.1:5432/postgres}"

ensure_postgres() {
  if command -v pg_isready >/dev/null && pg_isready -q -h 127.0.0.1 -p 5432; then
    return
  fi
  echo "== PostgreSQL is not answering on 127.0.0.1:5432; starting it"
  if ! ls /etc/postgresql/*/main >/dev/null 2>&1; then
    echo "== installing PostgreSQL"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq postgresql >/dev/null
  fi
  local version
  version=$(ls /etc/postgresql | sort -V | tail -n 1)
  pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  for _ in $(seq 1 60); do
    pg_isready -q -h 127.0.0.1 -p 5432 && break
    sleep 1
  done
  pg_isready -h 127.0.0.1 -p 5432
  su postgres -c "psql -q -c \"ALTER USER postgres PASSWORD 'postgres'\"" || true
}

ensure_postgres
# Drop throwaway databases left by earlier runs.
psql "$BULKHEAD_TEST_PG" -qAt -c "SELECT datname FROM pg_database WHERE datname LIKE 'bh\_t\_%'" |
  while read -r db; do psql "$BULKHEAD_TEST_PG" -q -c "DROP DATABASE IF EXISTS \"$db\"" || true; done
echo "== cargo fmt --check"
cargo fmt --all --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo test (SQLite and PostgreSQL)"
cargo test --workspace --locked
echo "== Python SDK and framework integrations"
bash scripts/test-python.sh
