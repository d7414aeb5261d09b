"""FP8 low-latency dispatch (``EPConfig.ll_fp8``): quantization, the layout every backend returns,
and combine.

Oracle: the built-in backends quantize at the sender with ``quant_rows``, so the rows expert e
receives must be EXACTLY ``quant_rows(x)[t]`` (e4m3 bytes and float32 scale bits) for the tokens
routed to e; experts then see ``q * scale``, and combine must equal the dense reference MoE on
those dequantized rows, and the non-FP8 path fed the same rows, bit for bit. The 2-rank tests run
this file as a worker script on gloo (``tests.test_ep.launch_ranks``), bounded by a timeout.
"""

from __future__ import annotations

import argparse
import sys
import types
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from pd.ep import EPConfig, ll_bytes_per_row, make_ep_backend
from pd.ep.base import EPBackend, LLDispatch
from pd.ep.fp8 import dequant_rows, library_ll_recv, quant_rows
from pd.ep.layout import weighted_gather_sum
from pd.ep.mooncake_ep import MooncakeEP
from pd.ep.reference import ReferenceExperts
from pd.kernels.fp8 import AMAX_FLOOR, FP8_MAX
from tests.test_ep import (
    CASES,
    E_LOCAL,
    EXPERT_SEED,
    EXPERTS,
    INTERMEDIATE,
    LAUNCH_TIMEOUT_S,
    MAX_TOKENS,
    TOP_K,
    WORLD,
    _FakeDeepEPBuffer,
    case_inputs,
    fake_library_ll_dispatch,
    launch_ranks,
    library_fp8_cast,
)

HIDDEN = 256  # two groups of 128 columns


