"""The engine's CUDA-graph decode path (qwen3next/engine/graphs.py), end to end on the embedded default model:
greedy tokens with graphs and without must be identical in fp32 (in bf16 the graph and eager steps may use
different GEMM shapes, so the count of identical sequences is reported), and tokens/s of both, for 8 concurrent
requests of different lengths (the batch shrinks through padded buckets) and for one request alone. Then the
8 prompts one at a time: each prefill alone in its step, so through the prefill graphs (engine/prefill_graphs.py,
bf16 only) too; and the 8 arriving one every 3 steps, so that each new prompt's prefill graph replays beside the
decode graph of the sequences already running. Their tokens are compared the same way.

    python benchmarks/engine_graphs.py [--device cuda] [--out results.json]

On a CPU (--device cpu) the static-buffer path runs without capture: a smoke test of the script.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from qwen3next import LLM, SamplingParams  # noqa: E402

QUESTIONS = ["json.dumps", "re.compile", "math.sqrt", "os.path.join", "zip", "itertools.chain",
             "functools.partial", "sorted"]
LENGTHS = (64, 40, 96, 17, 128, 33, 80, 50)


def arrivals(engine, prompts, sps, every: int) -> list[list[int]]:
    """The requests added one every `every` engine steps; each one's generated tokens, in order."""
    pending, ids, done, steps = list(zip(prompts, sps)), [], {}, 0
    while pending or engine.has_unfinished():
        if pending and steps % every == 0:
            ids.append(engine.add_request(*pending.pop(0)))
        for out in engine.step():
            if out.finished:
                done[out.request_id] = list(out.outputs[0].token_ids)
        steps += 1
    return [done[i] for i in ids]


def run(device: str, dtype, graphs: bool, repeat: int = 2) -> dict:
    t = time.perf_counter()
    llm = LLM(device=device, dtype=dtype, cuda_graphs=graphs, max_num_seqs=16)
    load_s = time.perf_counter() - t
    print(f"  [{dtype}, graphs={graphs}] loaded in {load_s:.1f} s, of which warm-up {llm.engine.warm_up_s:.1f} s",
          flush=True)
    if graphs and device == "cpu":       # no capture on a CPU: the same static-buffer path, run eagerly
        llm.engine.runner.graphs = llm.engine.runner.decode_graphs(capture=False)
        llm.engine.runner.prefill_graphs = llm.engine.runner.make_prefill_graphs(capture=False)
    prompts = [llm.render_chat([{"role": "user", "content": f"What does {f} do?"}]) for f in QUESTIONS]
    sps = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in LENGTHS]
    for i in range(repeat):              # the first pass compiles the decode layers and captures the graphs
        t = time.perf_counter()
        outs = llm.generate(prompts, sps, use_tqdm=False)
        batch_s = time.perf_counter() - t
        print(f"  [{dtype}, graphs={graphs}] pass {i}: {batch_s:.1f} s", flush=True)
    t = time.perf_counter()
    llm.generate(prompts[:1], sps[:1])   # one request alone: bucket 1
    alone_s = time.perf_counter() - t
    toks = [list(o.outputs[0].token_ids) for o in outs]
    t = time.perf_counter()
    one = [list(llm.generate([p], sp, use_tqdm=False)[0].outputs[0].token_ids) for p, sp in zip(prompts, sps)]
    one_by_one_s = time.perf_counter() - t
    arrivals(llm.engine, prompts, sps, every=3)   # a first pass: batch sizes not seen before compile (eagerly)
    t = time.perf_counter()
    arrived = arrivals(llm.engine, prompts, sps, every=3)
    arrivals_s = time.perf_counter() - t
    return {"tokens": toks, "one_by_one_tokens": one, "one_by_one_tok_s": sum(map(len, one)) / one_by_one_s,
            "arrival_tokens": arrived, "arrivals_tok_s": sum(map(len, arrived)) / arrivals_s, "batch_tok_s": sum(map(len, toks)) / batch_s, "alone_tok_s": LENGTHS[0] / alone_s,
            "load_s": load_s, "warm_up_s": llm.engine.warm_up_s,
            "cuda_graphs": llm.engine.usage().get("cuda_graphs")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows, ok = [], True
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name)
        g, e = run(args.device, dtype, True), run(args.device, dtype, False)
        same = sum(a == b for a, b in zip(g["tokens"], e["tokens"]))
        same1 = sum(a == b for a, b in zip(g["one_by_one_tokens"], e["one_by_one_tokens"]))
        same2 = sum(a == b for a, b in zip(g["arrival_tokens"], e["arrival_tokens"]))
        st = g["cuda_graphs"] or {}
        # prefill graphs exist for bf16 models only (engine/runner.py)
        used = st.get("replays", 0) > 0 and (dtype != torch.bfloat16 or args.device == "cpu"
                                             or (st.get("prefill", {}).get("replays", 0) >= len(QUESTIONS)
                                                 and st["prefill"]["beside_decode"] > 0))
        row = {"dtype": name, "identical": f"{same}/{len(QUESTIONS)}",
               "identical_one_by_one": f"{same1}/{len(QUESTIONS)}", "identical_arrivals": f"{same2}/{len(QUESTIONS)}",
               "graphs_used": used, "arrivals_tok_s": {"graphs": g["arrivals_tok_s"], "eager": e["arrivals_tok_s"]},
               "one_by_one_tok_s": {"graphs": g["one_by_one_tok_s"], "eager": e["one_by_one_tok_s"]},
               "batch8_tok_s": {"graphs": g["batch_tok_s"], "eager": e["batch_tok_s"]},
               "alone_tok_s": {"graphs": g["alone_tok_s"], "eager": e["alone_tok_s"]}, "stats": g["cuda_graphs"],
               "load_s": {"graphs": g["load_s"], "eager": e["load_s"]},
               "warm_up_s": {"graphs": g["warm_up_s"], "eager": e["warm_up_s"]}}
        rows.append(row)
        print(f"{name}: identical {same}/{len(QUESTIONS)}, one by one {same1}/{len(QUESTIONS)}, arriving "
              f"{same2}/{len(QUESTIONS)} | arriving: graphs {g['arrivals_tok_s']:.0f} tok/s, eager "
              f"{e['arrivals_tok_s']:.0f} | 8 requests: "
              f"graphs {g['batch_tok_s']:.0f} tok/s, eager {e['batch_tok_s']:.0f} | 1 request: graphs "
              f"{g['alone_tok_s']:.0f}, eager {e['alone_tok_s']:.0f} | one by one: graphs "
              f"{g['one_by_one_tok_s']:.0f}, eager {e['one_by_one_tok_s']:.0f}"
              f"\n  graph stats: {g['cuda_graphs']}", flush=True)
        if not used or (name == "float32" and len({same, same1, same2, len(QUESTIONS)}) > 1):
            ok = False
            print(f"FAIL {name}: " + ("the decode or prefill graphs were not used" if not used
                                      else "fp32 tokens differ"))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": args.device, "torch": torch.__version__, "rows": rows}, f, indent=2)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
