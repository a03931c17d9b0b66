"""Cache manager: who owns which state slot and which KV pages. Pure bookkeeping — the tensors live in the runner.

Two pools, because the two layer kinds grow differently:
  - state slots (Gated DeltaNet conv + fp32 recurrent state): one per running sequence, constant size;
  - KV pages (attention layers): page_size tokens each, a sequence holds ceil(tokens / page_size) of them.
"""
from __future__ import annotations

from collections import deque

from .sequence import Sequence


class CacheManager:
    def __init__(self, num_slots: int, num_pages: int, page_size: int):
        if num_slots < 1 or num_pages < 1 or page_size < 1:
            raise ValueError(f"need at least one slot, page and token per page; got slots={num_slots}, "
                             f"pages={num_pages}, page_size={page_size}")
        self.num_slots, self.num_pages, self.page_size = num_slots, num_pages, page_size
        self.free_slots: deque[int] = deque(range(num_slots))
        self.free_pages: deque[int] = deque(range(num_pages))

    def pages_needed(self, seq: Sequence, new_tokens: int) -> int:
        total = -(-(seq.num_computed + new_tokens) // self.page_size)
        return max(total - len(seq.pages), 0)

    def can_allocate(self, seq: Sequence, new_tokens: int) -> bool:
        return (seq.slot is not None or bool(self.free_slots)) and \
            self.pages_needed(seq, new_tokens) <= len(self.free_pages)

    def allocate(self, seq: Sequence, new_tokens: int) -> None:
        """Give `seq` a slot (if it has none) and enough pages for `new_tokens` more tokens."""
        if not self.can_allocate(seq, new_tokens):
            raise RuntimeError(f"cache manager: no room for {new_tokens} tokens of request {seq.request_id}")
        if seq.slot is None:
            seq.slot = self.free_slots.popleft()
        for _ in range(self.pages_needed(seq, new_tokens)):
            seq.pages.append(self.free_pages.popleft())

    def trim(self, seq: Sequence) -> None:
        """Return the pages beyond what seq's tokens need: after speculative verification, the pages that only
        held rejected drafts go back to the pool at once."""
        keep = -(-seq.num_tokens // self.page_size)
        while len(seq.pages) > keep:
            self.free_pages.append(seq.pages.pop())

    def free(self, seq: Sequence) -> None:
        if seq.slot is not None:
            self.free_slots.append(seq.slot)
            seq.slot = None
        self.free_pages.extend(seq.pages)
        seq.pages = []

    @property
    def slots_used(self) -> int:
        return self.num_slots - len(self.free_slots)

    @property
    def pages_used(self) -> int:
        return self.num_pages - len(self.free_pages)
