#!/usr/bin/env python3
"""Gateway overhead: the same Envoy binary, the same load generator (wrk), the same direct-response
route, twelve cases side by side in one run, interleaved over rounds (the machine is shared and noisy;
each case's figure is its median round):

  a  no filter                         (the physical limit of this machine)
  e  no-op proxy-wasm filter            (reads one header: the floor of any proxy-wasm filter)
  f  bench/floor-filter, `floor`        (a credit check's fewest host calls, no decisions: subject
                                         header, entry get + compare-and-swap, :status, one
                                         response header)
  p  bench/floor-filter, `prepaid`      (the host calls prepaid_credits makes on its warm path, seven,
                                         no decisions)
  l  bench/floor-filter, `local`        (floor with the balance in the worker's memory: subject,
                                         :status, one response header)
  b  prepaid_credits, one customer      (warm lease: a paying customer's steady state)
  h  b without the x-credits-* response headers
  g  b with pricing.charge_errors on     (an error costs its price, so no call is ever refunded;
                                         since §0u the same seven host calls as b)
  c  prepaid_credits, 10k subjects      (wrk script bench/subjects.lua: a subject picked at random
                                         per request; the filter's default configuration, warmed
                                         for at most 10 s)
  q  p with c's 10k subjects            (the seven host calls on 10,000 shared-data entries: what
                                         the engine's side of c costs with no decision behind it)
  r  e with c's 10k subjects            (the no-op filter under c's load: what 10,000 subject
                                         values cost with no filter work behind them)
  d  ext_authz (HTTP) to the ledger     (the naive design: a durable charge per call)

Every Envoy runs with --concurrency 1 pinned to CPU 0; wrk (1 thread) and the ledger share CPU 1.
wrk always runs a script that formats each request (bench/subject.lua names one subject): its
scripted mode alone moved a gateway's CPU per call (bench/RESULTS.md §0zg), so every case gets it.
Each measured run follows a 2-s unmeasured load of the same case (the cases take turns, so each
has been idle for the others' runs).
CPU per call is Envoy's own utime+stime (/proc/PID/stat) over the run divided by the calls wrk
completed. Sync cost comes from Envoy's stats of its `ledger` cluster during cases b and c.

Run through bench/gateway.sh (which draws the chart after). Builds what it runs, starts a ledger on
SQLite in a temporary directory and the Envoys, and stops all of them on exit.
  python3 bench/gateway.py --seconds 10 --rounds 3 --connections 16
"""

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKEN = "bench-token"
CLK_TCK = os.sysconf("SC_CLK_TCK")
SUBJECTS = 10_000
PRICE = "0.01"
PRELOAD_SECONDS = 2

children = []


def build():
    """Builds what the benchmarks run: the three filters for wasm32-wasip1, the ledger and its
    benchmark driver (cargo does nothing when they are up to date)."""
    for args in (["--target", "wasm32-wasip1", "-p", "prepaid-credits", "-p", "noop-filter", "-p", "floor-filter"],
                 ["-p", "ledger", "--bin", "credits-ledger", "--example", "ledger_bench"]):
        subprocess.run(["cargo", "build", "--quiet", "--release", *args], cwd=ROOT, check=True)


def stop_children():
    for p in reversed(children):
        if p.poll() is None:
            p.terminate()
    for p in reversed(children):
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            p.kill()
    children.clear()


def on_signal(signum, _frame):
    stop_children()
    sys.exit(128 + signum)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(cmd, log, cpu):
    p = subprocess.Popen(["taskset", "-c", str(cpu)] + cmd, stdout=log, stderr=subprocess.STDOUT)
    children.append(p)
    return p


def http_get(url, timeout=2.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read().decode()


def wait_until(url, what, seconds=30):
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            if http_get(url)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"{what} did not become ready ({url})")


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # utime and stime are fields 14 and 15 of the whole line; here offset by the 2 before ")".
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def start_ledger(work, ledger_bin=None, customers=(("payer", 1), ("s", SUBJECTS))):
    """A ledger on SQLite in `work` (CPU 1) with funded customers (`prefix`, how many); returns the
    process and its port."""
    release = os.path.join(ROOT, "target/release")
    port = free_port()
    ledger = spawn([ledger_bin or f"{release}/credits-ledger", "serve", "--listen", f"127.0.0.1:{port}",
                    "--database", f"sqlite://{work}/ledger.db", "--token", TOKEN],
                   open(os.path.join(work, "ledger.log"), "w"), 1)
    base = f"http://127.0.0.1:{port}"
    wait_until(f"{base}/healthz", "the ledger")
    for prefix, n in customers:
        subprocess.run([f"{release}/examples/ledger_bench", "--mode", "setup", "--url", base,
                        "--customers", str(n), "--subject-prefix", prefix], check=True, stdout=subprocess.DEVNULL)
    return ledger, port


