"""Training configuration: nested dataclasses read from TOML (or YAML when pyyaml is installed), with dotted
`key=value` overrides from the command line.

    [model]  source (preset name | checkpoint dir | omitted), tokenizer, and any ModelConfig field inline
    [data]   train / eval token files (from `qwen3next data prepare`), seq_len, micro_batch, grad_accum
    [optim]  AdamW + warmup / cosine or WSD schedule, clipping
    [loss]   MTP weight, load-balancing coefficient and its batch scope
    [run]    out_dir, steps, eval/save/log cadence, seed, dtype, activation checkpointing, resume

Every unknown key or badly typed value is an error that names the key and what was expected.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from ..config import ModelConfig

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]


@dataclass
class ModelSection:
    source: str | None = None      # preset name or checkpoint directory; None = only the inline fields below
    tokenizer: str | None = None   # tokenizer directory; None = the one recorded by the train token file
    fields: dict = field(default_factory=dict)   # inline ModelConfig fields (hidden_size = 256, ...)


@dataclass
class DataSection:
    train: str = ""                # token file (.bin) written by prepare_dataset
    eval: str | None = None        # held-out token file; None = no eval loss
    seq_len: int = 512
    micro_batch: int = 8           # sequences per forward/backward, per process
    grad_accum: int = 1            # micro-batches per optimizer step


@dataclass
class OptimSection:
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    decay_embeddings: bool = False  # see optim.py: embeddings are not decayed by default
    warmup: int = 100               # linear warmup steps
    schedule: str = "cosine"        # "cosine" | "wsd" (warmup-stable-decay)
    min_lr_ratio: float = 0.1       # final lr = lr * min_lr_ratio
    decay_fraction: float = 0.2     # wsd: the last fraction of steps decays linearly to the final lr
    clip: float = 1.0               # max global grad norm; 0 = no clipping


@dataclass
class LossSection:
    mtp_weight: float = 0.3                # total = lm + mtp_weight * mtp + aux_loss_coef * load_balance
    aux_loss_coef: float | None = None     # None = the model config's router_aux_loss_coef
    balance: str = "global"                # expert fractions over: "global" step | "running" | "micro" batch


@dataclass
class RunSection:
    out_dir: str = "runs/default"
    steps: int = 1000
    eval_every: int = 100          # 0 = only at the end
    eval_batches: int = 10
    save_every: int = 500          # 0 = only at the end
    log_every: int = 10
    seed: int = 0
    dtype: str = "auto"            # "auto" (bf16 autocast on CUDA, fp32 on CPU) | "bf16" | "fp32"
    device: str = "auto"           # "auto" | "cpu" | "cuda"
    activation_checkpointing: bool = False
    resume: bool = False           # continue from out_dir/latest when it exists
    progress: bool = True          # tqdm bar
    plot: bool = True              # curves.png at each save and at the end (needs matplotlib)


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    loss: LossSection = field(default_factory=LossSection)
    run: RunSection = field(default_factory=RunSection)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["model"] = {k: v for k, v in out["model"].items() if k != "fields"} | dict(self.model.fields)
        return out


CHOICES = {"optim.schedule": ("cosine", "wsd"), "loss.balance": ("global", "running", "micro"),
           "run.dtype": ("auto", "bf16", "fp32"), "run.device": ("auto", "cpu", "cuda")}
_MODEL_KEYS = {f.name for f in dataclasses.fields(ModelConfig)} - {"extra"}


# ---- loading ----------------------------------------------------------------------------------------------------
def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read `path` (TOML, or YAML with pyyaml), apply `key=value` overrides, validate. `path=None`: defaults."""
    raw = read_file(path) if path else {}
    cfg = from_dict(raw, source=path or "defaults")
    for item in overrides:
        apply_override(cfg, item)
    validate(cfg)
    return cfg


def read_file(path: str) -> dict:
    if not os.path.exists(path):
        raise FileNotFoundError(f"training config {path!r} does not exist")
    if path.endswith((".yaml", ".yml")):
        try:
            import yaml
        except ModuleNotFoundError:
            raise ValueError(f"{path}: reading YAML needs pyyaml (pip install pyyaml); or write the config as TOML") \
                from None
        with open(path, encoding="utf-8") as f:
            try:
                data = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ValueError(f"{path}: not valid YAML ({e})") from None
    else:
        with open(path, "rb") as f:
            try:
                data = tomllib.load(f)
            except tomllib.TOMLDecodeError as e:
                raise ValueError(f"{path}: not valid TOML ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a table of sections at the top, got {type(data).__name__}")
    return data


def from_dict(raw: dict, source: str = "config") -> TrainConfig:
    cfg = TrainConfig()
    sections = {f.name for f in dataclasses.fields(TrainConfig)}
    for name, table in raw.items():
        if name not in sections:
            raise ValueError(f"{source}: unknown section [{name}]{_suggest(name, sections)}; "
                             f"sections are {', '.join(sorted(sections))}")
        if not isinstance(table, dict):
            raise ValueError(f"{source}: [{name}] must be a table of keys, got {type(table).__name__}")
        for key, value in table.items():
            set_value(cfg, f"{name}.{key}", value, source)
    return cfg


