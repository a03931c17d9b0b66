"""Training efficiency of the Qwen3-Next design choices at small scale: same data, same tokens, five models.

    a  hybrid-moe            Qwen3-Next in small: 3:1 Gated DeltaNet : gated attention, sparse MoE (top-k of E
                             routed experts + a shared expert), zero-centred norms, attention output gate.
    b  dense-same-active     dense Qwen3 (softmax attention in every layer, SwiGLU MLP, plain norms, no gate,
                             full RoPE) with the SAME ACTIVE non-embedding parameters per token as (a): its MLP
                             width is solved so that the whole model's active count matches (a)'s.
    c  dense-same-flops      a dense Qwen3 with the same total training FLOPs as (a). With one token budget for all
                             runs that means the same FLOPs per token, counted by the trainer's own formula
                             (qwen3next.train.metrics.flops_per_token):
                                 6 x active params + attention (6 * heads * head_dim * seq_len per softmax layer)
                                 + Gated DeltaNet (3 * value_heads * (6 dk dv + 4 * 64 * (dk + dv)) per GDN layer).
                             At this size and seq_len that dense model comes out within a few per cent of (b) (the
                             hybrid's delta-rule and router terms roughly cancel the dense model's extra attention
                             terms), i.e. (c) would be (b) again. The script detects this (solved MLP widths
                             within 10%) and then makes (c) `dense-same-total`: a dense model with the same TOTAL
                             parameters as (a) — the other honest baseline, which spends ~2-3x (a)'s FLOPs per
                             token. Which definition was used is written in every result ("definition").
    d  hybrid-all-attention  (a) with gated softmax attention in every layer (no Gated DeltaNet).
    e  hybrid-no-gate        (a) without the sigmoid output gate of its attention layers (attn_output_gate=false).

Every run uses the project's trainer (qwen3next.train.Trainer) unchanged, with the same tokenizer, seq_len, batch,
token budget, LR schedule shape (linear warmup over 10% of the steps, cosine to 0.1x), peak LR, AdamW settings and
seed. The MTP head is off everywhere (dense Qwen3 has none; the comparison is of the backbones) and the loss is the
next-token LM loss (+ the 0.001 load-balancing term in the MoE models). Held-out loss is measured before training
and at ~8 points; each point carries the tokens seen, the cumulative training FLOPs (tokens x FLOPs per token) and
the cumulative training wall time (the trainer's own per-step timings summed; model build and evaluation excluded).
The trainer writes no checkpoints here (the benchmark keeps only the numbers).

Data: the default model's corpus, `qwen3next data default --out data/default` (3.05M training tokens, 25k held out).

Usage (one H100: ~5 min for all five runs, estimated; see docs/training_efficiency.md):
    python benchmarks/train_efficiency.py                       # all runs -> benchmarks/results/train_efficiency/
    python benchmarks/train_efficiency.py --only a,b --out DIR  # some runs (split across GPU calls)
    python benchmarks/train_efficiency.py --report              # merge -> PNG + JSON + markdown table
    python benchmarks/train_efficiency.py --plan                # the five configs and their sizes, no training
    python benchmarks/train_efficiency.py --smoke               # tiny end-to-end run on CPU (< 1 min)
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import glob
import json
import math
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass

import numpy as np
import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
from qwen3next.checkpoint import build_model  # noqa: E402
from qwen3next.config import FULL, ModelConfig  # noqa: E402
from qwen3next.train.config import from_dict, validate  # noqa: E402
from qwen3next.train.data import write_token_file  # noqa: E402
from qwen3next.train.metrics import active_params, flops_per_token  # noqa: E402

DEFAULT_OUT = os.path.join("benchmarks", "results", "train_efficiency")
DEFAULT_JSON = os.path.join("benchmarks", "results", "train_efficiency.json")
DEFAULT_PNG = os.path.join("docs", "training_efficiency.png")
NAMES = {"a": "hybrid-moe", "b": "dense-same-active", "c": "dense-same-flops", "d": "hybrid-all-attention",
         "e": "hybrid-no-gate"}
SAME_WIDTH = 0.10   # (c) counts as "the same as (b)" when the two solved MLP widths differ by less than this


@dataclass
class Scale:
    """Everything shared by the five runs: the hybrid's shape (the others derive from it) and the training setup."""
    hybrid: dict
    seq_len: int
    micro_batch: int
    steps: int
    evals: int            # held-out evaluations during the run (plus one before and one at the end)
    eval_batches: int
    lr: float
    width_multiple: int   # solved dense MLP widths are rounded to a multiple of this

    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.micro_batch


