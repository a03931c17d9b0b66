"""Training speed on one GPU: our trainer's step vs transformers' Qwen3NextForCausalLM, same config, same batch.

The model is a ~1.0B-parameter Qwen3-Next (hidden 1024, 16 layers in the 3:1 Gated DeltaNet : gated attention
pattern, 64 routed experts top-8 of width 256 + a shared expert of width 512, vocab 32,768, untied; no MTP head,
since transformers has none): 1.01B parameters, 276M active per token.

  ours          qwen3next.train.Trainer.train_step(): forward + LM loss + load-balancing loss + backward + clip +
                fused AdamW, bf16 autocast over fp32 master weights and optimizer state (the trainer as it is).
  transformers  transformers 5.17 Qwen3NextForCausalLM built by qwen3next.bench.hf_model (the repo's one
                ModelConfig -> Qwen3NextConfig conversion) in fp32 on the GPU with transformers' own random init,
                the same bf16 autocast, the same batches (the trainer's WindowSampler over the same token file),
                its built-in
                loss (LM cross-entropy + router_aux_loss_coef x its load-balancing loss), clip, fused AdamW with the
                same hyper-parameters. It uses fla's kernels when fla is importable (that is transformers' own
                choice); if that step fails (fla refuses its chunk backward on Hopper with Triton 3.4 - 3.7.0), the
                error is recorded and the step is retried on transformers' torch reference of the gated delta rule,
                then with its eager experts. The implementation that ran is recorded.

Each side: build, `--warmup` steps, `--steps` timed steps (CUDA events, synchronised; the median is reported),
one profiled step (the top kernels say which code paths ran), peak memory (torch.cuda.max_memory_allocated,
weights + gradients + optimizer state + activations). A side that runs out of memory is retried with half the
batch (recorded); one that fails otherwise records the error and the other side still runs.

MFU = tokens/s x FLOPs per token / peak; FLOPs per token from qwen3next.train.metrics.flops_per_token
(6 x active params + 6 * heads * head_dim * seq_len per attention layer + the Gated DeltaNet chunk term), the same
number for both sides; peak from metrics.peak_flops (989 TFLOP/s dense bf16 on an H100).

    python benchmarks/train_speed.py                      # one H100: ~2-4 min; -> benchmarks/results/train_speed.json
    python benchmarks/train_speed.py --smoke              # tiny config on the CPU, both sides (< 30 s)
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import inspect
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from unittest import mock

import numpy as np
import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
from qwen3next.bench import timed  # noqa: E402
from qwen3next.checkpoint import build_model  # noqa: E402
from qwen3next.config import ModelConfig  # noqa: E402
from qwen3next.train.config import from_dict, validate  # noqa: E402
from qwen3next.train.data import TokenFile, WindowSampler, write_token_file  # noqa: E402
from qwen3next.train.metrics import active_params, flops_per_token, peak_flops  # noqa: E402

DEFAULT_OUT = os.path.join("benchmarks", "results", "train_speed.json")
LR, BETAS, WEIGHT_DECAY, CLIP = 3e-4, (0.9, 0.95), 0.1, 1.0

CONFIG = dict(model_type="qwen3_next", vocab_size=32768, hidden_size=1024, num_hidden_layers=16,
              num_attention_heads=8, num_key_value_heads=2, head_dim=128, partial_rotary_factor=0.25,
              rope_theta=10_000_000.0, max_position_embeddings=8192, linear_num_key_heads=8,
              linear_num_value_heads=16, linear_key_head_dim=128, linear_value_head_dim=128, num_experts=64,
              num_experts_per_tok=8, moe_intermediate_size=256, shared_expert_intermediate_size=512,
              norm_topk_prob=True, num_nextn_predict_layers=0, tie_word_embeddings=False, router_aux_loss_coef=0.001,
              bos_token_id=None, eos_token_id=None)

SMOKE_CONFIG = dict(CONFIG, vocab_size=256, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, max_position_embeddings=512, linear_num_key_heads=2,
                    linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16, num_experts=8,
                    num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32)


# ---- shared pieces ---------------------------------------------------------------------------------------------------
def sizes(fields: dict, seq_len: int) -> dict:
    model = build_model(ModelConfig(**fields), device="meta")
    return {"total_params": model.num_parameters(), "active_params": active_params(model),
            "flops_per_token": flops_per_token(model, seq_len)}


def token_file(folder: str, vocab: int, n_tokens: int, seed: int = 0) -> str:
    """Uniformly random tokens: the speed of a step does not depend on what the text says."""
    path = os.path.join(folder, "train.bin")
    write_token_file(path, np.random.default_rng(seed).integers(0, vocab, n_tokens), vocab_size=vocab)
    return path


def top_ops(step, cuda: bool, n: int = 12) -> list[list]:
    """One profiled step: the ops (CPU) or kernels (GPU) that took the most time, [name, ms, calls]."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        step()
        if cuda:
            torch.cuda.synchronize()
    def self_us(e) -> float:   # torch >= 2.4 names it device time; older versions cuda time
        if not cuda:
            return e.self_cpu_time_total
        return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)

    events = sorted((e for e in prof.key_averages() if self_us(e) > 0), key=self_us, reverse=True)
    return [[e.key[:90], round(self_us(e) / 1e3, 3), e.count] for e in events[:n]]


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def measure(name: str, build, batch: int, setup: dict, fpt: float, device: torch.device) -> dict:
    """build(batch) -> (step, info, close). Time the step; halve the batch on OOM; record any other failure."""
    cuda = device.type == "cuda"
    result = {"name": name, "error": None, "oom_at_batch": []}
    while batch >= 1:
        step = close = None
        try:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
                result["start_memory_gb"] = torch.cuda.memory_allocated() / 2**30   # ~0: the other side is gone
            t0 = time.perf_counter()
            step, info, close = build(batch)
            result.update(info, batch=batch, build_s=time.perf_counter() - t0)
            times = timed(step, setup["warmup"], setup["steps"], cuda)
            tokens = batch * setup["seq_len"]
            median = statistics.median(times)
            peak = peak_flops(device, torch.bfloat16) if cuda else None
            result.update(tokens_per_step=tokens, step_s=times, step_s_median=median, tokens_per_s=tokens / median,
                          mfu=tokens / median * fpt / peak if peak else None,
                          peak_memory_gb=torch.cuda.max_memory_allocated() / 2**30 if cuda else None)
            result["top_ops"] = top_ops(step, cuda)
            return result
        except Exception as e:  # noqa: BLE001 - record and go on: the other side must still run
            if is_oom(e) and batch > 1:
                result["oom_at_batch"].append(batch)
                print(f"[{name}] out of memory at batch {batch}: retrying with {batch // 2}", flush=True)
                batch //= 2
                continue
            result["error"] = f"{type(e).__name__}: {str(e)[:2000]}"
            result["oom"] = is_oom(e)
            result["traceback"] = traceback.format_exc()[-4000:]
            return result
        finally:
            step = None                  # the step closure holds the model: drop it before the next attempt
            if close is not None:
                close()
            free_memory()
    return result


