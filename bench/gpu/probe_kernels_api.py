"""Device probe (issue 17's fusions): which fused kernels this host's FlashInfer and torch offer, with their
signatures, and whether FlashInfer's cos/sin-cache rope rotates strided views in place and in which layout
(against pd's torch rotary). Prints; asserts nothing."""

import inspect

import flashinfer
import flashinfer.norm
import flashinfer.rope
import torch

print("flashinfer", flashinfer.__version__, "torch", torch.__version__)
for mod in (flashinfer.rope, flashinfer.norm):
    for name in sorted(dir(mod)):
        obj = getattr(mod, name)
        if callable(obj) and not name.startswith("_"):
            try:
                print(f"{mod.__name__}.{name}{inspect.signature(obj)}")
            except (TypeError, ValueError):
                print(f"{mod.__name__}.{name} (no signature)")
a = torch.randn(8, 64, device="cuda", dtype=torch.bfloat16)
b = torch.randn(64, 32, device="cuda", dtype=torch.bfloat16)
try:
    c = torch.mm(a, b, out_dtype=torch.float32)
    ref = a.float() @ b.float()
    print("torch.mm out_dtype=float32: yes", c.dtype, "max err vs fp32", (c - ref).abs().max().item())
except Exception as e:
    print("torch.mm out_dtype: no", type(e).__name__, e)

from pd.config import RopeConfig  # noqa: E402
from pd.model.layers import RotaryEmbedding  # noqa: E402

t, heads, nope, rope = 5, 16, 128, 64
rot = RotaryEmbedding(RopeConfig(theta=10000.0, interleave=True), rope, 4096).cuda()
q = torch.randn(t, heads, nope + rope, device="cuda", dtype=torch.bfloat16)
kv = torch.randn(t, 512 + rope, device="cuda", dtype=torch.bfloat16)
pos = torch.tensor([0, 3, 100, 1000, 4000], device="cuda")
ref_q, ref_k = rot.rotate_pair(pos, q[..., nope:], kv[:, 512:])


def deinterleave(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x[..., 0::2], x[..., 1::2]], dim=-1)


try:
    q2, kv2 = q.clone(), kv.clone()
    flashinfer.rope.apply_rope_with_cos_sin_cache_inplace(
        pos, q2[..., nope:], kv2[:, None, 512:], rope, rot.cos_sin, is_neox=False
    )
    print("cos_sin_cache inplace on strided views: ran")
    for name, got, ref in (("q", q2[..., nope:], ref_q), ("k", kv2[:, 512:], ref_k)):
        print(
            f"  {name}: deinterleaved-vs-pd max err {(deinterleave(got).float() - ref.float()).abs().max().item():.4f};"
            f" as-is {(got.float() - ref.float()).abs().max().item():.4f}"
        )
    print(
        "  q nope untouched:",
        torch.equal(q2[..., :nope], q[..., :nope]),
        "c_kv untouched:",
        torch.equal(kv2[:, :512], kv[:, :512]),
    )
except Exception as e:
    print("cos_sin_cache inplace:", type(e).__name__, e)
try:
    q3, kv3 = q.clone(), kv.clone()
    flashinfer.rope.apply_rope_with_cos_sin_cache_inplace(
        pos, q3[..., nope:].reshape(t, -1), kv3[:, 512:], rope, rot.cos_sin, is_neox=False
    )
    print(
        "cos_sin_cache inplace 2-D reshaped: ran (reshape of a strided view copies: q unchanged =",
        torch.equal(q3, q),
        ")",
    )
except Exception as e:
    print("cos_sin_cache inplace 2-D:", type(e).__name__, e)
x = torch.randn(t, 576, device="cuda", dtype=torch.bfloat16)
w = torch.rand(512, device="cuda", dtype=torch.bfloat16)
try:
    out = torch.empty_like(x)
    flashinfer.norm.rmsnorm(x[:, :512], w, 1e-6, out=out[:, :512])
    ref = (
        x[:, :512].float() * torch.rsqrt(x[:, :512].float().pow(2).mean(-1, keepdim=True) + 1e-6) * w.float()
    )
    print("rmsnorm strided in/out: max err", (out[:, :512].float() - ref).abs().max().item())
except Exception as e:
    print("rmsnorm strided:", type(e).__name__, e)
