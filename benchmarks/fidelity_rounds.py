"""How precisely `splitllm fidelity` measures a split's saving, and with which estimator.

Run: .venv/bin/python benchmarks/fidelity_rounds.py DIR [DIR ...] [--windows 3,5,7,9]

Each DIR is a `splitllm fidelity --out DIR` report (its results.json keeps every round). Prints:

1. Pairing: the correlation of a split's and server-only's log server CPU seconds (each less its
   placement's mean) in the same round and with server-only one round later, and the sd of
   the log ratio of a split's round to server-only's run before it (its round's), after it (the
   next round's) and their mean. Noise common to a round would show in the same round alone; a
   drift over neighbouring generations in both (then the mean of before and after pairs best).
2. Estimators of a split's saving from its rounds, each against the mean of server-only's runs
   before and after it (what `fidelity` pairs): the mean of the rounds' savings (what it
   reports), their median (what it reported before), their 20% trimmed mean, one minus the
   ratio of the two placements' summed or median CPU seconds. For each, the RMS and mean of its
   gap to the plan over all splits, and its spread over 2000 draws of k rounds from every
   split's centred (split, server-only) pairs pooled (the noise's real shape, a known true
   saving).
3. The per-round sd of a split's saving, and the rounds a 95% t interval of +-1, 2 or 3 points
   needs at that sd.
4. Per k, how many windows of k consecutive rounds put the mean within 3 points of the plan.
5. Grid to grid: per kind of split, the sd of its planned and of its measured saving over the
   runs that hold the same point (condition, lengths, placement), their mean over the points (a
   planned saving that moves from run to run is the cost model's noise, not the measurement's).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

TARGET_POINTS = 3.0
Estimator = Callable[[np.ndarray, np.ndarray], float]  # (split CPU s, server-only's) -> saving


def trimmed_mean(values: np.ndarray, share: float = 0.2) -> float:
    """The mean of the values less the lowest and highest share of them."""
    ordered = np.sort(values)
    cut = int(share * len(ordered))
    return float(ordered[cut:len(ordered) - cut].mean())


ESTIMATORS: dict[str, Estimator] = {
    "mean of rounds": lambda s, b: float(np.mean(1 - s / b)),
    "median of rounds": lambda s, b: float(np.median(1 - s / b)),
    "20% trimmed mean": lambda s, b: trimmed_mean(1 - s / b),
    "ratio of sums": lambda s, b: float(1 - s.sum() / b.sum()),
    "medians' ratio": lambda s, b: float(1 - np.median(s) / np.median(b)),
}


def split_rounds(document: dict[str, Any]) -> list[tuple[float, np.ndarray, np.ndarray]]:
    """(planned saving, the split's CPU seconds per round, server-only's from the same first
    round on) per split point."""
    points = document["results"]
    rows = []
    for point in points:
        if "server-only" in point["kinds"] or "S" not in point["placement"]:
            continue
        base = next(b for b in points if "server-only" in b["kinds"]
                    and (b["condition_label"], b["prompt_tokens"], b["new_tokens"])
                    == (point["condition_label"], point["prompt_tokens"], point["new_tokens"]))
        planned = 1 - point["predicted"]["server_cpu_s"] / base["predicted"]["server_cpu_s"]
        rows.append((planned, np.array([run["server_cpu_s"] for run in point["runs"]]),
                     np.array([run["server_cpu_s"] for run in base["runs"]])))
    return rows


def flanked(split: np.ndarray, base: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The split's rounds that have a server-only run after them, and the mean of server-only's
    run before (its round's) and after (the next round's) each."""
    rounds = min(len(split), len(base) - 1)
    return split[:rounds], (base[:rounds] + base[1:rounds + 1]) / 2


def pairing(rows: list[tuple[float, np.ndarray, np.ndarray]]) -> None:
    """Correlation of the two placements' log CPU deviations (same round, one round on), and
    the sd of a round's log ratio against server-only before, after and both."""
    same, later = [], []
    ratios: dict[str, list[float]] = {"before": [], "after": [], "before and after": []}
    for _, split, base in rows:
        rounds = min(len(split), len(base) - 1)
        s, b = np.log(split[:rounds]), np.log(base[:rounds + 1])
        same += list(zip(s - s.mean(), b[:-1] - b[:-1].mean(), strict=True))
        later += list(zip(s - s.mean(), b[1:] - b[1:].mean(), strict=True))
        for name, ratio in (("before", s - b[:-1]), ("after", s - b[1:]),
                            ("before and after", np.log(np.divide(*flanked(split, base))))):
            ratios[name] += list(ratio - ratio.mean())
    for name, pairs in (("the same round", same), ("the next round", later)):
        x, y = np.array(pairs).T
        print(f"log CPU deviations, split against server-only in {name}: correlation "
              f"{np.corrcoef(x, y)[0, 1]:.2f} ({len(pairs)} pairs)")
    x, y = np.array(same).T
    print(f"  sd of the split's {x.std():.3f}, server-only's {y.std():.3f}; unpaired, their "
          f"difference's would be {math.hypot(x.std(), y.std()):.3f}")
    print("sd of a round's log(split / server-only), server-only " + ", ".join(
        f"{name} {np.std(r):.3f}" for name, r in ratios.items()))


