#!/usr/bin/env python3
"""Gateway overhead on Kong's Wasm engine (nginx + ngx_wasm_module + Wasmtime), the cases of
bench/gateway.py that apply, side by side in one run, interleaved over rounds:

  A  no filter                      (proxy_pass to a keep-alive upstream)
  E  no-op proxy-wasm filter        (bench/noop-filter: reads one header)
  F  bench/floor-filter `floor`     (a credit check's fewest host calls, five, and no decisions)
  P  bench/floor-filter `prepaid`   (prepaid_credits' seven host calls on its warm path, no decisions)
  L  bench/floor-filter `local`     (F with the balance in the worker's memory: three host calls)
  B  prepaid_credits, one customer  (its default configuration: a warm lease)
  H  B without the x-credits-* response headers
  G  B with pricing.charge_errors on (an error costs its price, so no call is ever refunded;
     since §0u the same seven host calls as B)
  C  prepaid_credits, 10k subjects  (bench/subjects.lua picks one at random per request; defaults,
                                     at most 10 s of warm-up)
  Q  P with C's 10k subjects         (the seven host calls on 10,000 shared-data entries, no decisions)
  R  E with C's 10k subjects         (the no-op filter under C's load: every case runs wrk with a
                                     script, bench/subject.lua where it names one subject)
  B0, C0  B and C on an earlier build, given as GATEWAY_BENCH_BASELINE=<prepaid_credits.wasm> (as
          bench/gateway.py's B and C)

Each gateway is its own nginx (one worker, pinned to CPU 0); the upstream (an nginx answering 200),
the ledger (SQLite) and wrk (1 thread) share CPU 1. CPU per call is the gateway's master and
worker utime+stime over the run divided by the calls wrk completed.

NGX_WASM_NGINX names the engine's nginx (../shared/tools/build-kong-engine.sh prints it).
  NGX_WASM_NGINX=/path/to/nginx python3 bench/kong.py --seconds 6 --rounds 5 --connections 16
It builds the filters and the ledger first (`gateway.build`).
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import gateway as g


class Nginx:
    """One nginx with `location /` as given, proxying to `upstream_port` (or answering itself)."""

    def __init__(self, case, nginx_bin, work, location, upstream_port, modules, cpu, wasmtime_flags=()):
        self.case = case
        self.port = g.free_port()
        self.prefix = os.path.join(work, f"nginx-{case}")
        for d in ("logs", "body", "proxy", "fastcgi", "uwsgi", "scgi"):
            os.makedirs(os.path.join(self.prefix, d), exist_ok=True)
        wasm = "".join(f"    module {name} {path};\n" for name, path in modules)
        flags = "".join(f"        flag {name} {value};\n" for name, value in wasmtime_flags)
        runtime = f"    wasmtime {{\n{flags}    }}\n" if flags else ""
        wasm_block = f"wasm {{\n{wasm}    shm_kv prepaid_credits 16m;\n{runtime}}}\n" if modules else ""
        p = self.prefix
        upstream = f"upstream backend {{ server 127.0.0.1:{upstream_port}; keepalive 32; }}" if upstream_port else ""
        conf = f"""daemon off;
