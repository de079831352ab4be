"""How many rounds a split's saving needs: what k rounds of `splitllm fidelity` runs would give.

Run: .venv/bin/python benchmarks/fidelity_rounds.py DIR [DIR ...] [--windows 3,5,7,9]

Each DIR is a `splitllm fidelity --out DIR` report (its results.json keeps every round). For
every split and every k consecutive rounds of it, the gap between the plan and the saving those
rounds measure, two ways: the median of the rounds' paired savings (what `fidelity` reports)
and one minus the ratio of the two placements' median CPU seconds (what it reported before).
Prints, per k, how many such windows are within 3 points of the plan, the worst gap and the
mean gap (a bias common to all runs would show there; noise would not).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

TARGET_POINTS = 3.0


def split_rounds(document: dict[str, Any]) -> list[tuple[float, list[float], list[float]]]:
    """(planned saving, the split's CPU seconds per round, server-only's) per split point."""
    points = document["results"]
    rows = []
    for point in points:
        if "server-only" in point["kinds"] or "S" not in point["placement"]:
            continue
        base = next(b for b in points if "server-only" in b["kinds"]
                    and (b["condition_label"], b["prompt_tokens"], b["new_tokens"])
                    == (point["condition_label"], point["prompt_tokens"], point["new_tokens"]))
        planned = 1 - point["predicted"]["server_cpu_s"] / base["predicted"]["server_cpu_s"]
        rows.append((planned, [run["server_cpu_s"] for run in point["runs"]],
                     [run["server_cpu_s"] for run in base["runs"]]))
    return rows


def window_gaps(planned: float, split: list[float], base: list[float], k: int
                ) -> list[tuple[float, float]]:
    """(paired median, medians' ratio) gap in points for every k consecutive rounds."""
    gaps = []
    for i in range(len(split) - k + 1):
        s, b = split[i:i + k], base[i:i + k]
        paired = statistics.median(1 - x / y for x, y in zip(s, b, strict=True))
        ratio = 1 - statistics.median(s) / statistics.median(b)
        gaps.append((100 * (paired - planned), 100 * (ratio - planned)))
    return gaps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+", type=Path)
    parser.add_argument("--windows", default="3,5,7,9")
    args = parser.parse_args()
    rows = [row for d in args.dirs
            for row in split_rounds(json.loads((d / "results.json").read_text()))]
    print(f"{len(rows)} splits from {len(args.dirs)} runs")
    for k in (int(w) for w in args.windows.split(",")):
        gaps = [g for row in rows for g in window_gaps(*row, k)]
        if not gaps:
            continue
        for name, column in (("paired median", 0), ("medians' ratio", 1)):
            values = [g[column] for g in gaps]
            within = sum(abs(v) <= TARGET_POINTS for v in values)
            print(f"{k} rounds, {name:14}: {within}/{len(values)} windows within "
                  f"{TARGET_POINTS:g} points, worst {max(values, key=abs):+.1f}, "
                  f"mean {statistics.fmean(values):+.2f}")


if __name__ == "__main__":
    main()
