#!/usr/bin/env python3
"""Turns the JSON lines of topk's benchmarks into one report: report.json, report.md and
report.png (freshness and API latency distributions). Called by scripts/bench-report.

    scripts/bench_report.py <dir>   # reads <dir>/*.json (one benchmark's JSON line each)
"""
import json
import os
import platform
import sys
from pathlib import Path


def load(directory: Path) -> dict:
    results = {}
    for path in sorted(directory.glob("*.json")):
        if path.name.startswith("report"):
            continue
        text = path.read_text().strip()
        if not text:
            results[path.stem] = {"error": "no output (see the log beside it)"}
            continue
        try:
            results[path.stem] = json.loads(text.splitlines()[-1])
        except json.JSONDecodeError as error:
            results[path.stem] = {"error": f"unreadable output: {error}"}
    return results


def machine() -> dict:
    facts = {"platform": platform.platform(), "cores": os.cpu_count()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                facts["cpu"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                facts["memory_kib"] = int(line.split()[1])
        facts["load_average_at_end"] = Path("/proc/loadavg").read_text().split()[:3]
    except OSError:
        pass
    return facts


def get(data: dict, *path, default="—"):
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return default
        data = data[key]
    if isinstance(data, list) and data and all(isinstance(x, (int, float)) for x in data):
        # Per-round figures: the median, as the ratios use.
        return sorted(data)[len(data) // 2]
    return data


def rows(results: dict) -> list:
    """(figure, measured, baseline, ratio) rows of the summary table."""
    out = []
    ingest = results.get("ingest", {})
    out.append((
        "Ingest: events/s into ClickHouse (steady, median of rounds) vs consume-and-discard",
        get(ingest, "aggregator_into_clickhouse_events_per_s", "steady"),
        get(ingest, "baseline_consume_discard_events_per_s", "steady"),
        get(ingest, "median_ratio_aggregator_to_baseline", "steady"),
    ))
    query = results.get("query", {})
    out.append((
        "Query: single-user p50 ms, exact vs naive minute-row query",
        get(query, "single_user_ms", "exact_p50"),
        get(query, "single_user_ms", "naive_p50"),
        get(query, "single_user_ms", "ratio_p50_naive_over_exact"),
    ))
    out.append((
        "Query: heavy-listener p50 ms, exact vs naive",
        get(query, "heavy_user_ms", "exact_p50"),
        get(query, "heavy_user_ms", "naive_p50"),
        get(query, "heavy_user_ms", "ratio_p50_naive_over_exact"),
    ))
    out.append((
        "Query: batch users/s, exact vs naive",
        get(query, "batch_users_per_s", "exact"),
        get(query, "batch_users_per_s", "naive"),
        get(query, "batch_users_per_s", "ratio_exact_over_naive"),
    ))
    refresh = results.get("refresh", {})
    out.append((
        "Refresher: users/s vs one ClickHouse query per user",
        get(refresh, "refresher", "users_per_s"),
        get(refresh, "per_user_baseline", "users_per_s"),
        get(refresh, "ratio_refresher_over_baseline"),
    ))
    group = results.get("refresh_group", {})
    out.append((
        "Refreshers: users/s of two processes in one group vs one (same stack)",
        get(group, "two_members_users_per_s"),
        get(group, "one_member_users_per_s"),
        get(group, "ratio_two_over_one"),
    ))
    api = results.get("api", {})
    if api and "error" not in api:
        out.append((
            "API: requests/s (warm cache) vs redis-benchmark of the same reads",
            get(api, "api_rps"),
            get(api, "redis_benchmark_rps"),
            get(api, "api_vs_redis"),
        ))
        out.append((
            "API: p99 at half the maximum rate / no-cache (ClickHouse) path requests/s",
            f"{get(api, 'half_rate_p99')} at {get(api, 'half_rate_rps')} req/s",
            f"no-cache {get(api, 'olap_rps')} req/s (p99 {get(api, 'olap_p99')})",
            get(api, "cache_vs_olap"),
        ))
    for config in get(results.get("freshness", {}), "configs", default=[]):
        out.append((
            f"Freshness p50 / p99 ms (flush {config['flush_interval']}, refresh {config['refresh_interval']})",
            f"{config['p50_ms']:.0f} / {config['p99_ms']:.0f}",
            "—",
            "—",
        ))
    memory = results.get("memory", {})
    for run in get(memory, "runs", default=[]):
        out.append((
            f"Aggregator peak RSS MiB, cap {run['cap_bytes'] >> 20} MiB (state over cap = (peak − idle) / cap)",
            run["peak_rss_bytes"] >> 20,
            f"idle {get(memory, 'idle_rss_bytes', default=0) >> 20}",
            run["state_over_cap"],
        ))
    if refresh:
        out.append((
            "Redis bytes per cached user (both keys)",
            get(refresh, "redis_bytes_per_cached_user"),
            "—",
            "—",
        ))
    return out


def chart(results: dict, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    left, right = axes
    for config in get(results.get("freshness", {}), "configs", default=[]):
        samples = sorted(config.get("samples_ms", []))
        if samples:
            ys = [(i + 1) / len(samples) for i in range(len(samples))]
            left.step([s / 1000 for s in samples], ys, where="post",
                      label=f"flush {config['flush_interval']} / refresh {config['refresh_interval']}")
    left.set_xlabel("produced → visible (s)")
    left.set_ylabel("fraction of probes")
    left.set_title("Freshness (CDF)")
    left.grid(alpha=0.3)
    if left.get_legend_handles_labels()[0]:
        left.legend()
    api = results.get("api", {})
    latency = get(api, "latency_ms", default={})
    if isinstance(latency, dict) and latency:
        labels = list(latency.keys())
        right.bar(labels, [latency[k] for k in labels])
        right.set_ylabel("ms")
        right.set_title("API latency percentiles (warm cache)")
    else:
        query = results.get("query", {})
        labels, values = [], []
        for key in ("exact_p50", "exact_p99", "naive_p50", "naive_p99"):
            value = get(query, "single_user_ms", key, default=None)
            if value is not None:
                labels.append(key)
                values.append(value)
        right.bar(labels, values)
        right.set_ylabel("ms")
        right.set_title("Single-user query latency (ClickHouse)")
    right.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main() -> None:
    directory = Path(sys.argv[1] if len(sys.argv) > 1 else "target/bench-report")
    results = load(directory)
    report = {"machine": machine(), "results": results}
    (directory / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    has_chart = chart(results, directory / "report.png")
    lines = [
        "# topk benchmark report",
        "",
        "Every figure is measured in one run on this machine, against its baseline measured in the "
        "same run. Machine: " + ", ".join(f"{k} {v}" for k, v in report["machine"].items()) + ".",
        "",
        "| figure | measured | baseline | ratio |",
        "|---|---|---|---|",
    ]
    for figure, measured, baseline, ratio in rows(results):
        lines.append(f"| {figure} | {measured} | {baseline} | {ratio} |")
    errors = [f"- `{name}`: {data['error']}" for name, data in results.items() if "error" in data]
    if errors:
        lines += ["", "Benchmarks that produced no figures:", *errors]
    if has_chart:
        lines += ["", "![freshness and latency distributions](report.png)"]
    lines += ["", "Raw figures of every benchmark: `report.json`.", ""]
    (directory / "report.md").write_text("\n".join(lines))
    print(directory / "report.md")


if __name__ == "__main__":
    main()
