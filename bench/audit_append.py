"""The audit log's cost per request: AuditLog.append with its fsyncs (as served) against the same
appends with fsync made a no-op (the page cache only), in the same run, on the disk given.

Each append is what one audited request writes: the chained line, then LOG.head. Prints JSON.

    python bench/audit_append.py                    # a folder under the system's temp dir
    python bench/audit_append.py --dir /var/log/convirt --entries 2000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from service.guard.audit import AuditLog


def timed_appends(folder: Path, entries: int) -> dict:
    log = AuditLog(folder / "audit.jsonl")
    fields = {"endpoint": "/v1/search/text", "status": 200, "results": [str(n) for n in range(10)]}
    times = []
    for _ in range(entries):
        started = time.perf_counter()
        log.append(fields)
        times.append((time.perf_counter() - started) * 1e6)
    times.sort()
    return {
        "p50_us": round(statistics.median(times), 1),
        "p99_us": round(times[int(0.99 * (len(times) - 1))], 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=None, help="where to write the test logs")
    parser.add_argument("--entries", type=int, default=1000, help="appends per way")
    parser.add_argument("--rounds", type=int, default=3, help="both ways, alternating")
    args = parser.parse_args()
    fsync = os.fsync
    results: dict[str, list[dict]] = {"durable": [], "page_cache_only": []}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for n in range(args.rounds):
            results["durable"].append(timed_appends(Path(tmp) / f"durable-{n}", args.entries))
            os.fsync = lambda fd: None  # the baseline: what the log cost before it synced
            try:
                baseline = timed_appends(Path(tmp) / f"cached-{n}", args.entries)
            finally:
                os.fsync = fsync
            results["page_cache_only"].append(baseline)
    medians = {
        way: {key: statistics.median(r[key] for r in runs) for key in ("p50_us", "p99_us")}
        for way, runs in results.items()
    }
    print(
        json.dumps(
            {
                "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
                "dir": str(args.dir or tempfile.gettempdir()),
                "entries": args.entries,
                "rounds": results,
                "median": medians,
                "durable_over_cached_p50": round(
                    medians["durable"]["p50_us"] / medians["page_cache_only"]["p50_us"], 1
                ),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