# ---- ours ------------------------------------------------------------------------------------------------------------
def build_ours(fields: dict, setup: dict, data: str, device: torch.device, run_dir: str):
    """The project's trainer on the config, its train_step as the step."""
    def build(batch: int):
        from qwen3next.train.trainer import Trainer
        raw = {"model": dict(fields),
               "data": {"train": data, "seq_len": setup["seq_len"], "micro_batch": batch, "grad_accum": 1},
               "optim": {"lr": LR, "betas": list(BETAS), "weight_decay": WEIGHT_DECAY, "warmup": 1, "clip": CLIP},
               "loss": {"mtp_weight": 0.0},
               "run": {"out_dir": os.path.join(run_dir, f"ours-b{batch}"), "steps": 1000, "save_every": 0,
                       "eval_every": 0, "device": device.type, "dtype": "auto", "progress": False, "plot": False}}
        cfg = from_dict(raw, source="train_speed")
        validate(cfg)
        trainer = Trainer(cfg)
        info = {"implementation": "qwen3next.train.Trainer.train_step", "amp_dtype": str(trainer.amp_dtype),
                "master_weights": str(next(trainer.lm.parameters()).dtype)}
        return trainer.train_step, info, trainer.close
    return build


# ---- transformers ----------------------------------------------------------------------------------------------------
def hf_peer(cfg: ModelConfig, device: torch.device):
    """transformers' model for our config, made by qwen3next.bench.hf_model (the repo's one ModelConfig ->
    Qwen3NextConfig conversion), with fp32 weights on `device`, in train mode. hf_model builds where bench.DEV
    says (bf16 on CUDA by default, for inference): we point DEV at our device and fp32 for the call."""
    from qwen3next import bench
    if hasattr(bench, "DEV"):
        with mock.patch.dict(bench.DEV, {"device": device.type, "dtype": torch.float32}):
            return bench.hf_model(cfg, cfg.num_hidden_layers).train()
    if device.type == "cuda":                       # an older bench.py: CUDA + bf16 only, so cast up
        return bench.hf_model(cfg, cfg.num_hidden_layers).float().train()
    raise RuntimeError("qwen3next.bench.hf_model has no device switch (bench.DEV): it can build on CUDA only")


