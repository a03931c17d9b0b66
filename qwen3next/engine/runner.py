"""Model runner: owns the device work — the cache tensors, batch tensors and the forward pass.

It turns a scheduled batch into packed input ids + BatchMeta, runs the model, and returns the logits of the
sequences that need a new token (those whose last scheduled token is their last known token).
"""
from __future__ import annotations

import torch

from ..model.cache import BatchMeta, HybridCache
from .scheduler import ScheduledBatch


class ModelRunner:
    def __init__(self, model, num_slots: int, num_pages: int, page_size: int):
        self.model = model
        p = model.model.embed_tokens.weight
        self.device, self.dtype = p.device, p.dtype
        self.cache = HybridCache(model.config, num_slots, num_pages, page_size, self.dtype, self.device,
                                 include_mtp=False)
        self.page_size = page_size

    @torch.inference_mode()
    def forward(self, batch: ScheduledBatch) -> tuple[torch.Tensor, list[int]]:
        """Returns (logits [R, V] in fp32, indices into batch.seqs of the R rows that get a new token)."""
        seqs, counts = batch.seqs, batch.num_tokens
        ids = [t for s, n in zip(seqs, counts) for t in s.token_slice(s.num_computed, s.num_computed + n)]
        meta = BatchMeta.build(counts, [s.num_computed for s in seqs], [s.slot for s in seqs],
                               [s.pages for s in seqs], self.page_size, self.device)
        sample_rows = [i for i, (s, n) in enumerate(zip(seqs, counts)) if s.num_computed + n == s.num_tokens]
        if not sample_rows:
            keep = torch.zeros(0, dtype=torch.long, device=self.device)
        else:
            ends = meta.cu_seqlens[1:] - 1
            keep = ends[torch.tensor(sample_rows, device=self.device)]
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        out = self.model(input_ids, cache=self.cache, meta=meta, logits_to_keep=keep)
        return out.logits.float(), sample_rows
