"""Decode steps with and without programmatic dependent launch (ops/pdl.py), side by side in one process.

Qwen3-Next-80B-A3B layers (real shapes, random bf16 weights) run compiled decode steps in CUDA graphs; for each
batch / context the graph is captured twice, once with PDL off and once on (ops/pdl.ENABLED; the decode layers
are recompiled for each, since Inductor's kernels follow it too: ops/fused.py), and the two graphs are replayed
in alternating rounds. --ours-only leaves Inductor's kernels without PDL in both; --control compiles both without.
The logits of both graphs from the same cache state are compared (bit-identical when only our kernels switch;
with Inductor's too its generated code differs, ~4e-7 of the largest logit in fp32: --dtype float32 tells that
from a race), and each graph is checked to be deterministic. Prints the whole-model (48-layer) time per step and
its ratio to the bandwidth floor; writes JSON.

    python benchmarks/ab_pdl.py [--layers 8] [--rounds 5] [--out results.json]
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch

from qwen3next import bench
from qwen3next.config import preset
from qwen3next.model import qwen3_next
from qwen3next.ops import fused, pdl


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--cases", default="1x4096,1x32768,16x4096", help="batch x context, comma-separated")
    ap.add_argument("--ours-only", action="store_true", help="PDL in our kernels only, not in Inductor's")
    ap.add_argument("--control", action="store_true",
                    help="PDL off in both (two compilations of the same code: what differs without PDL)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                    help="float32: reduction-order differences between the two compilations shrink to ~1e-6, "
                         "so a larger difference would be a real one (a race)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    cfg = preset("qwen3-next-80b-a3b")
    bench.DEV["dtype"] = getattr(torch, args.dtype)
    model = bench.random_gpu_model(cfg, args.layers)
    bw = bench.copy_bandwidth()
    rows = []
    for case in args.cases.split(","):
        B, ctx = (int(v) for v in case.split("x"))
        cache, meta, ids = bench._decode_batch(model, B, ctx)
        step = lambda: model(ids, cache=cache, meta=meta)       # noqa: E731
        limit = fused.DECODE["max_tokens"]
        fused.DECODE.update(max_tokens=None)
        try:
            graphs, logits, outs = {}, {}, {}
            for on in (False, True):
                use = on and not args.control
                pdl.ENABLED = use and not args.ours_only  # what the layers are compiled with
                torch._dynamo.reset()
                qwen3_next.decode_layer.reset()
                for _ in range(3):                        # compile + warm up
                    step()
                pdl.ENABLED = use
                graphs[on] = bench.capture_graph(step)
                logits[on] = graphs[on].output.logits
            # the same output from the same state: restore the KV / conv / recurrent state, replay a graph three
            # times (the later steps read what the earlier ones wrote); twice per graph (is each deterministic?)
            # and across the two (the same up to the compiler's choices, e.g. autotuned reduction shapes)
            state = [p.clone() for p in _pools(cache)]
            for on in (False, True):
                outs[on] = []
                for _ in range(2):
                    for p, s in zip(_pools(cache), state):
                        p.copy_(s)
                    for _ in range(3):
                        graphs[on].replay()
                    torch.cuda.synchronize()
                    outs[on].append(logits[on].float().clone())
            times = {False: [], True: []}
            for _ in range(args.rounds):
                for on in (False, True):
                    times[on].append(bench.cuda_time(graphs[on].replay, 3, 20))
        finally:
            fused.DECODE.update(max_tokens=limit)
            pdl.ENABLED = True
        th = bench.time_head(model, B)
        floor = bench.decode_bytes(cfg, B, ctx) / bw
        whole = {on: (min(t) - th) * cfg.num_hidden_layers / args.layers + th for on, t in times.items()}
        same = torch.equal(outs[False][0], outs[True][0])
        deterministic = {("pdl" if on else "no_pdl"): torch.equal(*outs[on]) for on in (False, True)}
        diff = ((outs[False][0] - outs[True][0]).abs().max() / outs[False][0].abs().max()).item()
        row = {"batch": B, "ctx": ctx, "same_output": same, "deterministic": deterministic,
               "max_diff_over_max_logit": diff,
               "ms_step_measured": {("pdl" if on else "no_pdl"): [v * 1e3 for v in t] for on, t in times.items()},
               "ms_whole": {("pdl" if on else "no_pdl"): v * 1e3 for on, v in whole.items()},
               "over_floor": {("pdl" if on else "no_pdl"): v / floor for on, v in whole.items()},
               "floor_ms_whole": floor * 1e3}
        rows.append(row)
        print(f"b{B} @{ctx}: no PDL {whole[False] * 1e3:.3f} ms ({whole[False] / floor:.2f}x floor, median "
              f"{statistics.median(times[False]) * 1e3:.3f} ms / {args.layers} layers), PDL {whole[True] * 1e3:.3f} ms "
              f"({whole[True] / floor:.2f}x floor, median {statistics.median(times[True]) * 1e3:.3f}); "
              f"PDL / none = {whole[True] / whole[False]:.3f}; identical output: {same} (max diff / max logit "
              f"{diff:.1e}; each graph deterministic: {deterministic})", flush=True)
    res = {"device": torch.cuda.get_device_name(), "copy_GBps": bw / 1e9, "layers": args.layers,
           "dtype": args.dtype, "inductor_pdl_compared": not args.ours_only, "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


def _pools(cache):
    """Every state tensor of the cache (KV pages, conv and recurrent pools)."""
    out = []
    for layer in cache.layers:
        out += [t for name in ("k", "v", "conv", "recurrent") if isinstance(t := getattr(layer, name, None),
                                                                                torch.Tensor)]
    return out


if __name__ == "__main__":
    main()
