"""Hugging Face checkpoints: build a model (on any device, `meta` included), load safetensors tensor by tensor
(single file or sharded with `model.safetensors.index.json`), and save in the same format.

Experts are packed in memory ([E, 2I, H] gate|up and [E, H, I] down) but stored per expert on disk
(`mlp.experts.{e}.{gate,up,down}_proj.weight`), as the official checkpoints and transformers do.
"""
from __future__ import annotations

import json
import os
import re
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from .config import PRESETS, ModelConfig, preset
from .model.init import init_weights
from .model.qwen3_next import CausalLM

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
FP32_PARAMS = ("A_log", "dt_bias")   # decay parameters stay fp32 in any model dtype (fp16 exp(A_log) overflows)
_EXPERTS = re.compile(r"^(.*\.experts)\.(gate_up_proj|down_proj)$")

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64}


def parse_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---- building -----------------------------------------------------------------------------------------------------
def build_model(cfg: ModelConfig, dtype=torch.float32, device="cpu") -> CausalLM:
    """An uninitialised model: made on `meta` (no memory), cast, then given storage on `device` unless meta."""
    dtype = parse_dtype(dtype)
    with torch.device("meta"):
        model = CausalLM(cfg)
    model.to(dtype)
    for name, p in model.named_parameters():
        if name.rsplit(".", 1)[-1] in FP32_PARAMS:
            p.data = p.data.float()
    if str(device) != "meta":
        model.to_empty(device=device)
        if cfg.tie_word_embeddings:   # to_empty gives every parameter fresh storage; re-tie
            model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


def random_model(cfg: ModelConfig, dtype=torch.float32, device="cpu", seed: int = 0) -> CausalLM:
    model = build_model(cfg, torch.float32 if str(device) != "meta" else dtype, "cpu" if str(device) != "meta" else "meta")
    if str(device) == "meta":
        return model
    init_weights(model, generator=torch.Generator().manual_seed(seed))
    return cast(model, dtype).to(device)


def cast(model: CausalLM, dtype) -> CausalLM:
    dtype = parse_dtype(dtype)
    model.to(dtype)
    for name, p in model.named_parameters():
        if name.rsplit(".", 1)[-1] in FP32_PARAMS:
            p.data = p.data.float()
    return model


# ---- names: checkpoint tensor <-> (parameter, index) -----------------------------------------------------------------
def checkpoint_tensors(model: CausalLM) -> Iterator[tuple[str, torch.Tensor, tuple]]:
    """Every tensor of the checkpoint: (name on disk, our parameter, index of its slice in that parameter)."""
    for name, p in model.named_parameters():          # tied lm_head is yielded once, as the embedding
        m = _EXPERTS.match(name)
        if not m:
            yield name, p, ()
            continue
        prefix, which = m.groups()
        for e in range(p.shape[0]):
            if which == "down_proj":
                yield f"{prefix}.{e}.down_proj.weight", p, (e,)
            else:
                inter = p.shape[1] // 2
                yield f"{prefix}.{e}.gate_proj.weight", p, (e, slice(0, inter))
                yield f"{prefix}.{e}.up_proj.weight", p, (e, slice(inter, 2 * inter))


# ---- loading ------------------------------------------------------------------------------------------------------
def weight_files(path: str) -> dict[str, list[str]]:
    """file -> tensor names in it, from the index when sharded, else from the single file's header."""
    index = os.path.join(path, INDEX_FILE)
    if os.path.exists(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index}: not a valid safetensors index (need a 'weight_map' object): {e}") from None
        files: dict[str, list[str]] = {}
        for name, fname in weight_map.items():
            files.setdefault(os.path.join(path, fname), []).append(name)
        for fname in files:
            if not os.path.exists(fname):
                raise FileNotFoundError(f"{index} lists {os.path.basename(fname)}, which is not in {path}")
        return files
    candidates = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not candidates:
        raise FileNotFoundError(f"{path}: no {SINGLE_FILE} nor {INDEX_FILE} (only safetensors checkpoints load)")
    out = {}
    for fname in candidates:
        full = os.path.join(path, fname)
        with _open(full) as f:
            out[full] = list(f.keys())
    return out


