"""Prefill attention on the GPU: which SDPA backend torch picks for our shapes, what each costs the first time it
sees a new shape (cuDNN builds an execution plan per shape) and in steady state, for a chunk that starts its
sequence (causal) and for a later chunk over cached keys (bottom-right causal). Shapes: Qwen3-Next's attention
(16 query heads, 2 KV heads, head_dim 256), bf16, one sequence.

    python benchmarks/attention_backends.py [--out FILE.json]
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

HQ, HKV, D = 16, 2, 256
BACKENDS = {"auto": None, "cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def _inputs(n, ctx, dev):
    g = torch.Generator(device=dev).manual_seed(n * 7919 + ctx)
    q = torch.randn(1, HQ, n, D, device=dev, dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, HKV, ctx, D, device=dev, dtype=torch.bfloat16, generator=g)
    v = torch.randn(1, HKV, ctx, D, device=dev, dtype=torch.bfloat16, generator=g)
    return q, k, v


def _call(kind, q, k, v):
    n, ctx = q.shape[2], k.shape[2]
    if kind == "causal":
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    if kind == "bool_mask":     # what ops/attention._paged_prefill builds for a later chunk
        mask = torch.arange(ctx, device=q.device)[None, :] <= (ctx - n + torch.arange(n, device=q.device))[:, None]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    if kind == "lower_right":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(n, ctx), enable_gqa=True)
    raise ValueError(kind)


def _ctx(backend):
    return contextlib.nullcontext() if backend is None else sdpa_kernel([backend])


def first_call_ms(backend, kind, n, ctx, dev):
    q, k, v = _inputs(n, ctx, dev)
    torch.cuda.synchronize()
    t = time.perf_counter()
    with _ctx(backend):
        _call(kind, q, k, v)
    torch.cuda.synchronize()
    return (time.perf_counter() - t) * 1e3


def steady_ms(backend, kind, n, ctx, dev, reps=10):
    q, k, v = _inputs(n, ctx, dev)
    with _ctx(backend):
        for _ in range(2):
            _call(kind, q, k, v)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            _call(kind, q, k, v)
        end.record()
        torch.cuda.synchronize()
        # host time per call: the same loop without waiting on the device per call
        t = time.perf_counter()
        for _ in range(reps):
            _call(kind, q, k, v)
        host = (time.perf_counter() - t) / reps * 1e3
        torch.cuda.synchronize()
    return start.elapsed_time(end) / reps, host


def kernel_names(backend, kind, n, ctx, dev):
    q, k, v = _inputs(n, ctx, dev)
    with _ctx(backend), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        _call(kind, q, k, v)
        torch.cuda.synchronize()
    names = sorted({e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA},
                   key=len)
    return [nm[:90] for nm in names if "elementwise" not in nm][:3]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev = torch.device("cuda")
    rows = []
    # new lengths, one after the other: the first call of each (plan build + kernel)
    lengths = [700, 701, 777, 1000, 1013]
    cases = [("causal", [(n, n) for n in lengths]), ("bool_mask", [(n, n + 3000) for n in lengths]),
             ("lower_right", [(n, n + 3001) for n in lengths])]
    for i, (name, backend) in enumerate(BACKENDS.items()):
        for kind, shapes in cases:
            shapes = [(n + 50 * i, ctx + 50 * i) for n, ctx in shapes]     # shapes no backend has seen
            with contextlib.suppress(RuntimeError):                       # loads the backend's library
                first_call_ms(backend, kind, 96 + i, 96 + i + (kind != "causal") * 64, dev)
            firsts = []
            for n, ctx in shapes:
                try:
                    firsts.append(first_call_ms(backend, kind, n, ctx, dev))
                except RuntimeError as e:
                    firsts = f"unsupported: {str(e).splitlines()[0][:120]}"
                    break
            row = {"backend": name, "kind": kind, "first_call_ms_new_shapes": firsts}
            for n, ctx in ([(1024, 1024), (4096, 4096), (32768, 32768)] if kind == "causal"
                           else [(1024, 5120), (4096, 32768)]):
                try:
                    gpu, host = steady_ms(backend, kind, n, ctx, dev)
                    row[f"{n}x{ctx}"] = {"gpu_ms": gpu, "host_ms": host,
                                         "kernels": kernel_names(backend, kind, n, ctx, dev)}
                except RuntimeError as e:
                    row[f"{n}x{ctx}"] = f"unsupported: {str(e).splitlines()[0][:120]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = {"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "shapes": {"q_heads": HQ, "kv_heads": HKV, "head_dim": D, "dtype": "bf16"}, "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    print("\n| backend | kind | first call, new shapes (ms) | " + " | ".join(["1K", "4K", "32K"]) + " (GPU ms) |")
    for r in rows:
        f = r["first_call_ms_new_shapes"]
        f = " ".join(f"{x:.1f}" for x in f) if isinstance(f, list) else f[:40]
        cells = [f"{v['gpu_ms']:.3f}" if isinstance(v, dict) else "n/a" for k, v in r.items() if "x" in k[:6]]
        print(f"| {r['backend']} | {r['kind']} | {f} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
