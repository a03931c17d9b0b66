"""Training metrics: FLOPs per token and MFU, the JSONL log, and the PNG of the curves.

FLOPs per trained token = 6 * N_active + attention + Gated DeltaNet terms, where N_active counts every weight a
token multiplies (embedding lookup excluded, the lm_head counted once per head that uses it, routed experts
scaled by top_k / num_experts). The softmax-attention term per layer is 6 * heads * head_dim * T (QK^T and AV,
2 FLOPs per multiply-add, causal mean context T/2, x3 for forward + backward); the Gated DeltaNet term per layer
is 3 * value_heads * (6 * dk * dv + 4 * C * (dk + dv)) for its state updates and chunk-local products (chunk C =
64). An estimate, as every MFU is.
"""
from __future__ import annotations

import json
import os
import warnings

import torch

from ..config import FULL, LINEAR, ModelConfig

# Dense bf16 tensor-core peak per GPU (no sparsity), by a substring of torch.cuda.get_device_name().
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "GH200": 989e12, "B200": 2250e12,
                   "A100": 312e12, "A800": 312e12, "L40S": 362e12, "A10G": 70e12, "4090": 165e12}
GDN_CHUNK = 64


def active_params(model: torch.nn.Module) -> int:
    """Weights one token multiplies in a training step (see module docstring)."""
    cfg: ModelConfig = model.config
    k_over_e = cfg.num_experts_per_tok / cfg.num_experts if cfg.num_experts else 0.0
    total = 0.0
    for name, p in model.named_parameters():
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            continue
        total += p.numel() * (k_over_e if ".experts." in name else 1.0)
    heads = 1 + (1 if cfg.mtp_layers else 0)    # the MTP head runs the shared lm_head again
    return int(total + heads * cfg.vocab_size * cfg.hidden_size)


def flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    cfg: ModelConfig = model.config
    n_attn = cfg.layer_types.count(FULL) + cfg.mtp_layers
    n_gdn = cfg.layer_types.count(LINEAR)
    attention = n_attn * 6 * cfg.num_attention_heads * cfg.head_dim * seq_len
    dk, dv = cfg.linear_key_head_dim, cfg.linear_value_head_dim
    gdn = n_gdn * 3 * cfg.linear_num_value_heads * (6 * dk * dv + 4 * GDN_CHUNK * (dk + dv))
    return 6.0 * active_params(model) + attention + gdn


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """The device's peak for this dtype, or None (CPU, fp32, unknown GPU): then MFU is not reported."""
    if device.type != "cuda" or dtype != torch.bfloat16:
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_FLOPS.items():
        if key in name:
            return value
    return None


class MetricsLog:
    """metrics.jsonl under the run directory: one JSON object per logged step."""

    def __init__(self, path: str, enabled: bool = True):
        self.path, self.enabled = path, enabled

    def truncate_after(self, step: int) -> None:
        """On resume: drop records of steps past the checkpoint, which the resumed run will redo."""
        if not self.enabled or not os.path.exists(self.path):
            return
        kept = [r for r in read_jsonl(self.path) if r.get("step", 0) <= step]
        with open(self.path, "w", encoding="utf-8") as f:
            for r in kept:
                f.write(json.dumps(r) + "\n")

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


_PANELS = (("loss", ("loss", "lm_loss", "eval_loss", "mtp_loss")), ("aux / balance", ("aux_loss",
           "expert_load_max_mean")), ("lr", ("lr",)), ("grad norm", ("grad_norm",)),
           ("MTP accuracy", ("mtp_accuracy",)), ("router entropy (nats)", ("router_entropy",)))


def plot_curves(metrics_path: str, png_path: str) -> bool:
    """Draw the logged curves into a PNG (matplotlib, Agg). Without matplotlib: warn and return False."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed: skipping the training-curve plot (pip install matplotlib)",
                      stacklevel=2)
        return False
    records = read_jsonl(metrics_path) if os.path.exists(metrics_path) else []
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for ax, (title, keys) in zip(axes.flat, _PANELS):
        for key in keys:
            pts = [(r["step"], r[key]) for r in records if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), label=key, marker="o" if key == "eval_loss" else None, markersize=3)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return True