def _open(fname: str):
    try:
        return safe_open(fname, framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{fname}: not a readable safetensors file ({e})") from None


def _mtp_layers_in(names) -> int:
    idx = {int(m.group(1)) for n in names if (m := re.match(r"^mtp\.layers\.(\d+)\.", n))}
    return max(idx) + 1 if idx else 0


def load_config(path: str) -> ModelConfig:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{path}: no config.json")
    return ModelConfig.from_json(cfg_path)


def load_model(path_or_preset: str | None = None, dtype=torch.float32, device="cpu", seed: int = 0,
               progress: bool = False) -> CausalLM:
    """A model from a checkpoint directory, or a random-weight model from a preset name (`meta` allocates nothing).

    `None` loads the embedded default model."""
    if path_or_preset is None:
        from . import DEFAULT_MODEL
        if DEFAULT_MODEL is None:
            raise FileNotFoundError("no default model is embedded in this install; pass a checkpoint directory or "
                                    f"a preset name ({', '.join(sorted(PRESETS))})")
        path_or_preset = DEFAULT_MODEL
    if path_or_preset in PRESETS:
        return random_model(preset(path_or_preset), dtype, device, seed)
    path = os.fspath(path_or_preset)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path!r} is neither a checkpoint directory nor a preset name "
                                f"({', '.join(sorted(PRESETS))})")
    cfg = load_config(path)
    files = weight_files(path)
    names = {n for ns in files.values() for n in ns}
    if cfg.num_nextn_predict_layers is None:
        cfg.num_nextn_predict_layers = _mtp_layers_in(names)
    model = build_model(cfg, dtype, device)
    load_weights(model, files, names, progress)
    return model


@torch.no_grad()
def load_weights(model: CausalLM, files: dict[str, list[str]], names: set[str], progress: bool = False) -> None:
    expected = {name: (p, idx) for name, p, idx in checkpoint_tensors(model)}
    ignorable = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    missing = sorted(set(expected) - names)
    unexpected = sorted(n for n in names - set(expected) - ignorable if not n.endswith("rotary_emb.inv_freq"))
    if missing:
        raise ValueError(f"checkpoint is missing {len(missing)} tensor(s) the config requires, e.g. "
                         f"{', '.join(missing[:5])}")
    if unexpected:
        raise ValueError(f"checkpoint has {len(unexpected)} tensor(s) this config has no place for, e.g. "
                         f"{', '.join(unexpected[:5])}")
    bar = tqdm(total=len(expected), desc="loading weights", unit="tensor", disable=not progress)
    for fname, keys in files.items():
        with _open(fname) as f:
            for key in keys:
                if key not in expected:
                    continue
                p, idx = expected[key]
                dst = p.data[idx] if idx else p.data
                try:
                    t = f.get_tensor(key)
                except (SafetensorError, OSError, ValueError) as e:
                    raise ValueError(f"{fname}: tensor {key} cannot be read ({e})") from None
                if tuple(t.shape) != tuple(dst.shape):
                    raise ValueError(f"{fname}: tensor {key} has shape {tuple(t.shape)}, the config expects "
                                     f"{tuple(dst.shape)}")
                dst.copy_(t)
                bar.update(1)
    bar.close()


# ---- saving -------------------------------------------------------------------------------------------------------
def save_model(model: CausalLM, directory: str, max_shard_bytes: int = 4 << 30, progress: bool = False) -> None:
    """config.json + model.safetensors, or model-0000i-of-0000n.safetensors shards with an index when larger."""
    os.makedirs(directory, exist_ok=True)
    entries = [(name, p, idx) for name, p, idx in checkpoint_tensors(model)]
    if model.config.tie_word_embeddings:
        entries = [e for e in entries if e[0] != "lm_head.weight"]
    shards, cur, size = [], [], 0
    for e in entries:
        nbytes = (e[1].data[e[2]] if e[2] else e[1].data).numel() * e[1].element_size()
        if cur and size + nbytes > max_shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(e)
        size += nbytes
    shards.append(cur)
    main_dtype = model.model.embed_tokens.weight.dtype
    model.config.save(directory, dtype=dtype_name(main_dtype))
    for stale in os.listdir(directory):   # a previous save with another sharding must not leave files behind
        if stale.endswith(".safetensors") or stale == INDEX_FILE:
            os.remove(os.path.join(directory, stale))
    weight_map, total = {}, 0
    for i, shard in enumerate(tqdm(shards, desc="saving", unit="shard", disable=not progress)):
        fname = SINGLE_FILE if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: (p.data[idx] if idx else p.data).detach().to("cpu").contiguous() for name, p, idx in shard}
        save_file(tensors, os.path.join(directory, fname), metadata={"format": "pt"})
        for name, t in tensors.items():
            weight_map[name] = fname
            total += t.numel() * t.element_size()
    if len(shards) > 1:
        with open(os.path.join(directory, INDEX_FILE), "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
