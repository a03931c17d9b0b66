"""Is prefill host-bound? For a Qwen3-Next-80B-A3B layer group (3 Gated DeltaNet + 1 attention layer, real
shapes, random bf16 weights) at one sequence of `--tokens`: the host's enqueue time next to the GPU's wall time,
for the whole forward and for each part; every host-device sync (with the line that causes it); the ops that cost
the host the most; and fla's kernels with and without the packed-sequence boundaries (one sequence needs none).

    python benchmarks/host_overhead.py [--tokens 4096] [--quick | --only-python | --bench-prefill]

--bench-prefill times the bench's own prefill (qwen3next.bench.time_prefill, 8 layers, both elementwise paths)
twice: with a checkout of older code beside it, the same-machine A/B of the README's change table.
"""
from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import time
import traceback
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from qwen3next.bench import _pages_for, random_gpu_model  # noqa: E402
from qwen3next.config import preset  # noqa: E402
from qwen3next.model.cache import BatchMeta, HybridCache  # noqa: E402
from qwen3next.ops import cuda as gpu_ops  # noqa: E402


def host_and_wall(fn, iters: int = 7) -> tuple[float, float]:
    """Median (host seconds to enqueue fn, GPU seconds from its first to its last kernel), starting each call on
    an idle GPU. host ~ wall with little kernel time means the host (or a sync) sets the pace."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    host, wall = [], []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        t = time.perf_counter()
        fn()
        host.append(time.perf_counter() - t)
        b.record()
        b.synchronize()
        wall.append(a.elapsed_time(b) / 1e3)
    return statistics.median(host), statistics.median(wall)


def syncs(fn) -> collections.Counter:
    """The lines of our code (or fla's) that synchronise the host with the GPU during one call of fn."""
    seen: collections.Counter = collections.Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        stack = [f for f in traceback.extract_stack()[:-1] if "warnings" not in f.filename]
        ours = [f for f in stack if "qwen3next" in f.filename or "/fla/" in f.filename]
        frames = (ours or stack)[-3:]
        seen[" <- ".join(f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in reversed(frames))] += 1

    with warnings.catch_warnings():          # restores showwarning and the filters on the way out
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return seen


def top_host_ops(fn, n: int = 25) -> None:
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    evs = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in evs)
    print(f"  host (self) time in ops: {total / 1e3:.2f} ms")
    for e in evs[:n]:
        print(f"  {e.self_cpu_time_total / 1e3:8.3f} ms  x{e.count:<5d} {e.key[:100]}")


def python_profile(fn, n: int = 40) -> None:
    """cProfile of a few calls: which Python functions (ours, fla's, Triton's launcher) the host time goes to."""
    import cProfile
    import io
    import pstats
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(5):
        fn()
    pr.disable()
    torch.cuda.synchronize()
    out = io.StringIO()
    pstats.Stats(pr, stream=out).sort_stats("tottime").print_stats(n)
    print("\n".join(line for line in out.getvalue().splitlines() if line.strip())[:12000])


def row(label: str, hw: tuple[float, float]) -> None:
    print(f"  {label:44s} host {hw[0] * 1e3:8.3f} ms   GPU wall {hw[1] * 1e3:8.3f} ms")