# The default model's shape (configs/default-model.toml) with the 80B model's expert width ratio (moe and shared
# expert intermediate = hidden / 4) and no MTP head. 80 steps x 65,536 tokens = 5.2M tokens (1.7 epochs).
FULL_SCALE = Scale(
    hybrid=dict(model_type="qwen3_next", vocab_size=8192, hidden_size=256, num_hidden_layers=8,
                num_attention_heads=4, num_key_value_heads=2, head_dim=64, partial_rotary_factor=0.25,
                rope_theta=10000.0, max_position_embeddings=4096, linear_num_key_heads=2, linear_num_value_heads=4,
                linear_key_head_dim=64, linear_value_head_dim=64, num_experts=32, num_experts_per_tok=4,
                moe_intermediate_size=64, shared_expert_intermediate_size=64, norm_topk_prob=True,
                num_nextn_predict_layers=0, tie_word_embeddings=True, router_aux_loss_coef=0.001),
    seq_len=512, micro_batch=128, steps=80, evals=8, eval_batches=1, lr=2e-3, width_multiple=8)

# A few-second CPU version with the same code paths (synthetic learnable data, vocab 64).
SMOKE_SCALE = Scale(
    hybrid=dict(model_type="qwen3_next", vocab_size=64, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                num_key_value_heads=1, head_dim=16, partial_rotary_factor=0.25, rope_theta=10000.0,
                max_position_embeddings=256, linear_num_key_heads=1, linear_num_value_heads=2,
                linear_key_head_dim=8, linear_value_head_dim=8, num_experts=8, num_experts_per_tok=2,
                moe_intermediate_size=8, shared_expert_intermediate_size=8, norm_topk_prob=True,
                num_nextn_predict_layers=0, tie_word_embeddings=True, router_aux_loss_coef=0.001),
    seq_len=32, micro_batch=4, steps=6, evals=2, eval_batches=1, lr=1e-2, width_multiple=4)


# ---- the five configurations -----------------------------------------------------------------------------------------
def measure(fields: dict, seq_len: int) -> dict:
    """Parameter counts and FLOPs per token of a config, from a model built on `meta` (no memory, no init)."""
    model = build_model(ModelConfig(**fields), device="meta")
    cfg = model.config
    head = cfg.vocab_size * cfg.hidden_size          # one embedding / lm_head matrix
    active = active_params(model)                   # counts the lm_head once, the embedding lookup not at all
    total = model.num_parameters()
    tables = 1 if cfg.tie_word_embeddings else 2
    return {"total_params": total, "total_non_embedding": total - tables * head, "active_params": active,
            "active_non_embedding": active - head, "flops_per_token": flops_per_token(model, seq_len)}


def dense_fields(hybrid: dict, intermediate: int) -> dict:
    """Dense Qwen3 on the hybrid's trunk (vocab, hidden, layers, attention heads): model_type qwen3 means softmax
    attention everywhere, SwiGLU MLP, plain RMSNorm, no output gate, no MoE; RoPE on every dimension as in Qwen3."""
    keep = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "head_dim", "rope_theta", "max_position_embeddings", "tie_word_embeddings")
    return {"model_type": "qwen3", **{k: hybrid[k] for k in keep}, "partial_rotary_factor": 1.0,
            "intermediate_size": intermediate}


def solve_width(hybrid: dict, key: str, target: float, seq_len: int, multiple: int) -> int:
    """The dense MLP width whose `key` (a measure() field, linear in the width) is nearest `target`."""
    lo, hi = 8 * multiple, 64 * multiple
    f_lo, f_hi = (measure(dense_fields(hybrid, w), seq_len)[key] for w in (lo, hi))
    exact = lo + (target - f_lo) * (hi - lo) / (f_hi - f_lo)
    candidates = {max(multiple, multiple * math.floor(exact / multiple)), multiple * math.ceil(exact / multiple)}
    return min(candidates, key=lambda w: abs(measure(dense_fields(hybrid, w), seq_len)[key] - target))


