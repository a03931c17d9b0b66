"""MTP drafting of a speculative step as one CUDA graph per batch-size bucket: the catch-up and all k drafts.

Eagerly, drafting k tokens is k + 1 forwards of the MTP head (the catch-up over the positions it has not seen,
then one per further draft) with a host round trip between them to pick each draft. Here the drafts are greedy
(the argmax of the head's logits), so the whole chain stays on the device, and its shapes are fixed per bucket:
  - catch-up: q = k + 1 positions per sequence. After a verification that kept a drafts a sequence has a + 1 <= q
    new true positions; the rows after them are padding, whose MTP keys land at positions beyond the last true
    one and are overwritten by the drafts' own keys before anything reads them (a draft at position p attends to
    keys <= p). The first draft is the argmax at the last true row (`last`).
  - k - 1 further steps of one token per sequence, each fed the head's own hidden state and the previous draft.
Positions, KV rows and context lengths are derived inside the graph from each row's first catch-up position
(`start`) and the shared page table (engine/graphs.PageTable); the pending true hiddens are copied into a static
buffer before the replay. A sequence with more than q unseen positions (after a prefill, or after steps without
drafting) first catches up on the older ones eagerly (Speculator.draft).

Greedy drafts serve sampled requests too: rejection sampling with a draft distribution that puts all its mass on
the draft accepts it with probability p(draft) and keeps the output distribution exact (engine/speculative.py),
as vLLM's MTP drafting does.
"""
from __future__ import annotations

import torch

from ..model.cache import BatchMeta, HybridCache
from .graphs import Bucket, PageTable, StaticSteps, per_row


class DraftGraphs(StaticSteps):
    def __init__(self, model, cache: HybridCache, pages: PageTable, *, k: int, max_model_len: int,
                 max_batch: int, capture: bool = True):
        if k < 1:
            raise ValueError(f"drafting needs k >= 1, got {k}")
        self.k, self.q = k, k + 1
        self.kind = f"MTP drafting (k={k})"
        super().__init__(model, cache, pages, max_model_len=max_model_len, max_size=max_batch, capture=capture)
        w = model.model.embed_tokens.weight
        self.hidden = torch.zeros(self.sizes[-1] * self.q, model.config.hidden_size, dtype=w.dtype, device=w.device)

    def parts(self, size: int) -> dict[str, int]:
        q = self.q
        return per_row(size, next_ids=q, dest=q, slots=1, start=1, last=1, update_at=1, update_to=1)

    def applies(self, seqs) -> bool:
        return self.fits(len(seqs)) and all(
            s.spec_k == self.k and len(s.pages) <= self.pages.width and s.num_tokens + self.k <= self.max_model_len
            for s in seqs)

    # ---- one step -------------------------------------------------------------------------------------------------
    def run(self, rows: list[tuple[object, int, torch.Tensor]]) -> torch.Tensor | None:
        """rows: (sequence, first position to catch up, its true hiddens [n <= q, H] from there on). Returns the
        drafts [B, k] on the device (a view of a static output), or None when the graph could not be made."""
        total = sum(h.shape[0] for _, _, h in rows)

        def copy_hiddens(bk: Bucket):
            # the sequences' true hiddens into their rows of the static buffer (padding rows keep old values)
            self.hidden.index_copy_(0, bk.views["dest"][:total], torch.cat([h for _, _, h in rows]))

        got = self.run_rows(rows, before_replay=copy_hiddens)
        return None if got is None else got[1][0][:len(rows)]

    def row_values(self, size: int, rows) -> tuple[list[int], list[tuple[int, int]]]:
        q = self.q
        ids, dest, slots, start, last = [], [], [], [], []
        for i, (s, p, h) in enumerate(rows):
            n = h.shape[0]
            if not 1 <= n <= q:
                raise ValueError(f"a drafting graph catches up 1..{q} positions per sequence, got {n}")
            ids += s.token_slice(p + 1, p + 1 + n) + [0] * (q - n)     # t_{p+1} beside h_p
            dest += range(i * q, i * q + n)
            slots.append(s.slot)
            start.append(p)
            last.append(i * q + n - 1)
        pad = size - len(rows)
        ids += [0] * (pad * q)
        dest += [0] * (size * q - len(dest))
        slots += [self.scratch_slot] * pad
        start += [0] * pad
        last += [i * q + q - 1 for i in range(len(rows), size)]
        updates, extra = self.pages.inline(self.pages.updates([s for s, _, _ in rows]), size)
        return ids + dest + slots + start + last + updates, extra

    def setup(self, bk: Bucket) -> None:
        dev, size = self.device, bk.size
        bk.extra["page_table"] = torch.empty(size, self.pages.width, dtype=torch.long, device=dev)
        bk.extra["offsets"] = torch.arange(self.q, device=dev)

    # ---- the graph ------------------------------------------------------------------------------------------------
    def _meta(self, bk: Bucket, positions: torch.Tensor, q: int, verify_like: bool) -> BatchMeta:
        """Metadata of `q` tokens per row at `positions` [size * q] (tensors computed inside the graph)."""
        size, ps = bk.size, self.page_size
        pt = bk.extra["page_table"]
        pos = positions.view(size, q)
        rows = pt.gather(1, (pos // ps).clamp_max(pt.shape[1] - 1)) * ps + pos % ps
        seq = self.arange[:size]
        return BatchMeta(cu_seqlens=self.arange[:size + 1] * q, positions=positions, slots=bk.views["slots"],
                         page_table=pt, context_lens=pos[:, -1] + 1, fresh=pos[:, 0] == 0,
                         slot_mapping=rows.reshape(-1), token_seq=seq.repeat_interleave(q),
                         token_index=bk.extra["offsets"][:q].repeat(size), q_lens=[q] * size,
                         start_positions=[0] * size, page_size=ps, max_context_len=self.max_model_len,
                         # several tokens per row with fixed shapes: the uniform (verification) attention path
                         keep_step_states=[True] * size if verify_like else None,
                         fixed_shapes=True)

    def forward(self, bk: Bucket) -> tuple[torch.Tensor]:
        v, size, q = bk.views, bk.size, self.q
        self.pages.apply(v["update_at"], v["update_to"])
        torch.index_select(self.pages.table, 0, v["slots"], out=bk.extra["page_table"])
        positions = (v["start"][:, None] + bk.extra["offsets"]).reshape(-1)
        meta = self._meta(bk, positions, q, verify_like=True)
        logits, h, _ = self.model.mtp_forward(self.hidden[:size * q][None], v["next_ids"][None], cache=self.cache,
                                              meta=meta, logits_to_keep=v["last"])
        draft = logits[0].argmax(-1)
        h = h[0, v["last"]]
        pos = positions[v["last"]]                 # each row's last true position
        drafts = [draft]
        for _ in range(self.k - 1):
            pos = pos + 1
            logits, h, _ = self.model.mtp_forward(h[None], draft[None], cache=self.cache,
                                                  meta=self._meta(bk, pos, 1, verify_like=False))
            h = h[0]
            draft = logits[0].argmax(-1)
            drafts.append(draft)
        return (torch.stack(drafts, dim=1),)
