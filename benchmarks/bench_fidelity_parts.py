"""Where fidelity misses come from: the server's prefill against its two models, and the server
CPU seconds of placements measured in interleaved rounds against the prediction.

Run: PYTHONPATH=src .venv/bin/python benchmarks/bench_fidelity_parts.py [--rounds 5]

1. In-process, one thread, CPU seconds: a prefill of P tokens through the whole model as one
   engine step (`run_step`), per block and for the head, beside the engine's step model (one
   line in tokens) and the unit profile (timed at 8/32/96 prompt tokens).
2. On a `splitllm serve` child pinned to its own core: P=32, G=8 generations of six placements,
   each in turn per round; the median server CPU seconds of each beside the prediction of
   `Session.instance`, and the saving of each split against server-only, planned and measured.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from splitllm.placement import Placement
from splitllm.planner.instance import evaluate
from splitllm.runtime.client import connect
from splitllm.runtime.fidelity_run import local_server
from splitllm.runtime.models import LoadedModel, load_model
from splitllm.runtime.profile import measure_step_models, profile_units
from splitllm.runtime.step import StepRow, run_step
from splitllm.runtime.units import UnitStack

PLACEMENTS = {"server-only": "S" * 32, "blocks only": "C" + "S" * 30 + "C",
              "multi-switch": "C" + "S" * 15 + "C" * 7 + "S" * 8 + "C",
              "single cut": "C" + "S" * 19 + "C" * 12, "head on client": "S" * 31 + "C",
              "embed on client": "C" + "S" * 31}


def prefill_parts(stack: UnitStack, rounds: int) -> None:
    """Per block and head CPU ms of a P-token engine step against both models."""
    _, cpu = measure_step_models(stack)
    profile = profile_units(stack).cpu()
    n = stack.n_units
    ids = torch.randint(0, stack.vocab_size, (1, 128), generator=torch.Generator().manual_seed(0))
    for p in (1, 8, 32, 128):
        units = []
        for _ in range(rounds):
            row = StepRow(0, n, ids[:, :p], 0, stack.new_cache(0, n))
            units.append([run_step(stack, [row])[1].unit_cpu_s[u] for u in range(n)])
        measured = np.median(np.array(units), axis=0) * 1e3  # [units] ms
        block_ms = np.mean(profile.prefill_at(p)[1:-1]) * 1e3
        print(f"P={p:3d}: a block {measured[1:-1].mean():.2f} ms (step model "
              f"{cpu.block.seconds(p) * 1e3:.2f}, profile {block_ms:.2f}); "
              f"the head {measured[-1]:.2f} ms (step model {cpu.head.seconds(1) * 1e3:.2f}, "
              f"profile {profile.prefill_at(p)[-1] * 1e3:.2f})")


def placements_cpu(loaded: LoadedModel, rounds: int) -> None:
    """Median server CPU seconds per placement, interleaved rounds, against the prediction."""
    with local_server("smollm2", 1) as url, connect(url, loaded) as session:
        vocab = loaded.model.config.vocab_size
        prompt = [(vocab // 3 + 7 * i) % vocab for i in range(32)]
        session.generate(prompt[:8], 2, placement="S" * 32, chat=False)  # warm up
        whole, _ = session.instance(32, 8)
        runs: dict[str, list[float]] = {name: [] for name in PLACEMENTS}
        for _ in range(rounds):
            for name, sides in PLACEMENTS.items():
                runs[name].append(session.generate(prompt, 8, placement=sides, chat=False,
                                                   stop_at_eos=False).server_cpu_s)
        work = {name: evaluate(whole, Placement(sides)).server_work
                for name, sides in PLACEMENTS.items()}
        measured = {name: statistics.median(cpu) for name, cpu in runs.items()}
        for name in PLACEMENTS:
            planned = 1 - work[name] / work["server-only"]
            saved = 1 - measured[name] / measured["server-only"]
            print(f"{name:16s} server CPU s predicted {work[name]:.4f} measured "
                  f"{measured[name]:.4f} (x{measured[name] / work[name]:.3f}); saving planned "
                  f"{planned:.1%} "
                  f"measured {saved:.1%} ({100 * (saved - planned):+.1f} points)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    loaded = load_model("smollm2")
    clock = time.perf_counter()
    prefill_parts(UnitStack(loaded.model), args.rounds)
    placements_cpu(loaded, args.rounds)
    print(f"({time.perf_counter() - clock:.0f} s)")


if __name__ == "__main__":
    main()
