#!/usr/bin/env python3
"""Where nginx's CPU goes per call on Kong's Wasm engine (nginx + ngx_wasm_module + Wasmtime), in
cases E (no-op Wasm filter), P (bench/floor-filter making prepaid_credits' seven host calls and none
of its decisions), B (prepaid_credits, one customer), C (10,000 subjects at random, defaults) and Q
(P on C's 10,000 subjects: the engine's side of many customers) of bench/kong.py: `perf record` (software clock) of the gateway's worker during each measured run,
split by where the samples fall — the filter's code Wasmtime compiled (named through Wasmtime's
perf map), the Wasmtime runtime linked into nginx (its trampolines, libcalls, instance and store
code: every symbol of the binary not named ngx_*), ngx_wasm_module (the host side of every proxy-wasm call), the rest of nginx, libc, the
kernel — and each share turned into µs per call with the run's CPU per call (/proc). B − P is what
the filter's own code costs beyond its host calls, P − E what its host calls cost, and the top
symbols of each case say where inside each part. The Envoy counterpart is bench/envoy_profile.py.

  NGX_WASM_NGINX=<nginx> python3 bench/kong_profile.py [--seconds 8] [--rounds 2] [--connections 16] [--top 12]
      [--call-graph]   (perf -g; read the call graphs in the run's directory kept by BENCH_KEEP_WORK=1)

Builds what it runs (as bench/kong.py does). Needs perf (Debian's linux-perf) and an nginx built with
symbols (../shared/tools/build-kong-engine.sh builds with -g). Writes bench/results/kong-profile.json.
"""

import collections
import json
import os
import re
import subprocess
import time

import gateway as g
import kong
import perf_split

BUCKETS = ["wasm (JIT)", "wasmtime runtime", "ngx_wasm_module", "nginx", "libc", "kernel", "other"]
CASES = "EPBCQ"
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
    r = perf_split.recorded(gw.pids()[1], data,
                            lambda: kong.measure(gw, ledger_pid, a.seconds, a.connections, script), a.call_graph)
    return r, samples_by_symbol(data)


def main():
    ap = perf_split.arguments("kong-profile.json")
    ap.add_argument("--call-graph", action="store_true", help="record call graphs (perf -g) to read afterwards "
                    "with BENCH_KEEP_WORK=1")
    ap.add_argument("--top", type=int, default=12, help="symbols listed per case")
    a = ap.parse_args()
    nginx_bin, work = kong.begin("kong-profile-")
    gws = {}
    try:
        ledger, upstream, modules, cases, script = kong.start_backends(nginx_bin, work)
        for case in CASES:
            gws[case] = kong.Nginx(case, nginx_bin, work, kong.proxied(cases[case][1]), upstream.port, modules, 0,
                                   wasmtime_flags=[("profiler", "perfmap")])
            g.wrk(f"http://127.0.0.1:{gws[case].port}/", 10 if case in "CQ" else 5, a.connections, "payer0",
                  script.get(case))
            if case != "E":
                g.answers_with(f"http://127.0.0.1:{gws[case].port}/", "x-credits-balance")

        def run(case, rnd):
            return profiled_run(gws[case], ledger.pid, a, script.get(case), f"{work}/{case}-{rnd}.data")

        totals = perf_split.rounds(CASES, a, lambda case: gws[case].port, script.get, run, "gateway_cpu_us_per_call")
        results = perf_split.split(totals, BUCKETS, lambda key: bucket(*key), "gateway_cpu_us_per_call")
        for case, r in results.items():
            per_sample = r["gateway_cpu_us_per_call"] / r["samples"]
            r["top_symbols"] = [{"dso": dso, "symbol": sym, "bucket": bucket(dso, sym), "us_per_call": s * per_sample}
                                for (dso, sym), s in totals[case].samples.most_common(a.top)]
        diff = perf_split.differences(results, (("B", "E"), ("P", "E"), ("B", "P"), ("C", "B"), ("Q", "P"), ("C", "Q")), BUCKETS)
        doc = {"benchmark": "kong-engine profile", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "seconds": a.seconds, "rounds": a.rounds, "connections": a.connections,
               "load_average_at_end": os.getloadavg(), "cases": results, "differences": diff}
        with open(a.out, "w") as f:
            json.dump(doc, f, indent=1)
        perf_split.print_table("nginx worker", results, diff, BUCKETS, "gateway_cpu_us_per_call")
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
