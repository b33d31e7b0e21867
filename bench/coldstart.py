"""Cold start: how fast a gateway that meets 10,000 customers at once (or `--subjects` of them) gets
to its warm speed (or, with `--one-customer`, one customer's burst at a cold node).

For each filter build (`--filter`, repeatable; default the release build of this tree) and each
ledger build given (`--ledger`, repeatable; default the release build of this tree), a
fresh ledger on SQLite with 10,000 (`--subjects`) funded customers and a fresh Envoy running prepaid_credits
with its default configuration (case c of bench/gateway.py), then wrk picking a subject at random
per request (bench/subjects.lua) in back-to-back windows of `--window` seconds: each window's
req/s, p99, cache misses (calls that waited for a ledger read) and ledger round trips. A no-op
filter's Envoy (case e) is measured once per ledger, after the windows, for c/e.

Every Envoy runs with --concurrency 1 on CPU 0; wrk and the ledger share CPU 1 (as in
bench/gateway.py, whose helpers this script uses).
  python3 bench/coldstart.py [--filter WASM]... [--ledger PATH]... [--windows 10] [--window 2] [--connections 16]
                             [--subjects 10000] [--one-customer]
It builds this tree's filters and ledger first (`gateway.build`).
"""

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time

import gateway as g


def one_run(ledger_bin, filter_wasm, a, envoy_bin):
    wasm = os.path.join(g.ROOT, "target/wasm32-wasip1/release")
    work = tempfile.mkdtemp(prefix="coldstart-bench-")
    try:
        customers = (("payer", 1),) if a.one_customer else (("s", a.subjects),)
        ledger, port = g.start_ledger(work, ledger_bin, customers)
        config = g.filter_config()
        script = None if a.one_customer else os.path.join(g.ROOT, "bench/subjects.lua")
        c = g.Envoy("c", g.wasm_filter("prepaid_credits", filter_wasm, config), port, work, envoy_bin)
        windows = []
        for w in range(a.windows):
            r = g.measure(c, ledger.pid, a.window, a.connections, "payer0", script)
            d = r["stats_delta"]
            windows.append({"from_s": w * a.window, "rps": r["rps"], "p99_ms": r["p99_ms"],
                            "misses": d.get("cache_misses", 0), "calls": r["requests"],
                            "ledger_round_trips": d.get("ledger_upstream_rq_total", 0), "non_2xx": r["non_2xx"]})
            print(f"{os.path.basename(os.path.dirname(ledger_bin)) or ledger_bin} {w * a.window:>3}-{(w + 1) * a.window} s: "
                  f"{r['rps']:.0f} req/s, p99 {r['p99_ms']:.1f} ms, misses {windows[-1]['misses']}, "
                  f"round trips {windows[-1]['ledger_round_trips']}", file=sys.stderr)
        e = g.Envoy("e", g.wasm_filter("noop_filter", f"{wasm}/noop_filter.wasm", None), port, work, envoy_bin)
        e_rps = g.measure(e, ledger.pid, a.window * 2, a.connections, "payer0", script)["rps"]
        g.stop_children()
        return {"ledger": ledger_bin, "filter": filter_wasm, "windows": windows, "e_rps": e_rps}
    finally:
        g.stop_children()
        shutil.rmtree(work, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ledger", action="append")
    ap.add_argument("--filter", action="append", help="a prepaid_credits .wasm (default: this tree's release build)")
    ap.add_argument("--windows", type=int, default=10)
    ap.add_argument("--window", type=int, default=2)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--subjects", type=int, default=g.SUBJECTS, help="customers wrk names in turn")
    ap.add_argument("--one-customer", action="store_true", help="every request as payer0 (gateway case b)")
    ap.add_argument("--out", default=os.path.join(g.ROOT, "bench/results/coldstart.json"))
    a = ap.parse_args()
    os.environ["BENCH_SUBJECTS"] = str(a.subjects)  # read by bench/subjects.lua in wrk
    signal.signal(signal.SIGTERM, g.on_signal)
    signal.signal(signal.SIGINT, g.on_signal)
    g.build()
    envoy_bin = os.environ.get("ENVOY_BIN") or shutil.which("envoy")
    ledgers = a.ledger or [os.path.join(g.ROOT, "target/release/credits-ledger")]
    filters = a.filter or [os.path.join(g.ROOT, "target/wasm32-wasip1/release/prepaid_credits.wasm")]
    results = [one_run(os.path.abspath(l), os.path.abspath(f), a, envoy_bin) for f in filters for l in ledgers]
    for r in results:
        r["c_over_e_by_window"] = [round(w["rps"] / r["e_rps"], 3) for w in r["windows"]]
    doc = {"benchmark": "coldstart", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "window_seconds": a.window, "connections": a.connections, "subjects": 1 if a.one_customer else a.subjects,
           "results": results}
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(doc, f, indent=1)
    print(json.dumps([{"ledger": r["ledger"], "filter": r["filter"], "e_rps": r["e_rps"], "c/e": r["c_over_e_by_window"]} for r in results], indent=1))


if __name__ == "__main__":
    main()
