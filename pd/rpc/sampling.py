"""Sampling parameters and logprobs on the wire: the proxy writes ``worker.Sampling``, the workers read it
back; workers write top and prompt logprobs, the proxy reads them back."""

from __future__ import annotations

from collections.abc import Sequence

from pd.grammar.spec import GrammarSpec
from pd.rpc import worker_pb2 as wpb
from pd.types import SamplingParams, TopLogprobs


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
        repetition_penalty=sp.repetition_penalty,
        frequency_penalty=sp.frequency_penalty,
        presence_penalty=sp.presence_penalty,
        logit_bias=dict(sp.logit_bias),
        min_tokens=sp.min_tokens,
        top_logprobs=sp.top_logprobs,
        prompt_logprobs=-1 if sp.prompt_logprobs is None else sp.prompt_logprobs,
        grammar=None if sp.grammar is None else grammar_to_proto(sp.grammar),
        n=sp.n,
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
        repetition_penalty=s.repetition_penalty,
        frequency_penalty=s.frequency_penalty,
        presence_penalty=s.presence_penalty,
        logit_bias=tuple(sorted(s.logit_bias.items())),
        min_tokens=s.min_tokens,
        top_logprobs=s.top_logprobs,
        prompt_logprobs=None if s.prompt_logprobs < 0 else s.prompt_logprobs,
        grammar=grammar_from_proto(s.grammar) if s.HasField("grammar") else None,
        n=s.n or 1,
    )


def grammar_to_proto(spec: GrammarSpec) -> wpb.GrammarSpec:
    if spec.kind == "choice":
        return wpb.GrammarSpec(kind=spec.kind, choices=list(spec.value), strict=spec.strict)
    return wpb.GrammarSpec(kind=spec.kind, value=str(spec.value), strict=spec.strict)


def grammar_from_proto(g: wpb.GrammarSpec) -> GrammarSpec:
    """Raises GrammarError (a ValueError) for a spec GrammarSpec refuses."""
    value = tuple(g.choices) if g.kind == "choice" else g.value
    return GrammarSpec(g.kind, value, g.strict)  # type: ignore[arg-type]  # the kind is checked


def top_to_proto(top: TopLogprobs) -> wpb.TopLogprobs:
    return wpb.TopLogprobs(token_ids=[t for t, _ in top], logprobs=[lp for _, lp in top])


def top_from_proto(msg: wpb.TopLogprobs) -> TopLogprobs:
    return tuple(zip(msg.token_ids, msg.logprobs))


def prompt_to_proto(prompt: Sequence[tuple[float, TopLogprobs]]) -> list[wpb.PromptLogprob]:
    return [wpb.PromptLogprob(logprob=lp, top=top_to_proto(top)) for lp, top in prompt]


def prompt_from_proto(msgs: Sequence[wpb.PromptLogprob]) -> list[tuple[float, TopLogprobs]]:
    return [(m.logprob, top_from_proto(m.top)) for m in msgs]