def apply_override(cfg: TrainConfig, item: str) -> None:
    """`optim.lr=3e-4`, `run.out_dir=runs/x`, `optim.betas=[0.9,0.99]`: values parse as TOML, else as a string."""
    if "=" not in item:
        raise ValueError(f"override {item!r} has no '=': write section.key=value, e.g. optim.lr=3e-4")
    key, text = (s.strip() for s in item.split("=", 1))
    if "." not in key:
        raise ValueError(f"override {item!r}: the key must name its section, e.g. run.steps=100")
    set_value(cfg, key, parse_value(text), "override")


def parse_value(text: str) -> Any:
    if text.lower() in ("none", "null"):
        return None
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text   # a bare string: a path, a preset name


def set_value(cfg: TrainConfig, dotted: str, value: Any, source: str) -> None:
    section_name, _, key = dotted.partition(".")
    sections = {f.name for f in dataclasses.fields(TrainConfig)}
    if section_name not in sections:
        raise ValueError(f"{source}: unknown section {section_name!r} in {dotted!r}{_suggest(section_name, sections)}")
    section = getattr(cfg, section_name)
    if section_name == "model" and key in _MODEL_KEYS:   # an inline ModelConfig field
        hint = typing.get_type_hints(ModelConfig)[key]
        section.fields[key] = _coerce(value, hint, f"model.{key}", source)
        return
    names = {f.name for f in dataclasses.fields(section)} - {"fields"}
    if key not in names:
        known = sorted(names | (_MODEL_KEYS if section_name == "model" else set()))
        raise ValueError(f"{source}: unknown key {dotted!r}{_suggest(key, known, section_name)}; "
                         f"[{section_name}] takes {', '.join(sorted(names))}"
                         + (" and any ModelConfig field" if section_name == "model" else ""))
    hint = typing.get_type_hints(type(section))[key]
    setattr(section, key, _coerce(value, hint, dotted, source))


def _coerce(value: Any, hint: Any, key: str, source: str) -> Any:
    """Check `value` against the annotation `hint`; ints are accepted for floats."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, key, source)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0] if len(errors) == 1 else f"{source}: {key}: {value!r} fits none of {hint}")
    want = origin or hint
    if want is Any:
        return value
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if want is list and isinstance(value, (list, tuple)):
        return [_coerce(v, args[0], key, source) for v in value] if args else list(value)
    if want is int and isinstance(value, bool) or not isinstance(value, want):
        raise ValueError(f"{source}: {key} expects {_type_name(hint)}, got {value!r} ({type(value).__name__})")
    return value


def _type_name(hint) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "a table"}.get(
        hint, str(hint).replace("typing.", ""))


def _suggest(word: str, options, section: str | None = None) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    if not close:
        return ""
    return f" (did you mean '{section + '.' if section else ''}{close[0]}'?)"


# ---- validation ---------------------------------------------------------------------------------------------------
def validate(cfg: TrainConfig) -> None:
    for dotted, options in CHOICES.items():
        section, key = dotted.split(".")
        value = getattr(getattr(cfg, section), key)
        if value not in options:
            raise ValueError(f"{dotted}: expected one of {', '.join(map(repr, options))}, got {value!r}")
    d, o, r, lo = cfg.data, cfg.optim, cfg.run, cfg.loss
    checks = [
        (d.seq_len >= 2, "data.seq_len", "must be >= 2", d.seq_len),
        (d.micro_batch >= 1, "data.micro_batch", "must be >= 1", d.micro_batch),
        (d.grad_accum >= 1, "data.grad_accum", "must be >= 1", d.grad_accum),
        (o.lr > 0, "optim.lr", "must be > 0", o.lr),
        (len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas", "must be two numbers in [0, 1)",
         o.betas),
        (o.eps > 0, "optim.eps", "must be > 0", o.eps),
        (o.weight_decay >= 0, "optim.weight_decay", "must be >= 0", o.weight_decay),
        (o.warmup >= 0, "optim.warmup", "must be >= 0", o.warmup),
        (0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", "must be in [0, 1]", o.min_lr_ratio),
        (0 < o.decay_fraction <= 1, "optim.decay_fraction", "must be in (0, 1]", o.decay_fraction),
        (o.clip >= 0, "optim.clip", "must be >= 0 (0 = no clipping)", o.clip),
        (lo.mtp_weight >= 0, "loss.mtp_weight", "must be >= 0", lo.mtp_weight),
        (lo.aux_loss_coef is None or lo.aux_loss_coef >= 0, "loss.aux_loss_coef", "must be >= 0", lo.aux_loss_coef),
        (r.steps >= 1, "run.steps", "must be >= 1", r.steps),
        (r.eval_every >= 0, "run.eval_every", "must be >= 0 (0 = only at the end)", r.eval_every),
        (r.eval_batches >= 1, "run.eval_batches", "must be >= 1", r.eval_batches),
        (r.save_every >= 0, "run.save_every", "must be >= 0 (0 = only at the end)", r.save_every),
        (r.log_every >= 1, "run.log_every", "must be >= 1", r.log_every),
        (bool(r.out_dir), "run.out_dir", "must be a directory path", r.out_dir),
    ]
    for ok, key, rule, value in checks:
        if not ok:
            raise ValueError(f"{key} {rule}, got {value!r}")
