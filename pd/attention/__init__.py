"""Attention backends behind one interface (``pd.attention.base``): ``torch`` (the reference,
``torch_ref``), ``flashinfer`` (FlashInfer's MLA kernels, CUDA) and ``triton`` (``triton_mla``: FlashInfer with
pd's split-KV Triton kernel for decode steps of few queries, CUDA). ``pd.engine.runner`` builds one by
name; ``auto`` picks triton on CUDA when FlashInfer is installed and supports the model, else torch.

This module imports nothing, so a launcher can offer the names without importing torch.
"""

ATTENTION_BACKENDS = ("auto", "torch", "flashinfer", "triton")