def plan(scale: Scale) -> dict[str, dict]:
    """letter -> {name, definition, fields, sizes}: the five models, with (b) and (c) solved against (a)."""
    a = dict(scale.hybrid)
    ref = measure(a, scale.seq_len)
    width_b = solve_width(a, "active_non_embedding", ref["active_non_embedding"], scale.seq_len, scale.width_multiple)
    width_flops = solve_width(a, "flops_per_token", ref["flops_per_token"], scale.seq_len, scale.width_multiple)
    if abs(width_flops - width_b) / width_b < SAME_WIDTH:
        width_c = solve_width(a, "total_params", ref["total_params"], scale.seq_len, scale.width_multiple)
        name_c, def_c = "dense-same-total", (
            f"same total parameters as (a) (a FLOPs-matched dense model would have MLP width {width_flops}, within "
            f"{SAME_WIDTH:.0%} of (b)'s {width_b}: the same model as (b))")
    else:
        width_c, name_c, def_c = width_flops, NAMES["c"], "same FLOPs per token (= same total training FLOPs) as (a)"
    layers = scale.hybrid["num_hidden_layers"]
    variants = {
        "a": (NAMES["a"], "reference: hybrid Gated DeltaNet / gated attention 3:1, sparse MoE + shared expert", a),
        "b": (NAMES["b"], "same active non-embedding parameters per token as (a)", dense_fields(a, width_b)),
        "c": (name_c, def_c, dense_fields(a, width_c)),
        "d": (NAMES["d"], "(a) with gated softmax attention in every layer", {**a, "layer_types": [FULL] * layers}),
        "e": (NAMES["e"], "(a) without the attention output gate", {**a, "attn_output_gate": False}),
    }
    out = {}
    for letter, (name, definition, fields) in variants.items():
        out[letter] = {"letter": letter, "name": name, "definition": definition, "fields": fields,
                       **measure(fields, scale.seq_len)}
    out["c"]["c_rule"] = "same_total_params" if name_c == "dense-same-total" else "same_flops"
    return out


