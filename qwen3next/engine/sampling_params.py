"""Per-request decoding settings, with vLLM's field names and ranges.

A `SamplingParams` is checked once, when the request is made, so that the
batched sampler (`qwen3next.ops.sampling`) can trust every value it is given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Mapping

# Temperatures below this are treated as greedy decoding (as vLLM does): dividing
# logits by ~0 would only turn the softmax into an argmax with overflow risk.
GREEDY_TEMPERATURE_EPS = 1e-5

# vLLM's cap on the number of top logprobs returned per token.
MAX_LOGPROBS = 20

OUTPUT_KINDS = ("cumulative", "delta", "final_only")


def _is_int(value: Any) -> bool:
    # bool is an int subclass, but `top_k=True` is a mistake, not a number.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class SamplingParams:
    """How to pick the next tokens of one request.

    n: completions per prompt; only 1 is supported.
    temperature: >= 0; 0 (or below 1e-5) means greedy decoding.
    top_p: nucleus mass in (0, 1]; 1 = off.
    top_k: keep the k most likely tokens; 0 or -1 = off, otherwise >= 1.
    min_p: in [0, 1]; drop tokens whose probability is below min_p * the top
        token's probability; 0 = off.
    repetition_penalty: > 0; 1 = off.  Applied to tokens of the prompt and the
        output (positive logits divided by it, negative ones multiplied).
    presence_penalty / frequency_penalty: in [-2, 2]; 0 = off.  Applied to
        tokens of the output only (OpenAI convention).
    seed: makes this request's samples reproducible, whatever else is batched
        with it.
    stop: strings that end generation; never included in the output unless
        include_stop_str_in_output.
    stop_token_ids: token ids that end generation (the token is kept in the
        ids, not rendered in the text when it is special).
    max_tokens: >= 1, or None to generate until the context is full.
    min_tokens: EOS and stop_token_ids are banned until this many tokens exist.
    ignore_eos: keep generating after EOS (benchmarks).
    logprobs: number of top logprobs to return per token, in [0, 20], in
        addition to the sampled token's logprob; None = no logprobs.
    skip_special_tokens: leave special tokens out of the detokenized text.
    include_stop_str_in_output: keep the matched stop string in the text.
    output_kind: what the engine hands back while the request runs (vLLM's
        RequestOutputKind): "cumulative" (every step that added tokens: the
        text, token ids and logprobs so far), "delta" (every such step: only
        what it added) or "final_only" (one output, when the request ends).
        A cumulative output copies everything so far at each step; the other
        two cost the host nothing that grows with the output's length.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    output_kind: str = "cumulative"

    def __post_init__(self) -> None:
        if not _is_int(self.n) or self.n != 1:
            raise ValueError(f"n must be 1 (only one completion per request is supported), got {self.n!r}")
        if not _is_number(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or not (self.top_k in (-1, 0) or self.top_k >= 1):
            raise ValueError(f"top_k must be -1 or 0 (off) or an integer >= 1, got {self.top_k!r}")
        if not _is_number(self.min_p) or not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if not _is_number(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -2 <= value <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {value!r}")
        if self.seed is not None and (not _is_int(self.seed) or not -(2 ** 63) <= self.seed < 2 ** 64):
            raise ValueError(f"seed must be an integer in [-2**63, 2**64) or None, got {self.seed!r}")
        self.stop = self._normalise_stop(self.stop)
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        else:
            self.stop_token_ids = list(self.stop_token_ids)
            if not all(_is_int(t) and t >= 0 for t in self.stop_token_ids):
                raise ValueError(f"stop_token_ids must be integers >= 0, got {self.stop_token_ids!r}")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise ValueError(f"max_tokens must be an integer >= 1 or None, got {self.max_tokens!r}")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise ValueError(f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens must be <= max_tokens, got min_tokens={self.min_tokens} > max_tokens={self.max_tokens}"
            )
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise ValueError(f"logprobs must be an integer in [0, {MAX_LOGPROBS}] or None, got {self.logprobs!r}")
        if self.output_kind not in OUTPUT_KINDS:
            raise ValueError(f"output_kind must be one of {', '.join(OUTPUT_KINDS)}, got {self.output_kind!r}")
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")

    @staticmethod
    def _normalise_stop(stop: list[str] | str | None) -> list[str]:
        if stop is None:
            return []
        if isinstance(stop, str):
            stop = [stop]
        stop = list(stop)
        if not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"stop must be a non-empty string or a list of non-empty strings, got {stop!r}")
        return stop

    @property
    def greedy(self) -> bool:
        """True when the next token is always the argmax of the penalised logits."""
        return self.temperature < GREEDY_TEMPERATURE_EPS or self.top_k == 1

    @property
    def uses_output_history(self) -> bool:
        """True when sampling reads the tokens generated so far (a penalty is on): under overlap scheduling the
        engine then hands the sampler the device's copy of the token the host has not seen yet."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    # Keys of generation_config.json that map one-to-one onto our fields.
    _GENERATION_CONFIG_KEYS = (
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "repetition_penalty",
        "presence_penalty",
        "frequency_penalty",
    )

    @classmethod
    def from_generation_config(cls, config: Mapping[str, Any] | None, **overrides: Any) -> "SamplingParams":
        """Defaults recommended by a checkpoint, then the caller's overrides.

        `config` is the parsed `generation_config.json`.  `do_sample: false`
        means greedy (temperature 0) unless the caller overrides temperature;
        `max_new_tokens` becomes max_tokens.  Other keys (eos_token_id,
        bos_token_id, transformers_version, ...) are ignored here: EOS ids are
        the engine's business, not a per-request setting.
        """
        config = dict(config or {})
        kwargs: dict[str, Any] = {}
        for key in cls._GENERATION_CONFIG_KEYS:
            if config.get(key) is not None:
                kwargs[key] = config[key]
        # transformers writes top_k=0 / -1 for "off"; both are accepted as is.
        if config.get("max_new_tokens") is not None:
            kwargs["max_tokens"] = config["max_new_tokens"]
        if config.get("do_sample") is False:
            kwargs["temperature"] = 0.0
        unknown = set(overrides) - {f.name for f in fields(cls)}
        if unknown:
            raise TypeError(f"unknown SamplingParams fields: {sorted(unknown)}")
        kwargs.update(overrides)
        return cls(**kwargs)
