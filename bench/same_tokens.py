"""Greedy tokens of two deployments for the same prompts, compared (e.g. 2P2D vs one GPU).

    python -m pd.bench.same_tokens --system-a 2p2d --system-b 1gpu [--device cuda] [--prompts 32]

Starts each deployment in turn with pd-serve (dummy weights of the DESIGN.md §8 shape on CUDA, or
``--model`` on CPU), sends the same prompts greedily, and reports how many token sequences agree.
"""

from __future__ import annotations

import argparse
import random
import subprocess
from pathlib import Path

import httpx

from pd.bench.disagg_vs_colocated import free_port, pd_serve_command, shape_model, wait_healthy

# pd-serve flags of each system: (always, on CUDA only).
_NVLINK = ["--transfer-protocol", "nvlink"]
SYSTEMS = {
    "1gpu": (["--colocated", "1"], []),
    "1p1d": ([], ["--prefill-device", "cuda:0", "--decode-device", "cuda:1", *_NVLINK]),
    "2p2d": (
        ["--dp", "2", "--ep", "2"],
        ["--prefill-device", "cuda:0", "--decode-device", "cuda:2", *_NVLINK],
    ),
    # Both 2-rank instances on GPUs 0-1 (a two-GPU host): explicit KV sizes, as two processes share each GPU.
    "2p2d-2gpu": (
        ["--dp", "2", "--ep", "2"],
        ["--prefill-device", "cuda:0", "--decode-device", "cuda:0", "--num-pages", "1024", *_NVLINK],
    ),
}


def run(
    system: str, args: argparse.Namespace, model: str, prompts: list[list[int]], log: Path
) -> list[list[int]]:
    always, cuda_only = SYSTEMS[system]
    port = free_port()
    cmd = pd_serve_command(model, port, args.device)
    cmd += [*always, *(cuda_only if args.device == "cuda" else [])]
    proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, 600)
        out = []
        for p in prompts:
            body = {"model": "bench", "prompt": p, "max_tokens": args.max_tokens, "temperature": 0,
                    "ignore_eos": True, "return_token_ids": True}  # fmt: skip
            r = httpx.post(f"{url}/v1/completions", json=body, timeout=300)
            r.raise_for_status()
            out.append(r.json()["choices"][0]["token_ids"])
        return out
    finally:
        proc.terminate()
        proc.wait(90)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--system-a", default="2p2d", choices=sorted(SYSTEMS))
    p.add_argument("--system-b", default="1gpu", choices=sorted(SYSTEMS))
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--model", help="default: the §8 shape with dummy weights")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--out-dir", default=".")
    args = p.parse_args()
    model = args.model or shape_model(8448)
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 1000) for _ in range(rng.randint(16, 512))] for _ in range(args.prompts)]
    out = Path(args.out_dir)
    a = run(args.system_a, args, model, prompts, out / f"same-tokens-{args.system_a}.log")
    b = run(args.system_b, args, model, prompts, out / f"same-tokens-{args.system_b}.log")
    same = sum(x == y for x, y in zip(a, b))
    first_diff = [next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), None) for x, y in zip(a, b)]
    print(
        f"{args.system_a} vs {args.system_b}: {same}/{len(prompts)} identical greedy sequences of {args.max_tokens} tokens"
    )
    print("first differing position per prompt (None = identical):", first_diff)


if __name__ == "__main__":
    main()
