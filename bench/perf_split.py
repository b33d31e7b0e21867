"""What bench/envoy_profile.py and bench/kong_profile.py share: `perf` samples of a gateway summed
over a case's runs, split into buckets (where the samples fall) and turned into µs of CPU per call
with the runs' measured CPU per call."""

import argparse
import collections
import os
import signal
import subprocess
import sys
import time

import gateway as g


def arguments(out):
    """The options both profiles take; each adds its own."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--out", default=os.path.join(g.ROOT, "bench/results", out))
    return ap


def recorded(pid, data, measure, call_graph=False):
    """Runs `measure()` while `perf record` samples process `pid` (software clock, 4 kHz) into
    `data`; returns what `measure` returned."""
    perf = subprocess.Popen(["perf", "record", "-q", "-e", "cpu-clock", "-F", "4000", *(["-g"] if call_graph else []),
                             "-p", str(pid), "-o", data], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    try:
        return measure()
    finally:
        perf.send_signal(signal.SIGINT)
        perf.wait(timeout=30)


class Totals:
    """A case's calls, CPU and samples over all its runs (samples keyed as the profile reads them)."""

    def __init__(self):
        self.calls = 0
        self.cpu_us = 0.0
        self.samples = collections.Counter()

    def add(self, calls, cpu_us_per_call, samples):
        self.calls += calls
        self.cpu_us += cpu_us_per_call * calls
        self.samples.update(samples)


def rounds(cases, a, port_of, script_of, profiled_run, cpu_key):
    """`a.rounds` interleaved rounds over `cases`: each run preloaded as bench/gateway.py does, then
    `profiled_run(case, round)` → (the measurement, its samples); returns each case's Totals."""
    totals = {case: Totals() for case in cases}
    for rnd in range(a.rounds):
        for case in cases:
            g.wrk(f"http://127.0.0.1:{port_of(case)}/", g.PRELOAD_SECONDS, a.connections, "payer0", script_of(case))
            r, counts = profiled_run(case, rnd)
            totals[case].add(r["requests"], r[cpu_key], counts)
            print(f"round {rnd + 1} case {case}: {r['rps']:.0f} req/s, {r[cpu_key]:.1f} µs CPU/call, "
                  f"{sum(counts.values())} samples", file=sys.stderr)
    return totals


def split(totals, buckets, bucket_of, cpu_key):
    """Per case: its CPU per call (under `cpu_key`), that CPU split over `buckets` by each sample's
    `bucket_of(key)`, and its sample count."""
    results = {}
    for case, t in totals.items():
        cpu = t.cpu_us / max(t.calls, 1)
        n = max(sum(t.samples.values()), 1)
        by_bucket = collections.Counter()
        for key, s in t.samples.items():
            by_bucket[bucket_of(key)] += s
        results[case] = {cpu_key: cpu, "us_per_call": {b: cpu * by_bucket[b] / n for b in buckets}, "samples": n}
    return results


def differences(results, pairs, buckets):
    """`x - y` per bucket for each pair of cases that both ran."""
    return {f"{x} - {y}": {b: results[x]["us_per_call"][b] - results[y]["us_per_call"][b] for b in buckets}
            for x, y in pairs if x in results and y in results}


def print_table(what, results, diff, buckets, cpu_key, out=sys.stdout):
    print(f"| µs of {what} CPU per call | " + " | ".join(buckets) + " | all |", file=out)
    print("|---|" + "---:|" * (len(buckets) + 1), file=out)
    for case, r in results.items():
        print(f"| {case} | " + " | ".join(f"{r['us_per_call'][b]:.1f}" for b in buckets) + f" | {r[cpu_key]:.1f} |",
              file=out)
    for name, d in diff.items():
        print(f"| {name} | " + " | ".join(f"{d[b]:+.1f}" for b in buckets) + f" | {sum(d.values()):+.1f} |", file=out)
