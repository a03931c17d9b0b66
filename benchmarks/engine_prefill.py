"""Time to first token through the engine against the model's own prefill, with Qwen3-Next-80B-A3B layers.

`qwen3next bench` times one forward of a 4K prompt. A user's prompt goes through LLMEngine: the scheduler cuts it
into chunks of at most max_num_batched_tokens, each later chunk attends to the keys cached before it, and every
prompt length is new to the attention kernels. This sends prompts of lengths the process has not seen (one new
token is generated, so the time is the prefill's) under each setting and reports the engine's time to first
token (TTFT) over the model's forward of the same length (bench.time_prefill, warm). Settings: the prefill budget
(chunk size), whether the attention backend is steered (ops/sdpa.py) or left to torch, and whether a lone
prompt's first chunk replays a CUDA graph (engine/prefill_graphs.py; `--graphs`, captured before timing), and
overlap scheduling (`--overlap`: on by default, as in the engine on CUDA).

    python benchmarks/engine_prefill.py [--layers 8] [--lengths 4000,4100,4200] [--budgets 512,8192]
                                        [--graphs off|on|both] [--overlap off|on|both] [--out F]
"""
from __future__ import annotations

import argparse
import cProfile
import datetime
import json
import os
import pstats
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from qwen3next import bench  # noqa: E402
from qwen3next.config import preset  # noqa: E402
from qwen3next.engine.engine import LLMEngine  # noqa: E402
from qwen3next.engine.sampling_params import SamplingParams  # noqa: E402
from qwen3next.ops import sdpa  # noqa: E402


_compile_log: dict = {}


def _log_compiles(stop: bool = False) -> list:
    """Record every Triton compile (kernel, seconds, specialisation) until called with stop=True."""
    from triton.runtime.jit import JITFunction
    if stop:
        JITFunction._do_compile = _compile_log.pop("inner")
        return []
    inner, log = JITFunction._do_compile, []

    def compile_logged(self, key, signature, device, constexprs, options, attrs, *rest):
        t = time.perf_counter()
        out = inner(self, key, signature, device, constexprs, options, attrs, *rest)
        log.append((getattr(self.fn, "__name__", "?"), time.perf_counter() - t,
                    f"attrs={str(attrs)[:120]} constexprs={str(constexprs)[:200]}"))
        return out

    _compile_log["inner"] = inner
    JITFunction._do_compile = compile_logged
    return log


