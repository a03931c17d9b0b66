"""The training loop: micro-batches -> LM + MTP + load-balancing losses -> AdamW step; eval, logs, checkpoints.

One process on CPU or one GPU; one process per GPU under torchrun (FSDP2, see distributed.py). bf16 autocast on
CUDA with fp32 master weights (fp32 on CPU by default). A run directory holds metrics.jsonl, curves.png and
step_XXXXXX/ checkpoints with a `latest` pointer; `run.resume = true` continues from the latest and reproduces the
uninterrupted run exactly (bit for bit on CPU in fp32): the data order is a function of the step, the schedule is a
function of the step, and the optimizer state and RNG states are restored.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import random
import time

import numpy as np
import torch
from torch import nn

from ..checkpoint import build_model, load_model, random_model
from ..config import PRESETS, ModelConfig, preset
from ..model.qwen3_next import CausalLM
from . import distributed as dist_utils
from .checkpointing import capture_rng, latest_checkpoint, load_trainer_state, restore_rng, save_checkpoint
from .config import ModelSection, TrainConfig
from .data import TokenFile, WindowSampler, eval_windows, read_windows
from .losses import (BalanceCounter, all_reduce_sum, expert_counts, expert_load, lm_loss, load_balancing_loss, mtp_accuracy,
                     mtp_loss, router_entropy)
from .metrics import MetricsLog, flops_per_token, peak_flops, plot_curves
from .optim import build_optimizer, lr_at, set_lr


class TrainingModel(nn.Module):
    """One micro-batch's forward: the main model and the MTP head in one call, so that under FSDP2 one root unit
    covers everything the MTP head shares with the model (embeddings, lm_head)."""

    def __init__(self, lm: CausalLM, use_mtp: bool):
        super().__init__()
        self.lm = lm
        self.use_mtp = use_mtp and lm.mtp is not None

    def forward(self, inputs: torch.Tensor, labels: torch.Tensor, routing_only: bool = False):
        """-> (logits [B, T, V], MTP logits [B, T, V] predicting t_{p+2} or None, router logits per MoE layer)."""
        keep = inputs.new_zeros(0) if routing_only else None   # routing only: skip the vocabulary projection
        out = self.lm(inputs, output_router_logits=True, logits_to_keep=keep)
        routers = list(out.router_logits or [])
        mtp_logits = None
        if self.use_mtp:   # at p: h_p and t_{p+1} = labels[p]
            mtp_logits, _, mtp_routers = self.lm.mtp_forward(out.hidden_states, labels.clamp_min(0),
                                                             output_router_logits=True)
            routers += mtp_routers or []
        return out.logits, mtp_logits, routers


def checkpoint_layers(layers: list[nn.Module]) -> None:
    """Activation checkpointing per decoder layer: recompute its forward in backward instead of keeping its
    activations. Replaces the instance's forward, so parameter names (and checkpoints) are unchanged."""
    from torch.utils.checkpoint import checkpoint

    def run(fn, *args, **kwargs):
        return checkpoint(fn, *args, use_reentrant=False, **kwargs)

    for layer in layers:
        layer.forward = functools.partial(run, layer.forward)


