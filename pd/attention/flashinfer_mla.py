"""MLA attention on FlashInfer (CUDA): ragged causal prefill (non-absorbed) and paged absorbed decode.

Planning happens in ``prepare`` (once per step, outside any CUDA graph) on host tensors; the per-layer
calls only launch kernels. For CUDA graphs each batch bucket has its own decode wrapper whose metadata buffers
keep their addresses between captures and replays (``graph_state``); ``prepare_graph`` re-plans it
before each replay.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from pd.attention.base import AttentionBackend, AttnInputs, pad_for_graph
from pd.kv_cache import KVPool
from pd.types import BatchMode

WORKSPACE_BYTES = 128 << 20


# FlashInfer's MLA decode kernels are built for DeepSeek-V3's latent: 512 compressed + 64 rotary values.
SUPPORTED_LATENT = (512, 64)


def flashinfer_supports(kv_lora_rank: int, rope_dim: int) -> bool:
    """FlashInfer is installed, a GPU is present, and its MLA kernels cover these latent widths."""
    return flashinfer_unusable(kv_lora_rank, rope_dim) is None


def flashinfer_unusable(kv_lora_rank: int, rope_dim: int) -> str | None:
    """Why FlashInfer's MLA cannot serve these latent widths here, or None when it can."""
    try:
        import flashinfer  # noqa: F401
    except ImportError as e:  # flashinfer itself, or one of its own dependencies (apache-tvm-ffi, ...)
        return f"flashinfer does not import ({e})"
    if not torch.cuda.is_available():
        return "no CUDA device"
    if (kv_lora_rank, rope_dim) != SUPPORTED_LATENT:
        return f"its MLA kernels cover latent widths {SUPPORTED_LATENT}, not {(kv_lora_rank, rope_dim)}"
    return None