def estimators(rows: list[tuple[float, np.ndarray, np.ndarray]], rounds: list[int]) -> None:
    """Each estimator's gap to the plan, and its spread over draws of pooled noise."""
    pairs = [flanked(s, b) for _, s, b in rows]
    pooled = np.concatenate([np.stack([np.log(s) - np.log(s).mean(),
                                       np.log(b) - np.log(b).mean()], axis=1)
                             for s, b in pairs])  # [pairs, 2]
    rng = np.random.default_rng(0)
    draws = {k: [pooled[rng.integers(0, len(pooled), k)] for _ in range(2000)] for k in rounds}
    for name, estimate in ESTIMATORS.items():
        gaps = np.array([100 * (estimate(*pair) - planned)
                         for (planned, _, _), pair in zip(rows, pairs, strict=True)])
        spread = [np.std([100 * estimate(0.65 * np.exp(d[:, 0]), np.exp(d[:, 1]))
                          for d in draws[k]]) for k in rounds]
        print(f"{name:17}: gap to plan RMS {np.sqrt(np.mean(gaps ** 2)):.2f}, mean "
              f"{gaps.mean():+.2f}, beyond {TARGET_POINTS:g}: {np.sum(abs(gaps) > TARGET_POINTS)}"
              f"; spread (sd, points) at " + ", ".join(
                  f"{k} rounds {s:.2f}" for k, s in zip(rounds, spread, strict=True)))


def rounds_needed(rows: list[tuple[float, np.ndarray, np.ndarray]]) -> None:
    """Rounds a 95% t interval of a given half-width needs at each split's per-round sd."""
    sds = np.array([100 * np.std(1 - np.divide(*flanked(s, b)), ddof=1) for _, s, b in rows])
    print("per-round sd of a split's saving (points): 10th / 50th / 90th percentile "
          + " / ".join(f"{v:.1f}" for v in np.percentile(sds, [10, 50, 90])))
    for half_width in (1.0, 2.0, 3.0):
        need = np.ceil((1.96 * sds / half_width) ** 2)
        print(f"  +-{half_width:g} points: median {np.median(need):.0f} rounds, 90th percentile "
              f"{np.percentile(need, 90):.0f}")


def windows(rows: list[tuple[float, np.ndarray, np.ndarray]], rounds: list[int]) -> None:
    """Per k, the mean of k consecutive rounds against the plan."""
    savings = [(planned, 1 - np.divide(*flanked(s, b))) for planned, s, b in rows]
    for k in rounds:
        gaps = [100 * (statistics.fmean(saved[i:i + k]) - planned)
                for planned, saved in savings for i in range(len(saved) - k + 1)]
        if gaps:
            within = sum(abs(g) <= TARGET_POINTS for g in gaps)
            print(f"{k} rounds: {within}/{len(gaps)} windows within {TARGET_POINTS:g} points, "
                  f"worst {max(gaps, key=abs):+.1f}, mean {statistics.fmean(gaps):+.2f}")


def spread(documents: list[dict[str, Any]]) -> None:
    """Each kind of split's planned and measured saving, their sd over the runs per point."""
    by_point: dict[tuple[str, str, int, int, str], list[tuple[float, float]]] = {}
    for document in documents:
        for saving in document["savings"]:
            key = ("+".join(saving["kinds"]), saving["condition"], saving["prompt_tokens"],
                   saving["new_tokens"], saving["placement"])
            by_point.setdefault(key, []).append((saving["planned_saving"],
                                                 saving["measured_saving"]))
    for kind in sorted({key[0] for key in by_point}):
        points = [runs for key, runs in by_point.items() if key[0] == kind and len(runs) > 1]
        if points:
            planned, measured = (statistics.fmean(100 * statistics.stdev(run[i] for run in runs)
                                                  for runs in points) for i in (0, 1))
            print(f"{kind}: sd grid to grid over {len(points)} points, planned {planned:.2f}, "
                  f"measured {measured:.2f} points")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+", type=Path)
    parser.add_argument("--windows", default="3,5,7,9")
    args = parser.parse_args()
    documents = [json.loads((d / "results.json").read_text()) for d in args.dirs]
    rows = [row for document in documents for row in split_rounds(document)]
    rounds = [int(w) for w in args.windows.split(",")]
    print(f"{len(rows)} splits from {len(args.dirs)} runs")
    pairing(rows)
    estimators(rows, rounds)
    rounds_needed(rows)
    windows(rows, rounds)
    spread(documents)


if __name__ == "__main__":
    main()
