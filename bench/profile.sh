#!/usr/bin/env bash
# Instruction counts of the filter's per-call decision (native, callgrind): the steady state of
# gateway case b (one customer on a warm lease) and case c (10,000 subjects), measured inside
# bench/decide-profile's run_calls only (setup excluded). Instructions, not seconds: repeatable
# whatever else the machine does. Writes bench/results/profile.json, the annotated top functions
# in bench/results/profile-*.txt, and bench/results/profile.png.
#   bench/profile.sh [calls, default 200000]
# Builds with a 'profiling' profile (release + symbols) into target/profiling; needs valgrind.
set -euo pipefail
cd "$(dirname "$0")/.."
calls=${1:-200000}
cargo build --quiet -p decide-profile --profile profiling \
  --config 'profile.profiling.inherits="release"' --config 'profile.profiling.debug="line-tables-only"' \
  --config 'profile.profiling.strip=false'
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p bench/results
for run in "b-1-subject:1" "c-10k-subjects:10000"; do
  name=${run%%:*}
  subjects=${run##*:}
  valgrind --tool=callgrind --toggle-collect='*run_calls*' --callgrind-out-file="$work/$name.out" \
    target/profiling/decide-profile "$calls" "$subjects" > "$work/$name.json" 2>/dev/null
  callgrind_annotate --threshold=99 "$work/$name.out" > "bench/results/profile-$name.txt"
  callgrind_annotate --inclusive=yes --threshold=99 "$work/$name.out" > "$work/$name-inclusive.txt"
done
python3 - "$work" "$calls" <<'PY'
import json, re, sys
work, calls = sys.argv[1], int(sys.argv[2])
line = re.compile(r"^\s*([\d,]+)\s+\(\s*[\d.]+%\)\s+(.*?)\s*(\[.*\])?$")
def rows(path):
    out = []
    for l in open(path):
        m = line.match(l)
        if m and ":" in m.group(2):
            out.append({"function": m.group(2).split(":", 1)[1].strip(), "instructions_per_call": int(m.group(1).replace(",", "")) / calls})
    return out
def total(path):
    for l in open(path):
        m = re.match(r"^\s*([\d,]+)\s+\(100.0%\)\s+PROGRAM TOTALS", l)
        if m:
            return int(m.group(1).replace(",", ""))
runs = []
for name in ["b-1-subject", "c-10k-subjects"]:
    info = json.load(open(f"{work}/{name}.json"))
    tot = total(f"bench/results/profile-{name}.txt")
    runs.append({"name": name, **info, "instructions_per_call": tot / calls,
                 "top": rows(f"bench/results/profile-{name}.txt")[:25],
                 "top_inclusive": rows(f"{work}/{name}-inclusive.txt")[:40]})
json.dump({"benchmark": "profile", "calls": calls, "runs": runs}, open("bench/results/profile.json", "w"), indent=1)
for r in runs:
    print(f"\n{r['name']}: {r['instructions_per_call']:.0f} instructions per call; shared-data entry {r['entry_bytes_after_run']} bytes + key {r['entry_key_bytes']}")
    print("| self instructions/call | function |\n|---:|---|")
    for t in r["top"][:15]:
        print(f"| {t['instructions_per_call']:.0f} | `{t['function'][:110]}` |")
PY
python3 bench/chart.py profile