def filter_config(upstream="ledger"):
    """The benchmarks' filter configuration: its defaults, one price per call."""
    return {"ledger": {"upstream": upstream, "token": TOKEN, "timeout_ms": 1000},
            "subject": {"header": "x-consumer-username"}, "price": PRICE, "currency": "USD",
            "feature_key": "api_requests", "settlement_mode": "credit_only"}


def wasm_filter(name, wasm, configuration):
    # A string goes as it is; anything else as JSON.
    config = configuration if isinstance(configuration, str) else json.dumps(configuration) if configuration else ""
    return f"""
          - name: envoy.filters.http.wasm
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              config:
                name: {name}
                root_id: {name}
                vm_config:
                  vm_id: {name}
                  runtime: envoy.wasm.runtime.v8
                  code: {{ local: {{ filename: "{wasm}" }} }}
                configuration:
                  "@type": type.googleapis.com/google.protobuf.StringValue
                  value: '{config}'
                failure_policy: FAIL_CLOSED"""


def ext_authz(ledger_port):
    headers = {
        "authorization": f"Bearer {TOKEN}",
        "x-credits-price": PRICE,
        "x-credits-currency": "USD",
        "x-credits-feature-key": "api_requests",
    }
    to_add = "".join(f"\n                  - {{ key: {k}, value: \"{v}\" }}" for k, v in headers.items())
    return f"""
          - name: envoy.filters.http.ext_authz
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz
              transport_api_version: V3
              failure_mode_allow: false
              allowed_headers:
                patterns: [ {{ exact: x-consumer-username }}, {{ exact: x-request-id }} ]
              http_service:
                server_uri: {{ uri: "http://127.0.0.1:{ledger_port}", cluster: ledger, timeout: 1s }}
                path_prefix: /v3/gateway/authorize
                authorization_request:
                  headers_to_add:{to_add}"""


def envoy_yaml(admin, listen, ledger_port, filters):
    return f"""
admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin} }} }}
static_resources:
  listeners:
  - name: api
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {listen} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: api
          route_config:
            virtual_hosts:
            - name: api
              domains: ["*"]
              routes:
              - match: {{ prefix: "/" }}
                direct_response: {{ status: 200, body: {{ inline_string: "ok" }} }}
          http_filters:{filters}
          - name: envoy.filters.http.router
            typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}
  clusters:
  - name: ledger
    connect_timeout: 0.5s
    type: STATIC
    load_assignment:
      cluster_name: ledger
      endpoints: [ {{ lb_endpoints: [ {{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {ledger_port} }} }} }} }} ] }} ]
"""


class Envoy:
    def __init__(self, case, filters, ledger_port, work, envoy_bin):
        self.case = case
        self.admin, self.port = free_port(), free_port()
        path = os.path.join(work, f"envoy-{case}.yaml")
        with open(path, "w") as f:
            f.write(envoy_yaml(self.admin, self.port, ledger_port, filters))
        log = open(os.path.join(work, f"envoy-{case}.log"), "w")
        self.proc = spawn([envoy_bin, "-c", path, "--concurrency", "1", "--log-level", "warn",
                           "--base-id", str(100 + ord(case))], log, 0)
        wait_until(f"http://127.0.0.1:{self.admin}/ready", f"Envoy for case {case}")

    def stats(self):
        _, text = http_get(f"http://127.0.0.1:{self.admin}/stats?format=json", timeout=5)
        out = {}
        for s in json.loads(text).get("stats", []):
            if "name" in s and "value" in s:
                out[s["name"]] = s["value"]
        return out


