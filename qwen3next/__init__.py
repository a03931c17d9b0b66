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
import os as _os

# The embedded default model: a small Qwen3-Next trained by this package on the Python standard library
# (docs/default_model.md). load_model(None), LLM(), and the CLI use it when no model is given.
DEFAULT_MODEL: str = _os.path.join(_os.path.dirname(__file__), "default_model")
