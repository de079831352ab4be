"""Soak (issue 10): a real `splitllm serve` process, many sessions at once, many cycles.

64 concurrent split sessions of 32 tokens each must all get the unsplit model's tokens with no
error (the server has two tokens, one from --token and one from --token-file, and half the
sessions use each: every token's fair share of the 64 sessions is taken at once); 1000
open/close cycles must leave the server process's RSS within 10% of its baseline (taken after
100 warm-up cycles, when the allocators have settled). Counts and bytes only: the
latencies are reported by benchmarks/bench_soak.py, never asserted.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from process_kit import ServerProcess
from runtime_kit import VOCAB, metrics
from soak_kit import concurrent_sessions, cycles, soak_prompts, unsplit_tokens

from splitllm.runtime.models import LoadedModel
from splitllm.runtime.units import UnitStack

SESSIONS = 64  # the server's default max_sessions: every slot taken at once
NEW_TOKENS = 32
WARM_UP_CYCLES = 100
CYCLES = 1000
TOKENS = ("alpha-token", "beta-token")


@pytest.fixture(scope="module")
def serve_process(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory
                  ) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("soak")
    token_file = folder / "tokens.txt"
    token_file.write_text(f"# soak clients\n\n{TOKENS[1]}\n")
    server = ServerProcess(tiny_llama_dir, folder, args=(
        "--token", TOKENS[0], "--token-file", str(token_file))).start()
    try:
        yield server.wait_serving()
    finally:
        server.stop()


def test_64_concurrent_sessions_all_get_the_unsplit_tokens(
        tiny_llama: LoadedModel, serve_process: ServerProcess) -> None:
    prompts = soak_prompts(SESSIONS, 12, VOCAB)
    wants = unsplit_tokens(tiny_llama, prompts, NEW_TOKENS)
    runs = concurrent_sessions(tiny_llama, serve_process.ws_url, prompts, wants, TOKENS)
    assert [run.error for run in runs if run.error] == []
    assert sum(run.tokens == run.want for run in runs) == SESSIONS
    values = metrics(serve_process.http_url, TOKENS[0])
    assert not [name for name in values if name.startswith("splitllm_errors_total")]
    assert values["splitllm_open_sessions"] == 0


def test_1000_open_close_cycles_return_rss_to_its_baseline(
        tiny_llama: LoadedModel, serve_process: ServerProcess) -> None:
    assert serve_process.proc is not None
    server = psutil.Process(serve_process.proc.pid)
    n_units = UnitStack(tiny_llama.model).n_units
    prompt = soak_prompts(1, 12, VOCAB, seed=11)[0]
    want = unsplit_tokens(tiny_llama, [prompt], 1)[0][0]
    assert set(cycles(serve_process.ws_url, n_units, prompt, WARM_UP_CYCLES, TOKENS[1])) == {want}
    baseline_bytes = server.memory_info().rss
    assert set(cycles(serve_process.ws_url, n_units, prompt, CYCLES, TOKENS[0])) == {want}
    after_bytes = server.memory_info().rss
    assert after_bytes <= 1.1 * baseline_bytes, (baseline_bytes, after_bytes)
    values = metrics(serve_process.http_url, TOKENS[0])
    assert values["splitllm_open_sessions"] == 0 and values["splitllm_kv_cache_bytes"] == 0
    assert values['splitllm_sessions_closed_total{reason="close"}'] >= WARM_UP_CYCLES + CYCLES
