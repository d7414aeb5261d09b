"""EP backends against a dense reference MoE.

The 2-rank tests run this file as a worker script (``python -m tests.test_ep --worker ...``) in
two processes on gloo; the workers save what each rank received and returned, and the tests
check it here against the dense reference and the exact expected layouts. Every launch is
bounded by a timeout and kills only the processes it started.
"""

from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
import time
import types
from datetime import timedelta
from pathlib import Path
from typing import ClassVar

import pytest
import torch

from pd.ep import EPConfig, default_ep_backend, make_ep_backend
from pd.ep.base import EPBackend
from pd.ep.deepep import deepep_available
from pd.ep.layout import expert_slots, weighted_gather_sum
from pd.ep.mooncake_ep import mooncake_ep_available
from pd.ep.placement import ExpertPlacement, PlacementMap
from pd.ep.reference import ReferenceExperts, random_routing
from tests.support.net import free_port

WORLD, EXPERTS, HIDDEN, TOP_K, MAX_TOKENS, INTERMEDIATE = 2, 8, 32, 3, 6, 16
E_LOCAL = EXPERTS // WORLD
EXPERT_SEED = 1234
LAUNCH_TIMEOUT_S = 120
CASES = ("random", "one_expert", "idle_rank", "all_empty", "full", "masked", "remote_only")
ROOT = Path(__file__).resolve().parents[1]  # the workers run as ``-m tests.test_ep`` from here


