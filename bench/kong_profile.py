#!/usr/bin/env python3
"""Where nginx's CPU goes per call on Kong's Wasm engine (nginx + ngx_wasm_module + Wasmtime), in
cases E (no-op Wasm filter), P (bench/floor-filter making prepaid_credits' ten host calls and none
of its decisions), B (prepaid_credits, one customer) and C (10,000 subjects at random, defaults) of
bench/kong.py: `perf record` (software clock) of the gateway's worker during each measured run,
split by where the samples fall — the filter's code Wasmtime compiled (named through Wasmtime's
perf map), the Wasmtime runtime linked into nginx (its trampolines, libcalls, instance and store
code), ngx_wasm_module (the host side of every proxy-wasm call), the rest of nginx, libc, the
kernel — and each share turned into µs per call with the run's CPU per call (/proc). b − p is what
the filter's own code costs beyond its host calls, p − e what its host calls cost, and the top
symbols of each case say where inside each part. The Envoy counterpart is bench/envoy_profile.py.

  NGX_WASM_NGINX=<nginx> python3 bench/kong_profile.py [--seconds 8] [--rounds 2] [--connections 16]

Build first (as bench/kong.py says). Needs perf (Debian's linux-perf) and an nginx built with
symbols (../shared/tools/build-kong-engine.sh builds with -g). Writes bench/results/kong-profile.json.
"""

import argparse
import collections
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

import gateway as g
import kong

BUCKETS = ["wasm (JIT)", "wasmtime runtime", "ngx_wasm_module", "nginx", "libc", "kernel", "other"]
CASES = "EPBC"
WASM_MODULE_PREFIXES = ("ngx_proxy_wasm", "ngx_wasm", "ngx_wavm", "ngx_wa_", "ngx_wrt", "ngx_http_wasm",
                        "ngx_http_proxy_wasm")


def bucket(dso, sym):
    if dso.startswith("[kernel"):
        return "kernel"
    if dso.startswith(("libc", "libm", "libpthread", "ld-linux")):
        return "libc"
    if dso.startswith(("[JIT]", "perf-")) or dso in ("[unknown]", "//anon", "[anon]"):
        return "wasm (JIT)"
    if dso == "nginx":
        if sym.startswith(WASM_MODULE_PREFIXES):
            return "ngx_wasm_module"
        if sym.startswith("ngx_"):
            return "nginx"
        return "wasmtime runtime"
    return "other"


def samples_by_symbol(data):
    out = subprocess.run(["perf", "report", "-i", data, "--stdio", "--sort", "dso,sym", "-F", "sample,dso,sym",
                          "-q", "-t", "|"], capture_output=True, text=True, check=True).stdout
    counts = collections.Counter()
    for line in out.splitlines():
        fields = [f.strip() for f in line.split("|", 2)]
        if len(fields) == 3 and fields[0].isdigit():
            # "[JIT] tid 123" names the code Wasmtime compiled: one name for all of it.
            dso = "[JIT]" if fields[1].startswith("[JIT]") else fields[1]
            counts[(dso, re.sub(r"^\[.\]\s*", "", fields[2]))] += int(fields[0])
    return counts


def perf_maps(gw):
    """The perf maps naming the gateway's compiled Wasm: Wasmtime writes the master's, which compiles
    the modules before it forks the worker, so the worker's is a link to it."""
    master, worker = gw.pids()[:2]
    return f"/tmp/perf-{master}.map", f"/tmp/perf-{worker}.map"


