"""The OpenAI API's cost, side by side in one run on loopback (no emulation).

The same greedy generation four ways against one `splitllm serve` process: the native client
with an all-server session, the server's OpenAI API (SSE stream, the official `openai`
client), and a `splitllm proxy` in this process (all-server, and auto placement). TTFT and
decode tokens/s from the stream's first and last content events; best of interleaved rounds.

    .venv/bin/python benchmarks/bench_openai.py [--model smollm2] [--tokens 32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import openai
import torch
import uvicorn
from rich.console import Console
from rich.table import Table

from splitllm.placement import Placement
from splitllm.runtime.client import connect
from splitllm.runtime.demo import free_port, start_server, stop_server, wait_healthy
from splitllm.runtime.hosting import BackgroundApp
from splitllm.runtime.models import LoadedModel, encode_prompt, load_model
from splitllm.runtime.proxy import ProxyBackend, ProxyConfig, create_proxy_app
from splitllm.runtime.units import UnitStack

PROMPT = "Write a short story about a robot who learns to paint."
Sample = tuple[float, float, str]  # TTFT s, TPOT s, placement


def api_run(base_url: str, model: str, tokens: int) -> Callable[[], Sample]:
    client = openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)

    def run() -> Sample:
        clock = time.perf_counter()
        stamps: list[float] = []
        placement, completion = "server API", 0
        for chunk in client.chat.completions.create(
                model=model, max_tokens=tokens, temperature=0, stream=True,
                stream_options={"include_usage": True},
                messages=[{"role": "user", "content": PROMPT}]):
            if chunk.choices and chunk.choices[0].delta.content:
                stamps.append(time.perf_counter() - clock)
            if chunk.usage is not None:
                completion = chunk.usage.completion_tokens
                placement = (chunk.model_extra or {}).get("splitllm", {}).get(
                    "placement", placement)
        return stamps[0], (stamps[-1] - stamps[0]) / max(completion - 1, 1), placement
    return run


def native_run(url: str, loaded: LoadedModel, tokens: int) -> Callable[[], Sample]:
    session = connect(url, loaded)
    ids = encode_prompt(loaded, PROMPT)
    n = session.stack.n_units

    def run() -> Sample:
        result = session.generate(ids, tokens, placement="S" * n)
        return result.ttft_s, result.tpot_s, result.placement
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    loaded = load_model(args.model)
    n = UnitStack(loaded.model).n_units
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "server.log"
        proc = start_server(args.model, port, log, threads=1)
        try:
            wait_healthy(f"http://127.0.0.1:{port}", proc, log)
            url = f"ws://127.0.0.1:{port}"
            proxies = [ProxyBackend(loaded, ProxyConfig(server=url, placement=p))
                       for p in ("S" * n, "auto")]
            apps = [BackgroundApp(lambda bound, b=b: uvicorn.Config(
                create_proxy_app(b), host="127.0.0.1", port=bound, log_level="warning")).start()
                for b in proxies]
            configs = {
                "native client, all-server": native_run(url, loaded, args.tokens),
                "server's OpenAI API": api_run(f"http://127.0.0.1:{port}", loaded.model_id,
                                               args.tokens),
                "proxy, all-server": api_run(apps[0].http_url, loaded.model_id, args.tokens),
                "proxy, auto placement": api_run(apps[1].http_url, loaded.model_id,
                                                 args.tokens),
            }
            samples: dict[str, list[Sample]] = {name: [] for name in configs}
            for _ in range(args.rounds):  # interleaved: load from others hits all alike
                for name, run in configs.items():
                    samples[name].append(run())
            for app in apps:
                app.stop()
        finally:
            stop_server(proc)
    _print(samples, args, loaded)


def _print(samples: dict[str, list[Sample]], args: argparse.Namespace,
           loaded: LoadedModel) -> None:
    table = Table(title=f"OpenAI API on loopback: {loaded.model_id}, 1 thread per process, "
                        f"{args.tokens} new tokens, best of {args.rounds} interleaved rounds")
    for column in ("path", "placement", "TTFT ms", "decode tokens/s", "vs native"):
        table.add_column(column, justify="left" if column in ("path", "placement") else "right")
    native_tpot = min(s[1] for s in samples["native client, all-server"])
    for name, runs in samples.items():
        ttft, tpot = min(s[0] for s in runs), min(s[1] for s in runs)
        table.add_row(name, _compact(runs[-1][2]), f"{ttft * 1e3:.0f}", f"{1 / tpot:.2f}",
                      f"{native_tpot / tpot:.3f}x")
    Console(width=120).print(table)


def _compact(placement: str) -> str:
    if set(placement) - {"C", "S"}:
        return "all-server"  # the server's own API
    return " ".join(f"{s.side}{s.stop - s.start}" for s in Placement(placement).segments())


if __name__ == "__main__":
    clock = time.perf_counter()
    main()
    print(f"benchmark took {time.perf_counter() - clock:.0f} s")
