"""The first prefill chunk of one sequence, padded up to a token bucket and replayed from a CUDA graph.

An eager prefill enqueues ~40 kernels per layer from Python (fla's chunked delta rule alone costs the host ~1 ms
per Gated DeltaNet layer), so a short or mid-sized prompt waits for the host, not the GPU: on an H100 a 4K-token
prefill of 8 Qwen3-Next layers took 23 ms of wall time for ~19 ms of kernels. A new prompt's first chunk has fixed
shapes once padded to a bucket, so it is captured once per bucket (64, 128, 256, 512, 1K, then quarter steps:
1.25K, 1.5K, 1.75K, 2K, 2.5K, 3K, 3.5K, 4K tokens, up to `max_tokens`) and replayed, when it is alone in its step
or beside sequences that each decode one token (they then replay their decode graph: engine/runner.py).

Padding rows come after the prompt's tokens and leave no trace:
  - their keys and values go to the scratch KV page (the page a sequence owns past its last token is not
    touched), and no real query attends to them (causal);
  - Gated DeltaNet gives them beta = 0 and g = 0, so the recurrent state after the bucket is the state after the
    last real token (BatchMeta.valid), and the conv's final state is read at the last real token
    (cu_seqlens = [0, n]);
  - the experts compute them like any token; nothing reads their outputs.
Inside the graph the real length n (one int of the static input) gives the valid rows, KV rows, cu_seqlens and
the row whose logits are kept. Everything else is the eager forward: `model(ids, cache=cache, meta=meta)`.
"""
from __future__ import annotations

import torch

from ..model.cache import BatchMeta, HybridCache
from .graphs import Bucket, PageTable, StaticSteps

# up to this many prompt tokens by default: beyond it a prefill's kernels outlast its launches (H100: 4K tokens
# of 8 layers, 23 ms of wall time for ~19 ms of kernels), and padding to a bucket costs GPU time
PREFILL_GRAPH_MAX_TOKENS = 4096
SMALLEST_BUCKET = 64


def prefill_buckets(max_tokens: int) -> list[int]:
    """Powers of two from 64, and quarter steps between them from 1K (1,280, 1,536, 1,792, 2K, 2.5K, ...), up to
    max_tokens, which is always the last bucket. Below 1K a prefill's time hardly follows its length (an H100, 8
    layers of 80B-A3B: 11.8 ms at 300 tokens, 13.2 at 1,014); above, a prompt just past an edge of the earlier
    half steps waited 9% (1,049 tokens in 1,536) and 17% (2,056 in 3,072) longer: quarter steps pad by < 25%."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    sizes, b = [], SMALLEST_BUCKET
    while b < max_tokens:
        sizes += [b] if b < 1024 else [b, b * 5 // 4, b * 3 // 2, b * 7 // 4]
        b *= 2
    return sorted({s for s in sizes if s < max_tokens} | {max_tokens})


class PrefillGraphs(StaticSteps):
    """One sequence's first prefill chunk of n <= max_tokens tokens, padded to the smallest bucket >= n."""

    kind = "prefill"

    def __init__(self, model, cache: HybridCache, pages: PageTable, *, max_model_len: int, max_tokens: int,
                 capture: bool = True):
        super().__init__(model, cache, pages, max_model_len=max_model_len, max_size=max_tokens, capture=capture)

    def bucket_list(self, max_size: int) -> list[int]:
        return prefill_buckets(max_size)

    def size_of(self, rows) -> int:
        return sum(n for _, n in rows)

    def parts(self, size: int) -> dict[str, int]:
        return {"ids": size, "pages": -(-size // self.page_size), "n": 1, "slot": 1}

    # ---- when -----------------------------------------------------------------------------------------------------
    def takes(self, s, n: int) -> bool:
        """A chunk of n tokens of sequence s from its first token, no drafts, in a bucket that did not fail."""
        return (s.num_computed == 0 and not (s.spec_k and s.draft_tokens) and self.fits(n) and n <= s.num_tokens
                and n <= s.num_known)     # (a recomputed sequence whose last token is pending: eagerly)

    # ---- one step -------------------------------------------------------------------------------------------------
    def run(self, seq, n: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The logits of token n - 1 [1, V] and the hiddens of the n tokens [n, H] (views of static outputs: valid
        until the next run), or None when the graph could not be made (the caller runs the step eagerly)."""
        got = self.run_rows([(seq, n)])
        if got is None:
            return None
        _, (logits, hidden) = got
        return logits, hidden[:n]

    def setup(self, bk: Bucket) -> None:
        size, ps, dev = bk.size, self.page_size, self.device
        pos = self.arange[:size]
        e = bk.extra
        e["page_of"], e["offset"] = pos // ps, pos % ps
        e["valid"] = torch.empty(size, dtype=torch.bool, device=dev)
        e["rows"] = torch.empty(size, dtype=torch.long, device=dev)
        e["cu"] = torch.zeros(2, dtype=torch.long, device=dev)
        e["keep"] = torch.empty(1, dtype=torch.long, device=dev)
        bk.meta = BatchMeta(cu_seqlens=e["cu"], positions=pos, slots=bk.views["slot"],
                            page_table=bk.views["pages"].view(1, -1), context_lens=bk.views["n"],
                            fresh=torch.ones(1, dtype=torch.bool, device=dev), slot_mapping=e["rows"],
                            token_seq=torch.zeros(size, dtype=torch.long, device=dev), token_index=pos,
                            q_lens=[size], start_positions=[0], page_size=ps, max_context_len=size,
                            fixed_shapes=True, valid=e["valid"])

    def forward(self, bk: Bucket) -> tuple[torch.Tensor, torch.Tensor]:
        """What the graph holds: the rows' validity, KV rows and boundaries from n, then the model's forward."""
        v, e = bk.views, bk.extra
        n = v["n"]
        torch.lt(bk.meta.positions, n, out=e["valid"])
        e["cu"][1:].copy_(n)
        scratch = self.scratch_page * self.page_size + e["offset"]
        torch.where(e["valid"], v["pages"][e["page_of"]] * self.page_size + e["offset"], scratch, out=e["rows"])
        torch.sub(n, 1, out=e["keep"])
        out = self.model(v["ids"], cache=self.cache, meta=bk.meta, logits_to_keep=e["keep"])
        return out.logits, out.hidden_states

    # ---- static inputs --------------------------------------------------------------------------------------------
    def row_values(self, size: int, rows) -> tuple[list[int], list[tuple[int, int]]]:
        width = -(-size // self.page_size)
        if not rows:   # a capture's warm-up: every token real, all in the scratch slot and page
            return [0] * size + [self.scratch_page] * width + [size, self.scratch_slot], []
        (s, n), = rows
        pages = list(s.pages[:width])
        return (s.token_slice(0, n) + [0] * (size - n) + pages + [self.scratch_page] * (width - len(pages))
                + [n, s.slot]), []
