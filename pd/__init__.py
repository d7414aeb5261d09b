"""pd: prefill/decode disaggregated serving for DeepSeek-V3-architecture MoE models."""

__version__ = "0.1.0"
