"""Which ranks may be served together: compatibility checks and the model fingerprint."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pd.rpc import bootstrap_pb2 as pb

# Fields every two ranks registered with one bootstrap server must agree on: a KV page written by
# any prefill rank must be readable, byte for byte, by any decode rank.
MODEL_FIELDS = ("protocol_version", "model_fingerprint")
# Fields ranks that move KV between them (prefill and decode) must also agree on. Weight precision
# (--quantization: FP8 or dequantized) is deliberately absent: the KV layout does not depend on it (the
# cache holds the latent in the activation dtype either way), so an FP8 prefill instance may serve a bf16
# decode instance of the same architecture.
KV_FIELDS = (
    "page_size",
    "kv_dtype",
    "num_layers",
    "page_nbytes_per_layer",
    "latent_dim",
    "kv_order",
    "transfer_protocol",
    "kv_checksum",  # a decode rank that verifies needs a prefill rank that sends checksums, and back
)
# Speculative settings: a prefill rank ships the drafter's KV layer and a decode step's first drafts, so
# it must draft as its decode peers verify (--speculative-oracle is absent: it changes only what decode
# accepts).
SPECULATIVE_FIELDS = ("speculative_algorithm", "num_speculative_tokens")
CLUSTER_FIELDS = MODEL_FIELDS + KV_FIELDS + SPECULATIVE_FIELDS
# Fields the ranks of one instance must agree on.
INSTANCE_FIELDS = ("dp_size", "role")

# The architecture fields of a Hugging Face config.json that the fingerprint covers. Rope theta
# and rope scaling are added separately, normalised over the two spellings.
FINGERPRINT_FIELDS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "vocab_size",
    "q_lora_rank",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
    "n_routed_experts",
    "num_experts_per_tok",
    "n_group",
    "topk_group",
    "first_k_dense_replace",
    "moe_intermediate_size",
    "intermediate_size",
    "n_shared_experts",
    "tie_word_embeddings",
)


def role_name(role: Any) -> str:
    """``"prefill"`` for ``pb.ROLE_PREFILL`` (or for ``"prefill"``); unknown values as numbers."""
    if isinstance(role, int):
        role = pb.Role.Name(role) if role in pb.Role.values() else str(role)
    return str(role).lower().removeprefix("role_")


def rank_label(info: Any) -> str:
    """``"prefill p0/1"``: role, instance id and dp rank, for messages."""
    return f"{role_name(info.role)} {info.instance_id}/{info.dp_rank}"


def _show(value: Any, field: str) -> str:
    if field == "role":
        return role_name(value)
    return repr(value) if isinstance(value, str) else str(value)


def mismatches(a: Any, b: Any) -> list[str]:
    """Reasons why ranks ``a`` and ``b`` cannot be served together; empty if they can.

    ``a`` and ``b`` are RankInfo-like (a ``pb.RankInfo`` or anything with the same attributes).
    Each reason names the field and both values, e.g.
    ``"page_size: 16 (prefill p0/0) vs 64 (decode d0/0)"``. Instance fields (dp size, role) are
    compared only when both ranks belong to the same instance; KV layout fields only between ranks
    that move KV (not with a colocated rank).
    """
    colocated = pb.ROLE_COLOCATED in (a.role, b.role)  # a colocated rank moves no KV: its layout is its own
    fields = (MODEL_FIELDS if colocated else CLUSTER_FIELDS) + (
        INSTANCE_FIELDS if a.instance_id == b.instance_id else ()
    )
    la, lb = rank_label(a), rank_label(b)
    return [
        f"{f}: {_show(getattr(a, f), f)} ({la}) vs {_show(getattr(b, f), f)} ({lb})"
        for f in fields
        if getattr(a, f) != getattr(b, f)
    ]


def _canonical(value: Any) -> Any:
    """10000 and 10000.0 hash alike; nested dicts and lists are canonicalised too."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        value = float(value)
        return int(value) if value.is_integer() else value
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    raise TypeError(f"config value {value!r} of type {type(value).__name__} is not JSON-like")


def _rope(config: dict) -> tuple[Any, Any]:
    """``(theta, scaling)`` from either ``rope_scaling`` + ``rope_theta`` (published checkpoints)
    or ``rope_parameters`` (transformers 5, which folds theta in and renames ``type`` to
    ``rope_type``). Plain rope (``rope_type`` "default", nothing else) is scaling ``None``."""
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    params = dict(params)
    theta = params.pop("rope_theta", config.get("rope_theta"))
    rope_type = params.pop("rope_type", None) or params.get("type") or "default"
    params.pop("type", None)
    if rope_type == "default" and not params:
        return theta, None
    return theta, {"rope_type": rope_type, **params}


def model_fingerprint(config: dict) -> str:
    """Stable hash of the architecture of a Hugging Face ``config.json`` dict.

    sha256 (first 16 hex digits) of the canonical JSON of exactly ``FINGERPRINT_FIELDS`` plus rope
    theta and scaling: unrelated keys (dtype, token ids, auto_map, ...) do not change it, and the
    ``rope_scaling`` and ``rope_parameters`` spellings of the same rope give the same hash.
    """
    theta, scaling = _rope(config)
    fields = {name: config.get(name) for name in FINGERPRINT_FIELDS}
    fields["rope_theta"] = theta
    fields["rope_scaling"] = scaling
    text = json.dumps(_canonical(fields), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
