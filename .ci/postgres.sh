#!/usr/bin/env bash
# Install (from Debian's packages, if missing) and start PostgreSQL, idempotently, and make
# the role the tests use. Prints the URL the tests read from WEFT_TEST_POSTGRES_URL.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
  echo "installing postgresql from Debian's packages..." >&2
  apt-get update -qq >&2
  apt-get install -y -qq postgresql >&2
fi
ver=$(ls /usr/lib/postgresql | sort -V | tail -n1)
if ! pg_lsclusters -h 2>/dev/null | grep -q "^$ver main"; then
  pg_createcluster "$ver" main >&2
fi
if ! pg_isready -q -h 127.0.0.1 -p 5432; then
  pg_ctlcluster "$ver" main start >&2
fi
for _ in $(seq 1 60); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 0.5; done
pg_isready -h 127.0.0.1 -p 5432 >&2
su postgres -c "psql -qtAc \"SELECT 1 FROM pg_roles WHERE rolname='weft'\"" | grep -q 1 ||
  su postgres -c "psql -qc \"CREATE ROLE weft LOGIN PASSWORD 'weft' CREATEDB\"" >&2
echo "postgres://weft:weft@127.0.0.1:5432/postgres"
