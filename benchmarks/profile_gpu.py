"""Where the time goes: per-part timings and the top CUDA kernels of a Qwen3-Next-80B-A3B layer group (3 Gated
DeltaNet + 1 attention layer, real shapes, random bf16 weights) for a 4K prefill and a batch-1 decode step.

    python benchmarks/profile_gpu.py
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from qwen3next.bench import _pages_for, cuda_time, random_gpu_model  # noqa: E402
from qwen3next.config import preset  # noqa: E402
from qwen3next.model.cache import BatchMeta, HybridCache  # noqa: E402


@torch.inference_mode()
def parts(model, T, B=1, ctx=0, ps=64):
    """Time each sub-module of layer 0 (GDN), layer 3 (attention) and one MoE, on the path the engine uses."""
    H = model.config.hidden_size
    per_seq = _pages_for(ctx + T, ps)
    cache = HybridCache(model.config, B, B * per_seq, ps, torch.bfloat16, "cuda", include_mtp=False)
    meta = BatchMeta.build([T] * B, [ctx] * B, list(range(B)), [list(range(i * per_seq, (i + 1) * per_seq))
                                                                for i in range(B)], ps, "cuda")
    x = torch.randn(1, B * T, H, device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(0, model.config.vocab_size, (B * T,), device="cuda")
    keep = torch.arange(B, device="cuda") * T + T - 1
    pos = meta.positions[None]
    cos, sin = model.rotary(pos, x.dtype)
    L = model.model.layers
    out = {
        "gdn mixer": cuda_time(lambda: L[0].linear_attn(x, cache[0], meta)),
        "attention mixer": cuda_time(lambda: L[3].self_attn(x, cos, sin, cache[3], meta)),
        "moe (router+experts+shared)": cuda_time(lambda: L[0].mlp(x)),
        "rmsnorm": cuda_time(lambda: L[0].input_layernorm(x)),
        "whole 4 layers (model fwd)": cuda_time(lambda: model(ids, cache=cache, meta=meta, logits_to_keep=keep)),
    }
    return out


@torch.inference_mode()
def top_kernels(model, T, B=1, ctx=0, ps=64, n=32):
    per_seq = _pages_for(ctx + T, ps)
    cache = HybridCache(model.config, B, B * per_seq, ps, torch.bfloat16, "cuda", include_mtp=False)
    meta = BatchMeta.build([T] * B, [ctx] * B, list(range(B)), [list(range(i * per_seq, (i + 1) * per_seq))
                                                                for i in range(B)], ps, "cuda")
    # random tokens: identical ones would route every token to the same experts
    ids = torch.randint(0, model.config.vocab_size, (B * T,), device="cuda")
    keep = torch.arange(B, device="cuda") * T + T - 1          # logits of each sequence's last token, as served
    for _ in range(2):
        model(ids, cache=cache, meta=meta, logits_to_keep=keep)
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        model(ids, cache=cache, meta=meta, logits_to_keep=keep)
        torch.cuda.synchronize()
    evs = [e for e in prof.key_averages() if e.device_time_total > 0]
    evs.sort(key=lambda e: -e.device_time_total)
    total = sum(e.device_time_total for e in evs)
    kernels = sum(e.count for e in evs)
    print(f"  {kernels} kernel launches, {total / 1e3:.2f} ms of kernel time")
    for e in evs[:n]:
        print(f"  {e.device_time_total / 1e3:8.3f} ms  x{e.count:<4d} {e.key[:110]}")


CASES = {"prefill": ("prefill 4K", dict(T=4096)), "b1": ("decode b1 @4K", dict(T=1, ctx=4096)),
         "b64": ("decode b64 @4K", dict(T=1, B=64, ctx=4096))}


def main():
    import argparse
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = random_gpu_model(preset("qwen3-next-80b-a3b"), 4)
    for label, kw in (CASES[c] for c in args.only.split(",")):
        print(f"== {label}")
        for k, v in parts(model, **kw).items():
            print(f"  {k:32s} {v * 1e3:8.3f} ms")
        top_kernels(model, **kw)


if __name__ == "__main__":
    main()