def profiled_run(gw, ledger_pid, a, script, data):
    master_map, worker_map = perf_maps(gw)
    if not os.path.exists(worker_map) and os.path.exists(master_map):
        os.symlink(master_map, worker_map)
    worker = gw.pids()[1]
    perf = subprocess.Popen(["perf", "record", "-q", "-e", "cpu-clock", "-F", "4000", *(["-g"] if a.call_graph else []),
                             "-p", str(worker), "-o", data],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    try:
        r = kong.measure(gw, ledger_pid, a.seconds, a.connections, script)
    finally:
        perf.send_signal(signal.SIGINT)
        perf.wait(timeout=30)
    return r, samples_by_symbol(data)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--call-graph", action="store_true", help="record call graphs (perf -g) to read afterwards "
                    "with BENCH_KEEP_WORK=1")
    ap.add_argument("--top", type=int, default=12, help="symbols listed per case")
    ap.add_argument("--out", default=os.path.join(g.ROOT, "bench/results/kong-profile.json"))
    a = ap.parse_args()
    nginx_bin = os.environ.get("NGX_WASM_NGINX") or sys.exit("NGX_WASM_NGINX must name the engine's nginx")
    signal.signal(signal.SIGTERM, g.on_signal)
    signal.signal(signal.SIGINT, g.on_signal)
    wasm = os.path.join(g.ROOT, "target/wasm32-wasip1/release")
    work = tempfile.mkdtemp(prefix="kong-profile-")
    gws = {}
    try:
        ledger, ledger_port = g.start_ledger(work)
        upstream = kong.Nginx("upstream", nginx_bin, work, '            return 200 "ok";', None, [], 1)
        modules, cases, script = kong.gateway_cases(wasm, ledger_port)
        for case in CASES:
            gws[case] = kong.Nginx(case, nginx_bin, work, kong.proxied(cases[case][1]), upstream.port, modules, 0,
                                   wasmtime_flags=[("profiler", "perfmap")])
            g.wrk(f"http://127.0.0.1:{gws[case].port}/", 10 if case == "C" else 5, a.connections, "payer0",
                  script.get(case))
            if case != "E":
                g.answers_with(f"http://127.0.0.1:{gws[case].port}/", "x-credits-balance")
        totals = {case: {"calls": 0, "cpu_us": 0.0, "samples": collections.Counter()} for case in CASES}
        for rnd in range(a.rounds):
            for case in CASES:
                g.wrk(f"http://127.0.0.1:{gws[case].port}/", g.PRELOAD_SECONDS, a.connections, "payer0",
                      script.get(case))
                r, counts = profiled_run(gws[case], ledger.pid, a, script.get(case), f"{work}/{case}-{rnd}.data")
                t = totals[case]
                t["calls"] += r["requests"]
                t["cpu_us"] += r["gateway_cpu_us_per_call"] * r["requests"]
                t["samples"].update(counts)
                print(f"round {rnd + 1} case {case}: {r['rps']:.0f} req/s, {r['gateway_cpu_us_per_call']:.1f} µs "
                      f"CPU/call, {sum(counts.values())} samples", file=sys.stderr)
        results = {}
        for case, t in totals.items():
            cpu = t["cpu_us"] / max(t["calls"], 1)
            n = max(sum(t["samples"].values()), 1)
            split = collections.Counter()
            for (dso, sym), s in t["samples"].items():
                split[bucket(dso, sym)] += s
            results[case] = {
                "gateway_cpu_us_per_call": cpu,
                "us_per_call": {b: cpu * split[b] / n for b in BUCKETS},
                "samples": n,
                "top_symbols": [{"dso": dso, "symbol": sym, "bucket": bucket(dso, sym), "us_per_call": cpu * s / n}
                                for (dso, sym), s in t["samples"].most_common(a.top)],
            }
        diff = {f"{x} - {y}": {b: results[x]["us_per_call"][b] - results[y]["us_per_call"][b] for b in BUCKETS}
                for x, y in (("B", "E"), ("P", "E"), ("B", "P"), ("C", "B"))}
        doc = {"benchmark": "kong-engine profile", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "seconds": a.seconds, "rounds": a.rounds, "connections": a.connections,
               "load_average_at_end": os.getloadavg(), "cases": results, "differences": diff}
        with open(a.out, "w") as f:
            json.dump(doc, f, indent=1)
        print("| µs of nginx worker CPU per call | " + " | ".join(BUCKETS) + " | all |")
        print("|---|" + "---:|" * (len(BUCKETS) + 1))
        for case, r in results.items():
            print(f"| {case} | " + " | ".join(f"{r['us_per_call'][b]:.1f}" for b in BUCKETS)
                  + f" | {r['gateway_cpu_us_per_call']:.1f} |")
        for name, d in diff.items():
            print(f"| {name} | " + " | ".join(f"{d[b]:+.1f}" for b in BUCKETS) + f" | {sum(d.values()):+.1f} |")
        for case, r in results.items():
            print(f"\ncase {case}, top symbols (µs per call):")
            for s in r["top_symbols"]:
                print(f"  {s['us_per_call']:5.2f}  {s['bucket']:<17} {s['symbol'][:110]}")
    finally:
        maps = [m for gw in gws.values() for m in perf_maps(gw)]
        g.stop_children()
        g.remove_work(work)
        for m in maps:
            if os.path.lexists(m):
                os.remove(m)


if __name__ == "__main__":
    main()
