"""qwen3next: Qwen3-Next (hybrid Gated DeltaNet + gated attention, ultra-sparse MoE, MTP) in plain PyTorch."""
from __future__ import annotations

from .checkpoint import build_model, load_model, random_model, save_model  # noqa: F401
from .config import PRESETS, ModelConfig, preset  # noqa: F401
from .model.cache import BatchMeta, HybridCache, SequenceCache  # noqa: F401
from .model.qwen3_next import CausalLM, ModelOutput  # noqa: F401
from .engine.sampling_params import SamplingParams  # noqa: F401
from .engine.llm import LLM  # noqa: F401
from .tokenizer import load_tokenizer  # noqa: F401

__version__ = "0.1.0"
DEFAULT_MODEL: str | None = None   # path of the embedded default model, once one ships with the package
