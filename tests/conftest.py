"""Shared fixtures: tiny checkpoints made offline by pd-make-tiny-model, and their transformers oracle."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

from pd.tiny_model import make_tiny_model
from tests.support.oracle import load_hf


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `ci` preset (float32, seed 0, one safetensors file), made once per test session. Read-only."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "ci", "ci", seed=0)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory):
    """``tiny_model(preset="ci", **kw) -> Path``: a checkpoint made once per session per arguments. Read-only."""

    @functools.cache
    def make(preset: str = "ci", **kw) -> Path:
        return make_tiny_model(tmp_path_factory.mktemp(f"tiny-{preset}") / preset, preset, seed=0, **kw)

    return make


@pytest.fixture(scope="session")
def hf_model():
    """``hf_model(path) -> transformers DeepseekV3ForCausalLM`` in float32, eval mode (test-only oracle)."""
    pytest.importorskip("transformers")
    return functools.cache(load_hf)
