#!/usr/bin/env bash
# The ledger's throughput on SQLite and PostgreSQL, 1 and 10,000 customers, with the latency of a
# balance read (GET …/credits/balance every 10 ms) under that load:
# - charges/s through the public charge endpoint (16 concurrent clients), and
# - usage records/s through the gateway's batched POST /v3/gateway/sync (4 clients = 4 gateway
#   nodes; a record is one usage range: one subject's calls since its node's last report; each
#   sync carries one range per subject, up to 1,000 subjects, 10 calls per range; the nodes send
#   the same customers in step, so a customer's ranges from all of them fold into one movement),
# - the same with each node meeting the customers in an order of its own (10,000 customers only;
#   `--node-customers shuffled`: nodes behind one load balancer; a range then books its own
#   movement, postings and index entry),
# - both of those with 32 nodes syncing back to back (10,000 customers only): the ledger under more
#   load than it can serve, in groups as large as `--sync-group-ms` allows,
# - the same with one subject per sync from 16 clients (10,000 customers only): cold reads, and
# - on PostgreSQL, 1,000-subject syncs spread over two ledger instances on the one database.
# Every run starts its own credits-ledger (crates/ledger/examples/ledger_bench.rs) and stops it;
# the PostgreSQL database is created for the run and dropped on exit. Needs PostgreSQL at
# 127.0.0.1:5432 (trust auth), as on this machine. Writes bench/results/ledger.json and
# bench/results/ledger.png, and prints a Markdown table.
#   bench/ledger.sh [seconds per run, default 5]
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-5}
mkdir -p bench/results
cargo build --quiet --release -p ledger --bin credits-ledger --example ledger_bench
work=$(mktemp -d)
pgdb="ledger_bench_$$"
psql -q -h 127.0.0.1 -U postgres -c "CREATE DATABASE $pgdb" >/dev/null
cleanup() { psql -q -h 127.0.0.1 -U postgres -c "DROP DATABASE IF EXISTS $pgdb WITH (FORCE)" >/dev/null; rm -rf "$work"; }
trap cleanup EXIT
out=bench/results/ledger.json
echo "[" > "$out"
first=true
for backend in sqlite postgres; do
  for customers in 1 10000; do
    for mode in charges sync shuffled sync32 shuffled32 reads sync2; do
      # reads: 16 nodes each sending one-subject syncs back to back (cold reads: a gateway
      # meeting many customers at once); the ledger serves those that wait together.
      # sync2: sync against two ledger instances on the one PostgreSQL database.
      # sync32, shuffled32: a fleet of 32 workers syncing back to back, which the ledger serves
      # in groups as large as --sync-group-ms allows (bench/RESULTS.md §0za).
      per_sync=1000 instances=1 warm=0 nodes=shared
      case $mode in
        charges) clients=16 ;;
        sync) clients=4 ;;
        shuffled) clients=4 nodes=shuffled ;;
        sync32) clients=32 ;;
        shuffled32) clients=32 nodes=shuffled ;;
        reads) clients=16 per_sync=1 ;;
        sync2) clients=4 instances=2 ;;
      esac
      # 1,000-subject syncs of 10,000 customers are measured after 30 s of the same load: the
      # journal's per-customer index must outgrow a commit before a range costs what it will
      # cost in a ledger that has booked for a while (bench/RESULTS.md §0k).
      [ "$customers" = 10000 ] && [ "$per_sync" = 1000 ] && [ "$mode" != charges ] && warm=30
      { [ "$mode" = reads ] || [ "$mode" = shuffled ] || [ "$mode" = sync32 ] || [ "$mode" = shuffled32 ]; } && [ "$customers" = 1 ] && continue
      [ "$mode" = sync2 ] && { [ "$backend" = sqlite ] || [ "$customers" = 1 ]; } && continue
      case $backend in
        sqlite) db="sqlite://$work/bench-$customers-$mode.db" ;;
        postgres) db="postgres://postgres@127.0.0.1:5432/$pgdb" ;;
      esac
      line=$(target/release/examples/ledger_bench --mode "$(case $mode in charges) echo charges ;; *) echo sync ;; esac)" \
        --ledger target/release/credits-ledger --database "$db" --customers "$customers" --clients "$clients" \
        --seconds "$seconds" --warm-seconds "$warm" --subjects-per-sync "$per_sync" --instances "$instances" \
        --node-customers "$nodes")
      $first || echo "," >> "$out"
      first=false
      echo "$line" >> "$out"
      echo "$line" >&2
    done
  done
done
echo "]" >> "$out"
python3 bench/chart.py ledger
