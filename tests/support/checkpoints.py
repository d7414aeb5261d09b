"""Edited copies of a checkpoint directory (a tiny model made by pd-make-tiny-model), for the tests of
what loading makes of unusual or broken files."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file


def edit_json(path: Path, edit: Callable[[Any], None]) -> None:
    """Applies ``edit`` (in place) to the parsed JSON file ``path`` and writes it back (compact)."""
    obj = json.loads(path.read_text())
    edit(obj)
    path.write_text(json.dumps(obj))


def copy_checkpoint(
    src: Path,
    dst: Path,
    *,
    tensors: Callable[[dict], None] | None = None,
    **json_edits: Callable[[Any], None] | None,
) -> Path:
    """A copy of the checkpoint directory ``src`` at ``dst``, returned. ``tensors`` edits, in place, the
    dict of ``model.safetensors``' tensors; each other keyword names a JSON file by its stem and edits it
    (``config=`` config.json, ``tokenizer_config=``, ``tokenizer=``, ``generation_config=``); None: left
    as it is."""
    shutil.copytree(src, dst)
    if tensors is not None:
        loaded = load_file(dst / "model.safetensors")
        tensors(loaded)
        save_file(loaded, dst / "model.safetensors")
    for stem, edit in json_edits.items():
        if edit is not None:
            edit_json(dst / f"{stem}.json", edit)
    return dst
