"""ModelConfig: one dataclass for Qwen3-Next (`qwen3_next`) and dense Qwen3 (`qwen3`), read from and written to
Hugging Face `config.json` (both the transformers-v4 keys and the v5 `rope_parameters` dict), plus named presets."""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

SUPPORTED_MODEL_TYPES = ("qwen3_next", "qwen3")
LINEAR, FULL = "linear_attention", "full_attention"


@dataclass
class ModelConfig:
    model_type: str = "qwen3_next"
    vocab_size: int = 151936
    hidden_size: int = 2048
    num_hidden_layers: int = 48
    num_attention_heads: int = 16
    num_key_value_heads: int = 2
    head_dim: int = 256
    intermediate_size: int = 5120          # dense MLP width (mlp_only_layers, or every layer of dense Qwen3)
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 262144
    rope_theta: float = 10_000_000.0
    partial_rotary_factor: float = 0.25
    rope_scaling: dict | None = None       # e.g. {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 262144}
    attention_bias: bool = False
    attn_output_gate: bool = True          # Qwen3-Next's sigmoid gate on the attention output (q_proj is 2x wide)
    layer_types: list[str] = field(default_factory=list)
    # Gated DeltaNet
    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 32
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_conv_kernel_dim: int = 4
    # MoE
    num_experts: int = 512
    num_experts_per_tok: int = 10
    moe_intermediate_size: int = 512
    shared_expert_intermediate_size: int = 512
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    router_aux_loss_coef: float = 0.001
    # MTP (multi-token prediction) layers; transformers' config has no such key, so None means "infer from weights"
    num_nextn_predict_layers: int | None = 1
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = 151643
    eos_token_id: int | list[int] | None = 151645
    pad_token_id: int | None = None
    extra: dict = field(default_factory=dict)  # unknown keys, kept so a save writes them back

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"config: unknown model_type {self.model_type!r}; expected one of {SUPPORTED_MODEL_TYPES}")
        if self.model_type == "qwen3":  # dense Qwen3: softmax attention everywhere, no gate, full RoPE, no MoE/MTP
            self.attn_output_gate = False
            self.num_experts = 0
            self.num_nextn_predict_layers = 0
        if not self.layer_types:
            self.layer_types = default_layer_types(self.model_type, self.num_hidden_layers, 4)
        self.layer_types = [{"attention": FULL, "linear": LINEAR}.get(t, t) for t in self.layer_types]
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"config: layer_types has {len(self.layer_types)} entries, expected num_hidden_layers="
                             f"{self.num_hidden_layers}")
        bad = sorted(set(self.layer_types) - {LINEAR, FULL})
        if bad:
            raise ValueError(f"config: unknown layer_types {bad}; expected {LINEAR!r} or {FULL!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"config: num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        if LINEAR in self.layer_types and self.linear_num_value_heads % self.linear_num_key_heads:
            raise ValueError(f"config: linear_num_value_heads={self.linear_num_value_heads} is not a multiple of "
                             f"linear_num_key_heads={self.linear_num_key_heads}")
        if self.num_experts and self.num_experts_per_tok > self.num_experts:
            raise ValueError(f"config: num_experts_per_tok={self.num_experts_per_tok} > num_experts={self.num_experts}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in ("default", "yarn", "linear"):
                raise ValueError(f"config: rope_scaling type {kind!r} is not supported; expected 'yarn' or 'linear'")
            if kind == "default":
                self.rope_scaling = None

    # ---- derived shapes -------------------------------------------------------------------------------------------
    def is_moe_layer(self, i: int) -> bool:
        return (self.num_experts > 0 and i not in self.mlp_only_layers
                and (i + 1) % self.decoder_sparse_step == 0)

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def linear_key_dim(self) -> int:
        return self.linear_num_key_heads * self.linear_key_head_dim

    @property
    def linear_value_dim(self) -> int:
        return self.linear_num_value_heads * self.linear_value_head_dim

    @property
    def linear_conv_dim(self) -> int:
        return 2 * self.linear_key_dim + self.linear_value_dim

    @property
    def mtp_layers(self) -> int:
        return self.num_nextn_predict_layers or 0

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, (list, tuple)) else [self.eos_token_id]

    def replace(self, **changes) -> "ModelConfig":
        if "num_hidden_layers" in changes and "layer_types" not in changes:
            changes["layer_types"] = []
        return dataclasses.replace(self, **changes)

    # ---- Hugging Face config.json ---------------------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        d = dict(d)
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"{source}: unknown model_type {model_type!r}; expected one of {SUPPORTED_MODEL_TYPES}")
        # v5 keeps rope settings in `rope_parameters`; v4 has top-level rope_theta / partial_rotary_factor / rope_scaling
        rope = d.pop("rope_parameters", None) or {}
        scaling = d.pop("rope_scaling", None)
        theta = rope.get("rope_theta", d.pop("rope_theta", 10_000_000.0 if model_type == "qwen3_next" else 1_000_000.0))
        d.pop("rope_theta", None)
        prf = rope.get("partial_rotary_factor", d.pop("partial_rotary_factor", 0.25 if model_type == "qwen3_next" else 1.0))
        d.pop("partial_rotary_factor", None)
        rope_kind = rope.get("rope_type", rope.get("type", "default"))
        if rope_kind != "default":
            scaling = {k: v for k, v in rope.items() if k not in ("rope_theta", "partial_rotary_factor")}
        n_layers = d.get("num_hidden_layers", 48)
        if not d.get("layer_types"):
            d["layer_types"] = default_layer_types(model_type, n_layers, d.get("full_attention_interval", 4))
        d.pop("full_attention_interval", None)
        known = {f.name for f in dataclasses.fields(cls)} - {"extra", "rope_theta", "partial_rotary_factor", "rope_scaling"}
        kwargs = {k: d.pop(k) for k in list(d) if k in known}
        if kwargs.get("mlp_only_layers") is None:
            kwargs["mlp_only_layers"] = []
        if model_type == "qwen3_next" and "num_nextn_predict_layers" not in kwargs:
            kwargs["num_nextn_predict_layers"] = None  # decided by the weights present
        if model_type == "qwen3" and kwargs.get("head_dim") is None:
            kwargs["head_dim"] = kwargs.get("hidden_size", 2048) // kwargs.get("num_attention_heads", 16)
        for f in dataclasses.fields(cls):  # a JSON null on a non-optional field falls back to the default
            if f.name in kwargs and kwargs[f.name] is None and f.name not in (
                    "num_nextn_predict_layers", "bos_token_id", "eos_token_id", "pad_token_id"):
                del kwargs[f.name]
        for k in ("architectures", "transformers_version", "dtype", "torch_dtype", "use_cache", "output_router_logits",
                  "attention_dropout", "use_sliding_window", "sliding_window", "max_window_layers"):
            d.pop(k, None)
        return cls(rope_theta=theta, partial_rotary_factor=prf, rope_scaling=scaling, extra=d, **kwargs)

    def to_hf_dict(self, dtype: str | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "architectures": ["Qwen3NextForCausalLM" if self.model_type == "qwen3_next" else "Qwen3ForCausalLM"],
            "model_type": self.model_type,
        }
        skip = {"extra", "rope_theta", "partial_rotary_factor", "rope_scaling", "attn_output_gate"}
        if self.model_type == "qwen3":
            skip |= {n for n in _NEXT_ONLY}
        for f in dataclasses.fields(self):
            if f.name not in skip:
                out[f.name] = getattr(self, f.name)
        if self.model_type == "qwen3_next" and not self.attn_output_gate:
            out["attn_output_gate"] = False  # our ablation knob; transformers' config ignores it
        if self.num_nextn_predict_layers is None:
            out.pop("num_nextn_predict_layers", None)
        rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling:
            rope = {**self.rope_scaling, "rope_theta": self.rope_theta}
            rope["rope_type"] = rope.pop("type", rope.get("rope_type"))
        if self.model_type == "qwen3_next":
            rope["partial_rotary_factor"] = self.partial_rotary_factor
            out["partial_rotary_factor"] = self.partial_rotary_factor  # v4 readers
        out["rope_parameters"] = rope
        out["rope_theta"] = self.rope_theta          # v4 readers (transformers 5 accepts and folds it)
        out["rope_scaling"] = self.rope_scaling      # v4 readers
        if dtype:
            out["dtype"] = dtype
        out.update(self.extra)
        return out

    @classmethod
    def from_json(cls, path: str) -> "ModelConfig":
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise ValueError(f"{path}: expected a JSON object, got {type(d).__name__}")
        return cls.from_hf_dict(d, source=path)

    def save(self, directory: str, dtype: str | None = None) -> str:
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, "config.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_hf_dict(dtype), f, indent=2)
            f.write("\n")
        return path


