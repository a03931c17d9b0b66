"""MTP speculative decoding through the engine with the default model: acceptance length and wall-clock speedup vs
plain decoding, greedy, one request at a time (where speculation pays most), on the CPU or a GPU. Rows: plain
decoding; k = 1, 2, 3 drafts with drafting forced on (speculative_adaptive=False); k = 2 with the adaptive
policy (which drafts only where it measured a gain). On CUDA also plain decoding with eager layers
(QWEN3NEXT_COMPILE=0), to show what the compiled decode layers give in the engine (which has no CUDA graphs).

    python benchmarks/speculative.py [--device cpu|cuda] [--model PATH] [--tokens 96] [--out FILE.json]
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
from qwen3next import LLM, SamplingParams  # noqa: E402

QUESTIONS = ["json.dumps", "os.path.join", "re.compile", "math.sqrt", "itertools.chain", "collections.Counter",
             "subprocess.run", "functools.partial"]


def timed(llm: LLM, tokens: int) -> tuple[float, int]:
    """Seconds and tokens for the 8 questions, timed on a second pass: the first pass warms up everything that
    depends on shapes (on CUDA the compiled layers recompile once as the context length grows)."""
    sp = SamplingParams(temperature=0, max_tokens=tokens)
    for _ in range(2):
        t, n = time.perf_counter(), 0
        for q in QUESTIONS:
            out = llm.chat([{"role": "user", "content": f"What does {q} do?"}], sp)[0]
            n += len(out.outputs[0].token_ids)
    return time.perf_counter() - t, n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--out", default=None, help="JSON (default benchmarks/results/speculative_<device>.json)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = ap.parse_args()
    dev = args.device
    out = args.out or f"benchmarks/results/speculative_{dev}.json"
    variants = [("plain", 0, True, "1")]
    if dev == "cuda":
        variants.append(("plain, eager layers", 0, True, "0"))
    variants += [(f"k={k}, forced", k, False, "1") for k in (1, 2, 3)] + [("k=2, adaptive", 2, True, "1")]
    rows, base = [], None
    for name, k, adaptive, compile_flag in variants:
        os.environ["QWEN3NEXT_COMPILE"] = compile_flag
        llm = LLM(args.model, device=dev, speculative_tokens=k, speculative_adaptive=adaptive)
        t, n = timed(llm, args.tokens)
        base = base or (t, n)
        row = {"variant": name, "k": k, "seconds": t, "tokens": n, "tokens_per_s": n / t,
               "speedup": base[0] / t * n / base[1]}
        if k:
            st = llm.speculative_stats()
            row.update(mean_accepted_length=st["mean_accepted_length"],
                       per_position_acceptance=st["per_position_acceptance"], policy=st["policy"],
                       disabled_steps=st["disabled_steps"], verify_steps=st["verify_steps"])
        rows.append(row)
        print(f"{name}: {n / t:.1f} tokens/s", flush=True)
    os.environ["QWEN3NEXT_COMPILE"] = "1"
    print("| variant | tokens/s | speedup | mean accepted length | per-position acceptance | steps drafting / not |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        acc = ", ".join(f"{a:.2f}" for a in r.get("per_position_acceptance", []) if a is not None)
        steps = f"{r['verify_steps']} / {r['disabled_steps']}" if r["k"] else ""
        print(f"| {r['variant']} | {r['tokens_per_s']:.1f} | {r['speedup']:.2f}× | "
              f"{r.get('mean_accepted_length') or 1:.2f} | {acc} | {steps} |")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump({"date": datetime.date.today().isoformat(), "device": dev if dev == "cpu" else
                   torch.cuda.get_device_name(), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
