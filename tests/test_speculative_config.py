"""Speculative decoding settings: ``SpeculativeConfig`` validation, the flags of every launcher that builds
an ``EngineConfig``, the P/D compatibility check on them (a mismatch refused with the field named), and the
start-up refusals (no MTP layer; the engine not wired yet)."""

from __future__ import annotations

import subprocess
import sys

import grpc
import pytest

from pd.bootstrap.client import IncompatibleRankError
from pd.bootstrap.compat import mismatches
from pd.bootstrap.server import rank_info_problems
from pd.config import EngineConfig, ModelConfig
from pd.launch import worker
from pd.rpc import bootstrap_pb2 as pb
from pd.speculative import SpeculativeConfig
from pd.worker.builder import check_speculative
from tests.test_bootstrap import clients, rank_info, server  # noqa: F401 (fixtures)

FLAGS = ["--speculative-algorithm", "mtp", "--num-speculative-tokens", "2"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(algorithm="mtp"), r"num_speculative_tokens must be in \[1, 3\] .* got 0"),
        (dict(algorithm="mtp", num_tokens=4), r"num_speculative_tokens must be in \[1, 3\] .* got 4"),
        (dict(algorithm="eagle", num_tokens=1), r"speculative_algorithm must be one of \('mtp',\)"),
        (dict(num_tokens=2), "need a speculative algorithm"),
        (dict(oracle=True), "need a speculative algorithm"),
    ],
)
def test_invalid_settings_are_refused_with_the_field_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SpeculativeConfig(**kwargs)


def test_valid_settings():
    assert not SpeculativeConfig().enabled
    for k in (1, 2, 3):
        cfg = SpeculativeConfig("mtp", k)
        assert cfg.enabled and cfg.mtp and cfg.num_tokens == k


@pytest.mark.parametrize("role", ["prefill", "decode", "colocated"])
def test_worker_flags_set_the_engine_config(role):
    base = ["--model", "/m", "--bootstrap", "127.0.0.1:1"]
    args = worker.parse(role, [*base, *FLAGS, "--speculative-oracle"])
    assert worker.worker_config(role, args).engine.speculative == SpeculativeConfig("mtp", 2, oracle=True)
    assert worker.worker_config(role, worker.parse(role, base)).engine.speculative == SpeculativeConfig()
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        worker.worker_config(role, worker.parse(role, [*base, "--speculative-algorithm", "mtp"]))


def test_pd_serve_forwards_the_flags_to_both_instances_and_checks_them_first():
    pytest.importorskip("uvicorn")  # pd-serve's proxy needs it; a bare GPU image may lack it
    pytest.importorskip("starlette")
    from pd.launch import serve

    args = serve.parse(FLAGS)
    cmds = dict(serve.commands(args, "m", 1234))
    for name in ("prefill", "decode"):
        argv = cmds[name]
        assert argv[argv.index("--speculative-algorithm") + 1] == "mtp", name
        assert argv[argv.index("--num-speculative-tokens") + 1] == "2", name
    colocated = dict(serve.commands(serve.parse([*FLAGS, "--colocated", "1"]), "m", 1234))
    assert any("--speculative-algorithm" in argv for argv in colocated.values())
    # Refused before any child process starts.
    with pytest.raises(SystemExit, match=r"pd-serve: error: num_speculative_tokens must be in \[1, 3\]"):
        serve.main(["--speculative-algorithm", "mtp", "--num-speculative-tokens", "7"])


def test_prefill_and_decode_must_agree_on_the_speculative_settings():
    prefill = rank_info("p0", 0, pb.ROLE_PREFILL, speculative_algorithm="mtp", num_speculative_tokens=2)
    assert mismatches(prefill, rank_info("d0", 0, pb.ROLE_DECODE)) == [
        "speculative_algorithm: 'mtp' (prefill p0/0) vs '' (decode d0/0)",
        "num_speculative_tokens: 2 (prefill p0/0) vs 0 (decode d0/0)",
    ]
    other_k = rank_info("d0", 0, pb.ROLE_DECODE, speculative_algorithm="mtp", num_speculative_tokens=3)
    assert mismatches(prefill, other_k) == ["num_speculative_tokens: 2 (prefill p0/0) vs 3 (decode d0/0)"]
    same = rank_info("d0", 0, pb.ROLE_DECODE, speculative_algorithm="mtp", num_speculative_tokens=2)
    assert mismatches(prefill, same) == []
    assert mismatches(prefill, rank_info("c0", 0, pb.ROLE_COLOCATED)) == []  # moves no KV


def test_the_registry_refuses_a_mismatched_decode_rank(server, clients):  # noqa: F811 (fixtures)
    clients().register(rank_info("p0", 0, speculative_algorithm="mtp", num_speculative_tokens=1))
    with pytest.raises(IncompatibleRankError) as err:
        clients().register(rank_info("d0", 0, pb.ROLE_DECODE))
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "speculative_algorithm: '' (decode d0/0) vs 'mtp' (prefill p0/0)" in str(err.value)
    clients().register(
        rank_info("d0", 0, pb.ROLE_DECODE, speculative_algorithm="mtp", num_speculative_tokens=1)
    )


def test_malformed_speculative_fields_are_invalid():
    def problems(**fields) -> str:
        return "; ".join(rank_info_problems(rank_info(incarnation="i0", **fields)))

    assert problems(speculative_algorithm="mtp", num_speculative_tokens=2) == ""
    assert "disagree" in problems(speculative_algorithm="mtp")
    assert "disagree" in problems(num_speculative_tokens=2)
    assert "num_speculative_tokens must be in [0, 256], got -1" in problems(
        speculative_algorithm="mtp", num_speculative_tokens=-1
    )


def test_the_builder_refuses_speculative_decoding_without_an_mtp_layer(tiny_model):
    spec = SpeculativeConfig("mtp", 1)
    check_speculative(
        EngineConfig("m", speculative=spec), ModelConfig.from_dir(tiny_model("ci", with_mtp=True))
    )
    without = ModelConfig.from_dir(tiny_model("ci"))
    with pytest.raises(ValueError, match="num_nextn_predict_layers 0"):
        check_speculative(EngineConfig("m", speculative=spec), without)
    check_speculative(EngineConfig("m"), without)  # off: nothing to check
    assert spec.step_tokens(8) == 16 and SpeculativeConfig("mtp", 3).step_tokens(8) == 32
    assert SpeculativeConfig().step_tokens(8) == 8  # the EP buffers' tokens per rank


def test_pd_decode_exits_naming_the_missing_mtp_layer(tiny_model):
    path = tiny_model("ci")
    argv = ["--model", str(path), "--bootstrap", "127.0.0.1:1", *FLAGS]
    done = subprocess.run(
        [sys.executable, "-m", "pd.launch.decode", *argv], capture_output=True, text=True, timeout=120
    )
    assert done.returncode != 0
    assert "pd-decode: error: speculative decoding with MTP needs the checkpoint's MTP layer" in done.stderr
    assert "num_nextn_predict_layers 0" in done.stderr
