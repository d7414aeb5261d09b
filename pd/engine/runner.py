"""The model runner: turns a scheduled ``Batch`` into tensors, runs the forward and samples."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

from pd.attention import ATTENTION_BACKENDS
from pd.attention.base import AttentionBackend, AttnInputs
from pd.attention.flashinfer_mla import FlashInferMLABackend, flashinfer_unusable
from pd.attention.torch_ref import TorchMLABackend
from pd.attention.triton_mla import TritonMLABackend
from pd.config import DEFAULT_CPU_KV_TOKENS, EngineConfig, FP8Quant, ModelConfig
from pd.engine.decode_graph import DecodeGraphs, Launched, default_buckets
from pd.engine.extend_graph import ExtendGraphs, default_extend_buckets
from pd.engine.logits import LogitsProcessor
from pd.engine.memory import GB, WeightBytes, check_fits, gpu_share, pages_in_share
from pd.engine.verify_graph import VerifyGraphs
from pd.ep import EPBackend, EPConfig, make_ep_backend
from pd.ep.placement import ExpertPlacement, PlacementMap
from pd.kv_cache import KVLayout, KVOrder, KVPool
from pd.model.context import ForwardContext
from pd.model.deepseek_v3 import DeepseekV3ForCausalLM
from pd.model.moe import MoE
from pd.model.mtp import DeepseekV3WithMTP
from pd.model.quant import prepare_weights
from pd.model.weights import init_dummy_weights, load_weights
from pd.sampling import SamplingTensors, choice_seed, pair_top_logprobs, sample
from pd.types import Batch, BatchMode, Req, Sampled, StepResult, TopLogprobs


def build_model(
    cfg: ModelConfig,
    ep: EPBackend,
    max_positions: int,
    device: torch.device,
    dtype: torch.dtype,
    placement: PlacementMap | None = None,
    quant: FP8Quant | None = None,
    mtp: bool = False,
) -> DeepseekV3ForCausalLM:
    """Creates the model's parameters directly on ``device`` in ``dtype`` (FP8 with ``quant``; uninitialised).
    ``mtp``: with the checkpoint's MTP layer (``pd.model.mtp.DeepseekV3WithMTP``)."""
    return materialize(meta_model(cfg, ep, max_positions, dtype, placement, quant, mtp), device)


def meta_model(
    cfg: ModelConfig,
    ep: EPBackend,
    max_positions: int,
    dtype: torch.dtype,
    placement: PlacementMap | None = None,
    quant: FP8Quant | None = None,
    mtp: bool = False,
) -> DeepseekV3ForCausalLM:
    """The model on the meta device: shapes and dtypes, no memory (its size can be planned first)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    cls = DeepseekV3WithMTP if mtp else DeepseekV3ForCausalLM
    try:
        with torch.device("meta"):
            return cls(cfg, ep, max_positions, placement, quant)
    finally:
        torch.set_default_dtype(default)


def materialize(model: DeepseekV3ForCausalLM, device: torch.device) -> DeepseekV3ForCausalLM:
    """Allocates a meta model's tensors on ``device`` (uninitialised; the tables and counters set)."""
    cfg = model.cfg
    model.to_empty(device=device)
    model.model.rotary.build_tables()
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    for moe in model.modules():  # the main layers' and the MTP layer's
        if isinstance(moe, MoE):
            # The routing bias stays float32 whatever the model dtype; the counters start at zero.
            moe.gate.e_score_correction_bias.data = moe.gate.e_score_correction_bias.data.float()
            moe.expert_tokens.zero_()
    return model


def make_attention_backend(name: str, pool: KVPool, cfg: ModelConfig) -> AttentionBackend:
    if name == "auto":
        why = flashinfer_unusable(cfg.kv_lora_rank, cfg.qk_rope_head_dim) if pool.buffer.is_cuda else "CPU"
        if why is not None and pool.buffer.is_cuda:
            log.warning(
                "attention: FlashInfer is not usable (%s); the torch reference backend runs, without CUDA "
                "graphs: decode is several times slower",
                why,
            )
        # "triton" runs small decode and verify steps on pd's split kernel, which plans nothing on the host, and
        # the rest on FlashInfer, whose plan (~1.3 ms on an H200 at batch 1) serial and pipelined speculative
        # steps pay: as fast at plain decode, faster with MTP (bench/results/spec_step_h200.md, session 12).
        name = "triton" if why is None else "torch"
    if name == "torch":
        return TorchMLABackend(pool, cfg.softmax_scale, cfg.kv_lora_rank)
    if name in ("flashinfer", "triton"):
        if not pool.buffer.is_cuda:
            raise ValueError(f"the {name} attention backend needs a CUDA device")
        backend = FlashInferMLABackend if name == "flashinfer" else TritonMLABackend
        return backend(
            pool,
            cfg.softmax_scale,
            cfg.kv_lora_rank,
            cfg.num_attention_heads,
            cfg.qk_head_dim,
            cfg.v_head_dim,
        )
    raise ValueError(f"unknown attention backend {name!r}; expected one of {ATTENTION_BACKENDS}")