def ttft(eng: LLMEngine, n: int, vocab: int, seed: int) -> float:
    """Seconds from adding a new n-token prompt to its first token (the steps of any sequences already decoding
    run with it)."""
    prompt = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
    torch.cuda.synchronize()
    t = time.perf_counter()
    rid = eng.add_request({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    while not any(o.request_id == rid and o.finished for o in eng.step()):
        pass
    # the token is on the host now; under overlap scheduling the step that returned it has already queued the
    # next decode step of the other sequences, which the user does not wait for
    return time.perf_counter() - t


def start_decoding(eng: LLMEngine, count: int, vocab: int) -> list[str]:
    """`count` sequences of 64-token prompts that decode for as long as the timing lasts."""
    g = torch.Generator().manual_seed(123)
    ids = [eng.add_request({"prompt_token_ids": torch.randint(0, vocab, (64,), generator=g).tolist()},
                           SamplingParams(temperature=0, max_tokens=eng.max_model_len - 65, ignore_eos=True))
           for _ in range(count)]
    for _ in range(3):       # their prefill, then decode steps (the decode graph captured)
        eng.step()
    return ids


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--lengths", default="4000,4100,4200", help="prompt lengths, each new to the process")
    ap.add_argument("--budgets", default="512,8192", help="max_num_batched_tokens values to compare")
    ap.add_argument("--steer", default="both", choices=("both", "on", "off"),
                    help="attention backend steered (ops/sdpa.py), left to torch, or both")
    ap.add_argument("--profile-first", default=None, metavar="FILE",
                    help="write the functions that took the first timed request's time (cProfile) to FILE")
    ap.add_argument("--warm-up", action="store_true", help="build the engines with their start-up warm-up")
    ap.add_argument("--graphs", default="off", choices=("off", "on", "both"),
                    help="CUDA graphs (every prefill token bucket captured before timing), off, or both")
    ap.add_argument("--overlap", default="on", choices=("off", "on", "both"),
                    help="overlap scheduling (the engine's default on CUDA), off, or both")
    ap.add_argument("--decoding", type=int, default=0,
                    help="sequences decoding while the prompts arrive (their step runs with each prefill)")
    ap.add_argument("--out", default="benchmarks/results/engine_prefill.json")
    ap.add_argument("--set", action="append", default=[], metavar="MODULE.NAME=VALUE",
                    help="set a constant of qwen3next.ops.MODULE (an int), e.g. kernels.FUSED_QK_ROPE=0")
    args = ap.parse_args()
    import importlib
    for item in args.set:
        name, value = item.split("=")
        module, attr = name.rsplit(".", 1)
        setattr(importlib.import_module(f"qwen3next.ops.{module}"), attr, int(value))
    cfg = preset("qwen3-next-80b-a3b")
    m = bench.random_gpu_model(cfg, args.layers)
    lengths = [int(x) for x in args.lengths.split(",")]
    budgets = [int(x) for x in args.budgets.split(",")]
    fwd = {T: bench.time_prefill(m, T)[0] * 1e3 for T in sorted({min(lengths), max(lengths), 4096})}
    print(f"{torch.cuda.get_device_name()}, {args.layers} layers; model forward (warm): "
          + ", ".join(f"{T}: {ms:.1f} ms" for T, ms in fwd.items()), flush=True)
    rows, stats = [], []
    offset = 0
    steers = {"both": (False, "auto"), "on": ("auto",), "off": (False,)}[args.steer]
    graph_settings = {"both": (False, True), "on": (True,), "off": (False,)}[args.graphs]
    overlaps = {"both": (False, True), "on": (True,), "off": (False,)}[args.overlap]
    settings = [(st, b, g, ov) for st in steers for b in budgets for g in graph_settings for ov in overlaps]
    for steer, budget, graphs, overlap in settings:
        sdpa.STEER["enabled"] = steer
        eng = LLMEngine(m, None, max_num_seqs=args.decoding + 4, max_model_len=max(lengths) + 4096,
                        cuda_graphs=graphs, warm_up=args.warm_up, max_num_batched_tokens=budget, overlap=overlap)
        decoders = start_decoding(eng, args.decoding, cfg.vocab_size)
        pg = eng.runner.prefill_graphs
        if pg is not None:
            torch.cuda.synchronize()
            t, held = time.perf_counter(), torch.cuda.memory_reserved()
            for size in pg.sizes:
                pg.prepare(size)
            capture = {"seconds": time.perf_counter() - t, "reserved_gib": (torch.cuda.memory_reserved() - held) / 2**30,
                       "buckets": pg.as_dict()["buckets_captured"]}
            print(f"prefill graphs: buckets {pg.sizes} captured in {capture['seconds']:.1f} s, "
                  f"{capture['reserved_gib']:.2f} GiB more reserved ({capture['buckets']})", flush=True)
        ttft(eng, 1000 + offset, cfg.vocab_size, 0)          # the kernels' first use, not timed
        for j, n in enumerate(lengths):
            offset += 7                                      # a length no earlier setting used
            if args.profile_first:
                prof, compiled = cProfile.Profile(), _log_compiles()
                first = prof.runcall(ttft, eng, n + offset, cfg.vocab_size, n)
                _log_compiles(stop=True)
                with open(args.profile_first, "a") as f:
                    f.write(f"== steered={steer is not False} budget {budget} graphs={graphs}, {n + offset} tokens: "
                            f"first TTFT {first * 1e3:.1f} ms; {len(compiled)} Triton compiles, "
                            f"{sum(c[1] for c in compiled):.2f} s\n")
                    for name, sec, spec in compiled:
                        f.write(f"   compile {sec:6.3f} s  {name}  {spec}\n")
                    st = pstats.Stats(prof, stream=f).sort_stats("cumulative")
                    st.print_stats("qwen3next|fla/ops|torch/nn/functional", 25)
            else:
                first = ttft(eng, n + offset, cfg.vocab_size, n)
            again = ttft(eng, n + offset, cfg.vocab_size, n + 1)     # the same length once more
            ref = min(fwd, key=lambda T: abs(T - n))
            row = {"steered": steer is not False, "budget": budget, "graphs": graphs, "overlap": overlap,
                   "decoding": args.decoding,
                   "tokens": n + offset,
                   "ttft_first_ms": first * 1e3, "ttft_again_ms": again * 1e3,
                   "forward_ms": fwd[ref], "forward_tokens": ref}
            rows.append(row)
            print(f"steered={row['steered']!s:5} budget {budget:5} graphs={graphs!s:5} overlap={overlap!s:5} "
                  f"decoding {args.decoding:2} "
                  f"{n + offset:5} tokens: TTFT "
                  f"{first * 1e3:8.1f} ms first, {again * 1e3:8.1f} ms again  (forward of {ref}: "
                  f"{fwd[ref]:.1f} ms)", flush=True)
        stats.append({"steered": steer is not False, "budget": budget, "graphs": graphs, "overlap": overlap,
                      "cuda_graphs": eng.runner.graph_stats(), "capture": capture if pg is not None else None})
        print(f"  graph stats: {stats[-1]['cuda_graphs']}", flush=True)
        for rid in decoders:
            eng.abort(rid)
        del eng
        torch.cuda.empty_cache()
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name(),
                   "layers": args.layers, "set": args.set, "decoding": args.decoding, "forward_ms": fwd,
                   "rows": rows, "settings": stats}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
