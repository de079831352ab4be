"""`splitllm simulate` end to end: reports written, same numbers with --jobs 2, Ray optional."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

CLI = [sys.executable, "-c", "from splitllm.cli import main; main()"]
HAS_RAY = importlib.util.find_spec("ray") is not None

SMALL = {  # a small edge server; a sensor-class client can take only part of the work
    "name": "small",
    "seed": 5,
    "duration_s": 40,
    "warmup_s": 5,
    "server": {"device": "edge-box", "scheduler": "fcfs"},
    "clients": [
        {"name": "laptop", "device": "laptop", "link": "wifi"},
        {"name": "sensor", "link": "lan", "device": {
            "peak_flops_per_s": 2e10, "mem_bandwidth_bytes_per_s": 4e9,
            "mem_capacity_bytes": 4e9}},
    ],
    "request_types": [
        {"name": "chat", "model": "gpt2", "prompt_tokens": 128, "output_tokens": 16,
         "sla_s": 1.0},
        {"name": "tag", "model": "bert-base", "prompt_tokens": 64, "sla_s": 0.1},
    ],
    "arrivals": {"process": "poisson", "rate_per_s": 10},
    "policies": ["server-only", "exact", "exact-load-aware", "exact-tuned", "frontier-priced"],
}


def _simulate(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([*CLI, "simulate", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return done


@pytest.fixture(scope="module")
def small_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("scenario") / "small.yaml"
    path.write_text(yaml.safe_dump(SMALL))
    return path


def test_paper_quick_writes_a_report(tmp_path: Path) -> None:
    done = _simulate("--scenario", "paper", "--quick", "--out", str(tmp_path / "p"), cwd=tmp_path)
    for model in ("transformer-base", "bert-base", "gpt2", "vit-base", "smollm2-135m",
                  "llama-3-8b", "all models"):
        assert model in done.stdout
    files = {p.name for p in (tmp_path / "p").iterdir()}
    assert {"report.md", "results.json", "paper_server_work.png", "paper_sweeps.png"} <= files
    report = (tmp_path / "p" / "report.md").read_text()
    assert "exact vs greedy" in report and "48 points" in report


def test_scenario_file_report_is_the_same_with_two_jobs(tmp_path: Path, small_file: Path) -> None:
    one = _simulate("--scenario", str(small_file), "--quick", "--out", str(tmp_path / "one"),
                    cwd=tmp_path)
    _simulate("--scenario", str(small_file), "--quick", "--jobs", "2", "--out",
              str(tmp_path / "two"), cwd=tmp_path)
    for policy in SMALL["policies"]:
        assert policy in one.stdout
    first = (tmp_path / "one" / "results.json").read_text()
    assert first == (tmp_path / "two" / "results.json").read_text()
    files = {p.name for p in (tmp_path / "one").iterdir()}
    assert {"report.md", "results.json", "scenario.yaml", "goodput.png", "server_work.png",
            "placement.png"} <= files
    assert yaml.safe_load((tmp_path / "one" / "scenario.yaml").read_text()) == SMALL


def test_ray_missing_is_one_line(tmp_path: Path) -> None:
    no_ray = "import sys; sys.modules['ray'] = None; from splitllm.cli import main; main()"
    done = subprocess.run([sys.executable, "-c", no_ray, "simulate", "--ray", "local",
                           "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == "error: --ray needs Ray: pip install 'splitllm[ray]'"


@pytest.mark.skipif(not HAS_RAY, reason="Ray is not installed (pip install 'splitllm[ray]')")
def test_ray_backend_gives_the_same_numbers(tmp_path: Path, small_file: Path) -> None:
    _simulate("--scenario", str(small_file), "--quick", "--policies", "server-only,frontier-priced",
              "--out", str(tmp_path / "local"), cwd=tmp_path)
    _simulate("--scenario", str(small_file), "--quick", "--policies", "server-only,frontier-priced",
              "--ray", "local", "--jobs", "1", "--out", str(tmp_path / "ray"), cwd=tmp_path)
    assert ((tmp_path / "local" / "results.json").read_text()
            == (tmp_path / "ray" / "results.json").read_text())


@pytest.mark.skipif(not HAS_RAY, reason="Ray is not installed (pip install 'splitllm[ray]')")
def test_ray_without_a_cluster_is_one_line(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([*CLI, "simulate", "--scenario", "paper", "--quick", "--ray", "auto",
                           "--out", str(tmp_path)], capture_output=True, text=True, cwd=tmp_path,
                          timeout=120, env=env)
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1
    assert "--ray auto: cannot start or reach Ray" in done.stderr
