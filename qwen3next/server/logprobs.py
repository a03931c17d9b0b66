"""Token logprobs in the two shapes of the OpenAI API.

The engine gives, per generated token, `{token id: logprob}` holding the sampled token and the top-k most likely
ones (the sampled token may be among them). Chat wants a list of `{token, logprob, bytes, top_logprobs}`;
completions want parallel lists `tokens / token_logprobs / top_logprobs / text_offset`.
"""
from __future__ import annotations

import math

FLOOR = -9999.0   # JSON has no -inf; what a token of probability 0 reports


def _finite(lp: float) -> float:
    return lp if math.isfinite(lp) else FLOOR


class TokenText:
    """Token id -> (text, bytes), remembered: the same few thousand tokens come back all the time."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict[int, tuple[str, bytes]] = {}

    def __call__(self, token_id: int) -> tuple[str, bytes]:
        hit = self._cache.get(token_id)
        if hit is None:
            data = self.tokenizer.token_bytes(token_id)
            if data is None:                                  # not a byte-level tokenizer
                text = self.tokenizer.decode([token_id])
                data = text.encode()
            else:
                text = data.decode("utf-8", errors="replace")
            hit = self._cache[token_id] = (text, data)
        return hit


def _top(entry: dict[int, float], k: int) -> list[tuple[int, float]]:
    return sorted(entry.items(), key=lambda kv: -kv[1])[:k]


def chat_logprobs(token_ids: list[int], entries: list[dict[int, float]], k: int, text: TokenText) -> list[dict]:
    out = []
    for tok, entry in zip(token_ids, entries):
        s, b = text(tok)
        top = []
        for t, lp in _top(entry, k):
            ts, tb = text(t)
            top.append({"token": ts, "logprob": _finite(lp), "bytes": list(tb)})
        out.append({"token": s, "logprob": _finite(entry.get(tok, FLOOR)), "bytes": list(b), "top_logprobs": top})
    return out


def completion_logprobs(token_ids: list[int], entries: list[dict[int, float]], k: int, text: TokenText,
                        offset: int = 0) -> dict:
    """`offset` is where the first token starts in the whole completion text (chunks of a stream continue)."""
    tokens, lps, tops, offsets = [], [], [], []
    for tok, entry in zip(token_ids, entries):
        s, _ = text(tok)
        tokens.append(s)
        lps.append(_finite(entry.get(tok, FLOOR)))
        top = {s: _finite(entry.get(tok, FLOOR))}
        for t, lp in _top(entry, k):
            top.setdefault(text(t)[0], _finite(lp))
        tops.append(top)
        offsets.append(offset)
        offset += len(s)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}
