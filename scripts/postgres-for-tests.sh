#!/usr/bin/env bash
# Start the machine's PostgreSQL 15 cluster and create the test role and database
# (bqg/bqg, database bqg_test), idempotently. Needs root. The store tests use
# BQG_TEST_POSTGRES_URL, default postgresql+psycopg://bqg:bqg@127.0.0.1:5432/bqg_test.
set -euo pipefail
cd /  # runuser's postgres cannot enter a private working directory
if ! command -v pg_ctlcluster >/dev/null; then
  echo "postgres-for-tests: PostgreSQL is not installed (apt-get install postgresql)" >&2
  exit 1
fi
pg_ctlcluster 15 main status >/dev/null 2>&1 || pg_ctlcluster 15 main start
for _ in $(seq 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done
pg_isready -h 127.0.0.1 -p 5432
runuser -u postgres -- psql -q -v ON_ERROR_STOP=1 <<'SQL'
DO $$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'bqg') THEN
    CREATE ROLE bqg LOGIN PASSWORD 'bqg';
  END IF;
END $$;
SQL
if ! runuser -u postgres -- psql -tAc "SELECT 1 FROM pg_database WHERE datname = 'bqg_test'" | grep -q 1; then
  runuser -u postgres -- createdb -O bqg bqg_test
fi
