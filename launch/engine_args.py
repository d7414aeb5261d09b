"""Engine and parallelism flags (``pd-prefill``, ``pd-decode``, ``pd-colocated``, ``pd-serve``).

Defaults come from ``EngineConfig`` and ``ParallelConfig``, choices from the registries: attention
backends (``pd.attention``), EP backends (``pd.ep.BACKENDS``), expert placements (``pd.ep.placement``),
load formats and dtypes (``pd.config``).
"""

from __future__ import annotations

import argparse

from pd.attention import ATTENTION_BACKENDS
from pd.config import DTYPES, KV_LAYOUTS, LOAD_FORMATS, QUANTIZATIONS, EngineConfig, ParallelConfig
from pd.ep import BACKENDS as EP_BACKENDS
from pd.ep.placement import PLACEMENTS
from pd.launch.args import add_field_arg
from pd.speculative import MAX_SPECULATIVE_TOKENS, SPECULATIVE_ALGORITHMS, SpeculativeConfig


def add_engine_args(p: argparse.ArgumentParser, model_required: bool = True) -> list[argparse.Action]:
    """The engine's flags; returns those that set an ``EngineConfig`` field other than the model path
    (pd-serve forwards them)."""
    g = p.add_argument_group("model and engine")
    g.add_argument(
        "--model",
        required=model_required,
        help="Hugging Face model directory (config.json, safetensors, tokenizer)",
    )
    g.add_argument("--model-name", help="name served in the API (default: the model directory's name)")
    E = EngineConfig
    return [
        add_field_arg(g, "--device", E, "device", help="cpu, cuda or cuda:N"),
        add_field_arg(
            g,
            "--dtype",
            E,
            "dtype",
            choices=["auto", *DTYPES],
            help="auto: bfloat16 on CUDA, float32 on CPU",
        ),
        add_field_arg(
            g,
            "--load-format",
            E,
            "load_format",
            choices=LOAD_FORMATS,
            help="dummy: random weights of the right shapes",
        ),
        add_field_arg(
            g,
            "--quantization",
            E,
            "quantization",
            choices=QUANTIZATIONS,
            help="auto: as the checkpoint ships (block-FP8 kept FP8); fp8: block-FP8 weights (quantized on load "
            "if the checkpoint is not); none: weights in --dtype (FP8 checkpoints dequantized)",
        ),
        add_field_arg(g, "--page-size", E, "page_size", help="tokens per KV page"),
        add_field_arg(
            g,
            "--num-pages",
            E,
            "num_pages",
            type=int,
            help="KV pages (default: fill --gpu-memory-fraction on CUDA; 64K tokens on CPU)",
        ),
        add_field_arg(
            g, "--gpu-memory-fraction", E, "gpu_memory_fraction", help="share of GPU memory this rank may use"
        ),
        add_field_arg(g, "--chunk-size", E, "chunk_size", help="token budget of one prefill forward"),
        add_field_arg(g, "--max-running", E, "max_running", help="most requests in a batch"),
        add_field_arg(g, "--max-waiting", E, "max_waiting", help="bound of the waiting queue"),
        add_field_arg(
            g,
            "--max-context-len",
            E,
            "max_context_len",
            type=int,
            help="longest sequence (default: the model's max_position_embeddings)",
        ),
        add_field_arg(
            g,
            "--attention-backend",
            E,
            "attention_backend",
            choices=ATTENTION_BACKENDS,
            help="auto: triton on CUDA when FlashInfer is installed, else the torch reference; flashinfer: FlashInfer's MLA kernels for every step; triton: flashinfer with pd's split-KV Triton kernel for decode steps of few queries (plain decode, small verify steps: no attention planning on the host)",
        ),
        add_field_arg(g, "--seed", E, "seed", help="seed of dummy weights and of requests without a seed"),
        add_field_arg(
            g,
            "--cuda-graph",
            E,
            "cuda_graph",
            help="full-model CUDA graphs on CUDA: decode steps and short prompt steps (--no-cuda-graph: eager)",
        ),
        add_field_arg(
            g,
            "--kv-layout",
            E,
            "kv_layout",
            choices=KV_LAYOUTS,
            help="KV pool axis order: layer_major, or page_major (one transfer piece per page run of all layers); "
            "prefill and decode must agree",
        ),
        add_field_arg(
            g,
            "--graph-extend-tokens",
            E,
            "graph_extend_tokens",
            help="prompt steps of at most this many tokens run in CUDA graphs (piecewise on multi-rank engines; "
            "0: eager)",
        ),
        add_field_arg(
            g,
            "--piecewise-graphs",
            E,
            "piecewise_graphs",
            help="cut the CUDA graphs at every MoE layer's routed experts, run eagerly between them in the EP "
            "backend's normal mode: decode without low-latency dispatch (e.g. no GPU-initiated RDMA), and "
            "single-rank prompt steps (multi-rank prompt steps always run so)",
        ),
        add_field_arg(
            g,
            "--overlap",
            E,
            "overlap",
            help="launch each decode step before reading the one in flight, so the host's work of a step runs "
            "while the GPU computes the next (single-rank decode graphs; with MTP, each verify step is launched "
            "once the one before is read, before it is postprocessed; --no-overlap: one at a time)",
        ),
        add_field_arg(
            g,
            "--prefix-cache",
            E,
            "prefix_cache",
            help="reuse the KV pages of cached prefixes: prefill and colocated ranks skip computing them, "
            "decode ranks receiving them (--no-prefix-cache: compute and transfer every prompt in full)",
        ),
        *add_speculative_args(p),
    ]