def fp8_inputs(case: str, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``case_inputs`` at H = 256 with groups of very different magnitude and an all-zero group."""
    x, idx, w = case_inputs(case, rank, HIDDEN)
    x[:, :128] *= 1e3
    x[1::2, 128:] *= 1e-3
    if x.shape[0]:
        x[0, 128:] = 0.0  # the zero group must give q = 0, finite scale, no NaN
    return x, idx, w


def _received(d: LLDispatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Copies of the valid rows (e4m3 bytes as uint8, scales), expert after expert."""
    assert d.recv_scale is not None
    counts = d.recv_count.tolist()
    q = torch.cat([d.recv_x[e, :n].view(torch.uint8) for e, n in enumerate(counts)])
    scale = torch.cat([d.recv_scale[e, :n] for e, n in enumerate(counts)])
    return q, scale


def run_fp8_case(fp8: EPBackend, plain: EPBackend, experts: ReferenceExperts, x, idx, w) -> dict:
    """An FP8 low-latency round trip, and the non-FP8 one on the sender's dequantized rows."""
    cfg = fp8.config
    d = fp8.ll_dispatch(x, idx)
    assert d.recv_x.dtype == torch.float8_e4m3fn and d.recv_scale is not None
    assert d.recv_scale.dtype == torch.float32 and d.recv_scale.is_contiguous()
    q, scale = _received(d)
    out = fp8.ll_combine(experts.ll_outputs(d, cfg.first_local_expert, dtype=cfg.dtype), idx, w, d.handle)
    x_deq = dequant_rows(*quant_rows(x))
    d_plain = plain.ll_dispatch(x_deq, idx)
    out_plain = plain.ll_combine(experts.ll_outputs(d_plain, cfg.first_local_expert), idx, w, d_plain.handle)
    return {
        "recv_shape": torch.tensor(d.recv_x.shape),
        "scale_shape": torch.tensor(d.recv_scale.shape),
        "count": d.recv_count.clone(),
        "q": q,
        "scale": scale,
        "out": out,
        "out_plain": out_plain,
    }


def check_fp8(results: list[dict], inputs: list, n_local: int) -> None:
    world = len(inputs)
    experts = ReferenceExperts(EXPERTS, HIDDEN, INTERMEDIATE, EXPERT_SEED)
    sent = [quant_rows(x) for x, _, _ in inputs]  # what each source rank sends, per token
    for rank, res in enumerate(results):
        assert res["recv_shape"].tolist() == [n_local, MAX_TOKENS * world, HIDDEN]
        assert res["scale_shape"].tolist() == [n_local, MAX_TOKENS * world, HIDDEN // 128]
        start = 0
        for local, n in enumerate(res["count"].tolist()):
            e = rank * n_local + local
            want = sorted(
                sent[s][0][t].view(torch.uint8).numpy().tobytes() + sent[s][1][t].numpy().tobytes()
                for s, (_, idx, _) in enumerate(inputs)
                for t in range(idx.shape[0])
                if (idx[t] == e).any()
            )
            got = sorted(
                res["q"][r].numpy().tobytes() + res["scale"][r].numpy().tobytes()
                for r in range(start, start + n)
            )
            assert got == want, f"rank {rank} expert {e}: received rows are not the sender's quant_rows"
            start += n
        x, idx, w = inputs[rank]
        x_deq = dequant_rows(*quant_rows(x))
        torch.testing.assert_close(res["out"], experts.dense(x_deq, idx, w), atol=1e-3, rtol=1e-5)
        assert torch.equal(res["out"], res["out_plain"]), (
            "FP8 combine differs from the plain one on the same rows"
        )


# ---------------- backends ----------------


def _fp8_config(dtype: torch.dtype = torch.float32, **kw) -> EPConfig:
    return EPConfig(EXPERTS, HIDDEN, MAX_TOKENS, dtype, ll_fp8=True, **kw)


@pytest.mark.parametrize("case", CASES)
def test_local_fp8_rows_are_the_senders_quant_rows(case: str) -> None:
    fp8 = make_ep_backend("local", _fp8_config())
    plain = make_ep_backend("local", EPConfig(EXPERTS, HIDDEN, MAX_TOKENS, torch.float32))
    experts = ReferenceExperts(EXPERTS, HIDDEN, INTERMEDIATE, EXPERT_SEED)
    inputs = [fp8_inputs(case, 0)]
    check_fp8([run_fp8_case(fp8, plain, experts, *inputs[0])], inputs, EXPERTS)


def worker_main(argv: list[str]) -> None:
    import torch.distributed as dist

    p = argparse.ArgumentParser()
    p.add_argument("--worker", action="store_true")
    for name in ("--rank", "--world", "--port"):
        p.add_argument(name, type=int, required=True)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=args.rank, world_size=args.world,
        timeout=timedelta(seconds=60),
    )  # fmt: skip
    try:
        cfg = EPConfig(EXPERTS, HIDDEN, MAX_TOKENS, torch.float32, args.rank, args.world, ll_fp8=True)
        fp8 = make_ep_backend("torch", cfg, dist.group.WORLD)
        plain = make_ep_backend("torch", EPConfig(EXPERTS, HIDDEN, MAX_TOKENS, torch.float32, args.rank, args.world),
                                dist.group.WORLD)  # fmt: skip
        experts = ReferenceExperts(EXPERTS, HIDDEN, INTERMEDIATE, EXPERT_SEED)
        for case in CASES:
            res = run_fp8_case(fp8, plain, experts, *fp8_inputs(case, args.rank))
            torch.save(res, args.out / f"{case}.rank{args.rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def torch_fp8_results(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ep_torch_fp8")
    launch_ranks([], out, module="tests.test_ep_fp8")
    return out


@pytest.mark.timeout(LAUNCH_TIMEOUT_S + 30)
@pytest.mark.parametrize("case", CASES)
def test_torch_fp8_two_ranks(torch_fp8_results: Path, case: str) -> None:
    results = [torch.load(torch_fp8_results / f"{case}.rank{r}.pt", weights_only=True) for r in range(WORLD)]
    check_fp8(results, [fp8_inputs(case, r) for r in range(WORLD)], E_LOCAL)


@pytest.mark.parametrize("name", ["local", "torch"])
def test_fp8_low_latency_paths_are_data_independent(monkeypatch, name: str) -> None:
    """As ``test_ep.test_low_latency_paths_are_data_independent``, with ll_fp8: the meta device
    rejects every host sync and data-dependent shape."""
    import pd.ep.torch_ep

    monkeypatch.setattr(pd.ep.torch_ep.dist, "all_to_all_single", lambda out, inp, *a, **k: out.copy_(inp))
    backend = make_ep_backend(name, _fp8_config(torch.bfloat16, device="meta"))
    x = torch.empty(MAX_TOKENS - 1, HIDDEN, dtype=torch.bfloat16, device="meta")
    idx = torch.empty(MAX_TOKENS - 1, TOP_K, dtype=torch.long, device="meta")
    d = backend.ll_dispatch(x, idx)
    assert d.recv_scale is not None
    assert (d.recv_x.shape, d.recv_x.dtype) == ((EXPERTS, MAX_TOKENS, HIDDEN), torch.float8_e4m3fn)
    assert (d.recv_scale.shape, d.recv_scale.dtype) == ((EXPERTS, MAX_TOKENS, HIDDEN // 128), torch.float32)
    y = torch.empty(EXPERTS, MAX_TOKENS, HIDDEN, dtype=torch.bfloat16, device="meta")
    out = backend.ll_combine(y, idx, torch.empty(MAX_TOKENS - 1, TOP_K, device="meta"), d.handle)
    assert (out.shape, out.dtype) == (x.shape, torch.bfloat16)


def test_fp8_normal_mode_and_combine_stay_in_dtype() -> None:
    backend = make_ep_backend("local", _fp8_config())
    x, idx, w = fp8_inputs("random", 0)
    assert backend.dispatch(x, idx, w).recv_x.dtype == torch.float32
    d = backend.ll_dispatch(x, idx)
    with pytest.raises(ValueError, match="y must be"):  # combine takes config dtype, not e4m3
        backend.ll_combine(d.recv_x, idx, w, d.handle)


# ---------------- library wrappers against fakes with the libraries' FP8 return layout ----------------


def _check_library_fp8(d: LLDispatch, x: torch.Tensor, out: torch.Tensor, idx, w) -> None:
    """recv_scale row-major; rows are the library's quantization of x; combine on dequantized rows."""
    assert d.recv_x.dtype == torch.float8_e4m3fn and d.recv_scale is not None
    assert d.recv_scale.is_contiguous() and d.recv_scale.shape == (EXPERTS, MAX_TOKENS, HIDDEN // 128)
    lib_q, lib_scale = library_fp8_cast(x)
    for e, n in enumerate(d.recv_count.tolist()):
        tokens = (idx == e).any(dim=1).nonzero().squeeze(1)  # single rank: rows in token order
        assert torch.equal(d.recv_x[e, :n].view(torch.uint8), lib_q[tokens].view(torch.uint8))
        assert torch.equal(d.recv_scale[e, :n], lib_scale[tokens])
    experts = ReferenceExperts(EXPERTS, HIDDEN, INTERMEDIATE, EXPERT_SEED)
    want = experts.dense(dequant_rows(lib_q, lib_scale), idx, w)
    torch.testing.assert_close(out.float(), want, atol=3e-2, rtol=2e-2)


def test_deepep_wrapper_fp8_against_fake_deep_ep(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "deep_ep", types.SimpleNamespace(Buffer=_FakeDeepEPBuffer))
    _FakeDeepEPBuffer.built.clear()
    backend = make_ep_backend("deepep", EPConfig(EXPERTS, HIDDEN, MAX_TOKENS, torch.bfloat16, ll_fp8=True))
    (buf,) = _FakeDeepEPBuffer.built
    x, idx, w = case_inputs("masked", 1, HIDDEN)
    x = x.bfloat16()
    d = backend.ll_dispatch(x, idx)
    experts = ReferenceExperts(EXPERTS, HIDDEN, INTERMEDIATE, EXPERT_SEED)
    out = backend.ll_combine(experts.ll_outputs(d, 0, dtype=torch.bfloat16), idx, w, d.handle)
    assert buf.calls == ["ll_dispatch_fp8"]
    _check_library_fp8(d, x, out, idx, w)


class _FakeMooncakeBuffer:
    """Single-rank stand-in for ``mooncake.mooncake_ep_buffer.Buffer`` with its low-latency
    signatures and FP8 return layout (``mooncake_ep_buffer.py``: ``(x, scales)``, scales a
    transposed view of ``[E_local, H / 128, W * M]``)."""

    def __init__(self) -> None:
        self.use_fp8: list[bool] = []

    def dispatch(self, x, topk_idx, active_ranks, num_max_dispatch_tokens_per_rank, num_experts, timeout_us,
                 use_fp8=None, async_finish=False, return_recv_hook=False):  # fmt: skip
        assert x.dtype == torch.bfloat16 and x.shape[1] % 128 == 0 and active_ranks.dtype == torch.int32
        self.use_fp8.append(use_fp8)
        recv, count, handle = fake_library_ll_dispatch(
            x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts, use_fp8
        )
        return recv, count, handle, None, None

    def combine(self, x, topk_idx, topk_weights, active_ranks, timeout_us, handle, zero_copy=False,
                async_finish=False, return_recv_hook=False, out=None):  # fmt: skip
        assert x.dtype == torch.bfloat16
        valid, slot = handle
        return weighted_gather_sum(x.view(-1, x.shape[-1]), slot, valid, topk_weights).to(x.dtype), None, None


def _mooncake_with_buffer(cfg: EPConfig, buffer: object) -> MooncakeEP:
    """A MooncakeEP on a fake buffer: its constructor needs CUDA and Mooncake, so set up its
    state directly (the low-latency methods read only these attributes)."""
    backend = MooncakeEP.__new__(MooncakeEP)
    EPBackend.__init__(backend, cfg, None)
    backend._buffer, backend.timeout_us = buffer, 1000
    backend.active_ranks = torch.ones(cfg.world_size, dtype=torch.int32)
    return backend


@pytest.mark.parametrize("ll_fp8", [False, True])
def test_mooncake_wrapper_maps_fp8_dispatch(ll_fp8: bool) -> None:
    buf = _FakeMooncakeBuffer()
    cfg = EPConfig(EXPERTS, HIDDEN, MAX_TOKENS, torch.bfloat16, ll_fp8=ll_fp8)
    backend = _mooncake_with_buffer(cfg, buf)
    x, idx, w = case_inputs("masked", 0, HIDDEN)
    x = x.bfloat16()
    d = backend.ll_dispatch(x, idx)
    experts = ReferenceExperts(EXPERTS, HIDDEN, INTERMEDIATE, EXPERT_SEED)
    out = backend.ll_combine(experts.ll_outputs(d, 0, dtype=torch.bfloat16), idx, w, d.handle)
    assert buf.use_fp8 == [ll_fp8]
    if ll_fp8:
        _check_library_fp8(d, x, out, idx, w)
    else:
        assert d.recv_scale is None and d.recv_x.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), experts.dense(x, idx, w), atol=2e-2, rtol=2e-2)


def test_library_ll_recv_makes_column_major_scales_row_major() -> None:
    q = torch.zeros(2, 8, 256, dtype=torch.float8_e4m3fn)
    scales = torch.arange(2 * 2 * 8, dtype=torch.float32).view(2, 2, 8).transpose(1, 2)  # [2, 8, 2] col-major
    x, s = library_ll_recv((q, scales), use_fp8=True)
    assert x is q and s is not None and s.is_contiguous() and torch.equal(s, scales)
    assert s.stride() == (16, 2, 1)
    bf16 = torch.zeros(2, 8, 256, dtype=torch.bfloat16)
    assert library_ll_recv(bf16, use_fp8=False) == (bf16, None)
    with pytest.raises(TypeError, match=r"\(x, scales\)"):
        library_ll_recv(bf16, use_fp8=True)
    with pytest.raises(ValueError, match="do not match"):
        library_ll_recv((q, scales[:, :, :1]), use_fp8=True)


# ---------------- quantization ----------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quant_rows_format_and_error_bound(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(7, 384, generator=g) * torch.logspace(-6, 4, 7).unsqueeze(1)).to(dtype)
    x[2, 128:256] = 0.0
    x[3, 5] = -1e4  # the group's amax is negative
    q, scale = quant_rows(x)
    assert (q.dtype, q.shape, scale.dtype, scale.shape) == (
        torch.float8_e4m3fn,
        (7, 384),
        torch.float32,
        (7, 3),
    )
    assert q.is_contiguous() and scale.is_contiguous()
    amax = x.float().abs().unflatten(1, (3, 128)).amax(dim=2)
    torch.testing.assert_close(scale, amax.clamp(min=AMAX_FLOOR) / FP8_MAX, rtol=0, atol=0)
    assert scale[2, 1] > 0 and (q[2, 128:256].float() == 0).all()  # a zero group: tiny scale, q = 0
    # Each group's largest magnitude lands on +-448.
    qmax = q.float().abs().unflatten(1, (3, 128)).amax(dim=2)
    assert torch.equal(qmax[amax > 0], torch.full_like(qmax[amax > 0], FP8_MAX))
    assert q[3, 5].float() == -FP8_MAX
    # e4m3 keeps 3 mantissa bits: error <= 2^-4 relative for normal values, 2^-10 * scale for subnormal ones.
    deq = dequant_rows(q, scale)
    bound = torch.maximum(x.float().abs() * 2**-4, (scale * 2**-10).repeat_interleave(128, dim=1))
    assert ((deq - x.float()).abs() <= bound).all()
    assert torch.isfinite(deq).all()


def test_quant_rows_rejects_partial_groups_and_takes_zero_rows() -> None:
    with pytest.raises(ValueError, match="H % 128"):
        quant_rows(torch.zeros(2, 200))
    q, scale = quant_rows(torch.zeros(0, 256))
    assert q.shape == (0, 256) and scale.shape == (0, 2)
    with pytest.raises(ValueError, match="does not fit"):
        dequant_rows(q, torch.zeros(0, 3))


def test_fp8_config_validation() -> None:
    with pytest.raises(ValueError, match="multiple of 128"):
        EPConfig(EXPERTS, 200, MAX_TOKENS, ll_fp8=True)
    assert not EPConfig(EXPERTS, 200, MAX_TOKENS).ll_fp8  # off by default; any hidden without it
    assert (
        make_ep_backend("local", EPConfig(EXPERTS, HIDDEN, MAX_TOKENS))
        .ll_dispatch(torch.zeros(1, HIDDEN, dtype=torch.bfloat16), torch.zeros(1, TOP_K, dtype=torch.long))
        .recv_scale
        is None
    )


def test_ll_bytes_per_row() -> None:
    """DeepSeek-V3's H = 7168: FP8 dispatch moves 7168 + 224 bytes per (token, expert) instead of 14336."""
    b = ll_bytes_per_row(EPConfig(256, 7168, 128, torch.bfloat16, ll_fp8=True))
    assert (b["dispatch_bf16"], b["dispatch_fp8"], b["dispatch"], b["combine"]) == (14336, 7392, 7392, 14336)
    assert b["fp8_dispatch_ratio"] == pytest.approx(7392 / 14336)
    plain = ll_bytes_per_row(EPConfig(8, 32, 4, torch.float32))
    assert (plain["dispatch"], plain["combine"], plain["dispatch_fp8"]) == (128, 128, None)


@pytest.mark.timeout(150)
def test_bench_cpu_smoke_fp8(tmp_path: Path) -> None:
    """``pd.bench.ep_latency --fp8`` on gloo: dense-reference check on the quantized rows, the timed
    round trip, the dequantized-rows check and the bytes per row (H = 128: 128 + 4 vs 256)."""
    import json
    import os
    import subprocess

    out = tmp_path / "ep.json"
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pd.bench.ep_latency", "--device", "cpu", "--smoke", "--fp8", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=140, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    assert result["correctness"] and all(c["ok"] for c in result["correctness"]), result["correctness"]
    rows = result["low_latency"]
    assert rows and all(r["ok"] and r["fp8"] and r["fp8_rows_rel_err"] < 1e-2 for r in rows), rows
    assert {(r["bytes_per_row"]["dispatch"], r["bytes_per_row"]["combine"]) for r in rows} == {(132, 256)}


if __name__ == "__main__":
    if "--worker" in sys.argv:
        worker_main(sys.argv[1:])
