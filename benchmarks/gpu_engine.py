"""The engine on a GPU: packed == solo equivalence on CUDA, then the engine benchmark.

Prints "no CUDA" and exits 0 where there is none (CI, the CPU machines).

    .venv/bin/python benchmarks/gpu_engine.py [--model smollm2] [--sessions 1,4,8,16,32,64]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch

from splitllm.runtime.models import load_model
from splitllm.runtime.step import StepRow, run_step
from splitllm.runtime.units import UnitStack


def packed_vs_solo_max_diff(model: str, device: str) -> tuple[float, float]:
    """Largest |packed - solo| of logits, and of hidden states relative to their largest value,
    over rows of mixed segments and lengths, fp32 weights."""
    loaded = load_model(model, "float32")
    weights: torch.nn.Module = loaded.model
    weights.to(device)
    stack = UnitStack(loaded.model)
    n = stack.n_units
    gen = torch.Generator().manual_seed(0)
    specs = [(0, n, 37), (3, n, 12), (0, n // 2, 20), (5, n - 1, 1), (0, n, 1)]
    caches = [stack.new_cache(a, b) for a, b, _ in specs]
    solo = [stack.new_cache(a, b) for a, b, _ in specs]
    lengths = [0] * len(specs)
    worst = [0.0, 0.0]  # logits, hidden (relative)
    for step in range(4):
        rows = []
        for k, (start, stop, prompt) in enumerate(specs):
            t = prompt if step == 0 else 1
            x = (torch.randint(0, stack.vocab_size, (1, t), generator=gen) if start == 0
                 else torch.randn(1, t, stack.hidden_size, generator=gen)).to(device)
            rows.append(StepRow(start, stop, x, lengths[k], caches[k]))
            lengths[k] += t
        outputs, _ = run_step(stack, rows)
        with torch.inference_mode():
            for k, (row, out) in enumerate(zip(rows, outputs, strict=True)):
                want = stack.run(row.start, row.stop, row.x, row.position_ids, solo[k])
                assert out.out is not None
                diff = float((out.out - want).abs().max())
                if row.stop == n:
                    worst[0] = max(worst[0], diff)
                else:
                    worst[1] = max(worst[1], diff / float(want.abs().max()))
    return worst[0], worst[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--sessions", default="1,4,8,16,32,64")
    parser.add_argument("--tokens", default="32")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA: nothing to run here")
        return
    logits, hidden = packed_vs_solo_max_diff(args.model, "cuda")
    print(f"packed vs solo on CUDA, fp32: logits max |diff| = {logits:.2e} "
          f"({'OK' if logits <= 1e-4 else 'ABOVE 1e-4'}), hidden states max relative diff = "
          f"{hidden:.2e}")
    bench = Path(__file__).with_name("bench_engine.py")
    subprocess.run([sys.executable, str(bench), "--model", args.model, "--compute", "cuda",
                    "--driver", "socket",
                    "--sessions", args.sessions, "--tokens", args.tokens], check=True)


if __name__ == "__main__":
    main()