def add_speculative_args(p: argparse.ArgumentParser) -> list[argparse.Action]:
    """--speculative-algorithm, --num-speculative-tokens, --speculative-oracle (``SpeculativeConfig``)."""
    g = p.add_argument_group("speculative decoding (prefill and decode instances must agree)")
    S = SpeculativeConfig
    return [
        add_field_arg(
            g,
            "--speculative-algorithm",
            S,
            "algorithm",
            choices=SPECULATIVE_ALGORITHMS,
            help="mtp: draft with the checkpoint's MTP layer (needs num_nextn_predict_layers >= 1); "
            "default: off",
        ),
        add_field_arg(
            g,
            "--num-speculative-tokens",
            S,
            "num_tokens",
            metavar="K",
            help=f"drafts per step, 1..{MAX_SPECULATIVE_TOKENS} (more than one chains the MTP layer); "
            "needed with --speculative-algorithm",
        ),
        add_field_arg(
            g,
            "--speculative-oracle",
            S,
            "oracle",
            help="benchmark mode: draft the target's own argmax, so every draft is accepted",
        ),
    ]


def speculative_config(args: argparse.Namespace) -> SpeculativeConfig:
    return SpeculativeConfig(
        algorithm=args.speculative_algorithm,
        num_tokens=args.num_speculative_tokens,
        oracle=args.speculative_oracle,
    )


def engine_config(args: argparse.Namespace, model: str) -> EngineConfig:
    return EngineConfig(
        model_path=model,
        device=args.device,
        dtype=args.dtype,
        load_format=args.load_format,
        quantization=args.quantization,
        page_size=args.page_size,
        num_pages=args.num_pages,
        gpu_memory_fraction=args.gpu_memory_fraction,
        chunk_size=args.chunk_size,
        max_running=args.max_running,
        max_waiting=args.max_waiting,
        max_context_len=args.max_context_len,
        attention_backend=args.attention_backend,
        seed=args.seed,
        cuda_graph=args.cuda_graph,
        graph_extend_tokens=args.graph_extend_tokens,
        piecewise_graphs=args.piecewise_graphs,
        overlap=args.overlap,
        kv_layout=args.kv_layout,
        prefix_cache=args.prefix_cache,
        speculative=speculative_config(args),
    )


def add_parallel_args(p: argparse.ArgumentParser, multinode: bool) -> argparse._ArgumentGroup:
    """--dp, --ep, --ep-backend, --expert-placement; with ``multinode`` also --nnodes, --node-rank,
    --dist-init-addr (a worker launcher's)."""
    P = ParallelConfig
    g = p.add_argument_group("parallelism (DP attention + EP MoE over the same ranks)")
    add_field_arg(g, "--dp", P, "size", help="ranks of an instance: DP attention size")
    g.add_argument("--ep", type=int, help="EP size; must equal --dp (default: --dp)")
    add_field_arg(
        g,
        "--ep-backend",
        P,
        "ep_backend",
        choices=sorted(EP_BACKENDS),
        help="EP communication (default: local for one rank; torch on CPU; on GPU deepep if installed, else "
        "mooncake for decode, torch for prefill)",
    )
    add_field_arg(
        g,
        "--expert-placement",
        P,
        "expert_placement",
        choices=PLACEMENTS,
        help="which rank holds expert e: e // E_local (linear) or e %% W (round_robin)",
    )
    if multinode:
        add_field_arg(g, "--nnodes", P, "nnodes", help="nodes the ranks span")
        add_field_arg(g, "--node-rank", P, "node_rank", help="this node's index")
        add_field_arg(
            g,
            "--dist-init-addr",
            P,
            "dist_init_addr",
            help="HOST:PORT where the ranks meet (default on one node: a free local port)",
        )
    return g
