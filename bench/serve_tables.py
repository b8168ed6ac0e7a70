"""The figures a serve_latency.py run adds to its JSON: the targets of one query path, the
fp32/int8 comparison over rounds (also printed as a Markdown table) and the per-mode table of
--text-modes (printed too)."""

from __future__ import annotations

import statistics
import sys

from http_load import TEXT_MODES


def comparison(rounds: list[dict[str, dict]], levels: list[int]) -> dict:
    """Per figure: fp32's and int8's medians over the rounds, and the median per-round ratio."""
    high, low = str(max(levels)), str(min(levels))
    image_level = "8" if "8" in rounds[0]["fp32"]["http"]["image"] else high
    figures = {
        f"text requests/s, {high} clients": ("http", "text", high, "rps", 2.0, "min"),
        f"text p50 ms, {low} client": ("http", "text", low, "p50_ms", 0.6, "max"),
        f"text p99 ms, {low} client": ("http", "text", low, "p99_ms", None, None),
        f"image requests/s, {image_level} clients": (
            "http",
            "image",
            image_level,
            "rps",
            None,
            None,
        ),
        "lone text query p50 ms (0.5 s apart)": ("lone_query", "idle", None, "p50_ms", None, None),
    }
    out = {}
    for name, (section, kind, level, key, target, sense) in figures.items():

        def value(run: dict, section=section, kind=kind, level=level, key=key) -> float | None:
            part = run[section]
            if part is None:
                return None
            part = part[kind]
            return (part[level] if level else part)[key]

        fp32 = [value(r["fp32"]) for r in rounds]
        int8 = [value(r["int8"]) for r in rounds]
        if None in fp32 or None in int8:
            continue
        row = {
            "fp32": round(statistics.median(fp32), 2),
            "int8": round(statistics.median(int8), 2),
            "int8_over_fp32": round(
                statistics.median(b / a for a, b in zip(fp32, int8, strict=True)), 2
            ),
        }
        if target is not None:
            row["target"] = f"{'>=' if sense == 'min' else '<='} {target}"
        out[name] = row
    for path in rounds[0]:  # the query paths served (fp32, int8)
        ratios = [
            r[path]["lone_query"]["idle_over_back_to_back"] for r in rounds if r[path]["lone_query"]
        ]
        if ratios:
            out[f"{path}: lone over back-to-back"] = {
                "ratio": round(statistics.median(ratios), 2),
                "target": "<= 1.3",
            }
    return out


def print_table(table: dict) -> None:
    lines = ["| figure | fp32 | int8 | int8 / fp32 | target |", "|---|---|---|---|---|"]
    for name, row in table.items():
        if "ratio" in row:
            lines.append(f"| {name} | | | {row['ratio']} | {row['target']} |")
        else:
            lines.append(
                f"| {name} | {row['fp32']} | {row['int8']} | {row['int8_over_fp32']} | "
                f"{row.get('target', '')} |"
            )
    print("\n".join(lines), file=sys.stderr)


def mode_table(http: dict, levels: list[int]) -> dict:
    """Per text mode and level: p50/p99 and their ratio to the first mode's (printed too)."""
    out, lines = {}, ["| mode | clients | p50 ms | p99 ms | p50 / first's | p99 / first's |"]
    lines.append("|---|---|---|---|---|---|")
    for kind, mode in TEXT_MODES.items():
        for level in map(str, levels):
            row, base = http[kind][level], http["text"][level]
            out.setdefault(mode, {})[level] = {
                "p50_ms": row["p50_ms"],
                "p99_ms": row["p99_ms"],
                "p50_ratio": round(row["p50_ms"] / base["p50_ms"], 2),
                "p99_ratio": round(row["p99_ms"] / base["p99_ms"], 2),
            }
            figures = out[mode][level]
            lines.append(
                f"| {mode} | {level} | {row['p50_ms']} | {row['p99_ms']} | "
                f"{figures['p50_ratio']} | {figures['p99_ratio']} |"
            )
    print("\n".join(lines), file=sys.stderr)
    return out


def targets(in_process: dict, http: dict, levels: list[int]) -> dict:
    low, high = str(min(levels)), str(max(levels))
    text = http["text"]
    return {
        "text_p50_c1_over_in_process": round(text[low]["p50_ms"] / in_process["text"]["p50_ms"], 2),
        "text_p50_c1_over_in_process_target": 1.3,
        f"text_rps_{high}_over_{low}": round(text[high]["rps"] / max(text[low]["rps"], 1e-9), 2),
        f"image_rps_{high}_over_{low}": round(
            http["image"][high]["rps"] / max(http["image"][low]["rps"], 1e-9), 2
        ),
        "rps_ratio_target": 3.0,
        "errors": sum(v["errors"] for kind in http.values() for v in kind.values()),
        "errors_target": 0,
    }
