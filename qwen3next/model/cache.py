"""Explicit cache objects and batch metadata for the cached forward.

A batch is a set of sequences whose new tokens are packed along one axis (N tokens in all). Each sequence owns:
  - a state slot: conv state [C, K-1] and fp32 recurrent state [Hv, dk, dv] in every Gated DeltaNet layer;
  - KV pages in every attention layer (a page table row).
The model only sees `HybridCache` (the tensors) and `BatchMeta` (who is where); who owns which slot or page is
the engine's business.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import FULL, ModelConfig


@dataclass
class BatchMeta:
    cu_seqlens: torch.Tensor     # [S+1] long: sequence i's new tokens are rows cu_seqlens[i]:cu_seqlens[i+1]
    positions: torch.Tensor      # [N] long: absolute position of every new token
    slots: torch.Tensor          # [S] long: state slot of every sequence
    page_table: torch.Tensor     # [S, P] long: KV pages of every sequence
    context_lens: torch.Tensor   # [S] long: tokens in the KV cache after this step (cached + new)
    q_lens: list[int]            # host copies, for shape decisions without device syncs
    start_positions: list[int]
    page_size: int

    @property
    def num_seqs(self) -> int:
        return len(self.q_lens)

    @property
    def is_decode(self) -> bool:
        return all(n == 1 for n in self.q_lens)

    @property
    def max_q_len(self) -> int:
        return max(self.q_lens)

    @property
    def max_context_len(self) -> int:
        return max(s + n for s, n in zip(self.start_positions, self.q_lens))

    @property
    def fresh(self) -> torch.Tensor:
        """[S] bool: sequences starting at position 0, whose recurrent state must start from zero."""
        return torch.tensor([s == 0 for s in self.start_positions], device=self.slots.device)

    def slot_mapping(self) -> torch.Tensor:
        """[N] flat KV row (page * page_size + offset) of every new token."""
        seq_of = torch.repeat_interleave(torch.arange(self.num_seqs, device=self.positions.device),
                                         torch.tensor(self.q_lens, device=self.positions.device))
        page = self.page_table[seq_of, self.positions // self.page_size]
        return page * self.page_size + self.positions % self.page_size

    @classmethod
    def build(cls, q_lens: list[int], start_positions: list[int], slots: list[int], page_table: list[list[int]],
              page_size: int, device="cpu") -> "BatchMeta":
        if not q_lens or any(n < 1 for n in q_lens):
            raise ValueError(f"every sequence in a batch needs at least one new token, got q_lens={q_lens}")
        cu = [0]
        for n in q_lens:
            cu.append(cu[-1] + n)
        positions = [s + j for s, n in zip(start_positions, q_lens) for j in range(n)]
        width = max(len(r) for r in page_table) or 1
        table = [list(r) + [0] * (width - len(r)) for r in page_table]
        need = [-(-(s + n) // page_size) for s, n in zip(start_positions, q_lens)]
        for i, (r, m) in enumerate(zip(page_table, need)):
            if len(r) < m:
                raise ValueError(f"sequence {i} needs {m} KV pages for {start_positions[i] + q_lens[i]} tokens, "
                                 f"its page table has {len(r)}")
        t = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
        return cls(cu_seqlens=t(cu), positions=t(positions), slots=t(slots), page_table=t(table),
                   context_lens=t([s + n for s, n in zip(start_positions, q_lens)]), q_lens=list(q_lens),
                   start_positions=list(start_positions), page_size=page_size)


@dataclass
class GDNState:
    conv: torch.Tensor           # [num_slots, conv_dim, K-1]
    recurrent: torch.Tensor      # [num_slots, Hv, dk, dv], fp32


@dataclass
class KVPages:
    k: torch.Tensor              # [num_pages, page_size, Hkv, D]
    v: torch.Tensor


class HybridCache:
    """Per-layer state for `num_slots` sequences and a pool of `num_pages` KV pages (main layers, then MTP layers)."""

    def __init__(self, cfg: ModelConfig, num_slots: int, num_pages: int, page_size: int = 16,
                 dtype: torch.dtype = torch.float32, device="cpu", include_mtp: bool = True):
        self.num_slots, self.num_pages, self.page_size = num_slots, num_pages, page_size
        kinds = list(cfg.layer_types) + ([FULL] * cfg.mtp_layers if include_mtp else [])
        self.layers: list[GDNState | KVPages] = []
        for kind in kinds:
            if kind == FULL:
                shape = (num_pages, page_size, cfg.num_key_value_heads, cfg.head_dim)
                self.layers.append(KVPages(torch.zeros(shape, dtype=dtype, device=device),
                                           torch.zeros(shape, dtype=dtype, device=device)))
            else:
                self.layers.append(GDNState(
                    torch.zeros(num_slots, cfg.linear_conv_dim, cfg.linear_conv_kernel_dim - 1, dtype=dtype,
                                device=device),
                    torch.zeros(num_slots, cfg.linear_num_value_heads, cfg.linear_key_head_dim,
                                cfg.linear_value_head_dim, dtype=torch.promote_types(dtype, torch.float32), device=device)))

    def __getitem__(self, i: int):
        return self.layers[i]

    def zero_slots(self, slots) -> None:
        """A slot handed to a new sequence starts from a zero state."""
        idx = torch.as_tensor(slots, dtype=torch.long)
        for layer in self.layers:
            if isinstance(layer, GDNState):
                layer.conv[idx.to(layer.conv.device)] = 0
                layer.recurrent[idx.to(layer.recurrent.device)] = 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers
                   for t in ((layer.conv, layer.recurrent) if isinstance(layer, GDNState) else (layer.k, layer.v)))


class SequenceCache:
    """A `HybridCache` for a fixed batch of B sequences with contiguous pages, tracking each sequence's length.

    The simple way to run the cached forward from a script: `cache = model.new_cache(B, max_len)`, then
    `model(ids, cache=cache)` any number of times (a prefill chunk or one decode token per call).
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_seq_len: int, page_size: int = 16,
                 dtype=torch.float32, device="cpu"):
        self.pages_per_seq = -(-max_seq_len // page_size)
        self.max_seq_len = max_seq_len
        self.cache = HybridCache(cfg, batch_size, batch_size * self.pages_per_seq, page_size, dtype, device)
        self.lengths = [0] * batch_size
        self.device = device

    def plan(self, q_lens: list[int], seqs: list[int] | None = None) -> BatchMeta:
        """Metadata for appending q_lens[j] tokens to sequence seqs[j] (default: all, in order); advances lengths."""
        seqs = list(range(len(self.lengths))) if seqs is None else list(seqs)
        if len(seqs) != len(q_lens):
            raise ValueError(f"got {len(q_lens)} token counts for {len(seqs)} sequences")
        for s, n in zip(seqs, q_lens):
            if self.lengths[s] + n > self.max_seq_len:
                raise ValueError(f"sequence {s} would hold {self.lengths[s] + n} tokens; this cache was made for "
                                 f"max_seq_len={self.max_seq_len}")
        pps = self.pages_per_seq
        meta = BatchMeta.build(q_lens, [self.lengths[s] for s in seqs], seqs,
                               [list(range(s * pps, (s + 1) * pps)) for s in seqs], self.cache.page_size,
                               self.device)
        for s, n in zip(seqs, q_lens):
            self.lengths[s] += n
        return meta