def wrk(url, seconds, connections, subject, script):
    # Always a script (one subject: bench/subject.lua), so that every case runs wrk the same way.
    script = script or os.path.join(ROOT, "bench/subject.lua")
    cmd = ["taskset", "-c", "1", "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", script]
    env = {**os.environ, "BENCH_SUBJECT": subject}
    out = subprocess.run(cmd + [url], capture_output=True, text=True, check=True, env=env).stdout
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)

    def latency_ms(pct):
        m = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        value, unit = float(m.group(1)), m.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    return {
        "requests": requests,
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "p50_ms": latency_ms(50),
        "p99_ms": latency_ms(99),
        "non_2xx": int(non_2xx.group(1)) if non_2xx else 0,
        "socket_errors": errors.group(1).strip() if errors else "",
    }


LEDGER_STATS = ["cluster.ledger.upstream_rq_total", "cluster.ledger.upstream_cx_tx_bytes_total",
                "cluster.ledger.upstream_cx_rx_bytes_total", "wasmcustom.calls_allowed", "wasmcustom.cache_hits", "wasmcustom.cache_misses",
                "wasmcustom.sync_batches", "wasmcustom.sync_failures", "wasmcustom.records_queued",
                "wasmcustom.calls_refused", "wasmcustom.calls_unavailable"]


def measure(envoy, ledger_pid, seconds, connections, subject, script):
    before, cpu0, lcpu0 = envoy.stats(), cpu_seconds(envoy.proc.pid), cpu_seconds(ledger_pid)
    r = wrk(f"http://127.0.0.1:{envoy.port}/api/v1/things", seconds, connections, subject, script)
    cpu1, lcpu1, after = cpu_seconds(envoy.proc.pid), cpu_seconds(ledger_pid), envoy.stats()
    calls = max(r["requests"], 1)
    r["envoy_cpu_us_per_call"] = (cpu1 - cpu0) * 1e6 / calls
    r["ledger_cpu_us_per_call"] = (lcpu1 - lcpu0) * 1e6 / calls
    r["stats_delta"] = {k.split(".")[-1] if k.startswith("wasmcustom") else k.replace("cluster.ledger.", "ledger_"):
                        after.get(k, 0) - before.get(k, 0) for k in LEDGER_STATS if k in after}
    return r


def warm_up(envoy, connections, script, max_seconds):
    """Load until the filter's cache misses fall below 1 % of calls (every subject cached, leases
    sized for the rate), or for 3 s without a filter; no longer once `max_seconds` have passed."""
    started = time.time()
    while True:
        before = envoy.stats()
        r = wrk(f"http://127.0.0.1:{envoy.port}/", 3, connections, "payer0", script)
        misses = envoy.stats().get("wasmcustom.cache_misses", 0) - before.get("wasmcustom.cache_misses", 0)
        if misses <= 0.01 * r["requests"] or time.time() - started + 3 > max_seconds:
            print(f"case {envoy.case} warm after {time.time() - started:.0f} s ({misses} misses in the last "
                  f"{r['requests']} calls)", file=sys.stderr)
            return


def answers_with(url, header):
    """Fails the benchmark unless a call through `url` as payer0 comes back 200 with `header`: a
    filter that did not run (a wrong configuration, a VM that failed to start) would otherwise be
    measured as if it were fast."""
    request = urllib.request.Request(url, headers={"x-consumer-username": "payer0"})
    with urllib.request.urlopen(request, timeout=5) as r:
        if r.status != 200 or r.headers.get(header) is None:
            raise SystemExit(f"{url}: {r.status} without {header}: the filter did not run")


def remove_work(work):
    """Removes a run's directory, unless BENCH_KEEP_WORK is set: then its logs (the ledger's, each
    gateway's) stay there to be read."""
    if os.environ.get("BENCH_KEEP_WORK"):
        print(f"kept {work}", file=sys.stderr)
    else:
        shutil.rmtree(work, ignore_errors=True)


