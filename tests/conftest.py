"""Shared fixtures: tiny checkpoints made offline by pd-make-tiny-model, and their transformers oracle."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """``tiny_model_dir(preset="ci", **kw) -> Path``: a checkpoint made once per session per arguments."""
    from pd.tiny_model import make_tiny_model

    @functools.cache
    def make(preset: str = "ci", **kw) -> Path:
        out = tmp_path_factory.mktemp(f"tiny-{preset}")
        return make_tiny_model(out, preset=preset, seed=0, **kw)

    return make


@pytest.fixture(scope="session")
def hf_model():
    """``hf_model(path) -> transformers DeepseekV3ForCausalLM`` in float32, eval mode (test-only oracle)."""
    transformers = pytest.importorskip("transformers")

    @functools.cache
    def load(path: Path):
        model = transformers.DeepseekV3ForCausalLM.from_pretrained(str(path), dtype=torch.float32)
        return model.eval()

    return load
