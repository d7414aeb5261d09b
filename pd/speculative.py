"""Speculative decoding settings (DESIGN.md §11): which algorithm drafts, how many tokens per step.

A frozen config, part of ``EngineConfig``; the flags are ``--speculative-algorithm``,
``--num-speculative-tokens`` and ``--speculative-oracle`` (pd.launch.engine_args).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pd.config import ModelConfig

# Speculative decoding algorithms (DESIGN.md §11): "mtp" drafts with the checkpoint's MTP layer.
SPECULATIVE_ALGORITHMS = ("mtp",)
MAX_SPECULATIVE_TOKENS = 3  # drafts per step; more than one chains the one MTP layer


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding: ``algorithm`` None (off) or ``"mtp"``; ``num_tokens`` drafts per step (K, in
    ``[1, MAX_SPECULATIVE_TOKENS]`` when on, 0 when off); ``oracle`` (a benchmark mode) forces acceptance by
    drafting the target's own argmax (requests with logits processing are verified for real: their masks and
    penalties saw their real drafts). Prefill and decode instances must agree on ``algorithm`` and
    ``num_tokens`` (pd.bootstrap.compat); ``oracle`` changes only what decode accepts."""

    algorithm: str | None = None
    num_tokens: int = 0
    oracle: bool = False

    def __post_init__(self) -> None:
        if self.algorithm is None:
            if self.num_tokens or self.oracle:
                raise ValueError(
                    "num_speculative_tokens and speculative_oracle need a speculative algorithm "
                    f"(--speculative-algorithm {' | '.join(SPECULATIVE_ALGORITHMS)})"
                )
            return
        if self.algorithm not in SPECULATIVE_ALGORITHMS:
            raise ValueError(
                f"speculative_algorithm must be one of {SPECULATIVE_ALGORITHMS}, got {self.algorithm!r}"
            )
        if not 1 <= self.num_tokens <= MAX_SPECULATIVE_TOKENS:
            raise ValueError(
                f"num_speculative_tokens must be in [1, {MAX_SPECULATIVE_TOKENS}] with speculative_algorithm "
                f"{self.algorithm!r}, got {self.num_tokens}"
            )

    @property
    def enabled(self) -> bool:
        return self.algorithm is not None

    @property
    def mtp(self) -> bool:
        """Whether the model needs its MTP layer (and the KV pool one more layer for it)."""
        return self.algorithm == "mtp"

    def kv_layers(self, model: ModelConfig) -> int:
        """Layers of the KV pool: the model's, plus one for the MTP layer's own MLA cache (layer index
        ``num_hidden_layers``), which prefill ships with the rest."""
        return model.num_hidden_layers + (1 if self.mtp else 0)

    def step_tokens(self, sequences: int) -> int:
        """The most tokens a decode step of ``sequences`` requests passes through a layer (an EP backend's
        ``max_tokens_per_rank``): each verifies its last token and up to K drafts."""
        return sequences * (1 + self.num_tokens)

    def check_model(self, model: ModelConfig) -> None:
        """Refuses a checkpoint that cannot draft: MTP needs ``num_nextn_predict_layers >= 1``."""
        if self.mtp:
            require_mtp_layer(model)


def require_mtp_layer(model: ModelConfig) -> None:
    """Raises ValueError, naming ``num_nextn_predict_layers``, unless the checkpoint carries an MTP layer."""
    if model.num_nextn_predict_layers < 1:
        raise ValueError(
            "speculative decoding with MTP needs the checkpoint's MTP layer, but its config.json has "
            f"num_nextn_predict_layers {model.num_nextn_predict_layers}: serve a checkpoint that carries one "
            "(published DeepSeek-V3/R1 do; pd-make-tiny-model --with-mtp writes one)"
        )
