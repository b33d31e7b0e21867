#!/usr/bin/env python3
"""Where Envoy's CPU goes per call, in cases e (no-op Wasm filter), p (bench/floor-filter making
prepaid_credits' seven host calls and none of its decisions), b (prepaid_credits, one customer) and c
(prepaid_credits, 10,000 subjects at random, defaults) of bench/gateway.py: `perf record`
(software clock, every thread of the Envoy) during each measured run, split by where the samples
fall — the Wasm code V8 compiled (the filter itself and V8's stubs for it: anonymous executable
memory), the Envoy binary (HTTP, the proxy-wasm host side of every host call, V8's runtime and
garbage collector: the binary is stripped, so no finer), libc, the kernel — and each share turned
into µs per call with the run's CPU per call (/proc). The differences b − e and c − b are what the
filter and its many customers cost, and where; p − e is what its host calls cost by themselves,
b − p what its own code costs beyond them. Case q (p's host calls on c's 10,000 subjects) splits c − b
into the engine's side of many customers (q − p) and the filter's (c − q against b − p).

  python3 bench/envoy_profile.py [--seconds 8] [--rounds 2] [--connections 16] [--baseline WASM]

With --baseline (an earlier prepaid_credits.wasm), cases B and C run it beside b and c in every
round, and the differences b − B and c − C say where a change moved the CPU.

Builds what it runs (as bench/gateway.py does). Needs perf (Debian's linux-perf; software events suffice).
Writes bench/results/envoy-profile.json.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time

import gateway as g
import perf_split

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
    r = perf_split.recorded(envoy.proc.pid, data,
                            lambda: g.measure(envoy, ledger_pid, a.seconds, a.connections, "payer0", script))
    return r, samples_by_dso(data)


def main():
    ap = perf_split.arguments("envoy-profile.json")
    ap.add_argument("--baseline", help="an earlier prepaid_credits.wasm, run as cases B and C")
    a = ap.parse_args()
    signal.signal(signal.SIGTERM, g.on_signal)
    signal.signal(signal.SIGINT, g.on_signal)
    g.build()
    envoy_bin = os.environ.get("ENVOY_BIN") or shutil.which("envoy")
    wasm = os.path.join(g.ROOT, "target/wasm32-wasip1/release")
    work = tempfile.mkdtemp(prefix="envoy-profile-")
    try:
        ledger, ledger_port = g.start_ledger(work)
        config = g.filter_config()
        credits = g.wasm_filter("prepaid_credits", f"{wasm}/prepaid_credits.wasm", config)
        cases = {"e": g.wasm_filter("noop_filter", f"{wasm}/noop_filter.wasm", None),
                 "p": g.wasm_filter("floor_filter", f"{wasm}/floor_filter.wasm", "prepaid"), "b": credits, "c": credits}
        # q: p's seven host calls on c's 10,000 entries, so that c − b splits into the engine's
        # side of many customers (q − p) and the filter's (c − b − (q − p)).
        cases["q"] = cases["p"]
        script = {case: os.path.join(g.ROOT, "bench/subjects.lua") for case in "cq"}
        if a.baseline:
            cases["B"] = cases["C"] = g.wasm_filter("prepaid_credits", a.baseline, config)
            script["C"] = script["c"]
        envoys = {}
        for case, filters in cases.items():
            envoys[case] = g.Envoy(case, filters, ledger_port, work, envoy_bin)
            g.warm_up(envoys[case], a.connections, script.get(case), 10 if case in script else 90)

        def run(case, rnd):
            return profiled_run(envoys[case], ledger.pid, a, script.get(case), f"{work}/{case}-{rnd}.data")

        totals = perf_split.rounds(cases, a, lambda case: envoys[case].port, script.get, run, "envoy_cpu_us_per_call")
        results = perf_split.split(totals, BUCKETS, bucket, "envoy_cpu_us_per_call")
        for case, r in results.items():
            r["top_dsos"] = dict(totals[case].samples.most_common(8))
        diff = perf_split.differences(results, (("b", "e"), ("p", "e"), ("b", "p"), ("c", "b"), ("q", "p"), ("c", "q"), ("b", "B"), ("c", "C")),
                                      BUCKETS)
        doc = {"benchmark": "envoy-profile", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "seconds": a.seconds, "rounds": a.rounds, "connections": a.connections,
               "baseline_wasm": a.baseline, "load_average_at_end": os.getloadavg(), "cases": results,
               "differences": diff}
        with open(a.out, "w") as f:
            json.dump(doc, f, indent=1)
        perf_split.print_table("Envoy", results, diff, BUCKETS, "envoy_cpu_us_per_call")
    finally:
        g.stop_children()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
