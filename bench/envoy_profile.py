#!/usr/bin/env python3
"""Where Envoy's CPU goes per call, in cases e (no-op Wasm filter), p (bench/floor-filter making
prepaid_credits' ten host calls and none of its decisions), b (prepaid_credits, one customer) and c
(prepaid_credits, 10,000 subjects at random, defaults) of bench/gateway.py: `perf record`
(software clock, every thread of the Envoy) during each measured run, split by where the samples
fall — the Wasm code V8 compiled (the filter itself and V8's stubs for it: anonymous executable
memory), the Envoy binary (HTTP, the proxy-wasm host side of every host call, V8's runtime and
garbage collector: the binary is stripped, so no finer), libc, the kernel — and each share turned
into µs per call with the run's CPU per call (/proc). The differences b − e and c − b are what the
filter and its many customers cost, and where; p − e is what its host calls cost by themselves,
b − p what its own code costs beyond them.

  python3 bench/envoy_profile.py [--seconds 8] [--rounds 2] [--connections 16] [--baseline WASM]

With --baseline (an earlier prepaid_credits.wasm), cases B and C run it beside b and c in every
round, and the differences b − B and c − C say where a change moved the CPU.

Build first (as bench/gateway.sh does). Needs perf (Debian's linux-perf; software events suffice).
Writes bench/results/envoy-profile.json.
"""

import argparse
import collections
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import gateway as g

BUCKETS = ["wasm (JIT)", "envoy binary", "libc", "kernel", "other"]


def bucket(dso):
    if dso == "[kernel.kallsyms]" or dso.startswith("[kernel"):
        return "kernel"
    if dso.startswith("libc") or dso.startswith("libm") or dso.startswith("libpthread"):
        return "libc"
    if dso.startswith("[JIT]") or dso in ("[unknown]", "//anon", "[anon]") or dso.startswith("perf-"):
        return "wasm (JIT)"
    if dso == "envoy" or dso.endswith("/envoy"):
        return "envoy binary"
    return "other"


def samples_by_dso(data):
    out = subprocess.run(["perf", "report", "-i", data, "--stdio", "--sort", "dso", "-F", "sample,dso", "-q"],
                         capture_output=True, text=True, check=True).stdout
    counts = {}
    for line in out.splitlines():
        m = re.match(r"^\s*(\d+)\s+(.+?)\s*$", line)
        if m:
            counts[m.group(2)] = counts.get(m.group(2), 0) + int(m.group(1))
    return counts


def profiled_run(envoy, ledger_pid, a, script, data):
    perf = subprocess.Popen(["perf", "record", "-q", "-e", "cpu-clock", "-F", "4000", "-p", str(envoy.proc.pid),
                             "-o", data], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    try:
        r = g.measure(envoy, ledger_pid, a.seconds, a.connections, "payer0", script)
    finally:
        perf.send_signal(signal.SIGINT)
        perf.wait(timeout=30)
    return r, samples_by_dso(data)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--baseline", help="an earlier prepaid_credits.wasm, run as cases B and C")
    ap.add_argument("--out", default=os.path.join(g.ROOT, "bench/results/envoy-profile.json"))
    a = ap.parse_args()
    signal.signal(signal.SIGTERM, g.on_signal)
    signal.signal(signal.SIGINT, g.on_signal)
    envoy_bin = os.environ.get("ENVOY_BIN") or shutil.which("envoy")
    wasm = os.path.join(g.ROOT, "target/wasm32-wasip1/release")
    work = tempfile.mkdtemp(prefix="envoy-profile-")
    try:
        ledger, ledger_port = g.start_ledger(work)
        config = g.filter_config()
        credits = g.wasm_filter("prepaid_credits", f"{wasm}/prepaid_credits.wasm", config)
        cases = {"e": g.wasm_filter("noop_filter", f"{wasm}/noop_filter.wasm", None),
                 "p": g.wasm_filter("floor_filter", f"{wasm}/floor_filter.wasm", "prepaid"), "b": credits, "c": credits}
        script = {"c": os.path.join(g.ROOT, "bench/subjects.lua")}
        if a.baseline:
            cases["B"] = cases["C"] = g.wasm_filter("prepaid_credits", a.baseline, config)
            script["C"] = script["c"]
        envoys = {}
        for case, filters in cases.items():
            envoys[case] = g.Envoy(case, filters, ledger_port, work, envoy_bin)
            g.warm_up(envoys[case], a.connections, script.get(case), 10 if case in script else 90)
        totals = {case: {"calls": 0, "cpu_us": 0.0, "samples": collections.Counter()} for case in cases}
        for rnd in range(a.rounds):
            for case in cases:
                g.wrk(f"http://127.0.0.1:{envoys[case].port}/", g.PRELOAD_SECONDS, a.connections, "payer0",
                      script.get(case))
                r, counts = profiled_run(envoys[case], ledger.pid, a, script.get(case), f"{work}/{case}-{rnd}.data")
                t = totals[case]
                t["calls"] += r["requests"]
                t["cpu_us"] += r["envoy_cpu_us_per_call"] * r["requests"]
                t["samples"].update(counts)
                print(f"round {rnd + 1} case {case}: {r['rps']:.0f} req/s, {r['envoy_cpu_us_per_call']:.1f} µs "
                      f"CPU/call, {sum(counts.values())} samples", file=sys.stderr)
        results = {}
        for case, t in totals.items():
            cpu = t["cpu_us"] / max(t["calls"], 1)
            n = max(sum(t["samples"].values()), 1)
            split = collections.Counter()
            for dso, s in t["samples"].items():
                split[bucket(dso)] += s
            results[case] = {
                "envoy_cpu_us_per_call": cpu,
                "us_per_call": {b: cpu * split[b] / n for b in BUCKETS},
                "samples": n,
                "top_dsos": dict(t["samples"].most_common(8)),
            }
        diff = {f"{x} - {y}": {b: results[x]["us_per_call"][b] - results[y]["us_per_call"][b] for b in BUCKETS}
                for x, y in (("b", "e"), ("p", "e"), ("b", "p"), ("c", "b"), ("b", "B"), ("c", "C")) if y in results}
        doc = {"benchmark": "envoy-profile", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "seconds": a.seconds, "rounds": a.rounds, "connections": a.connections,
               "baseline_wasm": a.baseline, "load_average_at_end": os.getloadavg(), "cases": results,
               "differences": diff}
        with open(a.out, "w") as f:
            json.dump(doc, f, indent=1)
        print("| µs of Envoy CPU per call | " + " | ".join(BUCKETS) + " | all |")
        print("|---|" + "---:|" * (len(BUCKETS) + 1))
        for case, r in results.items():
            print(f"| {case} | " + " | ".join(f"{r['us_per_call'][b]:.1f}" for b in BUCKETS)
                  + f" | {r['envoy_cpu_us_per_call']:.1f} |")
        for name, d in diff.items():
            print(f"| {name} | " + " | ".join(f"{d[b]:+.1f}" for b in BUCKETS) + f" | {sum(d.values()):+.1f} |")
    finally:
        g.stop_children()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