def hf_gdn_module():
    import transformers.models.qwen3_next.modeling_qwen3_next as mq
    return mq


def hf_gdn_implementation() -> str:
    """Which function transformers' chunk_gated_delta_rule dispatches to: fla's kernel or its torch reference."""
    fn = hf_gdn_module().torch_chunk_gated_delta_rule
    try:
        impl = inspect.getclosurevars(fn).nonlocals.get("implementation", fn)
    except TypeError:
        impl = fn
    return f"{impl.__module__}.{impl.__qualname__}"


@contextlib.contextmanager
def hf_torch_gdn(enabled: bool):
    """Make transformers use its torch reference of the chunked gated delta rule (undone on exit)."""
    mq = hf_gdn_module()
    original = mq.torch_chunk_gated_delta_rule
    if enabled:
        mq.torch_chunk_gated_delta_rule = inspect.unwrap(original)
    try:
        yield
    finally:
        mq.torch_chunk_gated_delta_rule = original


def build_hf(cfg: ModelConfig, setup: dict, data: str, device: torch.device, fallbacks: dict):
    """transformers' step; `fallbacks` may ask for its torch gated delta rule and/or its eager experts."""
    cuda = device.type == "cuda"

    def build(batch: int):
        torch.manual_seed(0)                              # transformers' init draws from the global generator
        model = hf_peer(cfg, device)
        if fallbacks.get("eager_experts"):
            model.set_experts_implementation("eager")
        optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY,
                                      **({"fused": True} if cuda else {}))
        sampler = WindowSampler(TokenFile(data), setup["seq_len"], batch, 1, 0, 0, 1)
        autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext
        state = {"step": 0}
        gdn = hf_torch_gdn(fallbacks.get("torch_gdn", False))
        gdn.__enter__()

        def step():
            tokens = sampler.micro_batches(state["step"])[0].to(device, non_blocking=True)
            inputs = tokens[:, :-1]                       # the same T tokens our trainer feeds
            with autocast():
                out = model(input_ids=inputs, labels=inputs, output_router_logits=True, use_cache=False)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] += 1
            return out.loss.detach().float().cpu()        # one host sync per step, as our trainer has

        info = {"implementation": f"transformers {_version('transformers')} Qwen3NextForCausalLM",
                "gated_delta_rule": hf_gdn_implementation(),
                "experts_implementation": model.config._experts_implementation,
                "attn_implementation": model.config._attn_implementation,
                "causal_conv1d": _importable("causal_conv1d"), "fla": _importable("fla"),
                "master_weights": str(next(model.parameters()).dtype),
                "amp_dtype": "torch.bfloat16" if cuda else "None"}

        def close():
            gdn.__exit__(None, None, None)
            optimizer.state.clear()      # the optimizer state is the biggest thing the step closure keeps alive
        return step, info, close
    return build


