"""Decode steps with and without one change, side by side in one process.

Qwen3-Next-80B-A3B layers (real shapes, random bf16 weights) run compiled decode steps in CUDA graphs; for each
batch / context the graph is captured twice, once with the change off and once on (the decode layers are
recompiled for each), and the two graphs are replayed in alternating rounds, so that both see the same machine.
The logits of both graphs from the same cache state are compared, and each graph is checked to be deterministic.
Prints the whole-model (48-layer) time per step and its ratio to the bandwidth floor; writes JSON.

    python benchmarks/ab_decode.py [--switch pdl] [--layers 8] [--rounds 5] [--out results.json]

Switches:
  pdl           programmatic dependent launch (ops/pdl.py) in our kernels and Inductor's. --ours-only leaves
                Inductor's kernels without it in both; --control compiles both without. With only our kernels
                switched the logits are bit-identical; with Inductor's too its generated code differs, ~4e-7 of the
                largest logit in fp32 (--dtype float32 tells that from a race)
  gdn-norm      the GDN decode step with its gated norm in the kernel, 32 value columns per program, the last of
                a head's programs norming it (on: at one sequence; --set kernels.GDN_NORM_IN_KERNEL_MAX_SEQS=64
                for larger steps too), or one program per head as until 2026-11-24 (off)
  qk-rope       attention's q/k norms, rotation and KV write as one kernel and the rotary table as one
                (ops/triton_rope.py; on), or Inductor's kernels, the KV write kernel and torch's nine rotary ops (off)
  moe-blocks    the fused MoE decode kernels above one token with 4 x 2048 (up) and 16 x 256 (down) blocks and 2
                warps each (on), or 4 x 1024 / 4 warps and 16 x 256 / 8 warps (off)
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch

from qwen3next import bench
from qwen3next.config import preset
from qwen3next.model import qwen3_next
from qwen3next.ops import fused, kernels, pdl


def _pdl(on: bool) -> None:
    pdl.ENABLED = on


def _gdn_norm(on: bool) -> None:
    kernels.GDN_NORM_BLOCK_V = None if on else 128


def _qk_rope(on: bool) -> None:
    kernels.FUSED_QK_ROPE = on


def _moe_blocks(on: bool) -> None:
    from qwen3next.ops import triton_moe
    triton_moe.WIDE_MULTI_TOKEN_BLOCKS = on


SWITCHES = {"pdl": _pdl, "gdn-norm": _gdn_norm, "qk-rope": _qk_rope, "moe-blocks": _moe_blocks}


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--switch", default="pdl", choices=sorted(SWITCHES))
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--cases", default="1x4096,1x32768,16x4096", help="batch x context, comma-separated")
    ap.add_argument("--ours-only", action="store_true", help="pdl: in our kernels only, not in Inductor's")
    ap.add_argument("--control", action="store_true",
                    help="the change off in both (two compilations of the same code: what differs without it)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                    help="float32: reduction-order differences between the two compilations shrink to ~1e-6, "
                         "so a larger difference would be a real one (a race)")
    ap.add_argument("--set", action="append", default=[], metavar="MODULE.NAME=VALUE",
                    help="set a constant of qwen3next.ops.MODULE in both arms (an int), "
                         "e.g. kernels.GDN_NORM_IN_KERNEL_MAX_SEQS=16")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    cfg = preset("qwen3-next-80b-a3b")
    bench.DEV["dtype"] = getattr(torch, args.dtype)
    switch = SWITCHES[args.switch]
    import importlib
    for item in args.set:
        name, value = item.split("=")
        module, attr = name.rsplit(".", 1)
        setattr(importlib.import_module(f"qwen3next.ops.{module}"), attr, int(value))
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
                switch(use)
                if args.switch == "pdl":
                    pdl.ENABLED = use and not args.ours_only  # what the layers are compiled with
                torch._dynamo.reset()
                qwen3_next.decode_layer.reset()
                for _ in range(3):                        # compile + warm up
                    step()
                switch(use)
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
            switch(True)
        th = bench.time_outside_layers(model, B)
        floor = bench.decode_bytes(cfg, B, ctx) / bw
        whole = {on: bench.scale_to_model(min(t), th, cfg.num_hidden_layers, args.layers) for on, t in times.items()}
        same = torch.equal(outs[False][0], outs[True][0])
        deterministic = {("on" if on else "off"): torch.equal(*outs[on]) for on in (False, True)}
        diff = ((outs[False][0] - outs[True][0]).abs().max() / outs[False][0].abs().max()).item()
        row = {"batch": B, "ctx": ctx, "same_output": same, "deterministic": deterministic,
               "max_diff_over_max_logit": diff,
               "ms_step_measured": {("on" if on else "off"): [v * 1e3 for v in t] for on, t in times.items()},
               "ms_whole": {("on" if on else "off"): v * 1e3 for on, v in whole.items()},
               "over_floor": {("on" if on else "off"): v / floor for on, v in whole.items()},
               "floor_ms_whole": floor * 1e3}
        rows.append(row)
        print(f"{args.switch} b{B} @{ctx}: off {whole[False] * 1e3:.3f} ms ({whole[False] / floor:.3f}x floor, median "
              f"{statistics.median(times[False]) * 1e3:.3f} ms / {args.layers} layers), on {whole[True] * 1e3:.3f} ms "
              f"({whole[True] / floor:.3f}x floor, median {statistics.median(times[True]) * 1e3:.3f}); "
              f"on / off = {whole[True] / whole[False]:.3f}; identical output: {same} (max diff / max logit "
              f"{diff:.1e}; each graph deterministic: {deterministic})", flush=True)
    res = {"device": torch.cuda.get_device_name(), "switch": args.switch, "set": args.set, "copy_GBps": bw / 1e9,
           "layers": args.layers, "dtype": args.dtype, "control": args.control,
           "inductor_pdl_compared": args.switch == "pdl" and not args.ours_only, "rows": rows}
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