def median(values):
    v = sorted(values)
    return v[len(v) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench/results/gateway.json"))
    a = ap.parse_args()
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    build()
    envoy_bin = os.environ.get("ENVOY_BIN") or shutil.which("envoy")
    wasm = os.path.join(ROOT, "target/wasm32-wasip1/release")
    work = tempfile.mkdtemp(prefix="gateway-bench-")
    try:
        ledger, ledger_port = start_ledger(work)
        config = filter_config()
        # GATEWAY_BENCH_FILTER='{"lease": {"max_calls": 100000}}' tries other settings in b and c.
        config.update(json.loads(os.environ.get("GATEWAY_BENCH_FILTER") or "{}"))
        cases = {
            "a": ("no filter", ""),
            "e": ("no-op wasm filter", wasm_filter("noop_filter", f"{wasm}/noop_filter.wasm", None)),
            "f": ("floor filter: a credit check's 5 host calls", wasm_filter("floor_filter", f"{wasm}/floor_filter.wasm", "floor")),
            "p": ("floor filter: prepaid_credits' 7 host calls", wasm_filter("floor_filter", f"{wasm}/floor_filter.wasm", "prepaid")),
            "l": ("floor filter: 3 host calls, balance in worker memory", wasm_filter("floor_filter", f"{wasm}/floor_filter.wasm", "local")),
            "b": ("prepaid_credits, 1 customer", wasm_filter("prepaid_credits", f"{wasm}/prepaid_credits.wasm", config)),
            "h": ("b without response headers", wasm_filter("prepaid_credits", f"{wasm}/prepaid_credits.wasm",
                                                            {**config, "response_headers": {"cost": None, "balance": None}})),
            "g": ("b with errors charged (pricing.charge_errors)", wasm_filter("prepaid_credits", f"{wasm}/prepaid_credits.wasm",
                                                                              {**config, "pricing": {"charge_errors": True}})),
            # The filter's defaults: an idle lease is kept (lease.idle_release_ms, 5 min) unless the
            # ledger recalls it, so c keeps its leases across the other cases' runs (≈ 40 s).
            "c": ("prepaid_credits, 10k subjects", wasm_filter("prepaid_credits", f"{wasm}/prepaid_credits.wasm", config)),
            "q": ("floor filter: 7 host calls, 10k subjects", wasm_filter("floor_filter", f"{wasm}/floor_filter.wasm", "prepaid")),
            "r": ("no-op wasm filter, 10k subjects", wasm_filter("noop_filter", f"{wasm}/noop_filter.wasm", None)),
            "d": ("ext_authz to the ledger", ext_authz(ledger_port)),
        }
        # GATEWAY_BENCH_BASELINE=<an earlier prepaid_credits.wasm> adds B and C: cases b and c run
        # by that build (with its own defaults), in the same run.
        baseline = os.environ.get("GATEWAY_BENCH_BASELINE")
        if baseline:
            cases["B"] = ("b, baseline build", wasm_filter("prepaid_credits", baseline, config))
            cases["C"] = ("c, baseline build", wasm_filter("prepaid_credits", baseline, config))
        script = {case: os.path.join(ROOT, "bench/subjects.lua") for case in "cCqr"}
        envoys = {}
        rss = {}
        for case, (_, filters) in cases.items():
            envoys[case] = Envoy(case, filters, ledger_port, work, envoy_bin)
            # c: at most 10 s of warm-up (the rule: a gateway meets its customers cold).
            warm_up(envoys[case], a.connections, script.get(case), 10 if case in "cC" else 90)
            rss[case] = rss_kib(envoys[case].proc.pid)
            if case in "flpqbgBcC":
                answers_with(f"http://127.0.0.1:{envoys[case].port}/", "x-credits-balance")
        runs = {case: [] for case in cases}
        for rnd in range(a.rounds):
            for case in cases:
                # Each case sat idle while the others ran: load it unmeasured for a moment first,
                # so the run measures its steady state, not its recovery (the filter measures a
                # customer's call rate once per sync interval and sizes leases from it).
                wrk(f"http://127.0.0.1:{envoys[case].port}/", PRELOAD_SECONDS, a.connections, "payer0", script.get(case))
                r = measure(envoys[case], ledger.pid, a.seconds, a.connections, "payer0", script.get(case))
                runs[case].append(r)
                print(f"round {rnd + 1} case {case}: {r['rps']:.0f} req/s, p50 {r['p50_ms']:.3f} ms, "
                      f"p99 {r['p99_ms']:.3f} ms, {r['envoy_cpu_us_per_call']:.1f} µs CPU/call, non-2xx {r['non_2xx']}",
                      file=sys.stderr)
        results = {}
        for case, (label, _) in cases.items():
            rs = runs[case]
            results[case] = {
                "label": label,
                "rps": median([r["rps"] for r in rs]),
                "p50_ms": median([r["p50_ms"] for r in rs]),
                "p99_ms": median([r["p99_ms"] for r in rs]),
                "envoy_cpu_us_per_call": median([r["envoy_cpu_us_per_call"] for r in rs]),
                "ledger_cpu_us_per_call": median([r["ledger_cpu_us_per_call"] for r in rs]),
                "rss_kib_after_warmup": rss[case],
                "non_2xx_share": sum(r["non_2xx"] for r in rs) / max(sum(r["requests"] for r in rs), 1),
                "runs": rs,
            }
        for case in [k for k in ("b", "h", "g", "c", "B", "C") if k in cases]:
            calls = sum(r["requests"] for r in runs[case])
            d = [r["stats_delta"] for r in runs[case]]
            rq = sum(x.get("ledger_upstream_rq_total", 0) for x in d)
            tx = sum(x.get("ledger_upstream_cx_tx_bytes_total", 0) for x in d)
            rx = sum(x.get("ledger_upstream_cx_rx_bytes_total", 0) for x in d)
            results[case]["sync"] = {
                "calls": calls,
                "ledger_round_trips": rq,
                "round_trips_per_1000_calls": rq * 1000 / max(calls, 1),
                "bytes_sent_per_call": tx / max(calls, 1),
                "bytes_received_per_call": rx / max(calls, 1),
                "round_trips_per_second": rq / (a.seconds * a.rounds),
            }
        ra = results["a"]
        ratios = {
            "b/a": results["b"]["rps"] / ra["rps"],
            "b/e": results["b"]["rps"] / results["e"]["rps"],
            "c/a": results["c"]["rps"] / ra["rps"],
            "c/e": results["c"]["rps"] / results["e"]["rps"],
            "h/e": results["h"]["rps"] / results["e"]["rps"],
            "g/e": results["g"]["rps"] / results["e"]["rps"],
            "p99 b/e": results["b"]["p99_ms"] / results["e"]["p99_ms"],
            "b/d": results["b"]["rps"] / results["d"]["rps"],
            "e/a": results["e"]["rps"] / ra["rps"],
            "f/e": results["f"]["rps"] / results["e"]["rps"],
            "l/e": results["l"]["rps"] / results["e"]["rps"],
            "p/e": results["p"]["rps"] / results["e"]["rps"],
            "b/p": results["b"]["rps"] / results["p"]["rps"],
            "q/e": results["q"]["rps"] / results["e"]["rps"],
            "c/q": results["c"]["rps"] / results["q"]["rps"],
            "r/e": results["r"]["rps"] / results["e"]["rps"],
            "c/r": results["c"]["rps"] / results["r"]["rps"],
            "added_cpu_us_f_over_e": results["f"]["envoy_cpu_us_per_call"] - results["e"]["envoy_cpu_us_per_call"],
            "added_cpu_us_p_over_e": results["p"]["envoy_cpu_us_per_call"] - results["e"]["envoy_cpu_us_per_call"],
            "added_cpu_us_b_over_a": results["b"]["envoy_cpu_us_per_call"] - ra["envoy_cpu_us_per_call"],
            "added_cpu_us_b_over_e": results["b"]["envoy_cpu_us_per_call"] - results["e"]["envoy_cpu_us_per_call"],
            "added_cpu_us_e_over_a": results["e"]["envoy_cpu_us_per_call"] - ra["envoy_cpu_us_per_call"],
        }
        if baseline:
            ratios["B/e"] = results["B"]["rps"] / results["e"]["rps"]
            ratios["C/e"] = results["C"]["rps"] / results["e"]["rps"]
        version = subprocess.run([envoy_bin, "--version"], capture_output=True, text=True).stdout.strip()
        doc = {
            "benchmark": "gateway",
            "load_average_at_end": os.getloadavg(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "envoy": version.split("version:")[-1].strip(),
            "seconds": a.seconds, "rounds": a.rounds, "connections": a.connections,
            "load_generator": "wrk -t1 (CPU 1, with the ledger); Envoy --concurrency 1 (CPU 0)",
            "cases": results, "ratios": ratios, "baseline_wasm": baseline,
        }
        with open(a.out, "w") as f:
            json.dump(doc, f, indent=1)
        print(json.dumps({"ratios": ratios, **{k: {x: v[x] for x in ("rps", "p50_ms", "p99_ms", "envoy_cpu_us_per_call")}
                                                for k, v in results.items()}}, indent=1))
    finally:
        stop_children()
        remove_work(work)


if __name__ == "__main__":
    main()
