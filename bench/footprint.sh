#!/usr/bin/env bash
# Footprint of the filter: .wasm size as built and after wasm-opt (binaryen from the npm registry,
# run with npx into a temporary directory; -O3 and -Oz), gzipped; and the shared-data size of one
# cached customer (key + encoded CustomerEntry, from bench/decide-profile). Memory per Envoy worker
# comes from bench/gateway.sh (RSS of each case's Envoy after warm-up). Writes
# bench/results/footprint.json and bench/results/footprint.png.
#   bench/footprint.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --quiet --release --target wasm32-wasip1 -p prepaid-credits -p noop-filter
# The same build as bench/profile.sh (release with symbols), so neither rebuilds for the other.
cargo build --quiet -p decide-profile --profile profiling \
  --config 'profile.profiling.inherits="release"' --config 'profile.profiling.debug="line-tables-only"' \
  --config 'profile.profiling.strip=false'
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
wasm=target/wasm32-wasip1/release
(cd "$work" && npm install --silent --no-audit --no-fund binaryen@132 >/dev/null)
wasm_opt="$work/node_modules/.bin/wasm-opt"
"$wasm_opt" --version >&2
for level in O3 Oz; do
  # The features rustc enables for wasm32-wasip1 (the stripped module no longer lists them).
  "$wasm_opt" "-$level" --enable-bulk-memory --enable-bulk-memory-opt --enable-sign-ext --enable-mutable-globals \
    --enable-nontrapping-float-to-int --enable-multivalue --enable-reference-types \
    "$wasm/prepaid_credits.wasm" -o "$work/prepaid_credits.$level.wasm" 2> "$work/wasm-opt.log" ||
    { tail -5 "$work/wasm-opt.log" >&2; exit 1; }
done
size() { stat -c %s "$1"; }
gz() { gzip -9 -c "$1" | wc -c; }
entry=$(target/profiling/decide-profile 1000 1)
python3 - "$entry" <<PY
import json, sys
entry = json.loads(sys.argv[1])
doc = {
  "benchmark": "footprint",
  "wasm_opt": "$("$wasm_opt" --version)",
  "prepaid_credits_wasm_bytes": $(size "$wasm/prepaid_credits.wasm"),
  "prepaid_credits_wasm_gzip_bytes": $(gz "$wasm/prepaid_credits.wasm"),
  "wasm_opt_O3_bytes": $(size "$work/prepaid_credits.O3.wasm"),
  "wasm_opt_O3_gzip_bytes": $(gz "$work/prepaid_credits.O3.wasm"),
  "wasm_opt_Oz_bytes": $(size "$work/prepaid_credits.Oz.wasm"),
  "wasm_opt_Oz_gzip_bytes": $(gz "$work/prepaid_credits.Oz.wasm"),
  "noop_filter_wasm_bytes": $(size "$wasm/noop_filter.wasm"),
  "shared_entry_key_bytes": entry["entry_key_bytes"],
  "shared_entry_value_bytes": entry["entry_bytes_after_run"],
}
json.dump(doc, open("bench/results/footprint.json", "w"), indent=1)
print(json.dumps(doc, indent=1))
PY
python3 bench/chart.py footprint
