"""MTP speculative decoding on the CPU with the default model: acceptance length and wall-clock speedup vs plain
decoding, greedy, one request at a time (where speculation pays most).

    python benchmarks/speculative_cpu.py [--model PATH] [--tokens 96] [--out benchmarks/results/speculative_cpu.json]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from qwen3next import LLM, SamplingParams  # noqa: E402

QUESTIONS = ["json.dumps", "os.path.join", "re.compile", "math.sqrt", "itertools.chain", "collections.Counter",
             "subprocess.run", "functools.partial"]


def timed(llm: LLM, tokens: int) -> tuple[float, int]:
    sp = SamplingParams(temperature=0, max_tokens=tokens)
    llm.chat([{"role": "user", "content": "warm up"}], SamplingParams(max_tokens=4))
    t, n = time.perf_counter(), 0
    for q in QUESTIONS:
        out = llm.chat([{"role": "user", "content": f"What does {q} do?"}], sp)[0]
        n += len(out.outputs[0].token_ids)
    return time.perf_counter() - t, n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--out", default="benchmarks/results/speculative_cpu.json")
    args = ap.parse_args()
    base_t, base_n = timed(LLM(args.model, device="cpu"), args.tokens)
    rows = [{"k": 0, "seconds": base_t, "tokens": base_n, "tokens_per_s": base_n / base_t, "speedup": 1.0}]
    for k in (1, 2, 3):
        llm = LLM(args.model, device="cpu", speculative_tokens=k)
        t, n = timed(llm, args.tokens)
        st = llm.speculative_stats()
        rows.append({"k": k, "seconds": t, "tokens": n, "tokens_per_s": n / t, "speedup": base_t / t * n / base_n,
                     "mean_accepted_length": st["mean_accepted_length"],
                     "per_position_acceptance": st["per_position_acceptance"]})
    print("| drafts k | tokens/s | speedup | mean accepted length | per-position acceptance |\n|---|---|---|---|---|")
    for r in rows:
        acc = ", ".join(f"{a:.2f}" for a in r.get("per_position_acceptance", []) if a is not None)
        print(f"| {r['k']} | {r['tokens_per_s']:.1f} | {r['speedup']:.2f}× | "
              f"{r.get('mean_accepted_length') or 1:.2f} | {acc} |")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"date": datetime.date.today().isoformat(), "device": "cpu", "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
