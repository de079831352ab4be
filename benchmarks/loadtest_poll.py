"""The load test's clients' CPU per read of the server's load: kept client vs fresh ones.

Load-aware probes read the server's /metrics page every `POLL_S`: the runner's kept HTTP
client beside a fresh one per read (how the runner read it before), side by side in one run
on one server, in rounds that alternate. Starts a local server as `splitllm loadtest` does;
run it under the measurement lock:

    flock /work/measure.lock env PYTHONPATH=src python benchmarks/loadtest_poll.py
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

from splitllm.runtime.fidelity_run import local_server
from splitllm.runtime.loadtest import POLL_S
from splitllm.runtime.loadtest_run import RunnerOptions, metrics_client, read_metrics


def cpu_per_read_s(read: Callable[[], object], reads: int) -> float:
    """This process's CPU seconds per call of `read`, over `reads` calls."""
    start_s = time.process_time()
    for _ in range(reads):
        read()
    return (time.process_time() - start_s) / reads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--reads", type=int, default=100, help="reads a round (default 100)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds each way (default 5)")
    args = parser.parse_args()
    with local_server(args.model, threads=1) as url:
        opts = RunnerOptions(server=url)

        def fresh() -> None:
            with metrics_client(opts) as http:
                read_metrics(http)

        with metrics_client(opts) as kept:
            page = read_metrics(kept)
            reads = {"kept client": lambda: read_metrics(kept), "fresh client a read": fresh}
            ways: dict[str, list[float]] = {way: [] for way in reads}
            for i in range(args.rounds):
                for way in (list(reads) if i % 2 == 0 else list(reversed(reads))):
                    ways[way].append(cpu_per_read_s(reads[way], args.reads))
    print(f"{len(page)} samples on the page; {args.rounds} rounds of {args.reads} reads each way")
    medians = {way: statistics.median(rounds) for way, rounds in ways.items()}
    for way, rounds in ways.items():
        print(f"  {way:20s} {medians[way] * 1e3:.3g} ms CPU a read (rounds "
              f"{', '.join(f'{r * 1e3:.3g}' for r in rounds)}): {medians[way] / POLL_S:.2%} "
              f"of a core at one read every {POLL_S:g} s")
    print(f"fresh over kept: x{medians['fresh client a read'] / medians['kept client']:.3g}")


if __name__ == "__main__":
    main()