def run_hf(cfg: ModelConfig, setup: dict, data: str, device: torch.device, batch: int, fpt: float) -> dict:
    """transformers as it comes; on a failure that is not OOM, retry with its torch gated delta rule (when it had
    picked fla), then also with its eager experts. Every failed attempt is kept in `failed_attempts`."""
    plans = [{}]
    if hf_gdn_implementation().startswith("fla"):
        plans.append({"torch_gdn": True})
    plans.append({**plans[-1], "eager_experts": True})
    attempts = []
    for i, fallbacks in enumerate(plans):
        result = measure("transformers", build_hf(cfg, setup, data, device, fallbacks), batch, setup, fpt, device)
        result.update(fallbacks=fallbacks, failed_attempts=list(attempts))
        if result["error"] is None or result.get("oom") or i == len(plans) - 1:   # a fallback needs no less memory
            return result
        attempts.append({"fallbacks": fallbacks, "error": result["error"]})
        print(f"[transformers] failed with {fallbacks or 'its defaults'}: {result['error'][:300]}", flush=True)
    return result


def _importable(name: str) -> bool:
    try:
        __import__(name)
        return True
    except Exception:  # noqa: BLE001
        return False


def _version(name: str) -> str:
    try:
        return __import__(name).__version__
    except Exception:  # noqa: BLE001
        return "?"


# ---- report ----------------------------------------------------------------------------------------------------------
def markdown(res: dict) -> str:
    ours, hf = res["ours"], res.get("transformers") or {"error": "not run"}

    def cell(r, key, fmt):
        if r.get("error") or r.get(key) is None:
            return "–"
        return fmt(r[key])

    rows = [("tokens/s", "tokens_per_s", lambda v: f"{v:,.0f}"),
            ("step time (median)", "step_s_median", lambda v: f"{v * 1e3:,.0f} ms"),
            ("MFU", "mfu", lambda v: f"{v:.1%}"),
            ("peak memory", "peak_memory_gb", lambda v: f"{v:.1f} GiB"),
            ("batch x seq_len", "batch", lambda v: f"{v} x {res['setup']['seq_len']}")]
    out = ["| measurement | ours (qwen3next trainer) | transformers |", "|---|---|---|"]
    for label, key, fmt in rows:
        out.append(f"| {label} | {cell(ours, key, fmt)} | {cell(hf, key, fmt)} |")
    if not ours.get("error") and not hf.get("error"):
        out.append(f"| ours / transformers, tokens/s | {ours['tokens_per_s'] / hf['tokens_per_s']:.2f}x | |")
    hf_paths = (f"gated delta rule: {hf.get('gated_delta_rule', '?')}; "
                f"experts: {hf.get('experts_implementation', '?')}; attention: {hf.get('attn_implementation', '?')}")
    out.append(f"| code paths | see top_ops in the JSON | {hf_paths} |")
    for name, r in (("ours", ours), ("transformers", hf)):
        if r.get("error"):
            out.append(f"\n{name} failed: {r['error'][:300]}")
        if r.get("oom_at_batch"):
            out.append(f"\n{name} ran out of memory at batch {r['oom_at_batch']}")
        for a in r.get("failed_attempts", []):
            out.append(f"\n{name} with {a['fallbacks'] or 'defaults'} failed: {a['error'][:300]}")
    return "\n".join(out)


