"""Installing and collecting: setup.sh's CPU path refuses a torch resolution that pulls CUDA packages (and
takes --torch-index), and the test suite collects (`pytest -m gpu`) without the optional packages."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# `python -m pip ...` as setup.sh calls it inside .venv: logs the arguments, writes FAKE_REPORT where a dry
# run asks for its report, installs nothing; every other `python` call goes to the real interpreter.
FAKE_PYTHON = """#!/usr/bin/env bash
echo "$*" >> "$PIP_LOG"
if [ "${1:-}" = -m ] && [ "${2:-}" = pip ]; then
  prev=""
  for arg in "$@"; do
    [ "$prev" = --report ] && cp "$FAKE_REPORT" "$arg"
    prev=$arg
  done
  exit 0
fi
exec "$REAL_PYTHON" "$@"
"""


def report(*packages: tuple[str, str]) -> dict:
    return {"version": "1", "install": [{"metadata": {"name": n, "version": v}} for n, v in packages]}


CPU = report(("torch", "2.13.0+cpu"), ("sympy", "1.14.0"), ("filelock", "3.20.0"))
CUDA = report(
    ("torch", "2.13.0"),
    ("nvidia-cublas-cu12", "12.8.4.1"),
    ("nvidia-cudnn-cu12", "9.10.2.21"),
    ("nvidia-nccl-cu12", "2.27.3"),
    ("triton", "3.5.0"),
    ("sympy", "1.14.0"),
)


def run_setup(tmp_path: Path, resolution: dict, *args: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """./setup.sh ARGS in a copy of it whose .venv holds the fake python; returns (result, pip calls)."""
    shutil.copy(ROOT / "setup.sh", tmp_path / "setup.sh")
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "activate").write_text('export PATH="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd):$PATH"\n')
    tools = tmp_path / "tools"
    tools.mkdir()
    for path, text in (
        (bin_dir / "python", FAKE_PYTHON),
        (tools / "ldconfig", "#!/bin/sh\necho libibverbs.so.1\n"),
    ):
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    (tmp_path / "report.json").write_text(json.dumps(resolution))
    log = tmp_path / "pip.log"
    env = dict(
        os.environ,
        PATH=f"{tools}:{os.environ['PATH']}",
        PIP_LOG=str(log),
        FAKE_REPORT=str(tmp_path / "report.json"),
        REAL_PYTHON=sys.executable,
    )
    result = subprocess.run(
        ["bash", str(tmp_path / "setup.sh"), *args], capture_output=True, text=True, env=env, timeout=60
    )
    calls = log.read_text().splitlines() if log.exists() else []
    return result, [c for c in calls if c.startswith("-m pip")]


def test_setup_refuses_a_cuda_resolution_on_the_cpu_path(tmp_path):
    result, calls = run_setup(tmp_path, CUDA)
    assert result.returncode != 0
    assert "resolves to torch's CUDA build" in result.stderr and "nvidia-cublas-cu12" in result.stderr
    assert "--torch-index URL" in result.stderr and "--cuda" in result.stderr
    installs = [c for c in calls if " install" in c and "--dry-run" not in c and "--upgrade pip" not in c]
    assert installs == []  # neither torch nor pd was installed


def test_setup_installs_the_cpu_build_when_the_index_has_it(tmp_path):
    """What CI does on this machine: the configured index has a CPU wheel of the pinned torch."""
    result, calls = run_setup(tmp_path, CPU)
    assert result.returncode == 0, result.stderr
    report_file = calls[1].split("--report ")[1].split()[0]
    assert calls == [
        "-m pip install -q --upgrade pip",
        f"-m pip install -q --dry-run --report {report_file} torch==2.13.0",
        "-m pip install -q torch==2.13.0",
        "-m pip install -q -e .[cpu,test,bench]",
    ]


def test_setup_takes_torch_from_the_given_index(tmp_path):
    result, calls = run_setup(tmp_path, CPU, "--torch-index", "file:///somewhere/cpu")
    assert result.returncode == 0, result.stderr
    torch_calls = [c for c in calls if "torch==2.13.0" in c]
    assert len(torch_calls) == 2 and all("--index-url file:///somewhere/cpu" in c for c in torch_calls)
    assert calls[-1] == "-m pip install -q -e .[cpu,test,bench]"


def test_setup_cuda_path_installs_the_cuda_extras(tmp_path):
    result, calls = run_setup(tmp_path, CUDA, "--cuda")
    assert result.returncode == 0, result.stderr
    assert not any("torch==" in c for c in calls)
    assert calls == ["-m pip install -q --upgrade pip", "-m pip install -q -e .[cuda,test,bench]"]


def test_setup_refuses_unknown_options(tmp_path):
    result, calls = run_setup(tmp_path, CPU, "--bogus")
    assert result.returncode == 2 and "unknown option '--bogus'" in result.stderr and calls == []


# Optional packages (extras, test tools) and those a bare GPU image lacks (../shared/gpu/NOTES.md): the
# suite must still collect without them, its modules skipped where they need one.
HIDDEN = (
    "openai",
    "transformers",
    "matplotlib",
    "grpc_tools",
    "mooncake",
    "flashinfer",
    "deep_ep",
    "starlette",
    "uvicorn",
    "pydantic",
)


@pytest.mark.timeout(180)
def test_suite_collects_without_optional_packages():
    code = (
        "import sys, pytest\n"
        f"for name in {HIDDEN!r}:\n"
        "    sys.modules[name] = None  # as if not installed\n"
        "sys.exit(pytest.main(['--collect-only', '-q', '-m', 'gpu', '-p', 'no:cacheprovider', 'tests']))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=170
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    summary = result.stdout.strip().splitlines()[-1]
    assert "tests collected" in summary and "error" not in summary, summary
