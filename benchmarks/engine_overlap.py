"""Overlap scheduling (engine.py) on the GPU: decode tokens/s through LLMEngine with it and without, side by side
in one process, against the decode graph replayed back to back (the device's time per step, no host work: what
the engine loop could reach at best).

For each model and batch size, B greedy requests of 64-token prompts each generate T tokens (ignore_eos), one
engine per setting over the same weights, the two settings alternating for `--repeat` rounds (the first round of
each engine compiles and captures; it is not counted). Reported per setting: ms per decode step (from the first
token to the last, every request in the batch) and tokens/s; the tokens of the two settings are compared (they
should be identical: the same graphs run the same batches).

Models: `default` (the embedded default model, bf16) and `80b` (N layers of Qwen3-Next-80B-A3B with random bf16
weights, `--layers`).

    python benchmarks/engine_overlap.py [--models default,80b] [--layers 8] [--batches 1,8,32] [--tokens 128]
                                        [--out F]
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
from qwen3next.engine.engine import LLMEngine  # noqa: E402
from qwen3next.engine.sampling_params import SamplingParams  # noqa: E402


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def load(name: str, layers: int, device: str):
    if name == "default":
        from qwen3next import DEFAULT_MODEL
        from qwen3next.checkpoint import load_model
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        return load_model(DEFAULT_MODEL, dtype=dtype, device=device)
    from qwen3next.config import preset
    return bench.random_gpu_model(preset("qwen3-next-80b-a3b"), layers)


def decode_run(eng: LLMEngine, batch: int, tokens: int, vocab: int, seed: int, **sampling) -> dict:
    """B requests together; ms per decode step from the step that delivered the first token to the last one."""
    g = torch.Generator().manual_seed(seed)
    ids = [eng.add_request({"prompt_token_ids": torch.randint(0, vocab, (64,), generator=g).tolist()},
                           SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True, **sampling))
           for _ in range(batch)]
    sync()
    t0, first, out = time.perf_counter(), None, {}
    while eng.has_unfinished():
        for o in eng.step():
            if first is None and o.outputs[0].token_ids:
                first = time.perf_counter()
            if o.finished:
                out[o.request_id] = list(o.outputs[0].token_ids)
    end = time.perf_counter()
    steps = tokens - 1
    return {"ms_per_step": (end - first) / steps * 1e3, "tokens_per_s": batch * steps / (end - first),
            "total_s": end - t0, "tokens": [out[i] for i in ids]}


def sync_audit(eng: LLMEngine, batch: int, vocab: int, steps: int = 10) -> dict:
    """Where the host waits for the GPU in decode steps: `steps` engine steps of `batch` decoding sequences under
    torch's sync debug mode, the synchronising calls counted by the line that made them."""
    import collections
    import warnings
    g = torch.Generator().manual_seed(99)
    for _ in range(batch):
        eng.add_request({"prompt_token_ids": torch.randint(0, vocab, (64,), generator=g).tolist()},
                        SamplingParams(temperature=0, max_tokens=steps + 8, ignore_eos=True))
    for _ in range(3):
        eng.step()
    where = collections.Counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                eng.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    for w in caught:
        if "synchroniz" in str(w.message):
            where[f"{os.path.relpath(w.filename)}:{w.lineno}"] += 1
    while eng.has_unfinished():
        eng.step()
    return dict(where)


