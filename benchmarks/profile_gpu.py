"""Where the time goes: per-part timings and the top CUDA kernels of a Qwen3-Next-80B-A3B layer group (3 Gated
DeltaNet + 1 attention layer, real shapes, random bf16 weights, random token ids) for 4K and 32K prefills and
decode steps; kernels are also summed by kind (expert GEMMs, projections, fla, attention, glue). Decode steps are
profiled as the bench times them: compiled layers replayed from a CUDA graph.

    python benchmarks/profile_gpu.py [--only prefill,prefill32k,b1,b64] [--lines] [--timeline]

--lines also attributes the GPU time of each torch op to the line of our code that called it (a profile with
Python stacks), which is how copies and elementwise kernels are traced back to their source. --timeline lists a
decode step's kernels in the order the GPU ran them, with start, duration and the gap after the kernel before
(negative where programmatic dependent launch overlaps them): where a step's time goes between kernels rather than
in them.
"""
from __future__ import annotations

import os
import re
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from qwen3next.bench import _pages_for, capture_graph, cuda_time, random_gpu_model  # noqa: E402
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


# kernel kinds, first match wins (names as the CUDA profiler reports them)
KINDS = [
    ("expert GEMMs (grouped)", r"GemmUniversal|grouped|_up_kernel|_down_kernel"),
    ("fla GDN chunk/recurrent", r"chunk_|recompute_w_u|solve_tril|merge_16x16|l2norm|fused_recurrent|gdn_step|"
                                r"_gdn_|prepare_wy|kkt"),
    ("expert glue (swiglu, combine)", r"_swiglu_kernel|_combine_kernel"),
    ("routing (softmax, top-k)", r"_route_kernel|topk|TopK"),
    ("attention", r"flash|fmha|sdpa|_decode_split|_decode_merge|attn"),
    ("conv1d", r"conv1d"),
    ("projection GEMMs / GEMVs", r"nvjet|cublas|gemv|gemm|splitK|dot_kernel|sm90_xmma|cutlass"),
    ("sort / gather / scatter", r"sort|gather|scatter|index|Sort"),
    ("norms", r"rms|norm|mean|rsqrt"),
    ("other elementwise / copies", r"."),
]


def kind_of(name: str) -> str:
    return next(k for k, pat in KINDS if re.search(pat, name))


def report(prof, n: int) -> None:
    evs = [e for e in prof.key_averages() if e.device_time_total > 0]
    evs.sort(key=lambda e: -e.device_time_total)
    total = sum(e.device_time_total for e in evs)
    kernels = sum(e.count for e in evs)
    print(f"  {kernels} kernel launches, {total / 1e3:.3f} ms of kernel time")
    by_kind: dict = {}
    for e in evs:
        k = kind_of(e.key)
        t, c = by_kind.get(k, (0.0, 0))
        by_kind[k] = (t + e.device_time_total, c + e.count)
    for k, (t, c) in sorted(by_kind.items(), key=lambda kv: -kv[1][0]):
        print(f"    {k:28s} {t / 1e3:8.3f} ms  {100 * t / total:5.1f}%  x{c}")
    for e in evs[:n]:
        print(f"  {e.device_time_total / 1e3:8.3f} ms  x{e.count:<4d} {e.key[:110]}")


def timeline(prof, path: str) -> None:
    """The kernels of one profiled step in GPU order (from the profiler's trace): start, duration, gap."""
    import json
    prof.export_chrome_trace(path)
    with open(path) as f:
        evs = json.load(f)["traceEvents"]
    ks = sorted((e for e in evs if e.get("cat") == "kernel"), key=lambda e: e["ts"])
    if not ks:
        print("  (no kernel events in the trace)")
        return
    t0, end, busy = ks[0]["ts"], ks[0]["ts"], 0.0
    print(f"  {'start':>8s} {'dur':>7s} {'gap':>7s}  kernel (us)")
    for e in ks:
        gap = e["ts"] - end
        print(f"  {e['ts'] - t0:8.1f} {e['dur']:7.1f} {gap:7.1f}  {e['name'][:90]}")
        busy += max(0.0, e["ts"] + e["dur"] - max(end, e["ts"]))
        end = max(end, e["ts"] + e["dur"])
    span = end - t0
    print(f"  {len(ks)} kernels, span {span:.1f} us, GPU busy {busy:.1f} us, idle between kernels {span - busy:.1f} us")


