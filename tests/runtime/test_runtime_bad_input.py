"""Bad input to `splitllm generate`: one line naming the problem, exit code 2, before any network.

Every case runs with `--local` and against a server address where nothing listens: the error
must be the user's mistake, found before a connection is tried.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from splitllm.cli import app
from splitllm.errors import UserError
from splitllm.runtime.demo import free_port

SPLITLLM = str(Path(sys.executable).parent / "splitllm")
LONG_PROMPT = "the quick brown fox " * 100  # far more tokens than the tiny model's 256 positions


def model_without(source: Path, target: Path, *patterns: str) -> Path:
    """A copy of a model directory without the files matching `patterns`."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(*patterns))
    return target


@pytest.fixture(params=["--local", "server"])
def mode(request: pytest.FixtureRequest) -> list[str]:
    if request.param == "--local":
        return ["--local"]
    return ["--server", f"ws://127.0.0.1:{free_port()}"]  # nothing listens there


@pytest.mark.parametrize(("args", "message"), [
    (["--prompt", ""], "the prompt is empty"),
    (["--prompt", "", "--raw"], "the prompt is empty"),
    (["--prompt", LONG_PROMPT, "--raw"], "more than the model's context of 256 tokens"),
    (["--prompt", "fox", "--max-new-tokens", "300"], "more than the model's context of 256"),
    (["--prompt", "fox", "--placement", "CCXSSS"], "expected a non-empty string of C and S"),
    (["--prompt", "fox", "--placement", "CCS"], "has 3 letters; the model has 6 units"),
])
def test_bad_prompts_and_placements(args: list[str], message: str, mode: list[str],
                                    tiny_llama_dir: Path) -> None:
    result = CliRunner().invoke(app, ["generate", "--model", str(tiny_llama_dir), *mode, *args])
    assert isinstance(result.exception, UserError), result.output
    assert message in str(result.exception) and "\n" not in str(result.exception)


@pytest.mark.parametrize(("patterns", "message"), [
    (("*.safetensors",), "no weights"),
    (("tokenizer*", "special_tokens_map.json"), "has no tokenizer"),
])
def test_model_directories_without_weights_or_tokenizer(
        patterns: tuple[str, ...], message: str, mode: list[str], tiny_llama_dir: Path,
        tmp_path: Path) -> None:
    broken = model_without(tiny_llama_dir, tmp_path / "broken", *patterns)
    result = CliRunner().invoke(app, ["generate", "--model", str(broken), *mode,
                                      "--prompt", "fox"])
    assert isinstance(result.exception, UserError), result.output
    assert message in str(result.exception)


def test_an_unreadable_config_is_named(tiny_llama_dir: Path, tmp_path: Path) -> None:
    broken = model_without(tiny_llama_dir, tmp_path / "broken")
    (broken / "config.json").write_text("{not json")
    result = CliRunner().invoke(app, ["generate", "--model", str(broken), "--local",
                                      "--prompt", "fox"])
    assert isinstance(result.exception, UserError), result.output
    assert "unreadable config.json" in str(result.exception)


def test_the_real_command_prints_one_line_and_exits_2(tiny_llama_dir: Path) -> None:
    result = subprocess.run(
        [SPLITLLM, "generate", "--model", str(tiny_llama_dir), "--local", "--raw",
         "--prompt", "", "--threads", "1"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: the prompt is empty"]
