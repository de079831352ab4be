"""Fixtures for the runtime tests: tiny random models built offline, real local servers.

Everything here is small: models of 64 hidden units and a few blocks, one torch thread per
process (the machine has two cores and is shared). The real SmolLM2 is loaded once per session.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from runtime_kit import gpt2_config, llama_config, save_tiny_model

from splitllm.runtime.hosting import BackgroundServer
from splitllm.runtime.models import LoadedModel, load_model
from splitllm.runtime.server_state import ServerConfig


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread() -> None:
    # Two shared cores: more intra-op threads than free cores makes every op wait on a barrier.
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), llama_config())


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-gpt2"), gpt2_config())


@pytest.fixture(scope="session")
def tiny_llama(tiny_llama_dir: Path) -> LoadedModel:
    return load_model(tiny_llama_dir)


@pytest.fixture(scope="session")
def tiny_gpt2(tiny_gpt2_dir: Path) -> LoadedModel:
    return load_model(tiny_gpt2_dir)


@pytest.fixture(scope="session")
def tiny_models(tiny_llama: LoadedModel, tiny_gpt2: LoadedModel) -> dict[str, LoadedModel]:
    return {"llama": tiny_llama, "gpt2": tiny_gpt2}


@pytest.fixture(scope="session")
def llama_server(tiny_llama: LoadedModel) -> Iterator[BackgroundServer]:
    """A real server on a free local port, shared by the tests that do not change its config."""
    with BackgroundServer(tiny_llama, ServerConfig(threads=1)) as server:
        yield server


@pytest.fixture(scope="session")
def gpt2_server(tiny_gpt2: LoadedModel) -> Iterator[BackgroundServer]:
    with BackgroundServer(tiny_gpt2, ServerConfig(threads=1, profile=False)) as server:
        yield server


@pytest.fixture
def make_server() -> Iterator[Callable[..., BackgroundServer]]:
    """Start servers with a custom config; all are stopped after the test."""
    started: list[BackgroundServer] = []

    def make(loaded: LoadedModel, **config: Any) -> BackgroundServer:
        config.setdefault("threads", 1)
        config.setdefault("profile", False)
        server = BackgroundServer(loaded, ServerConfig(**config)).start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def smollm2() -> LoadedModel:
    """The real SmolLM2-135M-Instruct, converted once into the user cache (~/.cache/splitllm)."""
    return load_model("smollm2")


@pytest.fixture(scope="session")
def smollm2_server(smollm2: LoadedModel) -> Iterator[BackgroundServer]:
    with BackgroundServer(smollm2, ServerConfig(threads=1, profile=False)) as server:
        yield server
