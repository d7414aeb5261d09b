"""Triton kernels in Triton's CPU interpreter: the switches, the float-cast fix, and the subprocess rerun.

A test module with CPU-interpreted cases puts them in a ``TestInterpreted`` class skipped unless
``INTERPRETING``, calls ``patch_float_casts()`` at import when interpreting, and sets
``test_triton_interpreter = interpreter_test(__file__)``, which reruns that class in a fresh interpreter
(``TRITON_INTERPRET`` must be set before Triton is imported)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


def _triton_version() -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in importlib.metadata.version("triton").split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return (0, 0)


# Older interpreters (3.5, 3.6) fail on loops bounded by a loaded value (the masked MoE kernels' row loop).
INTERPRETER_OK = HAS_TRITON and _triton_version() >= (3, 9)


def patch_float_casts() -> None:
    """Triton 3.9's interpreter converts float32 to e4m3 and to bf16 by truncating the mantissa bits
    with round-half-up at best and no carry into the exponent (126.1 becomes 64, not 128), and
    bf16 by truncation. The GPU rounds to nearest even (cvt.rn.satfinite.e4m3x2.f32, cvt.rn.bf16).
    Test-only: those conversions go through torch's (round to nearest even) instead."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    torch_dtype = {
        tl.float32: torch.float32,
        tl.float16: torch.float16,
        tl.bfloat16: torch.bfloat16,
        tl.float8e4nv: torch.float8_e4m3fn,
    }
    as_bits = {8: (torch.uint8, np.uint8), 16: (torch.int16, np.uint16), 32: (torch.int32, np.uint32)}
    original = interpreter._convert_float

    def convert(data, src, dst, rounding_mode):
        if src not in torch_dtype or dst not in torch_dtype or not {src, dst} & {tl.float8e4nv, tl.bfloat16}:
            return original(data, src, dst, rounding_mode)
        values = torch.from_numpy(np.ascontiguousarray(data)).view(torch_dtype[src]).to(torch_dtype[dst])
        torch_int, np_int = as_bits[dst.primitive_bitwidth]
        return values.view(torch_int).numpy().view(np_int)

    interpreter._convert_float = convert


def interpreter_test(test_file: str, runs: bool = INTERPRETER_OK) -> Callable[[], None]:
    """``test_file``'s ``test_triton_interpreter``: reruns its ``TestInterpreted`` (``rerun_interpreted``); skipped
    where ``runs`` is false (default: no interpreter of triton >= 3.9) and inside the rerun itself."""

    @pytest.mark.skipif(not runs, reason="needs triton's CPU interpreter (triton >= 3.9)")
    @pytest.mark.skipif(INTERPRETING, reason="this is the subprocess")
    def test_triton_interpreter() -> None:
        """Runs ``TestInterpreted`` in a fresh interpreter with ``TRITON_INTERPRET=1``."""
        rerun_interpreted(test_file)

    return test_triton_interpreter


def rerun_interpreted(test_file: str) -> None:
    """Runs ``test_file``'s ``TestInterpreted`` in a fresh interpreter with ``TRITON_INTERPRET=1``; asserts that
    it passed and skipped nothing."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "TRITON_DEFAULT_FP_FUSION": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"{test_file}::TestInterpreted"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=Path(__file__).parent.parent.parent,
    )
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, tail
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, tail
