"""A visit's fixed cost on the real server: the same server blocks in 1, 2, 4 and 8 segments.

Run: .venv/bin/python benchmarks/bench_visit_cost.py
     [--rounds 5] [--blocks 16] [--emulate-link 4g]

On a `splitllm serve` child pinned to its own core (loopback, P=32, G=8): after a warm-up, the
placements (server-only, a cut with the head, and `--blocks` server blocks in 1, 2, 4 and 8
segments) each in turn per round; per placement, the median server CPU seconds beside the
prediction of `Session.instance` (the server's live step model with its `job_s`, per visit); over
the segmented placements (the same blocks: an error in the blocks' cost moves them alike), a
line through (visits x passes, measured - predicted): its slope is the CPU per visit per pass
the model misses (0 when the model holds it); and the CPU per visit per pass itself, measured:
the slope of their measured CPU against their visits.
`--emulate-link` delays each message as that link would (the engine then waits between
visits): run it with and without to see whether a visit after a longer wait costs more.
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np

from splitllm.placement import SERVER, Placement
from splitllm.runtime.client import connect
from splitllm.runtime.fidelity import promised
from splitllm.runtime.fidelity_run import local_server, warm_up_placements
from splitllm.runtime.models import load_model

P, G = 32, 8


def segmented(n_units: int, segments: int, blocks: int) -> str:
    """`blocks` server blocks in `segments` runs, one client block between them; the embedding
    and the head on the client."""
    per = blocks // segments
    sides = "C" + "C".join(SERVER * per for _ in range(segments))
    return sides + "C" * (n_units - len(sides))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--blocks", type=int, default=16)
    parser.add_argument("--emulate-link", default=None, help="a link preset, e.g. wifi or 4g")
    args = parser.parse_args()
    loaded = load_model("smollm2")
    vocab = loaded.model.config.vocab_size
    prompt = [(vocab // 3 + 7 * i) % vocab for i in range(P)]
    with local_server("smollm2", 1) as url, connect(
            url, loaded, emulate_link=args.emulate_link) as session:
        n = session.stack.n_units
        placements = {"server-only": SERVER * n, "cut + head": "C" * 5 + SERVER * (n - 5),
                      **{f"{k} segments": segmented(n, k, args.blocks) for k in (1, 2, 4, 8)}}
        for placement in [*warm_up_placements(n), *warm_up_placements(n), *placements.values()]:
            session.generate(prompt, G, placement=placement, chat=False, stop_at_eos=False)
        cpu_s: dict[str, list[float]] = {name: [] for name in placements}
        for _ in range(args.rounds):
            for name, placement in placements.items():
                run = session.generate(prompt, G, placement=placement, chat=False,
                                       stop_at_eos=False)
                cpu_s[name].append(run.server_cpu_s)
        whole, source = session.instance(P, G)
        print(f"link: {args.emulate_link or 'loopback'} (EMULATED where named); predicted from: "
              f"{source}")
        visit_passes, missed_s = [], []
        for name, placement in placements.items():
            predicted = promised(session, Placement(placement), P, G, whole=whole).server_cpu_s
            measured = statistics.median(cpu_s[name])
            visits = sum(seg.side == SERVER for seg in Placement(placement).segments())
            visit_passes.append(visits * G)
            missed_s.append(measured - predicted)
            print(f"{name:12s} {visits} visits, {placement[1:-1].count(SERVER):2d} blocks: "
                  f"predicted {predicted * 1e3:6.1f} ms, measured {measured * 1e3:6.1f} ms "
                  f"({min(cpu_s[name]) * 1e3:.1f}-{max(cpu_s[name]) * 1e3:.1f}), "
                  f"{(measured - predicted) * 1e3:+.1f} ms")
        segments = [list(placements).index(name) for name in placements
                    if name.endswith("segments")]
        slope, _ = np.polyfit([visit_passes[i] for i in segments], [missed_s[i] for i in segments],
                              1)
        print(f"missed per visit per pass: {slope * 1e3:+.2f} ms of CPU")
        measured_s = [statistics.median(seconds) for seconds in cpu_s.values()]
        per_visit, _ = np.polyfit([visit_passes[i] for i in segments],
                                  [measured_s[i] for i in segments], 1)
        print(f"measured per visit per pass ({args.blocks} blocks in 1-8 segments): "
              f"{per_visit * 1e3:.2f} ms of CPU")


if __name__ == "__main__":
    main()
