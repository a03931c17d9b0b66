"""MTP speculative decoding through the engine's CUDA graphs on a GPU, with Qwen3-Next-80B-A3B shapes.

Random weights accept no drafts, so this measures what a round costs and takes the acceptance from the release
(3.8 tokens per round with 3 drafts) for the implied speedup. Two views of the same round:
  - parts: the engine's drafting, verification and commit graphs replayed alone (qwen3next.bench.time_speculative;
    device time, scaled to the 48 layers like `qwen3next bench`), against the plain decode step;
  - engine: one greedy request through LLMEngine with N layers (default 8), plain vs k drafts forced, tokens/s
    and ms per engine step, host work included (drafting, acceptance, commit, sampling).

    python benchmarks/speculative_gpu.py [--layers 8] [--k 3] [--ctx 4096] [--batches 1,16] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from qwen3next import bench  # noqa: E402
from qwen3next.config import preset  # noqa: E402
from qwen3next.engine.engine import LLMEngine  # noqa: E402
from qwen3next.engine.sampling_params import SamplingParams  # noqa: E402


def engine_rate(model, k: int, ctx: int, tokens: int, repeat: int = 2) -> dict:
    """One greedy request of `ctx` random prompt tokens and `tokens` new ones; the second pass is timed from its
    third step on (after the prefill and the first drafting step, whose MTP catch-up covers the whole prompt)."""
    eng = LLMEngine(model, None, max_num_seqs=4, max_model_len=ctx + tokens + 64, max_num_batched_tokens=ctx,
                    speculative_tokens=k, speculative_adaptive=False)
    prompt = torch.randint(0, model.config.vocab_size, (ctx,)).tolist()
    for _ in range(repeat):
        eng.add_request({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=tokens,
                                                                      ignore_eos=True), request_id="r")
        steps, t0, made = 0, None, 0
        while eng.has_unfinished():
            out = eng.step()
            steps += 1
            if steps == 2:
                torch.cuda.synchronize()
                t0 = time.perf_counter()
            elif steps > 2:
                made += sum(len(o.outputs[0].delta_token_ids) for o in out)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
    u = eng.usage()
    timed = steps - 2
    return {"k": k, "decode_steps_timed": timed, "seconds": dt, "ms_per_step": dt / timed * 1e3,
            "tokens_per_s": made / dt, "cuda_graphs": u.get("cuda_graphs"), "speculative": u.get("speculative")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--tokens", type=int, default=48, help="new tokens of the engine's request")
    ap.add_argument("--acceptance", type=float, default=3.8, help="tokens per round assumed (release: 3.8 at k=3)")
    ap.add_argument("--skip-engine", action="store_true")
    ap.add_argument("--out", default="benchmarks/results/speculative_gpu.json")
    args = ap.parse_args()
    cfg = preset("qwen3-next-80b-a3b")
    L, n = cfg.num_hidden_layers, args.layers
    m = bench.random_gpu_model(cfg, n, mtp=True)
    res = {"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name(), "layers": n,
           "k": args.k, "ctx": args.ctx, "acceptance": args.acceptance, "parts": {}, "engine": {}}
    bw = bench.copy_bandwidth()
    res["copy_bandwidth_GBps"] = bw / 1e9
    print(f"{res['device']}, {n} of {L} layers + MTP, k={args.k}, ctx {args.ctx}, copy {bw / 1e9:.0f} GB/s",
          flush=True)
    for B in [int(b) for b in args.batches.split(",") if b]:
        t, graphed, paths = bench.time_decode(m, B, args.ctx)
        plain = bench.scale_to_model(t, bench.time_outside_layers(m, B), L, n)
        try:
            sp = bench.time_speculative(m, B, args.ctx, args.k)
        except Exception as e:  # noqa: BLE001 - report and go on
            res["parts"][f"b{B}"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            print(f"  b{B} failed: {e}", flush=True)
            continue
        res["parts"][f"b{B}"] = bench.speculative_round(m, cfg, n, sp, plain, args.k, args.acceptance, B=B,
                                                        ctx=args.ctx, bw=bw)
    if not args.skip_engine:
        for k in (0, args.k):
            r = engine_rate(m, k, args.ctx, args.tokens)
            res["engine"][f"k{k}"] = r
            print(f"  engine ({n} layers) k={k}: {r['tokens_per_s']:.1f} tokens/s, {r['ms_per_step']:.2f} ms per "
                  f"step, {r['decode_steps_timed']} steps; graphs {json.dumps(r['cuda_graphs'])}", flush=True)
        plain, spec = res["engine"]["k0"]["ms_per_step"], res["engine"][f"k{args.k}"]["ms_per_step"]
        res["engine"]["round_over_plain"] = spec / plain
        res["engine"]["implied_speedup"] = args.acceptance * plain / spec
        print(f"  engine round / plain step = {spec / plain:.2f} -> implied speedup at acceptance "
              f"{args.acceptance}: {args.acceptance * plain / spec:.2f}x ({n} layers, host work included)")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