def resolve_device(name: str) -> torch.device:
    """``torch.device`` for ``name``, with ``"cuda"`` pinned to the current CUDA device's index
    (``torch.cuda.set_device`` refuses a CUDA device without one)."""
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def top_logprobs(full: torch.Tensor, rows: list[Req]) -> list[TopLogprobs]:
    """Each row's ``top_logprobs`` alternatives (token id, logprob), best first, from ``full [len(rows), V]``
    (log-probabilities); ``()`` for rows that ask for none."""
    k = max((r.sampling.top_logprobs for r in rows), default=0)
    if not k:
        return [()] * len(rows)
    values, ids = full.topk(k, dim=-1)
    return pair_top_logprobs(values.tolist(), ids.tolist(), rows)


log = logging.getLogger(__name__)

PROMPT_LOGPROBS_BLOCK = 1024  # prompt positions scored per lm_head call (echo)


class ModelRunner:
    """Owns the model, its KV pool and attention backend on one rank.

    ``ep``: the EP backend (default: ``local``, EP = 1). ``low_latency_moe``: MoE layers use the
    low-latency masked-layout path (decode instances with EP > 1); requires steps of at most the
    backend's ``max_tokens_per_rank`` tokens. ``expert_placement``: which rank holds which expert
    (``pd.ep.placement``: linear or round_robin).
    """

    def __init__(
        self,
        cfg: EngineConfig,
        model_cfg: ModelConfig,
        ep: EPBackend | None = None,
        low_latency_moe: bool = False,
        expert_placement: str = "linear",
    ) -> None:
        self.cfg = cfg
        self.model_cfg = model_cfg
        self.device = resolve_device(cfg.device)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.bind_thread()
        self.dtype = cfg.torch_dtype
        self.ep = ep or make_ep_backend(
            "local",
            EPConfig(
                model_cfg.n_routed_experts,
                model_cfg.hidden_size,
                cfg.speculative.step_tokens(cfg.max_running),
                self.dtype,
                device=self.device,
            ),
        )
        placement = ExpertPlacement(expert_placement, model_cfg.n_routed_experts, self.ep.config.world_size)
        self.placement = placement
        placement_map = None if placement.kind == "linear" else PlacementMap(placement, self.device)
        self.quant = cfg.weight_quant(model_cfg)
        cfg.speculative.check_model(model_cfg)
        model = meta_model(
            model_cfg,
            self.ep,
            cfg.context_len(model_cfg),
            self.dtype,
            placement_map,
            self.quant,
            cfg.speculative.mtp,
        )
        self.weights = WeightBytes.of(model)
        if self.device.type == "cuda":  # refused before a byte is allocated if it cannot fit
            check_fits(
                self.weights,
                *gpu_share(self.device, cfg.gpu_memory_fraction),
                cfg.gpu_memory_fraction,
                self.device,
            )
        self.model = materialize(model, self.device)
        if cfg.load_format == "dummy":
            init_dummy_weights(self.model, cfg.seed)
        else:
            load_weights(self.model, cfg.model_path, self.ep.config.rank, self.ep.config.world_size)
        prepare_weights(self.model)
        slow = [n for n, m in self.model.named_modules() if isinstance(m, MoE) and not m.experts.w8a8]
        if self.ep.config.ll_fp8 and slow:
            raise ValueError(
                f"FP8 low-latency dispatch needs the routed experts on the W8A8 kernels; {slow[0]} is not"
            )
        self.low_latency_moe = low_latency_moe
        self.lockstep = self.ep.config.world_size > 1
        self.context_len = cfg.context_len(model_cfg)
        self.pool = KVPool(self._kv_layout(), self.device)
        log.info("%s", self.memory_report())
        self.attn = make_attention_backend(cfg.attention_backend, self.pool, model_cfg)
        # Speculative decoding (pd.engine.speculative): extend steps keep every row's final hidden state
        # (``last_hidden [T, hidden]``, batch order, until the speculator takes it) for the MTP layer.
        self.keep_hidden = False
        self.last_hidden: torch.Tensor | None = None
        self.graphs: DecodeGraphs | None = None
        self.verify_graphs: VerifyGraphs | None = None  # speculative decoding's (its decode steps verify)
        self.extend_graphs: ExtendGraphs | None = None
        if cfg.cuda_graph and self.device.type == "cuda" and self.attn.supports_graphs:
            self._capture_graphs(cfg, low_latency_moe)

    def _capture_graphs(self, cfg: EngineConfig, low_latency_moe: bool) -> None:
        """The CUDA graphs this rank replays: short prompt steps without MTP (whose prompt steps keep every row's
        hidden state for the draft layer), piecewise on multi-rank engines (normal-mode dispatch synchronises
        with the host), and, if it decodes, decode steps (MTP's verify steps on a single rank; multi-rank
        speculation runs eager), piecewise unless the MoE layers dispatch in low-latency mode."""
        piecewise = cfg.piecewise_graphs or self.lockstep
        extend_buckets = default_extend_buckets(min(cfg.graph_extend_tokens, cfg.chunk_size))
        if extend_buckets and not cfg.speculative.enabled:
            self.extend_graphs = ExtendGraphs(
                self.model, self.attn, self.pool, extend_buckets, self.context_len, piecewise=piecewise
            )
        if not cfg.decodes:
            return
        buckets = default_buckets(cfg.max_running)
        if not cfg.speculative.enabled:
            self.graphs = DecodeGraphs(
                self.model,
                self.attn,
                self.pool,
                buckets,
                self.context_len,
                low_latency_moe,
                piecewise=piecewise and not low_latency_moe,
            )
        elif self.lockstep:
            log.info("speculative decoding on %d ranks: decode runs eager", self.ep.config.world_size)
        else:
            assert isinstance(self.model, DeepseekV3WithMTP)
            k, oracle = cfg.speculative.num_tokens, cfg.speculative.oracle
            self.verify_graphs = VerifyGraphs(
                self.model, self.attn, self.pool, buckets, self.context_len, k, oracle
            )

    def bind_thread(self) -> None:
        """Makes the model's device and compute stream current on the calling thread (both are per thread).

        Kernels (Triton, FlashInfer) launch on the current device. The model runs on a stream of its own, never
        on the legacy default stream: a synchronous ``cudaMemcpy`` that a library issues there waits for every
        kernel queued on the process's blocking streams, and Mooncake's TCP transport stages GPU memory through
        the host that way, 64 KiB at a time, so each 64 KiB of KV waited behind a whole forward."""
        if self.stream is not None:
            torch.cuda.set_device(self.device)
            torch.cuda.set_stream(self.stream)

    def _kv_layout(self) -> KVLayout:
        mc = self.model_cfg
        layers = self.cfg.speculative.kv_layers(mc)  # with MTP, its layer's cache too
        layout = KVLayout(layers, 2, self.cfg.page_size, mc.latent_dim, self.dtype)
        num_pages = self.cfg.num_pages
        if num_pages is None:
            if self.device.type == "cuda":
                num_pages = pages_in_share(
                    self.device, self.cfg.gpu_memory_fraction, layout.page_nbytes_per_layer * layers
                )
            else:
                num_pages = DEFAULT_CPU_KV_TOKENS // self.cfg.page_size + 1
        order = KVOrder(self.cfg.kv_layout)
        return KVLayout(layers, num_pages, self.cfg.page_size, mc.latent_dim, self.dtype, order)

    def memory_report(self) -> str:
        """Where this rank's memory went: weights by kind, the KV pool, and (on CUDA) what the device has left."""
        layout = self.pool.layout
        line = (
            f"rank memory on {self.device}: {self.weights.describe()}; KV pool {layout.usable_pages} pages = "
            f"{layout.usable_pages * layout.page_size} tokens ({layout.nbytes / GB:.2f} GB)"
        )
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            line += (
                f"; {free / GB:.2f} GB of the device's {total / GB:.2f} GB free for activations, graphs "
                f"and other processes (share {self.cfg.gpu_memory_fraction})"
            )
        return line

    @torch.inference_mode()
    def run(
        self,
        batch: Batch,
        logits: LogitsProcessor | None = None,
        kv_stored: Callable[[int], None] | None = None,
    ) -> StepResult:
        """Runs one step. ``logits``: the engine's per-request logits state (penalties, bias, min_tokens,
        grammar matchers); None: no request of the batch asks for processing. A decode step on the graphs without
        a grammar is launched and waited for (``launch``: processing, sampling and top logprobs on the device);
        with a grammar the graph's logits are masked and sampled here. Requests that ask for processing never
        take the graph's greedy tokens.
        ``kv_stored(layer)``: called as each layer's KV store is issued (``ForwardContext.kv_stored``; eager
        extend steps only: a step in an extend graph calls it for no layer, the caller marks them after it)."""
        sampled = [r for r, s in zip(batch.reqs, batch.samples) if s]
        if self.launches(batch.mode, batch.reqs):
            return self.launch(batch, logits=logits).result()
        self.copy_on_write(batch)
        if batch.mode is BatchMode.DECODE and self.graphs is not None and self.graphs.bucket(len(batch.reqs)):
            out, _, _, full = self.graphs.run(batch)
            return self._sample(out, batch, sampled, logits, full)
        bucket = self._extend_bucket(batch)
        if bucket is not None:
            assert self.extend_graphs is not None
            out = self.extend_graphs.run(batch, bucket)
            picked = self.ints([i for i, s in enumerate(batch.samples) if s])
            return self._sample(out[picked], batch, sampled, logits)
        ids: list[int] = []
        positions: list[int] = []
        rows: list[int] = []  # rows of the step's tokens that sample
        scored: list[int] = []  # rows whose next token is a prompt token to score (prompt logprobs)
        targets: list[int] = []
        for req, start, end in zip(batch.reqs, batch.starts, batch.ends):
            base = len(ids) - start
            ids += req.ids(start, end)
            positions += range(start, end)
            if end == req.seq_len:
                rows.append(base + end - 1)
            if req.sampling.prompt_logprobs is not None:
                last = min(end, len(req.prompt_ids) - 1)
                scored += range(base + start, base + last)
                targets += req.prompt_ids[start + 1 : last + 1]
        self.attn.prepare(AttnInputs(batch.mode, batch.starts, batch.ends, [r.pages for r in batch.reqs]))
        ctx = ForwardContext(
            batch.mode, self.attn, self.ints(rows), self.low_latency_moe, kv_stored=kv_stored
        )
        every = list(range(len(ids))) if self.keep_hidden else []
        hidden = self.model.hidden(
            self.ints(ids), self.ints(positions), ctx, self.ints(rows + scored + every)
        )
        if every:
            self.last_hidden = hidden[len(rows) + len(scored) :]
            hidden = hidden[: len(rows) + len(scored)]
        result = self._sample(self.model.logits(hidden[: len(rows)]), batch, sampled, logits)
        if scored:
            self._score_prompt(batch, hidden[len(rows) :], targets, result)
        return result

    def launches(self, mode: BatchMode, reqs: Sequence[Req]) -> bool:
        """Whether a batch of ``reqs`` in ``mode`` runs as a launched decode step (``launch``): a decode step on
        the graphs without a request whose grammar needs the host to have seen its last token."""
        return (
            mode is BatchMode.DECODE
            and self.graphs is not None
            and self.graphs.bucket(len(reqs)) is not None
            and not any(r.sampling.grammar is not None for r in reqs)
        )

    @torch.inference_mode()
    def launch(
        self, batch: Batch, prev: Launched | None = None, logits: LogitsProcessor | None = None
    ) -> Launched:
        """Queues a decode step without waiting for it (``DecodeGraphs.launch``; ``launches`` must hold), after
        its copies on write. ``logits``: the engine's processor (requests with penalties, bias, min_tokens)."""
        assert self.graphs is not None
        self.copy_on_write(batch)
        return self.graphs.launch(batch, prev, logits)

    def copy_on_write(self, batch: Batch) -> None:
        """The step's page copies (``Batch.copies``), queued before any write of the step."""
        for src, dst in batch.copies:
            self.pool.copy_page(src, dst)

    def _extend_bucket(self, batch: Batch) -> int | None:
        """The extend graph's token bucket that runs ``batch``, or None: eager (not an extend step, too many
        tokens or requests, prompt logprobs asked, or every row's hidden state kept)."""
        if batch.mode is not BatchMode.EXTEND or self.extend_graphs is None or self.keep_hidden:
            return None
        if any(r.sampling.prompt_logprobs is not None for r in batch.reqs):
            return None
        return self.extend_graphs.bucket(batch)

    def _sample(
        self,
        out: torch.Tensor,
        batch: Batch,
        sampled: list[Req],
        logits: LogitsProcessor | None,
        full: torch.Tensor | None = None,
    ) -> StepResult:
        """Samples ``out [len(sampled), V]`` float32 (processed in place first). ``full``: ``out``'s
        log_softmax where the caller has it (the decode graph's), used unless processing changes ``out``.

        A request of ``n > 1`` choices sampling its first token forks: its row is drawn from n times,
        choice i keyed by ``choice_seed(seed, i)``; the draws of choices 1.. come back in ``forks``."""
        if logits is None and any(r.sampling.grammar is not None for r in sampled):
            raise ValueError("a request with a grammar needs the engine's LogitsProcessor (its token masks)")
        step = logits.prepare(sampled) if logits is not None else None
        if logits is not None and step is not None:
            logits.apply(out, step)
            full = None  # of the unprocessed logits
        forks = [(row, i) for row, r in enumerate(sampled) for i in range(1, r.width)]
        rows = sampled + [sampled[row] for row, _ in forks]  # one per draw: the requests' own, then forks
        if forks:
            order = list(range(len(sampled))) + [row for row, _ in forks]
            out = out[order]
            full = full[order] if full is not None else None
        st = SamplingTensors.build(
            [r.sampling for r in rows],
            [r.seed for r in sampled] + [choice_seed(sampled[row].seed, i) for row, i in forks],
            [r.seq_len for r in rows],
            self.device,
        )
        if full is None and any(r.sampling.top_logprobs for r in sampled):
            full = out.log_softmax(-1)  # shared with sample
        tokens, lps = sample(out, st, full)
        if logits is not None:
            logits.record(step, tokens)  # the requests' own draws (the first rows)
        top_rows = top_logprobs(full, rows) if full is not None else [()] * len(rows)
        draws = [Sampled(t, lp, top) for t, lp, top in zip(tokens.tolist(), lps.tolist(), top_rows)]
        forked: list[list[Sampled]] = [[] for _ in sampled]
        for (row, _), draw in zip(forks, draws[len(sampled) :]):
            forked[row].append(draw)
        it = iter(zip(draws, forked))
        picked = [next(it) if s else (None, []) for s in batch.samples]
        return StepResult(
            [d.token if d else None for d, _ in picked],
            [d.logprob if d else None for d, _ in picked],
            [d.top if d else () for d, _ in picked],
            [[] for _ in batch.reqs],
            [f for _, f in picked],
        )

    def _score_prompt(
        self, batch: Batch, hidden: torch.Tensor, targets: list[int], result: StepResult
    ) -> None:
        """Fills ``result.prompt``: the logprob (and alternatives) of each prompt token that ``hidden``
        ``[len(targets), hidden]`` predicts, in blocks of ``PROMPT_LOGPROBS_BLOCK`` rows (logits of a whole
        chunk at once would take chunk x vocab x 4 bytes)."""
        k = max((r.sampling.prompt_logprobs or 0 for r in batch.reqs), default=0)
        target = self.ints(targets)
        chosen: list[float] = []
        top_v: list[list[float]] = []
        top_i: list[list[int]] = []
        for i in range(0, len(targets), PROMPT_LOGPROBS_BLOCK):
            lp = self.model.logits(hidden[i : i + PROMPT_LOGPROBS_BLOCK]).log_softmax(-1)
            chosen += lp.gather(1, target[i : i + PROMPT_LOGPROBS_BLOCK, None])[:, 0].tolist()
            if k:
                v, t = lp.topk(k, dim=-1)
                top_v += v.tolist()
                top_i += t.tolist()
        n = 0
        for j, (req, start, end) in enumerate(zip(batch.reqs, batch.starts, batch.ends)):
            kr = req.sampling.prompt_logprobs
            if kr is None:
                continue
            count = max(0, min(end, len(req.prompt_ids) - 1) - start)
            result.prompt[j] = [
                (chosen[n + m], tuple(zip(top_i[n + m][:kr], top_v[n + m][:kr])) if kr else ())
                for m in range(count)
            ]
            n += count

    @torch.inference_mode()
    def run_idle(self) -> None:
        """This rank has nothing to run in a step other ranks run: join their EP collectives."""
        if not self.lockstep:
            return
        if self.graphs is not None and self.low_latency_moe:
            self.graphs.run_idle()
        else:
            self.model.idle(self.low_latency_moe)

    def close(self) -> None:
        """Releases the CUDA graphs (before any process group is destroyed)."""
        if self.graphs is not None:
            self.graphs.close()
            self.graphs = None
        if self.verify_graphs is not None:
            self.verify_graphs.close()
            self.verify_graphs = None
        if self.extend_graphs is not None:
            self.extend_graphs.close()
            self.extend_graphs = None

    def ints(self, values: Sequence[int]) -> torch.Tensor:
        """``values`` as int64 on the device, copied without waiting for the steps queued there (the copy
        reads the host list before it returns)."""
        return torch.tensor(values, dtype=torch.int64).to(self.device, non_blocking=True)
