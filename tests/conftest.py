from pathlib import Path

import pytest

from pd.tiny_model import make_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `ci` preset (float32, seed 0, one safetensors file), made once per test session. Read-only."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "ci", "ci", seed=0)