def case_inputs(
    case: str, rank: int, hidden: int = HIDDEN
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The (x, topk_idx, topk_weights) rank ``rank`` uses in ``case``; identical in every process."""
    g = torch.Generator().manual_seed(1000 * CASES.index(case) + rank)
    tokens = {
        "random": [5, 4],
        "one_expert": [MAX_TOKENS, MAX_TOKENS],
        "idle_rank": [5, 0],
        "all_empty": [0, 0],
        "full": [MAX_TOKENS, MAX_TOKENS],
        "masked": [5, MAX_TOKENS],
        "remote_only": [4, 4],
    }[case][rank]
    x = torch.randn(tokens, hidden, generator=g)
    idx, w = random_routing(tokens, EXPERTS, TOP_K, g)
    if case == "one_expert":  # every token of every rank names expert 5 (in a random slot)
        idx, _ = random_routing(tokens, EXPERTS - 1, TOP_K - 1, g)
        idx = idx + (idx >= 5).long()
        idx = torch.cat([idx, torch.full((tokens, 1), 5)], dim=1)
        idx = idx.gather(1, torch.rand(tokens, TOP_K, generator=g).argsort(dim=1))
    elif case == "masked":  # scattered -1 slots, one row with no expert at all
        idx[0, 1] = -1
        idx[1, :] = -1
        idx[2, 0] = idx[2, 2] = -1
        idx[4, 2] = -1
    elif case == "remote_only":  # every expert lives on the other rank
        other = 1 - rank
        idx = other * E_LOCAL + torch.rand(tokens, E_LOCAL, generator=g).topk(TOP_K, dim=1).indices
    return x, idx, w


def run_case(backend: EPBackend, experts: ReferenceExperts, x, idx, w) -> dict[str, torch.Tensor]:
    """Normal and low-latency round trips with the reference experts; what the checks need."""
    first = backend.config.first_local_expert
    d = backend.dispatch(x, idx, w)
    out = backend.combine(experts.normal_outputs(d, first), d.handle)
    ll = backend.ll_dispatch(x, idx)
    assert ll.recv_scale is None and ll.recv_x.dtype == x.dtype  # no FP8 unless ll_fp8
    counts = ll.recv_count.tolist()
    ll_rows = torch.cat([ll.recv_x[e, :n] for e, n in enumerate(counts)])  # a copy: recv_x is reused
    ll_out = backend.ll_combine(experts.ll_outputs(ll, first), idx, w, ll.handle)
    return {
        "recv_x": d.recv_x.clone(),
        "recv_topk_idx": d.recv_topk_idx,
        "recv_topk_weights": d.recv_topk_weights,
        "num_recv_per_expert": torch.tensor(d.num_recv_per_expert),
        "out": out,
        "ll_recv_shape": torch.tensor(ll.recv_x.shape),
        "ll_count": ll.recv_count.clone(),
        "ll_rows": ll_rows,
        "ll_out": ll_out,
    }


def placement_inputs(rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, GLOBAL topk_idx, topk_weights) of ``rank`` in the placement case."""
    g = torch.Generator().manual_seed(7000 + rank)
    x = torch.randn(5, HIDDEN, generator=g)
    return (x, *random_routing(5, EXPERTS, TOP_K, g))


def run_placement_case(
    backend: EPBackend, experts: ReferenceExperts, kind: str, rank: int, world: int
) -> dict:
    """Route with global ids, translate them with the placement map, and run the physical slots'
    experts (physical slot p holds global expert physical_to_global[p], as the weight loader puts it)."""
    placement = ExpertPlacement(kind, EXPERTS, world)
    perm = torch.tensor(placement.physical_to_global())  # [E] physical -> global
    physical_experts = copy.copy(experts)
    physical_experts.up, physical_experts.down = experts.up[perm], experts.down[perm]
    x, global_idx, w = placement_inputs(rank)
    idx = PlacementMap(placement, "cpu").to_physical(global_idx)  # [T, K]
    first = backend.config.first_local_expert
    d = backend.dispatch(x, idx, w)
    out = backend.combine(physical_experts.normal_outputs(d, first), d.handle)
    ll = backend.ll_dispatch(x, idx)
    ll_out = backend.ll_combine(physical_experts.ll_outputs(ll, first), idx, w, ll.handle)
    return {"out": out, "ll_out": ll_out}


# ---------------- checks (run in the test process) ----------------


def _row_keys(inputs: list) -> dict[bytes, tuple[int, int]]:
    """Map each source row's bytes to (source rank, token); random rows are all distinct."""
    keys = {}
    for src, (x, _, _) in enumerate(inputs):
        for t in range(x.shape[0]):
            keys[x[t].numpy().tobytes()] = (src, t)
    assert len(keys) == sum(x.shape[0] for x, _, _ in inputs)
    return keys


def _identify(rows: torch.Tensor, keys: dict) -> list[tuple[int, int]]:
    found = [keys.get(r.numpy().tobytes()) for r in rows]
    assert None not in found, "a received row is not a copy of any source token"
    return found


def check_normal(results: list[dict], inputs: list, n_local: int) -> None:
    keys = _row_keys(inputs)
    experts = ReferenceExperts(n_local * len(inputs), HIDDEN, INTERMEDIATE, EXPERT_SEED)
    for rank, res in enumerate(results):
        lo, hi = rank * n_local, (rank + 1) * n_local
        got = _identify(res["recv_x"], keys)
        assert len(set(got)) == len(got), f"rank {rank}: a token arrived twice"
        expected = {(s, t) for s, (_, idx, _) in enumerate(inputs) for t in range(idx.shape[0])
                    if ((idx[t] >= lo) & (idx[t] < hi)).any()}  # fmt: skip
        assert expected <= set(got), f"rank {rank}: missing rows {sorted(expected - set(got))}"
        counts = torch.zeros(n_local, dtype=torch.long)
        for i, (s, t) in enumerate(got):
            ids, w = inputs[s][1][t], inputs[s][2][t]
            here = (ids >= lo) & (ids < hi)
            assert res["recv_topk_idx"][i].tolist() == torch.where(here, ids - lo, -1).tolist()
            assert torch.equal(res["recv_topk_weights"][i], torch.where(here, w, 0.0))
            counts += torch.bincount(ids[here] - lo, minlength=n_local)
        assert res["num_recv_per_expert"].tolist() == counts.tolist()
        x, idx, w = inputs[rank]
        torch.testing.assert_close(res["out"], experts.dense(x, idx, w), atol=1e-5, rtol=1e-5)


def check_ll(results: list[dict], inputs: list, n_local: int) -> None:
    keys = _row_keys(inputs)
    world = len(inputs)
    experts = ReferenceExperts(n_local * world, HIDDEN, INTERMEDIATE, EXPERT_SEED)
    for rank, res in enumerate(results):
        assert res["ll_recv_shape"].tolist() == [n_local, MAX_TOKENS * world, HIDDEN]
        got = _identify(res["ll_rows"], keys)
        start = 0
        for local, n in enumerate(res["ll_count"].tolist()):
            e = rank * n_local + local
            expected = sorted((s, t) for s, (_, idx, _) in enumerate(inputs) for t in range(idx.shape[0])
                              for k in range(idx.shape[1]) if idx[t, k] == e)  # fmt: skip
            assert sorted(got[start : start + n]) == expected, f"rank {rank} expert {e}"
            start += n
        assert res["ll_count"].dtype == torch.int32
        x, idx, w = inputs[rank]
        torch.testing.assert_close(res["ll_out"], experts.dense(x, idx, w), atol=1e-5, rtol=1e-5)


# ---------------- 2-rank launches ----------------


def launch_ranks(args: list[str], out_dir: Path, world: int = WORLD, module: str = "tests.test_ep") -> None:
    """Run ``module`` (this file by default) as ``world`` worker processes; fail with their output
    on error or timeout."""
    port = free_port()
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    procs = []
    for rank in range(world):
        log = open(out_dir / f"rank{rank}.log", "w")  # noqa: SIM115 (closed below)
        cmd = [sys.executable, "-m", module, "--worker", "--rank", str(rank), "--world", str(world),
               "--port", str(port), "--out", str(out_dir), *args]  # fmt: skip
        procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT), log))
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    try:
        # A rank that fails leaves its peer blocked in a collective: stop as soon as one fails.
        while any(p.poll() is None for p, _ in procs) and time.monotonic() < deadline:
            if any(p.poll() not in (None, 0) for p, _ in procs):
                break
            time.sleep(0.1)
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    logs = "\n".join(f"--- rank {r} (rc {p.returncode}) ---\n" + (out_dir / f"rank{r}.log").read_text()
                     for r, (p, _) in enumerate(procs))  # fmt: skip
    assert all(p.returncode == 0 for p, _ in procs), logs