def graph_alone(eng: LLMEngine, batch: int, n: int = 50) -> float | None:
    """ms per replay of the decode graph of `batch` back to back: the device's time per step."""
    graphs = eng.runner.graphs
    bk = graphs.buckets.get(graphs.bucket_for(batch)) if graphs is not None else None
    if bk is None or bk.graph is None:
        return None
    bk.graph.replay()
    sync()
    t = time.perf_counter()
    for _ in range(n):
        bk.graph.replay()
    sync()
    return (time.perf_counter() - t) / n * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="default,80b")
    ap.add_argument("--layers", type=int, default=8, help="layers of Qwen3-Next-80B-A3B for the 80b model")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--tokens", type=int, default=128, help="tokens generated per request")
    ap.add_argument("--repeat", type=int, default=3, help="rounds per setting; the first is not counted")
    ap.add_argument("--profile", metavar="FILE", help="also cProfile one overlap run per batch size (the host's "
                    "functions by their own time) into FILE")
    ap.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke test of the script (default model)")
    ap.add_argument("--out", default="benchmarks/results/engine_overlap.json")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    on_gpu = args.device == "cuda"
    res = {"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name() if on_gpu else "cpu",
           "command": "python " + " ".join(sys.argv), "rows": []}
    print(f"{res['device']}, {args.tokens} tokens per request", flush=True)
    for name in args.models.split(","):
        model = load(name, args.layers, args.device)
        vocab = model.config.vocab_size
        engines = {ov: LLMEngine(model, None, max_num_seqs=max(batches), max_model_len=64 + args.tokens + 64,
                                 overlap=ov, max_num_batched_tokens=8192) for ov in (False, True)}
        for B in batches:
            runs = {False: [], True: []}
            for r in range(args.repeat):
                for ov, eng in engines.items():
                    got = decode_run(eng, B, args.tokens, vocab, seed=B)
                    if r:
                        runs[ov].append(got)
            best = {ov: min(rs, key=lambda x: x["ms_per_step"]) for ov, rs in runs.items()}
            alone = graph_alone(engines[True], B)
            same = sum(a == b for a, b in zip(best[False]["tokens"], best[True]["tokens"]))
            row = {"model": name if name == "default" else f"80b x {args.layers} layers", "batch": B,
                   "ms_per_step_sync": best[False]["ms_per_step"], "ms_per_step_overlap": best[True]["ms_per_step"],
                   "tokens_per_s_sync": best[False]["tokens_per_s"], "tokens_per_s_overlap": best[True]["tokens_per_s"],
                   "speedup": best[False]["ms_per_step"] / best[True]["ms_per_step"],
                   "graph_alone_ms": alone, "identical": f"{same}/{B}",
                   "all_ms_per_step": {str(ov): [x["ms_per_step"] for x in rs] for ov, rs in runs.items()}}
            if on_gpu:
                row["syncs_in_10_steps"] = {str(ov): sync_audit(eng, B, vocab) for ov, eng in engines.items()}
            if args.profile:
                import cProfile
                import io
                import pstats
                prof = cProfile.Profile()
                prof.runcall(decode_run, engines[True], B, args.tokens, vocab, B)
                text = io.StringIO()
                pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(30)
                with open(args.profile, "a") as f:
                    f.write(f"== {row['model']} B={B}, overlap, {args.tokens} tokens per request\n{text.getvalue()}\n")
            res["rows"].append(row)
            print(f"  {row['model']:>22} B={B:<3} sync {row['ms_per_step_sync']:.3f} ms/step "
                  f"({row['tokens_per_s_sync']:,.0f} tok/s), overlap {row['ms_per_step_overlap']:.3f} ms/step "
                  f"({row['tokens_per_s_overlap']:,.0f} tok/s): {row['speedup']:.2f}x; graph alone "
                  f"{alone if alone is None else round(alone, 3)} ms; identical {row['identical']}; host waits in "
                  f"10 steps: {row.get('syncs_in_10_steps')}", flush=True)
        if name == "default":   # penalties count the pending token on the device: the same tokens as without overlap
            pen = dict(presence_penalty=1.5, repetition_penalty=1.1, frequency_penalty=0.3)
            got = {ov: decode_run(eng, 8, args.tokens, vocab, seed=7, **pen)["tokens"] for ov, eng in engines.items()}
            same = sum(a == b for a, b in zip(got[False], got[True]))
            plain = decode_run(engines[True], 8, args.tokens, vocab, seed=7)["tokens"]
            res["penalties_identical"] = f"{same}/8"
            res["penalties_change_tokens"] = sum(a != b for a, b in zip(plain, got[True]))
            print(f"  default, penalties {pen}: identical with and without overlap {same}/8 "
                  f"(the penalties changed {res['penalties_change_tokens']}/8 requests)", flush=True)
        del engines, model
        if on_gpu:
            torch.cuda.empty_cache()
    print("\n| model | batch | sync ms/step | overlap ms/step | overlap vs sync | graph alone ms "
          "| overlap ÷ graph alone | identical |\n|---|---|---|---|---|---|---|---|")
    for r in res["rows"]:
        ga = r["graph_alone_ms"]
        print(f"| {r['model']} | {r['batch']} | {r['ms_per_step_sync']:.3f} | {r['ms_per_step_overlap']:.3f} | "
              f"{r['speedup']:.2f}x | {ga if ga is None else f'{ga:.3f}'} | "
              f"{'' if ga is None else round(r['ms_per_step_overlap'] / ga, 2)} | {r['identical']} |")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
