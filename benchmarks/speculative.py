"""MTP speculative decoding through the engine with the default model: acceptance length and wall-clock speedup vs
plain decoding, greedy, one request at a time (where speculation pays most), on the CPU or a GPU. Rows: plain
decoding; k = 1, 2, 3 drafts with drafting forced on (speculative_adaptive=False); k = 2 with the adaptive
policy (which drafts only where it measured a gain). On CUDA the engine replays decode steps, MTP drafting and
verification from CUDA graphs; two more rows switch the graphs off (plain and k = 2 forced), as the engine ran
before it had graphs for speculation.

    python benchmarks/speculative.py [--device cpu|cuda] [--model PATH] [--tokens 96] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from qwen3next import LLM, SamplingParams  # noqa: E402

QUESTIONS = ["json.dumps", "os.path.join", "re.compile", "math.sqrt", "itertools.chain", "collections.Counter",
             "subprocess.run", "functools.partial"]


def timed(llm: LLM, tokens: int) -> tuple[float, int, dict]:
    """Seconds and tokens for the 8 questions, timed on a second pass: the first pass warms up everything that
    depends on shapes (on CUDA the compiled layers recompile once as the context length grows). Also where the
    second pass's time went: inside engine steps, in Python's garbage collector, and how many graphs
    torch.compile made during it."""
    import gc
    from torch._dynamo.utils import counters
    sp = SamplingParams(temperature=0, max_tokens=tokens)
    where = {"step_s": 0.0, "gc_s": 0.0, "gc_collections": 0}
    step = llm.engine.step

    def timed_step():
        t = time.perf_counter()
        try:
            return step()
        finally:
            where["step_s"] += time.perf_counter() - t

    gc_start = []

    def gc_clock(phase, info):
        if phase == "start":
            gc_start.append(time.perf_counter())
        elif gc_start:
            where["gc_s"] += time.perf_counter() - gc_start.pop()
            where["gc_collections"] += 1

    prof = None
    for p in range(2):
        if p == 1:
            llm.engine.step = timed_step
            gc.callbacks.append(gc_clock)
            graphs_before = counters["stats"]["unique_graphs"]
            if PROFILE_PASS:
                import cProfile
                prof = cProfile.Profile()
                prof.enable()
        t, n = time.perf_counter(), 0
        for q in QUESTIONS:
            out = llm.chat([{"role": "user", "content": f"What does {q} do?"}], sp)[0]
            n += len(out.outputs[0].token_ids)
    dt = time.perf_counter() - t
    if prof is not None:
        import pstats
        prof.disable()
        with open(PROFILE_PASS, "a") as f:
            f.write(f"== {llm.engine.speculator is not None and 'speculative' or 'plain'}: {n / dt:.1f} tokens/s\n")
            pstats.Stats(prof, stream=f).sort_stats("tottime").print_stats(35)
    gc.callbacks.remove(gc_clock)
    llm.engine.step = step
    where["compiled_graphs"] = counters["stats"]["unique_graphs"] - graphs_before
    return dt, n, where


PROFILE_CATCH_UPS = os.environ.get("PROFILE_CATCH_UPS")     # a file: cProfile of the slowest eager catch-ups
PROFILE_PASS = os.environ.get("PROFILE_PASS")               # a file: cProfile of each variant's timed pass


def _write_catch_up_profiles(seen: dict) -> None:
    import pstats
    with open(PROFILE_CATCH_UPS, "a") as f:
        for sec, prof in sorted(seen.pop("profiles", []), key=lambda p: -p[0])[:3]:
            f.write(f"== eager catch-up, {sec * 1e3:.1f} ms\n")
            pstats.Stats(prof, stream=f).sort_stats("cumulative").print_stats("qwen3next|torch/nn|triton", 30)


def _count_eager_catch_ups() -> dict:
    """Wraps Speculator._catch_up (the MTP head's eager forward over unseen positions) to count its calls, their
    lengths and wall time (device included): the suspect of the adaptive policy's slow GPU runs."""
    from qwen3next.engine.speculative import Speculator
    seen = {"calls": 0, "seconds": 0.0, "lengths": []}
    inner = Speculator._catch_up

    def timed_catch_up(self, rows, dev, want_logits=True):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t = time.perf_counter()
        if PROFILE_CATCH_UPS:
            import cProfile
            prof = cProfile.Profile()
            out = prof.runcall(inner, self, rows, dev, want_logits)
            torch.cuda.synchronize(dev) if dev.type == "cuda" else None
            seen.setdefault("profiles", []).append((time.perf_counter() - t, prof))
        else:
            out = inner(self, rows, dev, want_logits)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        seen["calls"] += 1
        seen["seconds"] += time.perf_counter() - t
        seen["lengths"].append(sum(h.shape[0] for _, _, h in rows))
        return out

    Speculator._catch_up = timed_catch_up
    return seen


def run_variant(args, name: str, k: int, adaptive: bool, graphs: bool) -> dict:
    llm = LLM(args.model, device=args.device, speculative_tokens=k, speculative_adaptive=adaptive, cuda_graphs=graphs)
    seen = _count_eager_catch_ups()
    t, n, where = timed(llm, args.tokens)
    if PROFILE_CATCH_UPS:
        _write_catch_up_profiles(seen)
    row = {"variant": name, "k": k, "seconds": t, "tokens": n, "tokens_per_s": n / t, "second_pass": where,
           "eager_catch_ups_both_passes": {**seen, "lengths": seen["lengths"][:64]}}
    if k:
        st = llm.speculative_stats()
        row.update(mean_accepted_length=st["mean_accepted_length"],
                   per_position_acceptance=st["per_position_acceptance"], policy=st["policy"],
                   disabled_steps=st["disabled_steps"], verify_steps=st["verify_steps"])
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--out", default=None, help="JSON (default benchmarks/results/speculative_<device>.json)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--only", default=None, help="comma-separated variant numbers to run (0 = plain, ...)")
    ap.add_argument("--same-process", action="store_true",
                    help="run every variant in this process (default on CUDA: each in a fresh process, since engines "
                         "built one after another in one process measured different speeds: the fifth, adaptive, "
                         "0.19x where a fresh process ran it near plain speed; H100, 2026-11-24)")
    ap.add_argument("--variant", type=int, default=None, help=argparse.SUPPRESS)   # one variant, JSON to stdout
    args = ap.parse_args()
    dev = args.device
    out = args.out or f"benchmarks/results/speculative_{dev}.json"
    variants = [("plain", 0, True, True)]
    variants += [(f"k={k}, forced", k, False, True) for k in (1, 2, 3)] + [("k=2, adaptive", 2, True, True)]
    if dev == "cuda":
        variants += [("plain, no CUDA graphs", 0, True, False), ("k=2, forced, no CUDA graphs", 2, False, False)]
    if args.variant is not None:
        print("ROW " + json.dumps(run_variant(args, *variants[args.variant])), flush=True)
        return 0
    chosen = [int(i) for i in args.only.split(",")] if args.only else range(len(variants))
    rows = []
    for i in chosen:
        if dev == "cuda" and not args.same_process:
            cmd = [sys.executable, __file__, "--device", dev, "--tokens", str(args.tokens), "--variant", str(i)]
            if args.model:
                cmd += ["--model", args.model]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("ROW ")]
            if proc.returncode or not lines:
                print(f"{variants[i][0]}: failed\n{proc.stderr[-2000:]}", flush=True)
                continue
            row = json.loads(lines[-1][4:])
            row["warnings"] = [ln for ln in proc.stderr.splitlines() if "qwen3next" in ln or "failed" in ln][-10:]
            for ln in row["warnings"]:
                print(f"  [{row['variant']}] {ln[:300]}", flush=True)
        else:
            row = run_variant(args, *variants[i])
        rows.append(row)
        print(f"{row['variant']}: {row['tokens_per_s']:.1f} tokens/s", flush=True)
    base = next((r for r in rows if r["variant"] == "plain"), rows[0])
    for r in rows:
        r["speedup"] = r["tokens_per_s"] / base["tokens_per_s"]
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