master_process on;
worker_processes 1;
pid {p}/logs/nginx.pid;
error_log {p}/logs/error.log warn;
events {{ worker_connections 1024; }}
{wasm_block}http {{
    access_log off;
    client_body_temp_path {p}/body;
    proxy_temp_path {p}/proxy;
    fastcgi_temp_path {p}/fastcgi;
    uwsgi_temp_path {p}/uwsgi;
    scgi_temp_path {p}/scgi;
    {upstream}
    server {{
        listen 127.0.0.1:{self.port};
        location = /__ready {{ return 200 "ready"; }}
        location / {{
{location}
        }}
    }}
}}
"""
        path = os.path.join(self.prefix, "nginx.conf")
        with open(path, "w") as f:
            f.write(conf)
        log = open(os.path.join(self.prefix, "logs", "stdout.log"), "w")
        self.proc = g.spawn([nginx_bin, "-p", self.prefix, "-c", path], log, cpu)
        g.wait_until(f"http://127.0.0.1:{self.port}/__ready", f"nginx for case {case}")

    def pids(self):
        children = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout.split()
        # taskset execs nginx in place, so the spawned pid is the master.
        return [self.proc.pid] + [int(c) for c in children]

    def cpu_seconds(self):
        return sum(g.cpu_seconds(pid) for pid in self.pids())

    def fatal_lines(self):
        with open(os.path.join(self.prefix, "logs", "error.log")) as f:
            bad = ("exited on signal", "trap", "panicked")
            return [line for line in f if any(b in line for b in bad)]


def proxied(filter_line):
    return "\n".join(line for line in [
        "            proxy_wasm_request_headers_in_access on;" if filter_line else "",
        f"            {filter_line}" if filter_line else "",
        "            proxy_http_version 1.1;",
        '            proxy_set_header Connection "";',
        "            proxy_pass http://backend;",
    ] if line)


def measure(gw, ledger_pid, seconds, connections, script):
    cpu0, lcpu0 = gw.cpu_seconds(), g.cpu_seconds(ledger_pid)
    r = g.wrk(f"http://127.0.0.1:{gw.port}/api/v1/things", seconds, connections, "payer0", script)
    calls = max(r["requests"], 1)
    r["gateway_cpu_us_per_call"] = (gw.cpu_seconds() - cpu0) * 1e6 / calls
    r["ledger_cpu_us_per_call"] = (g.cpu_seconds(ledger_pid) - lcpu0) * 1e6 / calls
    return r


def gateway_cases(wasm, ledger_port):
    """The Wasm modules every filtered case loads, the cases (label and `proxy_wasm` line, none for
    A) and the wrk script of the cases that need one."""
    config = g.filter_config(f"127.0.0.1:{ledger_port}")
    quiet = {**config, "response_headers": {"cost": None, "balance": None}}

    def credits(cfg, module="prepaid_credits"):
        text = json.dumps(cfg).replace("\\", "\\\\").replace("'", "\\'")
        return f"proxy_wasm {module} '{text}';"

    modules = [("prepaid_credits", f"{wasm}/prepaid_credits.wasm"), ("noop_filter", f"{wasm}/noop_filter.wasm"),
               ("floor_filter", f"{wasm}/floor_filter.wasm")]
    cases = {
        "A": ("no filter", None),
        "E": ("no-op wasm filter", "proxy_wasm noop_filter;"),
        "F": ("floor filter: a credit check's 5 host calls", "proxy_wasm floor_filter 'floor';"),
        "P": ("floor filter: prepaid_credits' 7 host calls", "proxy_wasm floor_filter 'prepaid';"),
        "L": ("floor filter: 3 host calls, balance in worker memory", "proxy_wasm floor_filter 'local';"),
        "B": ("prepaid_credits, 1 customer", credits(config)),
        "H": ("B without response headers", credits(quiet)),
        "G": ("B with errors charged (pricing.charge_errors)", credits({**config, "pricing": {"charge_errors": True}})),
        "C": ("prepaid_credits, 10k subjects, defaults", credits(config)),
        "Q": ("floor filter: 7 host calls, 10k subjects", "proxy_wasm floor_filter 'prepaid';"),
        "R": ("no-op wasm filter, 10k subjects", "proxy_wasm noop_filter;"),
    }
    subjects = os.path.join(g.ROOT, "bench/subjects.lua")
    scripts = {case: subjects for case in "CQR"}
    baseline = os.environ.get("GATEWAY_BENCH_BASELINE")
    if baseline:
        modules.append(("prepaid_credits_baseline", os.path.abspath(baseline)))
        cases["B0"] = ("B, baseline build", credits(config, "prepaid_credits_baseline"))
        cases["C0"] = ("C, baseline build", credits(config, "prepaid_credits_baseline"))
        scripts["C0"] = subjects
    return modules, cases, scripts


def begin(prefix):
    """What every benchmark of Kong's engine starts with: the engine's nginx (NGX_WASM_NGINX), stops
    on SIGTERM/SIGINT that clean up, the filters and the ledger built, a work directory."""
    nginx_bin = os.environ.get("NGX_WASM_NGINX") or sys.exit("NGX_WASM_NGINX must name the engine's nginx")
    signal.signal(signal.SIGTERM, g.on_signal)
    signal.signal(signal.SIGINT, g.on_signal)
    g.build()
    return nginx_bin, tempfile.mkdtemp(prefix=prefix)


def start_backends(nginx_bin, work):
    """Starts the ledger (SQLite) and the upstream (an nginx answering 200, on CPU 1); returns them
    with `gateway_cases`' modules, cases and wrk scripts."""
    ledger, ledger_port = g.start_ledger(work)
    upstream = Nginx("upstream", nginx_bin, work, '            return 200 "ok";', None, [], 1)
    return (ledger, upstream, *gateway_cases(os.path.join(g.ROOT, "target/wasm32-wasip1/release"), ledger_port))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--out", default=os.path.join(g.ROOT, "bench/results/kong.json"))
    a = ap.parse_args()
    nginx_bin, work = begin("kong-bench-")
    try:
        ledger, upstream, modules, cases, script = start_backends(nginx_bin, work)
        gws = {}
        for case, (_, line) in cases.items():
            gws[case] = Nginx(case, nginx_bin, work, proxied(line), upstream.port, modules if line else [], 0)
            started = time.time()
            # C: at most 10 s of warm-up (the rule); the others until warm.
            g.wrk(f"http://127.0.0.1:{gws[case].port}/", 10 if case in ("C", "C0") else 5, a.connections, "payer0",
                  script.get(case))
            print(f"case {case} warmed for {time.time() - started:.0f} s", file=sys.stderr)
            if case in ("F", "L", "P", "Q", "B", "C", "B0", "C0"):
                g.answers_with(f"http://127.0.0.1:{gws[case].port}/", "x-credits-balance")
        runs = {case: [] for case in cases}
        for rnd in range(a.rounds):
            for case in cases:
                g.wrk(f"http://127.0.0.1:{gws[case].port}/", g.PRELOAD_SECONDS, a.connections, "payer0", script.get(case))
                r = measure(gws[case], ledger.pid, a.seconds, a.connections, script.get(case))
                runs[case].append(r)
                print(f"round {rnd + 1} case {case}: {r['rps']:.0f} req/s, p50 {r['p50_ms']:.3f} ms, "
                      f"p99 {r['p99_ms']:.3f} ms, {r['gateway_cpu_us_per_call']:.1f} µs CPU/call, "
                      f"non-2xx {r['non_2xx']}", file=sys.stderr)
        results = {}
        for case, (label, _) in cases.items():
            rs = runs[case]
            results[case] = {
                "label": label,
                "rps": g.median([r["rps"] for r in rs]),
                "p50_ms": g.median([r["p50_ms"] for r in rs]),
                "p99_ms": g.median([r["p99_ms"] for r in rs]),
                "gateway_cpu_us_per_call": g.median([r["gateway_cpu_us_per_call"] for r in rs]),
                "ledger_cpu_us_per_call": g.median([r["ledger_cpu_us_per_call"] for r in rs]),
                "non_2xx": sum(r["non_2xx"] for r in rs),
                "fatal_log_lines": gws[case].fatal_lines(),
                "runs": rs,
            }
        e = results["E"]
        ratios = {
            "B/E": results["B"]["rps"] / e["rps"],
            "H/E": results["H"]["rps"] / e["rps"],
            "G/E": results["G"]["rps"] / e["rps"],
            "per-round G/E": [x["rps"] / y["rps"] for x, y in zip(runs["G"], runs["E"])],
            "C/E": results["C"]["rps"] / e["rps"],
            "E/A": e["rps"] / results["A"]["rps"],
            "F/E": results["F"]["rps"] / e["rps"],
            "L/E": results["L"]["rps"] / e["rps"],
            "per-round L/E": [x["rps"] / y["rps"] for x, y in zip(runs["L"], runs["E"])],
            "P/E": results["P"]["rps"] / e["rps"],
            "B/P": results["B"]["rps"] / results["P"]["rps"],
            "per-round F/E": [f["rps"] / x["rps"] for f, x in zip(runs["F"], runs["E"])],
            "per-round P/E": [p["rps"] / x["rps"] for p, x in zip(runs["P"], runs["E"])],
            "p99 B/E": results["B"]["p99_ms"] / e["p99_ms"],
            "per-round B/E": [b["rps"] / x["rps"] for b, x in zip(runs["B"], runs["E"])],
            "per-round C/E": [c["rps"] / x["rps"] for c, x in zip(runs["C"], runs["E"])],
            "Q/E": results["Q"]["rps"] / e["rps"],
            "C/Q": results["C"]["rps"] / results["Q"]["rps"],
            "R/E": results["R"]["rps"] / e["rps"],
            "C/R": results["C"]["rps"] / results["R"]["rps"],
            "per-round C/Q": [c["rps"] / x["rps"] for c, x in zip(runs["C"], runs["Q"])],
            "per-round C/R": [c["rps"] / x["rps"] for c, x in zip(runs["C"], runs["R"])],
        }
        if "B0" in results:
            ratios.update({
                "B0/E": results["B0"]["rps"] / e["rps"],
                "C0/E": results["C0"]["rps"] / e["rps"],
                "per-round B/B0": [b["rps"] / x["rps"] for b, x in zip(runs["B"], runs["B0"])],
                "per-round C/C0": [c["rps"] / x["rps"] for c, x in zip(runs["C"], runs["C0"])],
            })
        version = subprocess.run([nginx_bin, "-V"], capture_output=True, text=True).stderr.splitlines()[0]
        doc = {
            "benchmark": "kong-engine gateway",
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "load_average_at_end": os.getloadavg(),
            "nginx": version, "seconds": a.seconds, "rounds": a.rounds, "connections": a.connections,
            "load_generator": "wrk -t1 (CPU 1, with the ledger and the upstream); nginx, 1 worker (CPU 0)",
            "cases": results, "ratios": ratios, "baseline_wasm": os.environ.get("GATEWAY_BENCH_BASELINE"),
        }
        os.makedirs(os.path.dirname(a.out), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(doc, f, indent=1)
        print(json.dumps({"ratios": ratios, **{k: {x: v[x] for x in ("rps", "p50_ms", "p99_ms", "gateway_cpu_us_per_call")}
                                                for k, v in results.items()}}, indent=1))
    finally:
        g.stop_children()
        g.remove_work(work)


if __name__ == "__main__":
    main()
