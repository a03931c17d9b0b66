"""Model runner: owns the device work — the cache tensors, batch tensors and the forward pass.

It turns a scheduled batch into packed input ids + BatchMeta, runs the model, and returns the logits of the
sequences that need a new token (those whose last scheduled token is their last known token).
"""
from __future__ import annotations

import torch

from ..model.cache import BatchMeta, HybridCache
from .scheduler import ScheduledBatch


class ModelRunner:
    def __init__(self, model, num_slots: int, num_pages: int, page_size: int, include_mtp: bool = False):
        self.model = model
        p = model.model.embed_tokens.weight
        self.device, self.dtype = p.device, p.dtype
        self.cache = HybridCache(model.config, num_slots, num_pages, page_size, self.dtype, self.device,
                                 include_mtp=include_mtp)
        self.page_size = page_size

    @torch.inference_mode()
    def forward(self, batch: ScheduledBatch) -> tuple[torch.Tensor, dict[int, slice], torch.Tensor]:
        """Returns (logits [R, V] in fp32, {seq index: its rows in logits}, hidden [N, H] of every token).

        A sequence gets logits rows when its last known token is in this step: one row, or 1 + k rows when it
        verifies k drafts (its drafts are appended to its tokens, and the GDN states after each are kept)."""
        seqs, counts = batch.seqs, batch.num_tokens
        ids, keep, rows, r = [], [], {}, 0
        offset = 0
        for i, (s, n) in enumerate(zip(seqs, counts)):
            d = s.draft_tokens if s.spec_k else []
            ids += s.token_slice(s.num_computed, s.num_computed + n - len(d)) + d
            want = (len(d) + 1) if s.num_computed + n - len(d) == s.num_tokens else 0
            keep += range(offset + n - want, offset + n)
            if want:
                rows[i] = slice(r, r + want)
                r += want
            offset += n
        spec = [bool(s.spec_k and s.draft_tokens) for s in seqs]
        meta = BatchMeta.build(counts, [s.num_computed for s in seqs], [s.slot for s in seqs],
                               [s.pages for s in seqs], self.page_size, self.device,
                               keep_step_states=spec if any(spec) else None)
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        out = self.model(input_ids, cache=self.cache, meta=meta,
                         logits_to_keep=torch.tensor(keep, dtype=torch.long, device=self.device))
        return out.logits.float(), rows, out.hidden_states
