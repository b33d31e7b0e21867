#!/usr/bin/env python3
"""Charts and Markdown tables from bench/results/*.json (matplotlib: pip install matplotlib).
  python3 bench/chart.py gateway|ledger|profile|footprint   → bench/results/NAME.png, table on stdout"""

import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def load(name):
    with open(os.path.join(RESULTS, f"{name}.json")) as f:
        return json.load(f)


def gateway():
    doc = load("gateway")
    cases = doc["cases"]
    order = [k for k in ["a", "e", "r", "f", "l", "p", "q", "b", "h", "g", "c", "d", "B", "C"] if k in cases]
    labels = [f"{k}. {cases[k]['label']}" for k in order]
    fig, axes = plt.subplots(1, 3, figsize=(16, 5))
    palette = {"a": "#888888", "e": "#4c72b0", "f": "#8172b2", "l": "#64b5cd", "p": "#b3a7d9", "q": "#d6cdeb", "r": "#8fa9d4", "b": "#55a868", "h": "#55a868", "g": "#3d8b50",
               "c": "#8fd18f", "d": "#c44e52", "B": "#dd8452", "C": "#f0b27a"}
    colors = [palette[k] for k in order]
    axes[0].barh(labels, [cases[k]["rps"] for k in order], color=colors)
    axes[0].set_title("requests/s (higher is better)")
    axes[1].barh(labels, [cases[k]["envoy_cpu_us_per_call"] for k in order], color=colors)
    axes[1].set_title("Envoy CPU µs per call (lower is better)")
    width = 0.4
    ys = range(len(order))
    axes[2].barh([y - width / 2 for y in ys], [cases[k]["p50_ms"] for k in order], height=width, label="p50")
    axes[2].barh([y + width / 2 for y in ys], [cases[k]["p99_ms"] for k in order], height=width, label="p99")
    axes[2].set_yticks(list(ys), labels)
    axes[2].set_xscale("log")
    axes[2].set_title("latency ms (log scale)")
    axes[2].legend()
    for ax in axes[1:]:
        ax.tick_params(labelleft=False) if ax is axes[1] else None
    r = doc["ratios"]
    fig.suptitle(f"Gateway overhead, Envoy {doc['envoy'].split('/')[1] if '/' in doc['envoy'] else doc['envoy']}, "
                 f"--concurrency 1, wrk {doc['connections']} connections, median of {doc['rounds']}×{doc['seconds']} s — "
                 f"b/e {r['b/e']:.2f}, h/e {r['h/e']:.2f}, g/e {r['g/e']:.2f}, c/e {r['c/e']:.2f}, b/d {r['b/d']:.1f}")
    fig.tight_layout()
    fig.savefig(os.path.join(RESULTS, "gateway.png"), dpi=90)
    print("| case | req/s | p50 ms | p99 ms | Envoy CPU µs/call | ledger CPU µs/call | RSS after warm-up MiB | non-2xx |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for k in order:
        c = cases[k]
        print(f"| {k}. {c['label']} | {c['rps']:.0f} | {c['p50_ms']:.3f} | {c['p99_ms']:.3f} | "
              f"{c['envoy_cpu_us_per_call']:.1f} | {c['ledger_cpu_us_per_call']:.1f} | {c['rss_kib_after_warmup'] / 1024:.1f} | {100 * c['non_2xx_share']:.1f} % |")
    print()
    print("| ratio | value |")
    print("|---|---:|")
    for k, v in r.items():
        print(f"| {k} | {v:.2f} |")
    print()
    print("| case | calls | ledger round trips | per 1,000 calls | bytes sent/call | bytes received/call | round trips/s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for k in [k for k in ("b", "h", "g", "c", "B", "C") if k in cases]:
        s = cases[k]["sync"]
        print(f"| {k} | {s['calls']} | {s['ledger_round_trips']} | {s['round_trips_per_1000_calls']:.3f} | "
              f"{s['bytes_sent_per_call']:.2f} | {s['bytes_received_per_call']:.2f} | {s['round_trips_per_second']:.2f} |")


def ledger():
    rows = load("ledger")
    fig, axes = plt.subplots(1, 2, figsize=(19, 5.5), gridspec_kw={"width_ratios": [1, 2.4]})
    for ax, mode, key, title in [
        (axes[0], "charges", "charges_per_second", "charges/s (public charge endpoint, 16 clients)"),
        (axes[1], "sync", "ranges_per_second", "usage records (ranges)/s via /v3/gateway/sync"),
    ]:
        sel = [r for r in rows if r["mode"] == mode]
        labels = [f"{r['backend']}\n{r['customers']:,} cust." + (f"\n{r['ranges_per_sync']}/sync" if mode == "sync" else "")
                  + (f"\n{r['instances']} ledgers" if r.get("instances", 1) > 1 else "")
                  + (f"\nnodes {r['node_customers']}" if r.get("node_customers", "shared") != "shared" else "") for r in sel]
        bars = ax.bar(labels, [r[key] for r in sel], color=["#4c72b0" if r["backend"] == "sqlite" else "#dd8452" for r in sel])
        for b, r in zip(bars, sel):
            ax.annotate(f"balance read p50 {r['balance_p50_ms']} / p99 {r['balance_p99_ms']} ms",
                        (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=7)
        if mode == "sync":
            ax.axhline(50_000, color="red", linestyle="--", label="target 50,000 records/s")
            ax.set_yscale("log")
            ax.legend()
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(os.path.join(RESULTS, "ledger.png"), dpi=90)
    print("| mode | nodes' customers | backend | ledgers | customers | clients | subjects/sync | warm-up s | requests/s | records (ranges)/s | calls/s | p50 ms | p99 ms | "
          "ledger CPU µs/range | PostgreSQL CPU µs/range | machine CPU µs/range | busy cores | ledger bytes written/range | "
          "balance read p50 ms | p99 ms | failed |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ranges = r.get("ranges_per_second", r["requests_per_second"] if r["mode"] == "charges" else 0)
        calls = r.get("calls_per_second", r["requests_per_second"])
        nodes = r.get("node_customers", "shared") if r["mode"] == "sync" else "—"
        print(f"| {r['mode']} | {nodes} | {r['backend']} | {r.get('instances', 1)} | {r['customers']} | {r['clients']} | {r.get('ranges_per_sync', '—')} | "
              f"{r.get('warm_seconds', 0)} | {r['requests_per_second']:.0f} | {ranges:.0f} | {calls:.0f} | {r['p50_ms']} | {r['p99_ms']} | "
              f"{r.get('ledger_cpu_us_per_range') or '—'} | {r.get('postgres_cpu_us_per_range') or '—'} | "
              f"{r.get('machine_cpu_us_per_range') or '—'} | {r.get('machine_busy_cores') or '—'} | "
              f"{r.get('ledger_written_bytes_per_range') or '—'} | "
              f"{r['balance_p50_ms']} | {r['balance_p99_ms']} | {r['failed']} |")


def profile():
    doc = load("profile")
    runs = doc["runs"]
    fig, ax = plt.subplots(figsize=(10, 5))
    for run in runs:
        top = run["top"][:10]
        ax.barh([f"{run['name']}: {t['function'][:60]}" for t in top], [t["instructions_per_call"] for t in top])
    ax.invert_yaxis()
    ax.set_title("callgrind: self instructions per call, top functions")
    fig.tight_layout()
    fig.savefig(os.path.join(RESULTS, "profile.png"), dpi=90)


def footprint():
    doc = load("footprint")
    names = ["prepaid_credits.wasm", "after wasm-opt -O3", "after wasm-opt -Oz", "noop_filter.wasm"]
    raw = [doc["prepaid_credits_wasm_bytes"], doc["wasm_opt_O3_bytes"], doc["wasm_opt_Oz_bytes"],
           doc["noop_filter_wasm_bytes"]]
    gz = [doc["prepaid_credits_wasm_gzip_bytes"], doc["wasm_opt_O3_gzip_bytes"], doc["wasm_opt_Oz_gzip_bytes"], None]
    fig, ax = plt.subplots(figsize=(9, 3.5))
    ys = range(len(names))
    ax.barh([y + 0.2 for y in ys], [b / 1024 for b in raw], height=0.4, label="as built", color="#4c72b0")
    ax.barh([y - 0.2 for y in ys], [(g or 0) / 1024 for g in gz], height=0.4, label="gzip -9", color="#55a868")
    ax.set_yticks(list(ys), names)
    ax.invert_yaxis()
    ax.set_xlabel("KiB")
    ax.set_title(f"Filter size; one cached customer: key {doc['shared_entry_key_bytes']} B + "
                 f"value {doc['shared_entry_value_bytes']} B of shared data")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(RESULTS, "footprint.png"), dpi=90)
    print("| what | bytes | gzip -9 |\n|---|---:|---:|")
    for n, b, g in zip(names, raw, gz):
        print(f"| {n} | {b:,} | {f'{g:,}' if g else '—'} |")


if __name__ == "__main__":
    {"gateway": gateway, "ledger": ledger, "profile": profile, "footprint": footprint}[sys.argv[1]]()
