"""How well a measured profile predicts SmolLM2's unit times outside its measured points.

Run: .venv/bin/python benchmarks/bench_profile_fit.py

Profiles the whole model as a server does at start (`profile_units`: prefill at 8/32/96 tokens,
decode at contexts 16/256/1024 on filled caches, median of 3 rounds, wall and CPU seconds), then
times a prefill of 256 tokens and decode steps at context ~600 after a real 600-token prefill,
and prints each beside the fitted prediction, in wall and in CPU seconds (the CPU seconds are
what a loaded machine leaves steady). One thread.
"""

from __future__ import annotations

import statistics
import time

import torch

from splitllm.runtime.models import load_model
from splitllm.runtime.profile import UnitProfile, profile_units
from splitllm.runtime.units import SegmentCache, UnitStack


def timed(stack: UnitStack, ids: torch.Tensor, start: int, cache: SegmentCache | None
          ) -> tuple[float, float]:
    """(wall, CPU) seconds of the whole model on ids at positions start.. ."""
    wall: list[float] = []
    cpu: list[float] = []
    positions = torch.arange(start, start + ids.shape[1])[None]
    stack.run(0, stack.n_units, ids, positions, cache, wall, unit_cpu_seconds=cpu)
    return sum(wall), sum(cpu)


def line(what: str, measured: tuple[float, float], fitted: tuple[float, float]) -> str:
    return (f"{what}: wall measured {measured[0]:.3f} s, fitted {fitted[0]:.3f} s "
            f"({fitted[0] / measured[0] - 1:+.0%}); CPU measured {measured[1]:.3f} s, fitted "
            f"{fitted[1]:.3f} s ({fitted[1] / measured[1] - 1:+.0%})")


def main() -> None:
    torch.set_num_threads(1)
    stack = UnitStack(load_model("smollm2").model)
    clock = time.perf_counter()
    profile: UnitProfile = profile_units(stack)
    print(f"profile_units: {time.perf_counter() - clock:.2f} s")
    ids = torch.randint(0, stack.vocab_size, (1, 620), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        runs = [timed(stack, ids[:, :256], 0, stack.new_cache(0, stack.n_units))
                for _ in range(3)]
        prefill = (statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs))
        print(line("prefill P=256", prefill,
                   (sum(profile.prefill_at(256)), sum(profile.cpu().prefill_at(256)))))
        cache = stack.new_cache(0, stack.n_units)
        timed(stack, ids[:, :600], 0, cache)
        steps = [timed(stack, ids[:, p:p + 1], p, cache) for p in range(600, 605)]
    decode = (statistics.median(s[0] for s in steps), statistics.median(s[1] for s in steps))
    print(line("decode at context ~602", decode,
               (sum(profile.decode_at(602)), sum(profile.cpu().decode_at(602)))))


if __name__ == "__main__":
    main()
