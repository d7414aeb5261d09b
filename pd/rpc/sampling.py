"""Sampling parameters on the wire: the proxy writes ``worker.Sampling``, the workers read it back."""

from __future__ import annotations

from pd.rpc import worker_pb2 as wpb
from pd.types import SamplingParams


def sampling_to_proto(sp: SamplingParams) -> wpb.Sampling:
    """``sp`` as the message; ``seed`` must be set (the proxy draws one when the client gave none)."""
    return wpb.Sampling(
        temperature=sp.temperature,
        top_p=sp.top_p,
        top_k=sp.top_k,
        min_p=sp.min_p,
        seed=sp.seed,
        max_tokens=sp.max_tokens,
        stop=list(sp.stop),
        stop_token_ids=list(sp.stop_token_ids),
        ignore_eos=sp.ignore_eos,
    )


def sampling_from_proto(s: wpb.Sampling) -> SamplingParams:
    """Raises ValueError (naming the field) for values SamplingParams refuses."""
    return SamplingParams(
        temperature=s.temperature,
        top_p=s.top_p,
        top_k=s.top_k,
        min_p=s.min_p,
        seed=s.seed,
        max_tokens=s.max_tokens,
        stop=tuple(s.stop),
        stop_token_ids=tuple(s.stop_token_ids),
        ignore_eos=s.ignore_eos,
    )
