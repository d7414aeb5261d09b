"""The launchers: --help, flag defaults against the config dataclasses, and a torch-free pd-bootstrap."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pd.attention import ATTENTION_BACKENDS
from pd.bootstrap.server import BootstrapConfig
from pd.config import EngineConfig, ParallelConfig
from pd.ep import BACKENDS as EP_BACKENDS
from pd.ep.placement import PLACEMENTS
from pd.launch import bootstrap, worker
from pd.launch.args import field_default
from pd.transfer.engine import PROTOCOLS, TransferConfig
from pd.transfer.state import TransferTimeouts
from pd.worker.common import WorkerConfig

# pd-proxy and pd-serve run on uvicorn and starlette: pd's dependencies, but missing from a bare GPU image
# that runs `pytest -m gpu` with a few wheels added.
pytest.importorskip("uvicorn")
pytest.importorskip("starlette")
from pd.launch import proxy, serve
from pd.proxy.app import ProxyConfig

ROOT = Path(__file__).resolve().parents[1]
bounded = pytest.mark.timeout(120)


def console_scripts() -> dict[str, str]:
    """[project.scripts] of pyproject.toml: name -> "module:function"."""
    text = (ROOT / "pyproject.toml").read_text()
    section = text.split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    return dict(re.findall(r'^(pd-[\w-]+)\s*=\s*"([\w.:]+)"', section, re.M))


def test_every_launcher_help_exits_0(capsys):
    scripts = console_scripts()
    assert set(scripts) == {
        "pd-serve",
        "pd-bootstrap",
        "pd-prefill",
        "pd-decode",
        "pd-colocated",
        "pd-proxy",
        "pd-make-tiny-model",
        "pd-bench",
    }
    for name, target in scripts.items():
        module, func = target.split(":")
        with pytest.raises(SystemExit) as e:
            getattr(importlib.import_module(module), func)(["--help"])
        out = capsys.readouterr().out
        assert e.value.code == 0, name
        assert out.startswith(f"usage: {name}"), name


# ---------------------------------------------------------------------------------------------
# Defaults and choices come from the configs and the registries.

WORKER_FIELDS = {
    "device": (EngineConfig, "device"),
    "dtype": (EngineConfig, "dtype"),
    "load_format": (EngineConfig, "load_format"),
    "page_size": (EngineConfig, "page_size"),
    "num_pages": (EngineConfig, "num_pages"),
    "gpu_memory_fraction": (EngineConfig, "gpu_memory_fraction"),
    "chunk_size": (EngineConfig, "chunk_size"),
    "max_running": (EngineConfig, "max_running"),
    "max_waiting": (EngineConfig, "max_waiting"),
    "max_context_len": (EngineConfig, "max_context_len"),
    "attention_backend": (EngineConfig, "attention_backend"),
    "seed": (EngineConfig, "seed"),
    "cuda_graph": (EngineConfig, "cuda_graph"),
    "dp": (ParallelConfig, "size"),
    "ep_backend": (ParallelConfig, "ep_backend"),
    "expert_placement": (ParallelConfig, "expert_placement"),
    "nnodes": (ParallelConfig, "nnodes"),
    "node_rank": (ParallelConfig, "node_rank"),
    "dist_init_addr": (ParallelConfig, "dist_init_addr"),
    "host": (WorkerConfig, "host"),
    "port": (WorkerConfig, "port"),
    "instance_id": (WorkerConfig, "instance_id"),
    "model_name": (WorkerConfig, "model_name"),
    "aux_slots": (WorkerConfig, "aux_slots"),
    "decode_headroom_tokens": (WorkerConfig, "decode_headroom_tokens"),
    "transfer_protocol": (TransferConfig, "protocol"),
    "transfer_device_names": (TransferConfig, "device_names"),
    "transfer_timeout": (TransferConfig, "transfer_timeout_s"),
    "bootstrapping_timeout": (TransferTimeouts, "bootstrapping_s"),
    "waiting_timeout": (TransferTimeouts, "waiting_for_input_s"),
    "transferring_timeout": (TransferTimeouts, "transferring_s"),
    "abort_grace": (TransferTimeouts, "abort_grace_s"),
}
PROXY_FIELDS = {
    "host": (ProxyConfig, "host"),
    "port": (ProxyConfig, "port"),
    "max_body_bytes": (ProxyConfig, "max_body_bytes"),
    "max_prompt_tokens": (ProxyConfig, "max_prompt_tokens"),
    "max_completion_tokens": (ProxyConfig, "max_completion_tokens"),
    "max_inflight": (ProxyConfig, "max_inflight"),
    "request_timeout": (ProxyConfig, "request_timeout_s"),
    "body_timeout": (ProxyConfig, "body_timeout_s"),
    "keepalive": (ProxyConfig, "keepalive_s"),
    "retry_prefill": (ProxyConfig, "retry_prefill"),
}
BOOTSTRAP_FIELDS = {
    "host": (BootstrapConfig, "host"),
    "port": (BootstrapConfig, "port"),
    "lease_seconds": (BootstrapConfig, "lease_seconds"),
    "max_ranks": (BootstrapConfig, "max_ranks"),
}
SERVE_FIELDS = {
    **{k: v for k, v in WORKER_FIELDS.items() if v[0] in (EngineConfig,)},
    **PROXY_FIELDS,
    "transfer_protocol": (TransferConfig, "protocol"),
    "dp": (ParallelConfig, "size"),
    "ep_backend": (ParallelConfig, "ep_backend"),
    "expert_placement": (ParallelConfig, "expert_placement"),
}


def parsers() -> dict[str, tuple[argparse.ArgumentParser, dict]]:
    return {
        "pd-prefill": (worker.build_parser("prefill"), WORKER_FIELDS),
        "pd-decode": (worker.build_parser("decode"), WORKER_FIELDS),
        "pd-colocated": (worker.build_parser("colocated"), WORKER_FIELDS),
        "pd-proxy": (proxy.build_parser(), PROXY_FIELDS),
        "pd-bootstrap": (bootstrap.build_parser(), BOOTSTRAP_FIELDS),
        "pd-serve": (serve.build_parser()[0], SERVE_FIELDS),
    }


def test_flag_defaults_are_the_config_defaults():
    """Every flag that sets a config field has that field's default (here by an independent table, and for
    every flag the launchers mark as reading one)."""
    for name, (parser, table) in parsers().items():
        actions = {a.dest: a for a in parser._actions}
        for dest, (cls, field) in table.items():
            assert dest in actions, (name, dest)
            assert actions[dest].default == field_default(cls, field), (name, dest, cls.__name__, field)
        marked = [a for a in parser._actions if hasattr(a, "config_field")]
        assert {a.dest for a in marked} >= set(table) - {"model_name"}, name
        for a in marked:
            assert a.default == field_default(*a.config_field), (name, a.dest)


def test_configs_built_from_default_flags_equal_the_dataclass_defaults():
    """Parsing no optional flag gives the configs the dataclasses give (the transfer timeouts were 30/120 s
    in TransferTimeouts and 60/300 s in the flags: the flags' values, which users ran with, won)."""
    for role in ("prefill", "decode", "colocated"):
        args = worker.parse(role, ["--model", "/m", "--bootstrap", "127.0.0.1:1"])
        assert worker.worker_config(role, args) == WorkerConfig(
            role=role, engine=EngineConfig(model_path="/m"), bootstrap="127.0.0.1:1"
        )
    assert TransferTimeouts().bootstrapping_s == 60.0 and TransferTimeouts().waiting_for_input_s == 300.0
    assert proxy.proxy_config(proxy.parse(["--bootstrap", "b:1"])) == ProxyConfig(bootstrap="b:1")
    assert bootstrap.bootstrap_config(bootstrap.parse_args([])) == BootstrapConfig()


def test_choices_come_from_the_registries():
    for name, (parser, _) in parsers().items():
        actions = {a.dest: a for a in parser._actions}
        if "ep_backend" in actions:
            assert sorted(actions["ep_backend"].choices) == sorted(EP_BACKENDS), name
            assert tuple(actions["expert_placement"].choices) == PLACEMENTS, name
            assert tuple(actions["transfer_protocol"].choices) == PROTOCOLS, name
            assert tuple(actions["attention_backend"].choices) == ATTENTION_BACKENDS, name
    with pytest.raises(ValueError, match="attention_backend"):
        EngineConfig(model_path="/m", attention_backend="nope")


def test_bootstrap_launcher_imports_no_torch():
    code = (
        "import sys; import pd.launch.bootstrap, pd.bootstrap.server; "
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')); "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_field_default_reads_factories():
    assert field_default(WorkerConfig, "timeouts") == TransferTimeouts()
    with pytest.raises(AttributeError):
        field_default(WorkerConfig, "nope")
    assert all(f.name != "nope" for f in dataclasses.fields(WorkerConfig))