@torch.inference_mode()
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--only-python", action="store_true", help="only the cProfile of the forward")
    ap.add_argument("--quick", action="store_true", help="only the host / GPU times of the forward and its parts")
    ap.add_argument("--bench-prefill", action="store_true", help="only the bench's prefill timing, 8 layers, twice")
    args = ap.parse_args()
    T, ps = args.tokens, 64
    torch.manual_seed(0)
    if args.bench_prefill:
        from qwen3next.bench import time_prefill
        model = random_gpu_model(preset("qwen3-next-80b-a3b"), 8)
        for _ in range(2):
            _, paths = time_prefill(model, T)
            print("  bench prefill, 8 layers: " + ", ".join(f"{p} {v * 1e3:.2f} ms" for p, v in paths.items()))
        return
    model = random_gpu_model(preset("qwen3-next-80b-a3b"), 4)
    cfg = model.config
    cache = HybridCache(cfg, 1, _pages_for(T, ps), ps, torch.bfloat16, "cuda", include_mtp=False)
    meta = BatchMeta.build([T], [0], [0], [list(range(_pages_for(T, ps)))], ps, "cuda")
    ids = torch.randint(0, cfg.vocab_size, (T,), device="cuda")
    keep = torch.tensor([T - 1], device="cuda")
    x = torch.randn(1, T, cfg.hidden_size, device="cuda", dtype=torch.bfloat16)
    cos, sin = model.rotary(meta.positions[None], x.dtype)
    L = model.model.layers
    fwd = lambda: model(ids, cache=cache, meta=meta, logits_to_keep=keep)  # noqa: E731

    if args.only_python:
        python_profile(fwd)
        return
    print(f"== {T} tokens, 4 layers (3 GDN + 1 attention), one sequence")
    row("whole forward", host_and_wall(fwd))
    row("gdn mixer", host_and_wall(lambda: L[0].linear_attn(x, cache[0], meta)))
    row("attention mixer", host_and_wall(lambda: L[3].self_attn(x, cos, sin, cache[3], meta)))
    row("moe", host_and_wall(lambda: L[0].mlp(x)))
    row("rmsnorm", host_and_wall(lambda: L[0].input_layernorm(x)))
    if args.quick:
        return

    print("== host-device syncs in one forward (count, where)")
    found = syncs(fwd)
    for where, n in found.most_common():
        print(f"  x{n:<3d} {where}")
    if not found:
        print("  none")

    print("== fla with and without the packed boundaries (one sequence)")
    hk, hv, dk, dv = cfg.linear_num_key_heads, cfg.linear_num_value_heads, cfg.linear_key_head_dim, \
        cfg.linear_value_head_dim
    q = torch.randn(1, T, hk, dk, device="cuda", dtype=torch.bfloat16)
    k, v = torch.randn_like(q), torch.randn(1, T, hv, dv, device="cuda", dtype=torch.bfloat16)
    g = -torch.rand(1, T, hv, device="cuda")
    beta = torch.rand(1, T, hv, device="cuda", dtype=torch.bfloat16)
    h0 = torch.zeros(1, hv, dk, dv, device="cuda")
    cu, cu_cpu = meta.cu_seqlens, meta.cu_seqlens_cpu
    row("chunk GDN, cu_seqlens + host copy", host_and_wall(lambda: gpu_ops.chunk_gated_delta_rule(
        q, k, v, g, beta, initial_state=h0, output_final_state=True, cu_seqlens=cu, cu_seqlens_cpu=cu_cpu)))
    row("chunk GDN, cu_seqlens only", host_and_wall(lambda: gpu_ops.chunk_gated_delta_rule(
        q, k, v, g, beta, initial_state=h0, output_final_state=True, cu_seqlens=cu)))
    row("chunk GDN, no cu_seqlens", host_and_wall(lambda: gpu_ops.chunk_gated_delta_rule(
        q, k, v, g, beta, initial_state=h0, output_final_state=True)))
    C = cfg.linear_conv_dim
    xc = torch.randn(1, T, C, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(C, cfg.linear_conv_kernel_dim, device="cuda", dtype=torch.bfloat16)
    c0 = torch.zeros(1, C, cfg.linear_conv_kernel_dim - 1, device="cuda", dtype=torch.bfloat16)
    row("conv1d, cu_seqlens + host copy", host_and_wall(lambda: gpu_ops.causal_conv1d(
        xc, w, c0, cu_seqlens=cu, cu_seqlens_cpu=cu_cpu)))
    row("conv1d, no cu_seqlens", host_and_wall(lambda: gpu_ops.causal_conv1d(xc, w, c0)))
    from qwen3next.ops import triton_conv
    row("conv1d, ours (ops/triton_conv.py)", host_and_wall(lambda: triton_conv.causal_conv1d(
        xc, w, c0, cu, meta.token_seq, meta.token_index)))

    print("== ops with the most host time, one forward")
    top_host_ops(fwd)
    print("== Python functions with the most host time, 5 forwards")
    python_profile(fwd)


if __name__ == "__main__":
    main()