def worker_main(argv: list[str]) -> None:
    import torch.distributed as dist

    p = argparse.ArgumentParser()
    p.add_argument("--worker", action="store_true")
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world", type=int, required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--backend", default="torch")
    p.add_argument("--placement", default=None, help="run the placement case with this expert placement")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=args.rank, world_size=args.world,
        timeout=timedelta(seconds=60),
    )  # fmt: skip
    try:
        cfg = EPConfig(EXPERTS, HIDDEN, MAX_TOKENS, torch.float32, args.rank, args.world)
        backend = make_ep_backend(args.backend, cfg, dist.group.WORLD)
        experts = ReferenceExperts(EXPERTS, HIDDEN, INTERMEDIATE, EXPERT_SEED)
        if args.placement:
            torch.save(run_placement_case(backend, experts, args.placement, args.rank, args.world),
                       args.out / f"placement.rank{args.rank}.pt")  # fmt: skip
            return
        for case in CASES:
            res = run_case(backend, experts, *case_inputs(case, args.rank))
            torch.save(res, args.out / f"{case}.rank{args.rank}.pt")
        backend.close()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def torch_results(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ep_torch")
    launch_ranks(["--backend", "torch"], out)
    return out


def _load(out: Path, case: str) -> list[dict]:
    return [torch.load(out / f"{case}.rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.mark.timeout(LAUNCH_TIMEOUT_S + 30)
@pytest.mark.parametrize("case", CASES)
def test_torch_normal_matches_dense(torch_results: Path, case: str) -> None:
    check_normal(_load(torch_results, case), [case_inputs(case, r) for r in range(WORLD)], E_LOCAL)


@pytest.mark.timeout(LAUNCH_TIMEOUT_S + 30)
@pytest.mark.parametrize("case", CASES)
def test_torch_low_latency_matches_dense(torch_results: Path, case: str) -> None:
    check_ll(_load(torch_results, case), [case_inputs(case, r) for r in range(WORLD)], E_LOCAL)


# ---------------- single-rank backends ----------------


def _local_config(dtype: torch.dtype = torch.float32) -> EPConfig:
    return EPConfig(EXPERTS, HIDDEN, MAX_TOKENS, dtype)


@pytest.mark.parametrize("case", CASES)
def test_local_matches_dense(case: str) -> None:
    backend = make_ep_backend("local", _local_config())
    inputs = [case_inputs(case, 0)]
    results = [run_case(backend, ReferenceExperts(EXPERTS, HIDDEN, INTERMEDIATE, EXPERT_SEED), *inputs[0])]
    check_normal(results, inputs, EXPERTS)
    check_ll(results, inputs, EXPERTS)


@pytest.mark.parametrize("name", ["local", "torch"])
def test_low_latency_paths_are_data_independent(monkeypatch, name: str) -> None:
    """On the meta device every data-dependent op (.item(), .tolist(), .nonzero(), shapes from
    values) raises, so a low-latency round trip that runs there has static shapes and no host
    sync: what CUDA-graph capture needs. The torch backend's normal mode, which syncs, fails there
    as a control; the local backend's normal mode runs inside decode graphs, so it must not sync."""
    import pd.ep.torch_ep

    # W = 1: the all-to-all is a copy.
    monkeypatch.setattr(pd.ep.torch_ep.dist, "all_to_all_single", lambda out, inp, *a, **k: out.copy_(inp))
    backend = make_ep_backend(name, EPConfig(EXPERTS, HIDDEN, MAX_TOKENS, torch.bfloat16, device="meta"))
    x = torch.empty(MAX_TOKENS - 1, HIDDEN, dtype=torch.bfloat16, device="meta")
    idx = torch.empty(MAX_TOKENS - 1, TOP_K, dtype=torch.long, device="meta")
    w = torch.empty(MAX_TOKENS - 1, TOP_K, device="meta")
    d = backend.ll_dispatch(x, idx)
    out = backend.ll_combine(d.recv_x, idx, w, d.handle)
    assert (d.recv_x.shape, d.recv_count.shape, out.shape) == (
        (EXPERTS, MAX_TOKENS, HIDDEN),
        (EXPERTS,),
        x.shape,
    )
    if name == "local":
        d = backend.dispatch(x, idx, w)
        assert backend.combine(d.recv_x, d.handle).shape == x.shape
    else:
        with pytest.raises(RuntimeError, match="meta"):
            backend.dispatch(x, idx, w)


def test_local_normal_delivers_rows_without_experts_as_all_minus_one() -> None:
    backend = make_ep_backend("local", _local_config())
    x, idx, w = case_inputs("masked", 0)
    d = backend.dispatch(x, idx, w)
    assert d.recv_x.shape[0] == x.shape[0]
    assert d.recv_topk_idx[1].tolist() == [-1] * TOP_K and d.recv_topk_weights[1].tolist() == [0.0] * TOP_K


def test_layout_rejects_nothing_at_capacity() -> None:
    """Every token of every rank to one expert fills its W * M rows exactly, none dropped."""
    rows = WORLD * MAX_TOKENS
    local_idx = torch.full((rows, TOP_K), -1)
    local_idx[:, 1] = 2
    valid, slot, count = expert_slots(local_idx, E_LOCAL, rows)
    assert count.tolist() == [0, 0, rows, 0]
    assert sorted(slot[valid].tolist()) == list(range(2 * rows, 3 * rows))
    assert (slot[~valid] == E_LOCAL * rows).all()


def test_weighted_gather_sum_ignores_nan_garbage() -> None:
    y = torch.full((4, 3), float("nan"))
    y[1] = 1.0
    slot = torch.tensor([[1, 3], [0, 2]])
    valid = torch.tensor([[True, False], [False, False]])
    weights = torch.tensor([[0.5, float("nan")], [1.0, 1.0]])
    assert weighted_gather_sum(y, slot, valid, weights).tolist() == [[0.5] * 3, [0.0] * 3]


def test_low_latency_rejects_more_than_max_tokens() -> None:
    backend = make_ep_backend("local", _local_config())
    x = torch.zeros(MAX_TOKENS + 1, HIDDEN)
    with pytest.raises(ValueError, match="max_tokens_per_rank"):
        backend.ll_dispatch(x, torch.zeros(MAX_TOKENS + 1, TOP_K, dtype=torch.long))


@pytest.mark.parametrize("bad", [EXPERTS, -2])
def test_normal_rejects_out_of_range_expert_ids(monkeypatch, bad: int) -> None:
    """Backends whose normal mode reads the device anyway check the ids (the local backend, which
    must not sync, checks shapes only)."""
    import pd.ep.torch_ep

    monkeypatch.setattr(pd.ep.torch_ep.dist, "all_to_all_single", lambda out, inp, *a, **k: out.copy_(inp))
    backend = make_ep_backend("torch", _local_config())
    idx = torch.zeros(2, TOP_K, dtype=torch.long)
    idx[1, 2] = bad
    with pytest.raises(ValueError, match=f"holds {bad}"):
        backend.dispatch(torch.zeros(2, HIDDEN), idx, torch.ones(2, TOP_K))


def test_rejects_wrong_dtype_and_shape() -> None:
    backend = make_ep_backend("local", _local_config())
    idx = torch.zeros(2, TOP_K, dtype=torch.long)
    with pytest.raises(ValueError, match="x must be"):
        backend.ll_dispatch(torch.zeros(2, HIDDEN, dtype=torch.float64), idx)
    with pytest.raises(ValueError, match="topk_idx must be"):
        backend.ll_dispatch(torch.zeros(2, HIDDEN), idx.int())
    with pytest.raises(ValueError, match="topk_weights must be"):
        backend.dispatch(torch.zeros(2, HIDDEN), idx, torch.ones(2, TOP_K, dtype=torch.float64))


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="multiple of world_size"):
        EPConfig(num_experts=6, hidden=8, max_tokens_per_rank=4, world_size=4)
    with pytest.raises(ValueError, match="rank 2"):
        EPConfig(num_experts=8, hidden=8, max_tokens_per_rank=4, rank=2, world_size=2)
    cfg = EPConfig(num_experts=64, hidden=8, max_tokens_per_rank=16, rank=3, world_size=4)
    assert (cfg.num_local_experts, cfg.first_local_expert, cfg.ll_rows_per_expert) == (16, 48, 64)
    with pytest.raises(ValueError, match="process group is needed"):
        make_ep_backend("torch", cfg)
    with pytest.raises(ValueError, match="world_size=1"):
        make_ep_backend("local", cfg)


def test_make_ep_backend_rejects_unknown_name() -> None:
    with pytest.raises(ValueError, match="unknown EP backend 'nccl'"):
        make_ep_backend("nccl", _local_config())


@pytest.mark.parametrize(
    ("role", "device", "world", "deepep", "mooncake", "want"),
    [
        ("decode", "cuda", 1, True, True, "local"),
        ("prefill", "cpu", 2, True, True, "torch"),
        ("prefill", "cuda", 2, True, True, "deepep"),
        ("prefill", "cuda", 2, False, True, "torch"),
        ("decode", "cuda", 8, True, True, "deepep"),
        ("decode", "cuda", 8, False, True, "mooncake"),
        ("decode", "cuda", 8, False, False, "torch"),
    ],
)
def test_default_ep_backend(monkeypatch, role, device, world, deepep, mooncake, want) -> None:
    import pd.ep

    monkeypatch.setattr(pd.ep, "deepep_available", lambda: deepep)
    monkeypatch.setattr(pd.ep, "mooncake_ep_available", lambda: mooncake)
    assert default_ep_backend(role, device, world) == want


def test_default_ep_backend_rejects_unknown_role() -> None:
    with pytest.raises(ValueError, match="unknown role"):
        default_ep_backend("train", "cpu", 2)


@pytest.mark.skipif(mooncake_ep_available(), reason="Mooncake EP is installed here")
def test_mooncake_construction_names_the_missing_library() -> None:
    cfg = EPConfig(EXPERTS, 128, MAX_TOKENS, torch.bfloat16, device="cuda")
    with pytest.raises(RuntimeError, match="needs Mooncake EP"):
        make_ep_backend("mooncake", cfg)


@pytest.mark.skipif(deepep_available(), reason="DeepEP is installed here")
def test_deepep_construction_names_the_missing_library() -> None:
    with pytest.raises(RuntimeError, match="needs DeepEP"):
        make_ep_backend("deepep", _local_config(torch.bfloat16))


# ---------------- DeepEP wrapper against a fake deep_ep with DeepEP's documented signatures ----------------


class _FakeTuning:
    def __init__(self, *args: int) -> None:
        self.args = args

    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        return 1000 * hidden_bytes

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        return 0


def library_fp8_cast(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """How DeepEP's and Mooncake EP's dispatch kernels quantize (read in their sources): per row and
    128 columns, amax floored at 1e-4, e4m3 = saturating cast of ``x * (448 / amax)``, stored
    scale ``amax / 448``. Returns ``[T, H]`` e4m3 and ``[T, H / 128]`` float32."""
    groups = x.float().unflatten(1, (x.shape[1] // 128, 128))
    amax = groups.abs().amax(dim=2).clamp(min=1e-4)
    q = (groups * (448.0 / amax).unsqueeze(2)).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    return q.flatten(1), amax / 448.0


def fake_library_ll_dispatch(x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts, use_fp8):
    """Single-rank masked-layout dispatch returning what DeepEP / Mooncake EP return as their first
    value: recv_x bf16, or with use_fp8 ``(x e4m3 [E, M, H], scales [E, M, H / 128] float32)`` whose
    scales are a transposed view of an ``[E, H / 128, M]`` tensor (column-major, as theirs)."""
    m, hidden = num_max_dispatch_tokens_per_rank, x.shape[1]
    valid, slot, count = expert_slots(topk_idx, num_experts, m)
    rows = num_experts * m + 1
    if not use_fp8:
        storage = torch.zeros(rows, hidden, dtype=x.dtype)
        storage[slot] = x.unsqueeze(1)
        return storage[:-1].view(num_experts, m, hidden), count, (valid, slot)
    q, scale = library_fp8_cast(x)
    q_storage = torch.zeros(rows, hidden, dtype=torch.uint8)
    q_storage[slot] = q.view(torch.uint8).unsqueeze(1)
    s_storage = torch.zeros(rows, hidden // 128)
    s_storage[slot] = scale.unsqueeze(1)
    col_major = torch.empty(num_experts, hidden // 128, m).transpose(
        1, 2
    )  # [E, M, H/128], strides (G*M, 1, M)
    col_major.copy_(s_storage[:-1].view(num_experts, m, hidden // 128))
    recv_x = q_storage[:-1].view(torch.float8_e4m3fn).view(num_experts, m, hidden)
    return (recv_x, col_major), count, (valid, slot)


class _FakeDeepEPBuffer:
    """Single-rank stand-in for ``deep_ep.Buffer``: DeepEP's documented method signatures and
    dtype rules, implemented with plain torch (every expert is local)."""

    num_sms = 20
    built: ClassVar[list[_FakeDeepEPBuffer]] = []

    def __init__(self, group, num_nvl_bytes=0, num_rdma_bytes=0, low_latency_mode=False, num_qps_per_rank=24,
                 allow_nvlink_for_low_latency_mode=True, allow_mnnvl=False, explicitly_destroy=False, comm=None):  # fmt: skip
        self.sizes = (num_nvl_bytes, num_rdma_bytes, low_latency_mode, num_qps_per_rank)
        self.calls: list[str] = []
        _FakeDeepEPBuffer.built.append(self)

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> _FakeTuning:
        return _FakeTuning(_FakeDeepEPBuffer.num_sms, 24, 256, 6, 128)

    @staticmethod
    def get_combine_config(num_ranks: int) -> _FakeTuning:
        return _FakeTuning(_FakeDeepEPBuffer.num_sms, 10, 256, 6, 128)

    @staticmethod
    def get_low_latency_rdma_size_hint(
        num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts
    ) -> int:
        return num_max_dispatch_tokens_per_rank * hidden * num_experts

    def get_dispatch_layout(self, topk_idx, num_experts, previous_event=None, async_finish=False,
                            allocate_on_comm_stream=False):  # fmt: skip
        assert topk_idx.dtype == torch.int64
        valid = topk_idx >= 0
        in_rank = valid.any(dim=1, keepdim=True)
        per_expert = torch.bincount(topk_idx[valid], minlength=num_experts).int()
        return in_rank.sum(0).int(), None, per_expert, in_rank, None

    def dispatch(self, x, handle=None, num_tokens_per_rank=None, num_tokens_per_rdma_rank=None,
                 is_token_in_rank=None, num_tokens_per_expert=None, topk_idx=None, topk_weights=None,
                 expert_alignment=1, num_worst_tokens=0, config=None, previous_event=None, async_finish=False,
                 allocate_on_comm_stream=False):  # fmt: skip
        assert x.dtype == torch.bfloat16 and topk_weights.dtype == torch.float32
        assert num_tokens_per_rank is not None and num_tokens_per_expert is not None
        self.calls.append("dispatch")
        rows = is_token_in_rank[:, 0].nonzero().squeeze(1)
        ids = topk_idx[rows]
        weights = torch.where(ids >= 0, topk_weights[rows], 0.0)
        counts = torch.bincount(ids[ids >= 0], minlength=num_tokens_per_expert.numel()).tolist()
        return x[rows], ids, weights, counts, (rows, x.shape[0]), None

    def combine(self, x, handle, topk_weights=None, bias=None, config=None, previous_event=None, async_finish=False,
                allocate_on_comm_stream=False):  # fmt: skip
        rows, num_tokens = handle
        out = torch.zeros(num_tokens, x.shape[1], dtype=torch.float32).index_add_(0, rows, x.float())
        return out.to(x.dtype), None, None

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank, hidden, num_experts) -> None:
        self.calls.append("clean")

    def low_latency_dispatch(self, x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts,
                             cumulative_local_expert_recv_stats=None, dispatch_wait_recv_cost_stats=None,
                             use_fp8=True, round_scale=False, use_ue8m0=False, async_finish=False,
                             return_recv_hook=False):  # fmt: skip
        assert x.dtype == torch.bfloat16 and topk_idx.dtype == torch.int64
        assert x.shape[0] <= num_max_dispatch_tokens_per_rank
        assert not (round_scale or use_ue8m0)  # float32 scales, as the wrapper expects
        self.calls.append(f"ll_dispatch{'_fp8' if use_fp8 else ''}")
        recv, count, handle = fake_library_ll_dispatch(
            x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts, use_fp8
        )
        return recv, count, handle, None, None

    def low_latency_combine(self, x, topk_idx, topk_weights, handle, use_logfmt=False, zero_copy=False,
                            async_finish=False, return_recv_hook=False, out=None,
                            combine_wait_recv_cost_stats=None):  # fmt: skip
        assert x.dtype == torch.bfloat16 and topk_weights.dtype == torch.float32
        valid, slot = handle
        return weighted_gather_sum(x.view(-1, x.shape[-1]), slot, valid, topk_weights).to(x.dtype), None, None


def test_deepep_wrapper_against_fake_deep_ep(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "deep_ep", types.SimpleNamespace(Buffer=_FakeDeepEPBuffer))
    _FakeDeepEPBuffer.built.clear()
    cfg = _local_config(torch.bfloat16)
    backend = make_ep_backend("deepep", cfg)
    (buf,) = _FakeDeepEPBuffer.built
    assert buf.sizes == (1000 * HIDDEN * 2, MAX_TOKENS * HIDDEN * EXPERTS, True, max(EXPERTS, 20))
    experts = ReferenceExperts(EXPERTS, HIDDEN, INTERMEDIATE, EXPERT_SEED)
    x, idx, w = case_inputs("masked", 1)
    x = x.bfloat16()
    want = experts.dense(x, idx, w)
    d = backend.dispatch(x, idx, w)
    assert d.recv_x.shape[0] == x.shape[0] - 1  # the row without experts is not sent
    out = backend.combine(experts.normal_outputs(d, 0), d.handle)
    torch.testing.assert_close(out.float(), want, atol=2e-2, rtol=2e-2)
    ll = backend.ll_dispatch(x, idx)
    ll_out = backend.ll_combine(experts.ll_outputs(ll, 0), idx, w, ll.handle)
    torch.testing.assert_close(ll_out.float(), want, atol=2e-2, rtol=2e-2)
    backend.ll_dispatch(x, idx)
    # The low-latency buffer is cleaned once after normal-mode use, not on every call.
    assert buf.calls == ["dispatch", "clean", "ll_dispatch", "ll_dispatch"]


@pytest.mark.timeout(LAUNCH_TIMEOUT_S + 30)
@pytest.mark.parametrize("kind", ["linear", "round_robin"])
def test_placement_on_four_ranks_matches_dense(tmp_path: Path, kind: str) -> None:
    """4 gloo ranks: routing in global ids, dispatch in physical ids, experts in their physical slots;
    both modes must give what the dense reference computes from the global ids."""
    launch_ranks(["--backend", "torch", "--placement", kind], tmp_path, world=4)
    experts = ReferenceExperts(EXPERTS, HIDDEN, INTERMEDIATE, EXPERT_SEED)
    for rank in range(4):
        res = torch.load(tmp_path / f"placement.rank{rank}.pt", weights_only=True)
        want = experts.dense(*placement_inputs(rank))
        torch.testing.assert_close(res["out"], want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(res["ll_out"], want, atol=1e-5, rtol=1e-5)


# ---------------- the GPU benchmark's CPU smoke mode ----------------


@pytest.mark.timeout(150)
def test_bench_cpu_smoke(tmp_path: Path) -> None:
    import json

    out = tmp_path / "ep.json"
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pd.bench.ep_latency", "--device", "cpu", "--smoke", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=140, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    checks = result["correctness"]
    assert checks and all(c["ok"] for c in checks), checks
    assert {c["mode"] for c in checks} == {"normal", "low_latency"}
    assert result["low_latency"] and result["normal"]


@pytest.mark.timeout(150)
def test_bench_cpu_smoke_grouped_placements(tmp_path: Path) -> None:
    """The placement study's mode: grouped router, both placements, rows conserved on the wire."""
    import json

    out = tmp_path / "ep.json"
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pd.bench.ep_latency", "--device", "cpu", "--smoke", "--routing", "grouped",
           "--placements", "linear,round_robin", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=140, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out.read_text())["placement"]
    assert {r["placement"] for r in rows} == {"linear", "round_robin"}
    for r in rows:
        assert r["ok"], r
        # Every (token, expert) pair of both ranks arrives at exactly one rank.
        assert sum(r["recv_rows_per_rank"]) == r["tokens"] * r["top_k"] * 2, r
        assert 1.0 <= r["mean_ranks_spanned"] <= 2.0, r


if __name__ == "__main__":
    if "--worker" in sys.argv:
        worker_main(sys.argv[1:])
