#!/usr/bin/env bash
# Charges per second through the ledger's public charge endpoint, on SQLite and PostgreSQL,
# 1 and 100 customers, 1 (sequential) and 16 concurrent clients. Writes bench/results/charges.json
# and prints a Markdown table. Needs PostgreSQL at 127.0.0.1:5432 (trust auth), as on this machine.
#   bench/charges.sh [seconds per run, default 5]
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-5}
mkdir -p bench/results
cargo build --quiet --release -p ledger --bin credits-ledger --example charge_bench
work=$(mktemp -d)
pgdb="charge_bench_$$"
psql -q -h 127.0.0.1 -U postgres -c "CREATE DATABASE $pgdb" >/dev/null
cleanup() { psql -q -h 127.0.0.1 -U postgres -c "DROP DATABASE IF EXISTS $pgdb WITH (FORCE)" >/dev/null; rm -rf "$work"; }
trap cleanup EXIT
out=bench/results/charges.json
echo "[" > "$out"
first=true
for backend in sqlite postgres; do
  for customers in 1 100; do
    for clients in 1 16; do
      case $backend in
        sqlite) db="sqlite://$work/bench-$customers-$clients.db" ;;
        postgres) db="postgres://postgres@127.0.0.1:5432/$pgdb" ;;
      esac
      line=$(target/release/examples/charge_bench --ledger target/release/credits-ledger --database "$db" \
        --customers "$customers" --clients "$clients" --seconds "$seconds")
      $first || echo "," >> "$out"
      first=false
      echo "$line" >> "$out"
      echo "$line" >&2
    done
  done
done
echo "]" >> "$out"
python3 - "$out" <<'PY'
import json, sys
rows = json.load(open(sys.argv[1]))
print("| backend | customers | clients | charges/s | p50 ms | p99 ms | failed |")
print("|---|---:|---:|---:|---:|---:|---:|")
for r in rows:
    print(f"| {r['backend']} | {r['customers']} | {r['clients']} | {r['charges_per_second']:.0f} | {r['p50_ms']} | {r['p99_ms']} | {r['failed']} |")
PY
