"""The CLI: `splitllm serve` in a real process, `generate` against it, and `--local`."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from runtime_kit import TIMEOUT_S, wait_for
from typer.testing import CliRunner

from splitllm.cli import app
from splitllm.errors import UserError
from splitllm.runtime.demo import free_port

SPLITLLM = str(Path(sys.executable).parent / "splitllm")
TOKEN = "cli-secret"
# Generous bounds, not speed checks: a loaded 2-core machine takes a minute just to import torch.
SERVER_START_S = 300.0
COMMAND_S = 600.0


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def served(tiny_llama_dir: Path) -> Iterator[str]:
    """`splitllm serve` on the tiny model, in its own process, with a bearer token from env."""
    port = free_port()
    env = {**os.environ, "SPLITLLM_TOKEN": TOKEN}
    proc = subprocess.Popen(
        [SPLITLLM, "serve", "--model", str(tiny_llama_dir), "--port", str(port), "--threads", "1"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        wait_for(lambda: _healthy(f"http://127.0.0.1:{port}") or proc.poll() is not None,
                 timeout_s=SERVER_START_S)
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        yield f"ws://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=TIMEOUT_S)


def run_cli(*args: str) -> dict[str, object]:
    result = CliRunner().invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return dict(json.loads(result.stdout.strip().splitlines()[-1]))


def test_generate_split_equals_local(served: str, tiny_llama_dir: Path) -> None:
    common = ["generate", "--model", str(tiny_llama_dir), "--prompt", "the lazy dog",
              "--max-new-tokens", "8", "--json"]
    local = run_cli(*common, "--local")
    assert local["placement"] == "local" and len(local["tokens"]) >= 1  # type: ignore[arg-type]
    for placement in ("CSSCSC", "SSSSSS"):
        split = run_cli(*common, "--server", served, "--placement", placement,
                        "--token", TOKEN, "--prefill-chunk", "3")
        assert split["tokens"] == local["tokens"] and split["text"] == local["text"]
        assert split["placement"] == placement
        assert set(split) >= {"tokens", "text", "placement", "ttft_s", "tpot_s"}
        assert "predicted" not in split  # a fixed placement promises nothing
    for speculate in ("4", "auto"):
        fast = run_cli(*common, "--server", served, "--placement", "CSSSSC", "--token", TOKEN,
                       "--speculate", speculate)
        assert fast["tokens"] == local["tokens"], speculate
        assert 0 <= fast["accepted"] <= fast["drafted"]  # type: ignore[operator]
        assert fast["round_trips"] >= 1  # type: ignore[operator]


def test_auto_placement_over_an_emulated_link(served: str, tiny_llama_dir: Path) -> None:
    out = run_cli("generate", "--model", str(tiny_llama_dir), "--prompt", "quick fox",
                  "--max-new-tokens", "4", "--json", "--server", served, "--token", TOKEN,
                  "--placement", "auto", "--emulate-link", "lan",
                  "--emulate-client-slowdown", "2")
    assert len(str(out["placement"])) == 6 and set(str(out["placement"])) <= {"C", "S"}
    assert "EMULATED link lan" in str(out["emulation"])
    predicted = out["predicted"]  # what the plan promised, beside the measured figures
    assert isinstance(predicted, dict)
    assert set(predicted) == {"new_tokens", "ttft_s", "tpot_s", "e2e_s", "server_cpu_s"}
    assert predicted["new_tokens"] == 4  # the promise is for --max-new-tokens
    assert 0 < predicted["ttft_s"] <= predicted["e2e_s"] <= float(out["sla_s"])  # type: ignore[arg-type]
    assert out["headroom"] in (0.0, 0.1)  # planned within 0.9 x the SLA where a plan is that fast
    assert predicted["e2e_s"] <= (1 - out["headroom"]) * out["sla_s"] * (1 + 1e-9)  # type: ignore[operator]
    presets = run_cli("generate", "--model", str(tiny_llama_dir), "--prompt", "quick fox",
                      "--max-new-tokens", "2", "--json", "--server", served, "--token", TOKEN,
                      "--client-device", "phone", "--server-device", "datacenter-gpu")
    assert len(str(presets["placement"])) == 6


def test_streaming_and_user_errors_through_the_real_command(served: str,
                                                            tiny_llama_dir: Path) -> None:
    env = {**os.environ, "SPLITLLM_TOKEN": TOKEN}
    ok = subprocess.run(
        [SPLITLLM, "generate", "--model", str(tiny_llama_dir), "--server", served,
         "--prompt", "fox", "--placement", "CCCSSS", "--max-new-tokens", "5", "--threads", "1"],
        env=env, capture_output=True, text=True, timeout=COMMAND_S,
    )
    assert ok.returncode == 0, ok.stderr
    assert "placement CCCSSS" in ok.stderr and "tokens/s" in ok.stderr
    bad = subprocess.run(
        [SPLITLLM, "generate", "--model", str(tiny_llama_dir), "--server", served,
         "--prompt", "fox", "--placement", "CCS", "--threads", "1"],
        env=env, capture_output=True, text=True, timeout=COMMAND_S,
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith("error: placement 'CCS' has 3 letters")


def test_user_errors_in_process(served: str, tiny_llama_dir: Path) -> None:
    runner = CliRunner()
    for args, message in [
        (["--wire-dtype", "int8"], "wire dtype"),
        (["--placement", "auto", "--client-device", "phone"], "mixing"),
        (["--token", "wrong"], "unauthorized"),
        (["--emulate-link", "carrier-pigeon"], "unknown link"),
        (["--speculate", "many"], "--speculate must be 'auto' or a number"),
    ]:
        result = runner.invoke(app, ["generate", "--model", str(tiny_llama_dir), "--server",
                                     served, "--prompt", "x", "--token", TOKEN, *args])
        assert isinstance(result.exception, UserError), (args, result.output)
        assert message in str(result.exception)


def test_demo_runs_end_to_end_on_a_small_model(tiny_llama_dir: Path) -> None:
    result = CliRunner().invoke(app, ["demo", "--model", str(tiny_llama_dir),
                                      "--max-new-tokens", "6", "--link", "wifi"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "Answer (split):" in out and "What the split did" in out
    assert "EMULATED" in out and "server busy s" in out and "Plans, times in ms" in out
    same = next(line for line in out.splitlines() if "same tokens" in line)
    assert "yes" in same


def test_serve_rejects_bad_compute_and_keeps_the_old_device_flag(tiny_llama_dir: Path) -> None:
    import torch

    def serve(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([SPLITLLM, "serve", "--model", str(tiny_llama_dir), *args],
                              capture_output=True, text=True, timeout=120)

    if not torch.cuda.is_available():
        no_cuda = serve("--compute", "cuda")
        assert no_cuda.returncode == 2
        assert no_cuda.stderr.strip().splitlines() == [
            "error: --compute cuda: no CUDA device is available here (use --compute cpu)"]
    assert serve("--compute", "tpu").stderr.strip() == "error: --compute 'tpu': use cpu, cuda " \
                                                       "or auto"
    old = serve("--device", "no-such-device")  # the old name of --announce-device still works
    assert old.returncode == 2
    assert "--device is deprecated: use --announce-device" in old.stderr
    assert "no-such-device" in old.stderr.strip().splitlines()[-1]


def test_serve_on_a_port_in_use_says_so_before_it_loads_anything(tiny_llama_dir: Path) -> None:
    """The port is bound first: a port in use is one line and exit code 2, not a 'serving'
    line after the start-up work and then uvicorn's error."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([SPLITLLM, "serve", "--model", str(tiny_llama_dir), "--port",
                                 str(port)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: cannot listen on 127.0.0.1:{port}: Address already in use"]