_NEXT_ONLY = ("linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim",
              "linear_conv_kernel_dim", "num_experts", "num_experts_per_tok", "moe_intermediate_size",
              "shared_expert_intermediate_size", "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers",
              "router_aux_loss_coef", "num_nextn_predict_layers", "layer_types")


def default_layer_types(model_type: str, n_layers: int, interval: int) -> list[str]:
    if model_type == "qwen3":
        return [FULL] * n_layers
    return [FULL if (i + 1) % interval == 0 else LINEAR for i in range(n_layers)]


PRESETS: dict[str, ModelConfig] = {
    # Qwen/Qwen3-Next-80B-A3B-{Instruct,Thinking}: the shapes of SPEC §1
    "qwen3-next-80b-a3b": ModelConfig(),
    # Qwen/Qwen3-32B (dense): the speed baseline of the release
    "qwen3-32b": ModelConfig(
        model_type="qwen3", vocab_size=151936, hidden_size=5120, num_hidden_layers=64, num_attention_heads=64,
        num_key_value_heads=8, head_dim=128, intermediate_size=25600, max_position_embeddings=40960,
        rope_theta=1_000_000.0, partial_rotary_factor=1.0, tie_word_embeddings=False, eos_token_id=151645),
}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    return dataclasses.replace(PRESETS[name])
