"""The OpenAI API's parts: stop sequences over any deltas, the `proxy` command, SmolLM2."""

from __future__ import annotations

import itertools
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from hypothesis import given
from hypothesis import strategies as st
from openai_kit import TOKEN, reference, running_proxy
from runtime_kit import TIMEOUT_S, wait_for
from typer.testing import CliRunner

from splitllm.cli import app
from splitllm.errors import UserError
from splitllm.runtime.demo import free_port
from splitllm.runtime.hosting import BackgroundServer
from splitllm.runtime.models import LoadedModel
from splitllm.runtime.openai_api import StopText
from splitllm.runtime.server_state import ServerConfig

SPLITLLM = str(Path(sys.executable).parent / "splitllm")


@given(text=st.text(alphabet="abc", max_size=30),
       cuts=st.lists(st.integers(0, 30), max_size=8),
       stops=st.lists(st.text(alphabet="abc", min_size=1, max_size=4), max_size=4))
def test_stop_text_releases_exactly_the_text_before_the_first_stop(
        text: str, cuts: list[int], stops: list[str]) -> None:
    # Generation stops at the stop that ends first (of two ending together, the longer):
    # whatever the cuts, the text before where it begins.
    ends = [(i + len(s), i) for s in stops if (i := text.find(s)) >= 0]
    first = min(ends)[1] if ends else len(text)
    matcher = StopText(tuple(stops))
    bounds = [0, *sorted(c for c in cuts if c <= len(text)), len(text)]
    released = [matcher.add(text[a:b]) for a, b in itertools.pairwise(bounds)]
    released.append(matcher.flush())
    assert "".join(released) == text[:first]
    assert matcher.stopped == (first < len(text))
    assert all(s not in piece for piece in released for s in stops)


@pytest.fixture(scope="module")
def token_server(tiny_llama: LoadedModel) -> Iterator[BackgroundServer]:
    with BackgroundServer(tiny_llama, ServerConfig(threads=1, tokens=(TOKEN,))) as server:
        yield server


def test_the_proxy_command_serves_the_openai_api(token_server: BackgroundServer,
                                                 tiny_llama_dir: Path,
                                                 tiny_llama: LoadedModel) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [SPLITLLM, "proxy", "--server", token_server.ws_url, "--listen", f"127.0.0.1:{port}",
         "--model", str(tiny_llama_dir), "--threads", "1", "--placement", "SSSSCC"],
        env={**os.environ, "SPLITLLM_TOKEN": TOKEN}, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        def healthy() -> bool:
            try:
                return httpx.get(base + "/health", timeout=1.0).status_code == 200
            except httpx.HTTPError:
                return proc.poll() is not None
        wait_for(healthy, timeout_s=120)
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", timeout=TIMEOUT_S,
                               max_retries=0)
        out = client.completions.create(model=tiny_llama.model_id, prompt="lazy dog",
                                        max_tokens=5, temperature=0)
        ref = reference(tiny_llama_dir, "lazy dog", 5, raw=True)
        assert out.choices[0].text == ref["text"]
        assert (out.model_extra or {})["splitllm"]["placement"] == "SSSSCC"
    finally:
        proc.terminate()
        proc.wait(timeout=TIMEOUT_S)


def test_proxy_user_errors(token_server: BackgroundServer, tiny_llama_dir: Path) -> None:
    runner = CliRunner()
    for args, message in [
        (["--listen", "8080"], "expected HOST:PORT"),
        (["--wire-dtype", "int8"], "wire dtype"),
        (["--placement", "CCS"], "placement 'CCS'"),
        (["--token", "wrong"], "unauthorized"),
    ]:
        result = runner.invoke(app, ["proxy", "--server", token_server.ws_url, "--model",
                                     str(tiny_llama_dir), "--token", TOKEN,
                                     *(args if args[0] == "--listen" else
                                       ["--listen", "127.0.0.1:0", *args])])
        assert isinstance(result.exception, UserError), (args, result.output)
        assert message in str(result.exception)


def test_the_proxy_on_a_port_in_use_says_so_before_it_connects(tiny_llama_dir: Path) -> None:
    """The port is bound before the proxy connects and measures: one line, exit code 2 (the
    server named here does not listen either: the port is found first)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [SPLITLLM, "proxy", "--server", f"ws://127.0.0.1:{free_port()}", "--listen",
             f"127.0.0.1:{port}", "--model", str(tiny_llama_dir), "--threads", "1"],
            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: cannot listen on 127.0.0.1:{port}: Address already in use"]


@pytest.mark.slow
def test_smollm2_chat_through_server_and_proxy_equals_generate_local(
        smollm2: LoadedModel) -> None:
    prompt = "What is the capital of France?"
    ref = reference(Path("smollm2"), prompt, 12, raw=False)
    with BackgroundServer(smollm2, ServerConfig(threads=1, tokens=(TOKEN,))) as server, \
            running_proxy(smollm2, server, placement="auto") as proxy:
        for base, key in ((server.http_url, TOKEN), (proxy.http_url, "unused")):
            client = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0)
            out = client.chat.completions.create(
                model=smollm2.model_id, max_tokens=12, temperature=0,
                messages=[{"role": "user", "content": prompt}])
            assert out.choices[0].message.content == ref["text"]
            assert out.usage is not None
            assert out.usage.prompt_tokens == ref["prompt_tokens"]
            assert out.usage.completion_tokens == len(ref["tokens"])