def _caller(e) -> str:
    """The innermost Python frame of qwen3next above a profiler event (with_stack records frames as events)."""
    p = e.cpu_parent
    while p is not None:
        if "qwen3next/" in p.name:
            return p.name.split("qwen3next/")[-1]
        p = p.cpu_parent
    ours = [f for f in (getattr(e, "stack", None) or []) if "qwen3next/" in f]
    return ours[0].split("qwen3next/")[-1] if ours else "?"


def by_line(prof, n: int = 40) -> None:
    """GPU time of the torch ops, grouped by (op, the innermost line of qwen3next that called it)."""
    rows: dict = {}
    for e in prof.events():
        if not e.name.startswith("aten::") or e.device_time_total <= 0 or (e.cpu_parent is not None
                                                                           and e.cpu_parent.name.startswith("aten::")):
            continue
        key = (e.name, _caller(e))
        t, c = rows.get(key, (0.0, 0))
        rows[key] = (t + e.device_time_total, c + 1)
    print("  GPU time of torch ops by calling line:")
    for (name, where), (t, c) in sorted(rows.items(), key=lambda kv: -kv[1][0])[:n]:
        print(f"  {t / 1e3:8.3f} ms  x{c:<4d} {name:28s} {where[:90]}")


@torch.inference_mode()
def top_kernels(model, T, B=1, ctx=0, ps=64, n=32, lines=False, trace=None, verify=False):
    """verify: a speculative verification step of T tokens per sequence (T - 1 drafts; the GDN states after
    every token kept, logits of every row, compiled layers in a CUDA graph), as the engine's graphs run it."""
    per_seq = _pages_for(ctx + T, ps)
    cache = HybridCache(model.config, B, B * per_seq, ps, torch.bfloat16, "cuda", include_mtp=False)
    meta = BatchMeta.build([T] * B, [ctx] * B, list(range(B)), [list(range(i * per_seq, (i + 1) * per_seq))
                                                                for i in range(B)], ps, "cuda",
                           keep_step_states=[True] * B if verify else None)
    meta.fixed_shapes = verify
    # random tokens: identical ones would route every token to the same experts
    ids = torch.randint(0, model.config.vocab_size, (B * T,), device="cuda")
    keep = torch.arange(B, device="cuda") * T + T - 1          # logits of each sequence's last token, as served
    if verify:
        keep = torch.arange(B * T, device="cuda")
    step = (lambda: model(ids, cache=cache, meta=meta)) if T == 1 else \
        (lambda: model(ids, cache=cache, meta=meta, logits_to_keep=keep))
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    if T == 1 or verify:   # as the bench and the engine run it: the whole step replayed from a CUDA graph
        step = capture_graph(step).replay
        print(f"  graph replay: {cuda_time(step, 3, 20) * 1e3:.3f} ms per step")
    else:
        print(f"  wall: {cuda_time(step, 2, 5) * 1e3:.3f} ms")
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    report(prof, n)
    if trace:
        timeline(prof, trace)
    if lines and T > 1:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True) as prof:
            step()
            torch.cuda.synchronize()
        by_line(prof)


CASES = {"prefill": ("prefill 4K", dict(T=4096)), "prefill32k": ("prefill 32K", dict(T=32768)), "b1": ("decode b1 @4K", dict(T=1, ctx=4096)),
         "b1_32k": ("decode b1 @32K", dict(T=1, ctx=32768)),
         "b64": ("decode b64 @4K", dict(T=1, B=64, ctx=4096)),
         "verify": ("verification of 3 drafts, b1 @4K", dict(T=4, ctx=4096, verify=True))}


def main():
    import argparse
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    ap.add_argument("--lines", action="store_true", help="GPU time of torch ops by the line of ours calling them")
    ap.add_argument("--kernels", type=int, default=32, help="how many of the top kernels to list")
    ap.add_argument("--timeline", metavar="DIR", help="list each step's kernels in GPU order; traces saved in DIR")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = random_gpu_model(preset("qwen3-next-80b-a3b"), 4)
    for case in args.only.split(","):
        label, kw = CASES[case]
        print(f"== {label}")
        if not kw.get("verify"):
            for k, v in parts(model, **kw).items():
                print(f"  {k:32s} {v * 1e3:8.3f} ms")
        trace = None
        if args.timeline:
            os.makedirs(args.timeline, exist_ok=True)
            trace = os.path.join(args.timeline, f"trace_{case}.json")
        top_kernels(model, **kw, n=args.kernels, lines=args.lines, trace=trace)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