def save(res: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(res, f, indent=1)


# ---- command line ----------------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 4096; --smoke 64)")
    p.add_argument("--batch", type=int, default=None,
                   help="sequences per step, the same for both sides (default 2; halved on OOM; --smoke 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps before timing (default 3; --smoke 1)")
    p.add_argument("--steps", type=int, default=None,
                   help="timed steps; the median is reported (default 10; --smoke 2)")
    p.add_argument("--out", default=None, help=f"JSON output (default {DEFAULT_OUT}; --smoke: a temporary file)")
    p.add_argument("--skip-transformers", action="store_true", help="time only our trainer")
    p.add_argument("--skip-ours", action="store_true", help="time only transformers")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="where to run (auto: CUDA when available); --smoke forces cpu")
    p.add_argument("--smoke", action="store_true", help="tiny config on the CPU, both sides, to prove the code paths")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = _parser().parse_args(argv)
    smoke = args.smoke
    fields = SMOKE_CONFIG if smoke else CONFIG
    setup = {"seq_len": args.seq_len or (64 if smoke else 4096), "batch": args.batch or 2,
             "warmup": args.warmup if args.warmup is not None else (1 if smoke else 3),
             "steps": args.steps or (2 if smoke else 10)}
    device = torch.device("cpu" if smoke or args.device == "cpu" or not torch.cuda.is_available() else "cuda")
    out = args.out or (os.path.join(tempfile.mkdtemp(prefix="train_speed_smoke_"), "train_speed.json") if smoke
                       else DEFAULT_OUT)
    cfg = ModelConfig(**fields)
    size = sizes(fields, setup["seq_len"])
    res = {"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name() if device.type == "cuda"
           else "cpu", "torch": torch.__version__, "transformers_version": _version("transformers"),
           "config": fields, **size, "setup": setup, "ours": None, "transformers": None}
    print(f"model: {size['total_params']:,} parameters, {size['active_params']:,} active per token, "
          f"{size['flops_per_token'] / 1e9:.2f} GFLOP/token at seq_len {setup['seq_len']}; batch {setup['batch']}; "
          f"{res['device']}", flush=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="train_speed_") as tmp:
        per_step = setup["batch"] * (setup["seq_len"] + 1)
        data = token_file(tmp, cfg.vocab_size, max(per_step * (setup["warmup"] + setup["steps"] + 2), 1 << 16))
        if not args.skip_ours:
            print("[ours] building and timing ...", flush=True)
            res["ours"] = measure("ours", build_ours(fields, setup, data, device, tmp), setup["batch"], setup,
                                  size["flops_per_token"], device)
            _say(res["ours"], time.perf_counter() - started)
            save(res, out)
        if not args.skip_transformers:
            print("[transformers] building and timing ...", flush=True)
            res["transformers"] = run_hf(cfg, setup, data, device, setup["batch"], size["flops_per_token"])
            _say(res["transformers"], time.perf_counter() - started)
    res["wall_s"] = time.perf_counter() - started
    res["ours"] = res["ours"] or {"error": "skipped"}
    res["transformers"] = res["transformers"] or {"error": "skipped"}
    res["table"] = markdown(res)
    save(res, out)
    print(res["table"])
    print(f"\nwrote {out} ({res['wall_s']:.0f} s)")
    return res


def _say(r: dict, elapsed: float) -> None:
    if r.get("error"):
        print(f"[{r['name']}] failed: {r['error'][:500]}  ({elapsed:.0f} s)", flush=True)
    else:
        print(f"[{r['name']}] {r['tokens_per_s']:,.0f} tokens/s, {r['step_s_median'] * 1e3:,.0f} ms/step at batch "
              f"{r['batch']}" + (f", MFU {r['mfu']:.1%}, peak {r['peak_memory_gb']:.1f} GiB" if r.get("mfu") else "")
              + f"  ({elapsed:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
