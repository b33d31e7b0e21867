#!/usr/bin/env bash
# Instruction counts of the filter's per-call decision (native, callgrind): the steady state of
# gateway case b (one customer on a warm lease) and case c (10,000 subjects), measured inside
# bench/decide-profile's run_calls only (setup excluded); then case c's worker tick (the sync
# built from 10,000 subjects' entries, the ledger's answer applied), measured inside tick_prepare
# and tick_apply with TICK_CALLS calls between ticks (case c's rate; the calls not measured).
# Instructions, not seconds: repeatable whatever else the machine does. Writes
# bench/results/profile.json, the annotated top functions in bench/results/profile-*.txt, and
# bench/results/profile.png.
#   bench/profile.sh [calls, default 200000]   (env TICK_CALLS, default 7000; TICKS, default 20)
# Builds with a 'profiling' profile (release + symbols) into target/profiling; needs valgrind.
set -euo pipefail
cd "$(dirname "$0")/.."
calls=${1:-200000}
tick_calls=${TICK_CALLS:-7000}
ticks=${TICKS:-20}
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
valgrind --tool=callgrind --toggle-collect='*tick_prepare*' --toggle-collect='*tick_apply*' \
  --callgrind-out-file="$work/c-ticks.out" \
  target/profiling/decide-profile "$tick_calls" 10000 "$ticks" > "$work/c-ticks.json" 2>/dev/null
callgrind_annotate --threshold=99 "$work/c-ticks.out" > bench/results/profile-c-ticks.txt
callgrind_annotate --inclusive=yes --threshold=99 "$work/c-ticks.out" > "$work/c-ticks-inclusive.txt"
python3 - "$work" "$calls" "$ticks" <<'PY'
import json, re, sys
work, calls, ticks = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
line = re.compile(r"^\s*([\d,]+)\s+\(\s*[\d.]+%\)\s+(.*?)\s*(\[.*\])?$")
def rows(path, per=calls):
    out = []
    for l in open(path):
        m = line.match(l)
        if m and ":" in m.group(2):
            out.append({"function": m.group(2).split(":", 1)[1].strip(), "instructions_per_call": int(m.group(1).replace(",", "")) / per})
    return out
def total(path):
    for l in open(path):
        m = re.match(r"^\s*([\d,]+)\s+\(100.0%\)\s+PROGRAM TOTALS", l)
        if m:
            return int(m.group(1).replace(",", ""))
def counts(path):
    # Wall-clock figures mean nothing under valgrind (bench/v8.mjs reads them under V8).
    return {k: v for k, v in json.load(open(path)).items() if k not in ("call_ns", "tick_us")}
runs = []
for name in ["b-1-subject", "c-10k-subjects"]:
    info = counts(f"{work}/{name}.json")
    tot = total(f"bench/results/profile-{name}.txt")
    runs.append({"name": name, **info, "instructions_per_call": tot / calls,
                 "top": rows(f"bench/results/profile-{name}.txt")[:25],
                 "top_inclusive": rows(f"{work}/{name}-inclusive.txt")[:40]})
info = counts(f"{work}/c-ticks.json")
per_tick = total("bench/results/profile-c-ticks.txt") / ticks
# A tick a second at the gateway's rate: what each call carries of it.
tick = {"name": "c-ticks", **info, "instructions_per_tick": per_tick,
        "instructions_per_call_at_tick_rate": per_tick / info["calls_between_ticks"],
        "top_per_tick": [{"function": t["function"], "instructions_per_tick": t["instructions_per_call"]}
                         for t in rows("bench/results/profile-c-ticks.txt", ticks)[:25]],
        "top_inclusive_per_tick": [{"function": t["function"], "instructions_per_tick": t["instructions_per_call"]}
                                   for t in rows(f"{work}/c-ticks-inclusive.txt", ticks)[:40]]}
json.dump({"benchmark": "profile", "calls": calls, "runs": runs, "tick": tick},
          open("bench/results/profile.json", "w"), indent=1)
for r in runs:
    print(f"\n{r['name']}: {r['instructions_per_call']:.0f} instructions per call; shared-data entry {r['entry_bytes_after_run']} bytes + key {r['entry_key_bytes']}")
    print("| self instructions/call | function |\n|---:|---|")
    for t in r["top"][:15]:
        print(f"| {t['instructions_per_call']:.0f} | `{t['function'][:110]}` |")
print(f"\nc-ticks: {tick['instructions_per_tick']:.0f} instructions per tick ({tick['subjects_synced'] / ticks:.0f} subjects "
      f"synced per tick), {tick['instructions_per_call_at_tick_rate']:.0f} per call at {tick['calls_between_ticks']} calls a tick")
print("| self instructions/tick | function |\n|---:|---|")
for t in tick["top_per_tick"][:15]:
    print(f"| {t['instructions_per_tick']:.0f} | `{t['function'][:110]}` |")
print("| inclusive instructions/tick | function |\n|---:|---|")
for t in tick["top_inclusive_per_tick"][:30]:
    print(f"| {t['instructions_per_tick']:.0f} | `{t['function'][:110]}` |")
PY
python3 bench/chart.py profile