@dataclass(frozen=True)
class _StepMeta:
    """A step's page arithmetic on the host (numpy), before one copy to the device."""

    starts: np.ndarray  # [B] first position computed this step
    ends: np.ndarray  # [B] context length after the step
    pages_used: np.ndarray  # [B] pages holding [0, end)
    flat_pages: np.ndarray  # [sum(pages_used)] every sequence's pages, in order
    page_starts: np.ndarray  # [B] offset of each sequence's pages in flat_pages
    out_slots: np.ndarray  # [T] cache slot of every new token
    seq_of: np.ndarray  # [T] the sequence of every new token
    positions: np.ndarray  # [T] the position of every new token

    @classmethod
    def of(cls, inputs: AttnInputs, page_size: int) -> _StepMeta:
        starts = np.asarray(inputs.starts, dtype=np.int64)
        ends = np.asarray(inputs.ends, dtype=np.int64)
        pages_used = -(-ends // page_size)
        used = pages_used.tolist()
        flat_pages = np.fromiter(
            itertools.chain.from_iterable(t[:n] for t, n in zip(inputs.page_tables, used)),
            dtype=np.int64,
            count=sum(used),
        )
        page_starts = np.concatenate([[0], np.cumsum(pages_used)[:-1]])
        q_lens = ends - starts
        seq_of = np.repeat(np.arange(len(starts)), q_lens)
        q_starts = np.concatenate([[0], np.cumsum(q_lens)[:-1]])
        positions = starts[seq_of] + np.arange(len(seq_of)) - q_starts[seq_of]
        out_slots = (
            flat_pages[page_starts[seq_of] + positions // page_size] * page_size + positions % page_size
        )
        return cls(starts, ends, pages_used, flat_pages, page_starts, out_slots, seq_of, positions)

    def context_slots(self, page_size: int) -> np.ndarray:
        """Slots of every context position ``[0, end)`` of every sequence, in batch order."""
        return np.concatenate(
            [self.flat_pages[p0 + np.arange(e) // page_size] * page_size + np.arange(e) % page_size
             for p0, e in zip(self.page_starts, self.ends)]
        )  # fmt: skip


def _host(a: npt.ArrayLike) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int32))


@dataclass
class _GraphState:
    """One bucket's decode wrapper and the static buffers its captured kernels read."""

    batch: int
    tokens: int  # positions the rows compute in all (batch: plain decode; more: causal queries)
    wrapper: Any  # flashinfer.mla.BatchMLAPagedAttentionWrapper
    out_slots: torch.Tensor  # [tokens] int64: where each new latent goes (padded rows: the dummy page)


class FlashInferMLABackend(AttentionBackend):
    """Shapes as in ``AttentionBackend``; the pool's latent is ``[c_kv (kv_lora_rank) | k_pe (rope)]``."""

    supports_graphs = True

    def __init__(
        self,
        pool: KVPool,
        softmax_scale: float,
        kv_lora_rank: int,
        num_heads: int,
        qk_head_dim: int,
        v_head_dim: int,
    ) -> None:
        if (kv_lora_rank, pool.layout.latent_dim - kv_lora_rank) != SUPPORTED_LATENT:
            raise ValueError(
                f"FlashInfer MLA needs a latent of {SUPPORTED_LATENT[0]} + {SUPPORTED_LATENT[1]} values, this model has "
                f"{kv_lora_rank} + {pool.layout.latent_dim - kv_lora_rank}: use --attention-backend torch"
            )
        import flashinfer
        from flashinfer.mla import BatchMLAPagedAttentionWrapper, MLAPlanMetadata

        self._MLAPlanMetadata = MLAPlanMetadata
        self._Wrapper = BatchMLAPagedAttentionWrapper
        self.pool = pool
        self.scale = softmax_scale
        self.kv_lora_rank = kv_lora_rank
        self.rope_dim = pool.layout.latent_dim - kv_lora_rank
        self.num_heads = num_heads
        self.qk_head_dim, self.v_head_dim = qk_head_dim, v_head_dim  # non-absorbed prefill: nope + rope, v
        self.device = pool.buffer.device
        self.dtype = pool.layout.dtype
        self.workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=self.device)
        self.prefill = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(self.workspace, "NHD")
        self.decode_wrapper = BatchMLAPagedAttentionWrapper(self.workspace)
        self.graph_workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=self.device)
        self.active: _GraphState | None = None  # set while capturing or replaying a bucket
        self.inputs: AttnInputs | None = None

    # ---- metadata ----

    def _to_device(self, a: npt.ArrayLike, dtype: npt.DTypeLike = np.int32) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=dtype)).to(self.device, non_blocking=True)

    def _plan_decode(self, wrapper: Any, meta: _StepMeta, causal: bool) -> None:
        # Host tensors: the planner reads the lengths on the host (a device tensor costs a blocking copy back
        # each, which waits for whatever the stream still runs) and copies them into its buffers itself.
        # Causal: a sequence's query i sees the cache up to kv_len - q_len + i (its own position).
        metadata = self._MLAPlanMetadata.csr(
            _host(np.concatenate([[0], np.cumsum(meta.ends - meta.starts)])),
            _host(np.concatenate([[0], np.cumsum(meta.pages_used)])),
            _host(meta.flat_pages),
            _host(meta.ends),
        )
        wrapper.plan(
            metadata=metadata,
            num_heads=self.num_heads,
            head_dim_ckv=self.kv_lora_rank,
            head_dim_kpe=self.rope_dim,
            page_size=self.pool.layout.page_size,
            causal=causal,
            sm_scale=self.scale,
            q_data_type=self.dtype,
            kv_data_type=self.dtype,
            query_layout="split",
            kv_cache_layout="split",
        )

    def prepare(self, inputs: AttnInputs) -> None:
        self.inputs = inputs
        self.active = None
        meta = _StepMeta.of(inputs, self.pool.layout.page_size)
        self.out_slots = self._to_device(meta.out_slots, np.int64)
        if inputs.mode is BatchMode.DECODE:
            self._plan_decode(self.decode_wrapper, meta, causal=max(inputs.q_lens) > 1)
            return
        if inputs.has_prefix:
            self.ctx_slots = self._to_device(meta.context_slots(self.pool.layout.page_size), np.int64)
        self.prefill.plan(
            _host(np.concatenate([[0], np.cumsum(meta.ends - meta.starts)])),
            _host(np.concatenate([[0], np.cumsum(meta.ends)])),
            self.num_heads,
            self.num_heads,
            self.qk_head_dim,
            head_dim_vo=self.v_head_dim,
            causal=True,  # bottom-right aligned: query i of a sequence sees keys up to kv_len - q_len + i
            sm_scale=self.scale,
            q_data_type=self.dtype,
            kv_data_type=self.dtype,
        )

    # ---- CUDA graphs ----

    def graph_state(
        self, batch: int, max_pages: int, tokens: int | None = None, max_q_per_row: int | None = None
    ) -> _GraphState:
        """A new decode wrapper with static metadata buffers (its own planner buffers: states planned one after
        another before their replays do not overwrite each other's plan)."""
        tokens = batch if tokens is None else tokens
        i32: dict[str, Any] = dict(dtype=torch.int32, device=self.device)
        wrapper = self._Wrapper(
            self.graph_workspace,
            use_cuda_graph=True,
            qo_indptr=torch.zeros(batch + 1, **i32),
            kv_indptr=torch.zeros(batch + 1, **i32),
            kv_indices=torch.zeros(max_pages, **i32),
            kv_len_arr=torch.zeros(batch, **i32),
        )
        return _GraphState(batch, tokens, wrapper, torch.zeros(tokens, dtype=torch.int64, device=self.device))

    def prepare_graph(self, state: object, inputs: AttnInputs) -> None:
        """Plans a bucket for one replay: real rows from ``inputs``, the rest padded onto the dummy page."""
        assert isinstance(state, _GraphState)
        padded = pad_for_graph(inputs, state.batch, state.tokens, self.pool.layout.page_size)
        meta = _StepMeta.of(padded, self.pool.layout.page_size)
        self._plan_decode(state.wrapper, meta, causal=state.tokens > state.batch)
        state.out_slots.copy_(torch.from_numpy(meta.out_slots), non_blocking=True)
        self.inputs = padded
        self.active = state

    # ---- per layer ----

    def store(self, layer: int, latent: torch.Tensor) -> None:
        _, slots = self.store_target(layer)
        self.pool.write_slots(layer, slots, latent.to(self.dtype))

    def store_target(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pool.layer(layer), self.active.out_slots if self.active is not None else self.out_slots

    def context_latent(self, layer: int, latent: torch.Tensor) -> torch.Tensor:
        assert self.inputs is not None, "prepare() comes first"
        if not self.inputs.has_prefix:
            return latent
        return self.pool.read_slots(layer, self.ctx_slots)

    def extend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.prefill.run(q.contiguous(), k.contiguous(), v.contiguous())

    def decode(self, layer: int, q_latent: torch.Tensor, q_rope: torch.Tensor) -> torch.Tensor:
        cache = self.pool.layer(layer)  # [pages, page_size, D]
        wrapper = self.active.wrapper if self.active is not None else self.decode_wrapper
        return wrapper.run(
            query=(q_latent.contiguous(), q_rope.contiguous()),
            kv_cache=(cache[..., : self.kv_lora_rank], cache[..., self.kv_lora_rank :]),
        )