def model_config(section: ModelSection, tokenizer) -> ModelConfig:
    """A new model's shape: a preset and/or inline fields; an inline model takes vocab and eos from the tokenizer."""
    fields = dict(section.fields)
    try:
        if section.source:
            return preset(section.source).replace(**fields)
        if tokenizer is not None:
            fields.setdefault("vocab_size", -(-tokenizer.vocab_size // 64) * 64)   # round up to a multiple of 64
            fields.setdefault("eos_token_id", tokenizer.eos_token_id)
            fields.setdefault("bos_token_id", tokenizer.token_to_id("<|endoftext|>"))
        return ModelConfig(**fields)
    except (TypeError, ValueError) as e:
        raise ValueError(f"[model]: {e}") from None


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        run, data = cfg.run, cfg.data
        # Compiled decode layers (ops/fused.py) serve inference; the trainer's eval and sampling stay eager so
        # that a training run never waits on the compiler. An explicit setting wins.
        os.environ.setdefault("QWEN3NEXT_COMPILE", "0")
        self.layout = dist_utils.setup(run.device)
        self.device = self.layout.device
        self.amp_dtype = {"auto": torch.bfloat16 if self.device.type == "cuda" else None, "bf16": torch.bfloat16,
                          "fp32": None}[run.dtype]
        random.seed(run.seed)
        np.random.seed(run.seed)
        torch.manual_seed(run.seed + self.layout.rank)
        self.out_dir = run.out_dir
        resume_dir = self._resume_dir()

        if not data.train:
            raise ValueError("data.train: give the token file made by `qwen3next data prepare` (…/train.bin)")
        self.train_data = TokenFile(data.train)
        self.eval_data = TokenFile(data.eval) if data.eval else None
        self.tokenizer = self._tokenizer()
        self.lm = self._model(resume_dir).to(self.device).train()
        self._check_vocab()
        mcfg = self.lm.config
        self.top_k = mcfg.num_experts_per_tok
        self.aux_coef = cfg.loss.aux_loss_coef if cfg.loss.aux_loss_coef is not None else mcfg.router_aux_loss_coef
        self.tokens_per_step = data.micro_batch * data.grad_accum * self.layout.world_size * data.seq_len
        self.flops_per_token = flops_per_token(self.lm, data.seq_len)
        self.peak_flops = peak_flops(self.device, self.amp_dtype or torch.float32)

        layers = list(self.lm.model.layers) + (list(self.lm.mtp.layers) if self.lm.mtp is not None else [])
        if run.activation_checkpointing:
            checkpoint_layers(layers)
        self.net = TrainingModel(self.lm, use_mtp=cfg.loss.mtp_weight > 0)
        if self.layout.distributed:
            dist_utils.shard(self.net, layers)
        self.optimizer = build_optimizer(self.net, cfg.optim, fused=self.device.type == "cuda")
        self.sampler = WindowSampler(self.train_data, data.seq_len, data.micro_batch, data.grad_accum, run.seed,
                                     self.layout.rank, self.layout.world_size)
        self.balance = BalanceCounter(cfg.loss.balance)
        self.step = 0
        self.metrics = MetricsLog(os.path.join(self.out_dir, "metrics.jsonl"), enabled=self.layout.is_main)
        if self.layout.is_main:
            os.makedirs(self.out_dir, exist_ok=True)
        if resume_dir:
            self._restore(resume_dir)

    # ---- setup ----------------------------------------------------------------------------------------------------
    def _resume_dir(self) -> str | None:
        found = latest_checkpoint(self.out_dir)
        if found and not self.cfg.run.resume:
            raise ValueError(f"run.out_dir {self.out_dir!r} already holds a run (latest: {os.path.basename(found)}); "
                             "pass run.resume=true to continue it, or choose another run.out_dir")
        return found if self.cfg.run.resume else None

    def _tokenizer(self):
        from ..tokenizer import load_tokenizer
        src = self.cfg.model.source
        path = self.cfg.model.tokenizer
        if path is None and src and os.path.isfile(os.path.join(src, "tokenizer.json")):
            path = src
        if path is None:
            path = self.train_data.meta.get("tokenizer", {}).get("path")
            if path is None:
                return None
        if not os.path.exists(path):
            raise FileNotFoundError(f"tokenizer {path!r} not found (set model.tokenizer to the tokenizer directory)")
        return load_tokenizer(path)

    def _model(self, resume_dir: str | None) -> CausalLM:
        section = self.cfg.model
        if resume_dir:
            return load_model(resume_dir)
        if section.source and section.source not in PRESETS:   # continue training a checkpoint
            if section.fields:
                raise ValueError(f"[model]: source {section.source!r} is a checkpoint, whose shape is fixed; remove "
                                 f"the inline fields {sorted(section.fields)}")
            return load_model(section.source)
        return random_model(model_config(section, self.tokenizer), seed=self.cfg.run.seed)

    def _check_vocab(self) -> None:
        V = self.lm.config.vocab_size
        for data in filter(None, (self.train_data, self.eval_data)):
            top = data.meta.get("max_id", -1)
            if top >= V:
                raise ValueError(f"{data.path}: token ids go up to {top}, but the model's vocab_size is {V}")

    # ---- one optimizer step ---------------------------------------------------------------------------------------
    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def train_step(self) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        lr = lr_at(self.step, cfg.run.steps, cfg.optim)
        set_lr(self.optimizer, lr)
        micro = [mb.to(self.device, non_blocking=True) for mb in self.sampler.micro_batches(self.step)]
        n = len(micro)
        self.balance.reset()
        moe = self.lm.config.num_experts > 0
        if moe and self.balance.scope == "global" and n > 1:
            self._count_routing(micro)
        sums: dict[str, torch.Tensor] = {}
        step_counts = None
        for i, tokens in enumerate(micro):
            inputs, labels = tokens[:, :-1], tokens[:, 1:]
            if self.layout.distributed:   # reduce-scatter gradients once, after the last micro-batch
                self.net.set_requires_gradient_sync(i == n - 1)
            with self._autocast():
                logits, mtp_logits, routers = self.net(inputs, labels)
            parts = {"lm_loss": lm_loss(logits, labels)}
            total = parts["lm_loss"]
            if mtp_logits is not None:
                parts["mtp_loss"] = mtp_loss(mtp_logits, labels)
                parts["mtp_accuracy"] = mtp_accuracy(mtp_logits, labels)
                total = total + cfg.loss.mtp_weight * parts["mtp_loss"]
            if routers:
                counts = expert_counts(routers, self.top_k)
                if self.balance.scope == "global" and n == 1:
                    self.balance.add(counts)
                parts["aux_loss"] = load_balancing_loss(routers, self.balance.fractions_for(counts))
                total = total + self.aux_coef * parts["aux_loss"]
                parts["router_entropy"] = router_entropy(routers)
                step_counts = counts if step_counts is None else step_counts + counts
            parts["loss"] = total
            (total / n).backward()
            for k, v in parts.items():   # stays on the device: one host copy per step, below
                sums[k] = sums.get(k, 0.0) + v.detach().float() / n
        grad_norm = torch.nn.utils.clip_grad_norm_(self.net.parameters(),
                                                   cfg.optim.clip if cfg.optim.clip > 0 else math.inf)
        if hasattr(grad_norm, "full_tensor"):   # a DTensor under FSDP
            grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.sampler.step = self.step
        sums["grad_norm"] = grad_norm.detach().float()
        if step_counts is not None:
            sums["expert_load_max_mean"] = expert_load(all_reduce_sum(step_counts))   # the step's global load
        names = sorted(sums)
        values = torch.stack([sums[k].reshape(()).to(self.device) for k in names]).cpu()
        return {"lr": torch.tensor(lr), **{k: v for k, v in zip(names, values)}}

    @torch.no_grad()
    def _count_routing(self, micro: list[torch.Tensor]) -> None:
        """Global-batch balance with grad_accum > 1: route every micro-batch of the step first (no gradient) so that
        each micro-batch's loss can use the expert fractions of the whole step."""
        for tokens in micro:
            with self._autocast():
                _, _, routers = self.net(tokens[:, :-1], tokens[:, 1:], routing_only=True)
            self.balance.add(expert_counts(routers, self.top_k))

    # ---- evaluation -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean LM (and MTP) loss over the same held-out windows every time: eval_batches micro-batches per rank."""
        if self.eval_data is None:
            return {}
        d, lay = self.cfg.data, self.layout
        starts = eval_windows(self.eval_data, d.seq_len, self.cfg.run.eval_batches * d.micro_batch * lay.world_size)
        mine = starts[lay.rank::lay.world_size]
        totals = torch.zeros(3, dtype=torch.float64)   # lm loss sum, mtp loss sum, batches
        for i in range(0, len(mine), d.micro_batch):
            tokens = read_windows(self.eval_data, mine[i:i + d.micro_batch], d.seq_len + 1).to(self.device)
            labels = tokens[:, 1:]
            with self._autocast():
                logits, mtp_logits, _ = self.net(tokens[:, :-1], labels)
            totals[0] += lm_loss(logits, labels).item()
            totals[1] += mtp_loss(mtp_logits, labels).item() if mtp_logits is not None else 0.0
            totals[2] += 1
        totals = dist_utils.all_reduce_mean(totals.to(self.device), lay).cpu()
        out = {"eval_loss": (totals[0] / totals[2]).item()}
        if self.net.use_mtp:
            out["eval_mtp_loss"] = (totals[1] / totals[2]).item()
        return out

    # ---- the loop -------------------------------------------------------------------------------------------------
    def train(self, until_step: int | None = None) -> list[dict]:
        """Train to run.steps (or stop after `until_step`, as if killed there). Returns the logged records."""
        from tqdm import tqdm
        run = self.cfg.run
        end = min(run.steps, until_step) if until_step is not None else run.steps
        bar = tqdm(total=run.steps, initial=self.step, desc="training", unit="step",
                   disable=not (run.progress and self.layout.is_main))
        records, window_time, window_steps, started = [], 0.0, 0, time.perf_counter()
        while self.step < end:
            t0 = time.perf_counter()
            sums = self.train_step()
            window_time += time.perf_counter() - t0
            window_steps += 1
            bar.update(1)
            last = self.step == run.steps
            record = {}
            if self.step % run.log_every == 0 or last:
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                record = self._record(sums, window_time, window_steps, time.perf_counter() - started)
                window_time, window_steps = 0.0, 0
                bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}")
            if self.eval_data is not None and ((run.eval_every and self.step % run.eval_every == 0) or last):
                record = {"step": self.step, **record, **self.evaluate()}
            if record:
                self.metrics.write(record)
                records.append(record)
            if (run.save_every and self.step % run.save_every == 0) or last:
                self.save()
        bar.close()
        return records

    def _record(self, sums: dict[str, torch.Tensor], seconds: float, steps: int, elapsed: float) -> dict:
        names = sorted(sums)
        values = dist_utils.all_reduce_mean(torch.stack([sums[k].double() for k in names]).to(self.device),
                                            self.layout).cpu().tolist()
        record = {"step": self.step, **dict(zip(names, values))}
        tokens_per_s = self.tokens_per_step * steps / max(seconds, 1e-9)
        record["tokens"] = self.step * self.tokens_per_step
        record["tokens_per_s"] = tokens_per_s
        record["mfu"] = (tokens_per_s * self.flops_per_token / (self.peak_flops * self.layout.world_size)
                         if self.peak_flops else None)
        record["elapsed_s"] = elapsed
        return record

    # ---- checkpoints ------------------------------------------------------------------------------------------------
    def save(self) -> str | None:
        """Write out_dir/step_XXXXXX (HF model + tokenizer + trainer_state.pt) and point `latest` at it."""
        lay = self.layout
        if lay.distributed:
            weights = dist_utils.full_model_state(self.net)
            optimizer = dist_utils.full_optimizer_state(self.net, self.optimizer)
            model = None
            if lay.is_main:
                model = build_model(self.lm.config, torch.float32, "cpu")
                model.load_state_dict({k.removeprefix("lm."): v for k, v in weights.items()})
        else:
            model, optimizer = self.lm, self.optimizer.state_dict()
        path = None
        if lay.is_main:
            state = {"step": self.step, "optimizer": optimizer, "optimizer_format": self._optimizer_format(),
                     "sampler": self.sampler.state_dict(), "rng": capture_rng(), "world_size": lay.world_size,
                     "schedule": {"name": self.cfg.optim.schedule, "total_steps": self.cfg.run.steps,
                                  "lr": lr_at(max(self.step - 1, 0), self.cfg.run.steps, self.cfg.optim)}}
            path = save_checkpoint(self.out_dir, self.step, model, self.tokenizer, state, self.cfg.to_dict())
            if self.cfg.run.plot:
                plot_curves(self.metrics.path, os.path.join(self.out_dir, "curves.png"))
        dist_utils.barrier(lay)
        return path

    def _optimizer_format(self) -> str:
        return "full-fqn" if self.layout.distributed else "local"

    def _restore(self, path: str) -> None:
        state = load_trainer_state(path)
        if state["optimizer_format"] != self._optimizer_format():
            raise ValueError(f"{path} was written by {state['world_size']} process(es) and this run has "
                             f"{self.layout.world_size}: resume single-process runs in one process and "
                             "torchrun runs under torchrun")
        if self.layout.distributed:
            dist_utils.load_full_optimizer_state(self.net, self.optimizer, state["optimizer"])
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.sampler.load_state_dict(state["sampler"])
        self.step = int(state["step"])
        restore_rng(state["rng"])
        if self.layout.is_main:
            self.metrics.truncate_after(self.step)

    def close(self) -> None:
        dist_utils.teardown(self.layout)
