"""Run checkpoints: out_dir/step_XXXXXX/ holds the model in Hugging Face format (config.json +
model.safetensors, loadable by `load_model` and by transformers), the tokenizer, the resolved training config and
trainer_state.pt (optimizer, step, data sampler position, RNG states). out_dir/latest names the newest one.

A checkpoint is written under a temporary name and renamed when complete, and `latest` is replaced atomically, so a
run killed while saving resumes from the previous checkpoint.
"""
from __future__ import annotations

import json
import os
import random
import shutil

import numpy as np
import torch

from ..checkpoint import save_model

LATEST = "latest"
STATE_FILE = "trainer_state.pt"


def step_dir(out_dir: str, step: int) -> str:
    return os.path.join(out_dir, f"step_{step:06d}")


def latest_checkpoint(out_dir: str) -> str | None:
    """The directory named by out_dir/latest, or None when the run has no checkpoint yet."""
    pointer = os.path.join(out_dir, LATEST)
    if not os.path.exists(pointer):
        return None
    with open(pointer, encoding="utf-8") as f:
        name = f.read().strip()
    path = os.path.join(out_dir, name)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{pointer} names {name!r}, which is not a directory of {out_dir}")
    return path


def save_checkpoint(out_dir: str, step: int, model, tokenizer, trainer_state: dict, config: dict) -> str:
    final = step_dir(out_dir, step)
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(model, tmp)
    if tokenizer is not None:
        tokenizer.save(tmp)
    torch.save(trainer_state, os.path.join(tmp, STATE_FILE))
    with open(os.path.join(tmp, "train_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    pointer = os.path.join(out_dir, LATEST)
    with open(pointer + ".tmp", "w", encoding="utf-8") as f:
        f.write(os.path.basename(final) + "\n")
    os.replace(pointer + ".tmp", pointer)
    return final


def load_trainer_state(checkpoint_dir: str) -> dict:
    path = os.path.join(checkpoint_dir, STATE_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{checkpoint_dir} has no {STATE_FILE}: not a training checkpoint")
    return torch.load(path, map_location="cpu", weights_only=True)


def capture_rng() -> dict:
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    random.setstate(_as_tuples(state["python"]))
    torch.set_rng_state(state["torch"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuples(x):
    return tuple(_as_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x
