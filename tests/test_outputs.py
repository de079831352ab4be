"""A command's output path is checked before it works: one line, exit code 2, nothing run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from splitllm import cli
from splitllm.errors import UserError
from splitllm.outputs import output_dir, output_file

SPLITLLM = str(Path(sys.executable).with_name("splitllm"))


def test_an_output_folder_is_created_with_its_parents(tmp_path: Path) -> None:
    assert output_dir(tmp_path / "a" / "b", "--out").is_dir()
    assert output_file(tmp_path / "c" / "d.json", "--out") == tmp_path / "c" / "d.json"
    assert (tmp_path / "c").is_dir() and not (tmp_path / "c" / "d.json").exists()


def test_an_output_under_a_file_or_onto_a_folder_is_one_line(tmp_path: Path) -> None:
    a_file = tmp_path / "report.md"
    a_file.write_text("kept\n")
    with pytest.raises(UserError, match=r"^--out .*report.md/x: cannot create this folder"):
        output_dir(a_file / "x", "--out")
    with pytest.raises(UserError, match=r"^--link-out .*: cannot create this folder"):
        output_file(a_file / "x" / "link.json", "--link-out")
    with pytest.raises(UserError, match=r"^--out .*: a folder, not a file$"):
        output_file(tmp_path, "--out")
    assert a_file.read_text() == "kept\n"


@pytest.mark.parametrize("args", [
    ["profile", "--out", "{file}/device.json"],
    ["profile", "--out", "{folder}"],
    ["profile", "--server", "ws://127.0.0.1:9", "--link-out", "{file}/link.json"],
    ["fidelity", "--quick", "--out", "{file}/fidelity"],
    ["loadtest", "--quick", "--out", "{file}/loadtest"],
    ["simulate", "--quick", "--out", "{file}/sim"],
    ["plan", "--export-instance", "{file}/instance.json"],
], ids=lambda args: "-".join(a.strip("-") for a in args[:2] if "{" not in a))
def test_each_command_refuses_an_unwritable_output_before_it_works(
        args: list[str], tmp_path: Path) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    argv = [a.format(file=a_file, folder=tmp_path) for a in args]
    result = subprocess.run([SPLITLLM, *argv], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stderr.startswith("error: --") and result.stderr.count("\n") == 1, result.stderr
    assert result.stdout == ""  # nothing measured, nothing printed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


@pytest.mark.parametrize("args", [
    ["profile", "--model", "{folder}/no-model", "--out", "{folder}/new/device.json"],
    ["simulate", "--scenario", "{folder}/no-scenario.yaml", "--out", "{folder}/new"],
    ["loadtest", "--device-profile", "{folder}/no-profile.json", "--out", "{folder}/new"],
], ids=lambda args: args[0])
def test_bad_input_creates_no_output_folder(args: list[str], tmp_path: Path) -> None:
    argv = [a.format(folder=tmp_path) for a in args]
    result = subprocess.run([SPLITLLM, *argv], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert not (tmp_path / "new").exists()


def test_what_the_machine_refuses_later_is_one_line_and_exit_1(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def refused() -> None:
        raise PermissionError(13, "Permission denied", "/srv/report.md")

    monkeypatch.setattr(cli, "app", refused)
    with pytest.raises(SystemExit) as exited:
        cli.main()
    assert exited.value.code == 1
    assert capsys.readouterr().err == "error: [Errno 13] Permission denied: '/srv/report.md'\n"