# ---- one run ---------------------------------------------------------------------------------------------------------
def train_config(fields: dict, scale: Scale, data: dict, out_dir: str, steps: int, seed: int, device: str):
    """The TrainConfig of one run, written as the dict a TOML file would hold (kept in the result for the record)."""
    raw = {
        "model": {**({"tokenizer": data["tokenizer"]} if data.get("tokenizer") else {}), **fields},
        "data": {"train": data["train"], "eval": data["eval"], "seq_len": scale.seq_len,
                 "micro_batch": scale.micro_batch, "grad_accum": 1},
        "optim": {"lr": scale.lr, "betas": [0.9, 0.95], "weight_decay": 0.1, "warmup": max(1, steps // 10),
                  "schedule": "cosine", "min_lr_ratio": 0.1, "clip": 1.0},
        "loss": {"mtp_weight": 0.0, "balance": "global"},
        "run": {"out_dir": out_dir, "steps": steps, "eval_every": max(1, steps // scale.evals),
                "eval_batches": scale.eval_batches, "save_every": 0, "log_every": 1, "seed": seed,
                "dtype": "auto", "device": device, "progress": True, "plot": False},
    }
    cfg = from_dict(json.loads(json.dumps(raw)), source=f"train_efficiency:{fields.get('model_type')}")
    validate(cfg)
    return cfg, raw


def curve(records: list[dict], initial: dict, tokens_per_step: int, fpt: float) -> tuple[list[dict], float]:
    """Held-out points (tokens, FLOPs, training seconds) from the trainer's records (one per step: log_every = 1).
    Training seconds at step s = sum of the per-step times the trainer measured (tokens per step / tokens/s)."""
    seconds, points = 0.0, [{"step": 0, "tokens": 0, "flops": 0.0, "train_s": 0.0, "elapsed_s": 0.0,
                             "eval_loss": initial["eval_loss"]}]
    for r in records:
        if r.get("tokens_per_s"):
            seconds += tokens_per_step / r["tokens_per_s"]
        if r.get("eval_loss") is not None:
            points.append({"step": r["step"], "tokens": r["step"] * tokens_per_step,
                           "flops": r["step"] * tokens_per_step * fpt, "train_s": seconds,
                           "elapsed_s": r.get("elapsed_s"), "eval_loss": r["eval_loss"]})
    return points, seconds


def run_variant(spec: dict, scale: Scale, data: dict, steps: int, seed: int, device: str, out: str) -> dict:
    """Train one variant with the project's Trainer; write and return its result. A failure is recorded, not raised."""
    from qwen3next.train.trainer import Trainer
    result = {"variant": spec["name"], **{k: v for k, v in spec.items() if k != "name"}, "steps": steps,
              "tokens_per_step": scale.tokens_per_step, "tokens": steps * scale.tokens_per_step, "seed": seed,
              "started": datetime.datetime.now().isoformat(timespec="seconds"), "error": None}
    print(f"\n[{spec['letter']}] {spec['name']}: {spec['total_params']:,} params, "
          f"{spec['active_non_embedding']:,} active non-embedding, {spec['flops_per_token'] / 1e6:.1f} MFLOP/token, "
          f"{steps} steps x {scale.tokens_per_step:,} tokens", flush=True)
    t0 = time.perf_counter()
    trainer = None
    with tempfile.TemporaryDirectory(prefix=f"train_eff_{spec['letter']}_") as run_dir:
        try:
            cfg, raw = train_config(spec["fields"], scale, data, run_dir, steps, seed, device)
            result["train_config"] = raw
            trainer = Trainer(cfg)
            trainer.save = lambda: None        # no checkpoints: the benchmark keeps only the numbers
            result.update(device=_device_name(trainer.device), amp_dtype=str(trainer.amp_dtype),
                          trainer_flops_per_token=trainer.flops_per_token, build_s=time.perf_counter() - t0)
            initial = trainer.evaluate()
            records = trainer.train()
            points, train_s = curve(records, initial, scale.tokens_per_step, trainer.flops_per_token)
            rates = [r["tokens_per_s"] for r in records if r.get("tokens_per_s")]
            result.update(evals=points, train_s=train_s, final_eval_loss=points[-1]["eval_loss"],
                          tokens_per_s=result["tokens"] / train_s, median_step_tokens_per_s=float(np.median(rates)),
                          total_flops=result["tokens"] * trainer.flops_per_token,
                          log=[{k: r.get(k) for k in ("step", "loss", "lm_loss", "aux_loss", "lr", "grad_norm",
                                                       "tokens_per_s", "mfu", "expert_load_max_mean")}
                               for r in records])
        except Exception as e:  # noqa: BLE001 - one failing run must not stop the others
            result["error"] = f"{type(e).__name__}: {e}"
            result["traceback"] = traceback.format_exc()
            print(f"[{spec['letter']}] FAILED: {result['error']}", flush=True)
        finally:
            if trainer is not None:
                trainer.close()
            del trainer
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    result["wall_s"] = time.perf_counter() - t0
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"{spec['letter']}-{spec['name']}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    if result["error"] is None:
        print(f"[{spec['letter']}] done: held-out loss {result['final_eval_loss']:.3f}, "
              f"training {result['train_s']:.1f} s "
              f"({result['tokens_per_s']:,.0f} tokens/s), wall {result['wall_s']:.1f} s -> {path}", flush=True)
    return result


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


# ---- data ------------------------------------------------------------------------------------------------------------
def default_data(folder: str) -> dict:
    """The files `qwen3next data default --out FOLDER` writes."""
    data = {"train": os.path.join(folder, "tokens", "train.bin"), "eval": os.path.join(folder, "tokens", "eval.bin"),
            "tokenizer": os.path.join(folder, "tokenizer")}
    for key in ("train", "eval"):
        if not os.path.exists(data[key]):
            raise SystemExit(f"{data[key]} not found: run `qwen3next data default --out {folder}` first "
                             "(~25 s on 2 CPU cores), or pass --data")
    return data


def smoke_data(folder: str, vocab: int = 64, seed: int = 0) -> dict:
    """A learnable synthetic stream (random sequences of 12 fixed 'words'), so the smoke losses fall."""
    rng = np.random.default_rng(seed)
    words = [rng.integers(0, vocab, rng.integers(3, 7)) for _ in range(12)]
    stream = np.concatenate([words[i] for i in rng.integers(0, 12, 6000)])
    train, held = os.path.join(folder, "train.bin"), os.path.join(folder, "eval.bin")
    write_token_file(train, stream[:-2000], vocab_size=vocab)
    write_token_file(held, stream[-2000:], vocab_size=vocab)
    return {"train": train, "eval": held, "tokenizer": None}


# ---- report ----------------------------------------------------------------------------------------------------------
def load_results(folder: str) -> list[dict]:
    results = []
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        with open(path, encoding="utf-8") as f:
            r = json.load(f)
        if "letter" in r and "variant" in r:
            results.append(r)
    return sorted(results, key=lambda r: r["letter"])


def si(x: float) -> str:
    """17,267,632 -> '17.27M': three or four significant digits with a k / M / G suffix."""
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.{2 if abs(x) < 100 * div else 1}f}{suffix}"
    return f"{x:g}"


def markdown_table(results: list[dict]) -> str:
    rows = ["| variant | total params | active params (non-emb.) | FLOPs/token | tokens | final held-out loss | "
            "training wall time | tokens/s |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        ok = r.get("error") is None
        loss = f"{r['final_eval_loss']:.3f}" if ok else f"failed: {r['error'][:60]}"
        rows.append(f"| ({r['letter']}) {r['variant']} | {si(r['total_params'])} | {si(r['active_non_embedding'])} | "
                    f"{si(r['flops_per_token'])} | {si(r['tokens'])} | {loss} | "
                    + (f"{r['train_s']:.1f} s | {r['tokens_per_s']:,.0f} |" if ok else "– | – |"))
    return "\n".join(rows)


def plot(results: list[dict], png: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_f, ax_t) = plt.subplots(1, 2, figsize=(13, 5))
    for r in results:
        if r.get("error") is not None:
            continue
        pts = r["evals"]
        label = f"({r['letter']}) {r['variant']}"
        after = [p for p in pts if p["flops"] > 0]   # log axis: the point before training sits at 0 FLOPs
        line, = ax_f.plot([p["flops"] for p in after], [p["eval_loss"] for p in after], marker="o", ms=3,
                          label=label)
        ax_t.plot([p["train_s"] for p in pts], [p["eval_loss"] for p in pts], marker="o", ms=3, label=label,
                  color=line.get_color())
    ax_f.set_xscale("log")
    ax_f.set_xlabel("training FLOPs (analytic: tokens x FLOPs/token)")
    ax_t.set_xlabel("training wall time, s (evaluation excluded)")
    for ax in (ax_f, ax_t):
        ax.set_ylabel("held-out loss (nats/token)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png)), exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


def report(folder: str, png: str, merged: str) -> dict:
    results = load_results(folder)
    if not results:
        raise SystemExit(f"no run results (*.json) in {folder}: run the benchmark first")
    ok = [r for r in results if r.get("error") is None]
    ref = ok[0] if ok else results[0]
    devices = sorted({r.get("device", "?") for r in results})
    title = (f"held-out loss, {si(ref['tokens'])} tokens per run, seq {ref['train_config']['data']['seq_len']}"
             f", {ref['tokens_per_step']:,} tokens/step — {', '.join(devices)}") if "train_config" in ref else \
        "held-out loss"
    if ok:
        plot(results, png, title)
    table = markdown_table(results)
    out = {"date": datetime.date.today().isoformat(), "devices": devices, "torch": torch.__version__,
           "table": table, "runs": results}
    os.makedirs(os.path.dirname(os.path.abspath(merged)), exist_ok=True)
    with open(merged, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1)
    print(table)
    for r in results:
        if r["letter"] == "c":
            print(f"\n(c) = {r['variant']}: {r['definition']}")
    print(f"\nwrote {png if ok else '(no plot: every run failed)'} and {merged}")
    return out


# ---- command line ----------------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="a,b,c,d,e",
                   help="comma-separated runs to train, from a,b,c,d,e (default: all five, in that order)")
    p.add_argument("--tokens", type=int, default=None,
                   help="training tokens per run (rounded to whole steps of seq_len x micro_batch); "
                        "default 80 steps = 5,242,880 tokens (--smoke: 6 steps)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (overrides --tokens)")
    p.add_argument("--micro-batch", type=int, default=None,
                   help="sequences per step, shared by all runs (default 128; --smoke: 4); fewer = less memory, "
                        "but the launch-bound GPU step then processes fewer tokens per second")
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens per sequence (default 512; --smoke: 32); changes the attention FLOPs and so the "
                        "solved sizes of (b) and (c)")
    p.add_argument("--data", default=os.path.join("data", "default"),
                   help="folder written by `qwen3next data default` (tokens/ and tokenizer/); "
                        "default data/default. --smoke uses synthetic tokens instead")
    p.add_argument("--out", default=None,
                   help=f"folder of the per-run JSON files (written by runs, read by --report); default {DEFAULT_OUT}"
                        " (--smoke: a new temporary folder)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation and data order, shared by all runs")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="where to train (auto: CUDA when available); --smoke forces cpu")
    p.add_argument("--report", action="store_true",
                   help="train nothing: merge the JSON files in --out, write --png and --json, print the table")
    p.add_argument("--png", default=None, help=f"--report's plot (default {DEFAULT_PNG}; --smoke: in --out)")
    p.add_argument("--json", default=None, help=f"--report's merged JSON (default {DEFAULT_JSON}; --smoke: in --out)")
    p.add_argument("--plan", action="store_true", help="print the five configs and their sizes, train nothing")
    p.add_argument("--smoke", action="store_true",
                   help="tiny models on synthetic data on the CPU, all five runs and the report (< 1 min)")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = _parser().parse_args(argv)
    scale = SMOKE_SCALE if args.smoke else FULL_SCALE
    scale = dataclasses.replace(scale, micro_batch=args.micro_batch or scale.micro_batch,
                                seq_len=args.seq_len or scale.seq_len)
    if args.smoke:
        args.out = args.out or tempfile.mkdtemp(prefix="train_efficiency_smoke_")
        args.png = args.png or os.path.join(args.out, "training_efficiency.png")
        args.json = args.json or os.path.join(args.out, "train_efficiency.json")
        args.device = "cpu"
    out = args.out or DEFAULT_OUT
    if args.report:
        return report(out, args.png or DEFAULT_PNG, args.json or DEFAULT_JSON)
    variants = plan(scale)
    if args.plan:
        for v in variants.values():
            print(f"({v['letter']}) {v['name']}: {v['total_params']:,} params ({v['total_non_embedding']:,} "
                  f"non-embedding), {v['active_non_embedding']:,} active non-embedding, "
                  f"{v['flops_per_token'] / 1e6:.2f} MFLOP/token  -- {v['definition']}")
            print("    " + json.dumps({k: x for k, x in v["fields"].items() if k != "layer_types"}))
        return variants
    letters = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = sorted(set(letters) - set(NAMES))
    if bad:
        raise SystemExit(f"--only: unknown run(s) {bad}; choose from {','.join(NAMES)}")
    steps = args.steps or (max(1, round(args.tokens / scale.tokens_per_step)) if args.tokens else scale.steps)
    data = smoke_data(os.path.join(out, "smoke-data")) if args.smoke else default_data(args.data)
    started = time.perf_counter()
    results = {}
    for letter in letters:
        results[letter] = run_variant(variants[letter], scale, data, steps, args.seed, args.device, out)
        print(f"-- {time.perf_counter() - started:.0f} s since the first run started", flush=True)
    failed = [k for k, r in results.items() if r["error"]]
    print(f"\n{len(results) - len(failed)} of {len(results)} runs finished in {time.perf_counter() - started:.0f} s"
          + (f"; failed: {','.join(failed)}" if failed else "") + f"; results in {out}")
    if args.smoke:
        return report(out, args.png, args.json)
    return results


if __name__ == "__main__":
    main()
