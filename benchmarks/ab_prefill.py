"""Prefill with and without one change, side by side in one process: Qwen3-Next-80B-A3B layers (real shapes,
random bf16 weights), one sequence, the engine's path (paged cache, last token's logits), the two variants timed
alternately for several rounds so that both see the same machine.

    python benchmarks/ab_prefill.py [--switch experts] [--tokens 4096,32768] [--layers 8] [--rounds 3] [--graph]
                                    [--out F]

Switches:
  experts     the routed experts as ops/triton_experts.py's kernels (on) or torch._grouped_mm (off)
  conv-split  our prefill conv writes GDN's q, k, v as three contiguous tensors (on) or one [N, C] output that
              fla's wrapper copies apart (off)
  add-norm    a layer's residual add inside the norm after it, one Triton pass (on), or a torch add first (off)
  qk-rope     attention's q/k norms, rotation and KV write (and the rotary table) as ops/triton_rope.py's
              kernels (on), or norm kernels + torch's rotation ops + index_copy_ (off)
  combine     the MoE's gated shared expert and the layer's residual added in the experts' combine (on), or as
              torch ops after it (off)
  conv-reads-qkvz  GDN's conv reads q, k, v and the gated norm z in place from in_proj_qkvz's rows, the gates
              made from in_proj_ba's alone (on), or a pass that unpacks the rows first (off)

--graph: token counts up to 4,096 are timed as CUDA-graph replays (one graph per variant, captured once), as the
engine runs a new prompt's first chunk of up to 4K tokens: the eager 4K forward is paced by the host's launches.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from qwen3next.bench import _pages_for, capture_graph, cuda_time, random_gpu_model  # noqa: E402
from qwen3next.config import preset  # noqa: E402
from qwen3next.model.cache import BatchMeta, HybridCache  # noqa: E402
from qwen3next.ops import kernels  # noqa: E402


def _experts(on: bool) -> None:
    kernels.TRITON_EXPERTS = on


def _conv_split(on: bool) -> None:
    kernels.CONV_SPLIT_OUTPUT = on


def _add_norm(on: bool) -> None:
    kernels.FUSED_ADD_NORM = on


def _qk_rope(on: bool) -> None:
    kernels.FUSED_QK_ROPE = on


def _combine(on: bool) -> None:
    kernels.FUSED_MOE_COMBINE = on


def _conv_reads_qkvz(on: bool) -> None:
    kernels.CONV_READS_QKVZ = on


SWITCHES = {"experts": _experts, "conv-split": _conv_split, "add-norm": _add_norm, "qk-rope": _qk_rope,
            "combine": _combine, "conv-reads-qkvz": _conv_reads_qkvz}


@torch.inference_mode()
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--switch", default="experts", choices=sorted(SWITCHES))
    ap.add_argument("--tokens", default="4096,32768")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--graph", action="store_true", help="time up to 4,096 tokens as CUDA-graph replays")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = random_gpu_model(preset("qwen3-next-80b-a3b"), args.layers)
    switch, ps = SWITCHES[args.switch], 64
    results = {}
    print(f"{'tokens':>7} {'round':>5} {'off ms':>9} {'on ms':>9} {'on/off':>7}")
    for T in (int(t) for t in args.tokens.split(",")):
        cache = HybridCache(model.config, 1, _pages_for(T, ps), ps, torch.bfloat16, "cuda", include_mtp=False)
        meta = BatchMeta.build([T], [0], [0], [list(range(_pages_for(T, ps)))], ps, "cuda")
        ids = torch.randint(0, model.config.vocab_size, (T,), device="cuda")
        keep = torch.tensor([T - 1], device="cuda")
        fwd = lambda: model(ids, cache=cache, meta=meta, logits_to_keep=keep).logits  # noqa: E731
        run, graph = {}, None
        for variant in ("off", "on"):
            switch(variant == "on")
            if args.graph and T <= 4096:
                graph = capture_graph(fwd)
                run[variant] = (lambda g: lambda: (g.replay(), g.output)[1])(graph)
            else:
                run[variant] = (lambda on: lambda: (switch(on), fwd())[1])(variant == "on")
        logits, times = {}, {"off": [], "on": []}
        for r in range(args.rounds):
            for variant in ("off", "on") if r % 2 == 0 else ("on", "off"):
                switch(variant == "on")
                times[variant].append(cuda_time(run[variant], 2, 5))
                logits[variant] = run[variant]().float()
            print(f"{T:>7} {r:>5} {times['off'][-1] * 1e3:>9.2f} {times['on'][-1] * 1e3:>9.2f} "
                  f"{times['on'][-1] / times['off'][-1]:>7.3f}", flush=True)
        diff = ((logits["on"] - logits["off"]).abs().max() / logits["off"].abs().max()).item()
        med = {v: statistics.median(ts) for v, ts in times.items()}
        print(f"{T:>7} median {med['off'] * 1e3:>9.2f} {med['on'] * 1e3:>9.2f} {med['on'] / med['off']:>7.3f}   "
              f"logits differ by {diff:.1e} of the largest")
        results[T] = {"off_ms": [t * 1e3 for t in times["off"]], "on_ms": [t * 1e3 for t in times["on"]],
                      "median_ratio_on_off": med["on"] / med["off"], "logits_max_rel_diff": diff}
        cache = run = graph = None   # free the pools and graphs before the next length
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"switch": args.switch, "layers": args.layers, "graph": args.graph,
                       "device": torch.cuda.get_device_name(),
                       "torch": torch.__version__, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
