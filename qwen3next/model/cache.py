"""Explicit cache objects and batch metadata for the cached forward.

A batch is a set of sequences whose new tokens are packed along one axis (N tokens in all). Each sequence owns:
  - a state slot: conv state [C, K-1] and fp32 recurrent state [Hv, dk, dv] in every Gated DeltaNet layer;
  - KV pages in every attention layer (a page table row).
The model only sees `HybridCache` (the tensors) and `BatchMeta` (who is where); who owns which slot or page is
the engine's business.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config import FULL, ModelConfig
from ..ops.transfer import to_device


ALIGN = 16     # int64 elements (128 bytes) between the starts of BatchMeta's tensors in their one device buffer


@dataclass
class BatchMeta:
    """Who is where in a packed batch. Every tensor is built on the host in one go and moved in one copy, so a step
    needs no device-to-host syncs (and a decode step can be captured in a CUDA graph with these tensors as inputs)."""
    cu_seqlens: torch.Tensor     # [S+1] long: sequence i's new tokens are rows cu_seqlens[i]:cu_seqlens[i+1]
    positions: torch.Tensor      # [N] long: absolute position of every new token
    slots: torch.Tensor          # [S] long: state slot of every sequence
    page_table: torch.Tensor     # [S, P] long: KV pages of every sequence
    context_lens: torch.Tensor   # [S] long: tokens in the KV cache after this step (cached + new)
    fresh: torch.Tensor          # [S] bool: starts at position 0, so its recurrent state starts from zero
    slot_mapping: torch.Tensor   # [N] long: flat KV row (page * page_size + offset) of every new token
    token_seq: torch.Tensor      # [N] long: which sequence each token belongs to
    token_index: torch.Tensor    # [N] long: index of each token within its sequence's new tokens
    q_lens: list[int]            # host copies, for shape decisions
    start_positions: list[int]
    page_size: int
    max_context_len: int         # key length the attention pads to (>= every context_lens entry)
    keep_step_states: list[bool] | None = None   # speculative verification: keep GDN states after every token
    cu_seqlens_cpu: torch.Tensor | None = None   # cu_seqlens on the host (fla's prefill kernels take it: no sync)
    fixed_shapes: bool = False   # a step padded to a graph bucket: its shapes recur, so compiling it pays
    # [N] bool, False on padding rows after the real tokens (a prefill padded to a graph's token bucket,
    # engine/prefill_graphs.py); cu_seqlens then ends at the last real row. Padding rows must leave no trace:
    # their keys go to a scratch page, and Gated DeltaNet gives them beta = 0 and g = 0 (state passed unchanged)
    valid: torch.Tensor | None = None
    # the kind of step, decided once here: compiled decode layers read these bools, never the q_lens list (reading
    # a list inside torch.compile guards on its length and values, so every batch size would compile anew)
    is_decode: bool = field(init=False)   # one new token per sequence
    is_verify: bool = field(init=False)   # speculative verification: the same number of drafts per sequence,
    #                                       keeping the GDN states after every token
    is_step: bool = field(init=False)     # decode or uniform verification: fixed shapes, no per-sequence host
    #                                       loop, so the layers can run compiled (and be captured in a CUDA graph)
    num_seqs: int = field(init=False)
    max_q_len: int = field(init=False)

    def __post_init__(self):
        keep = self.keep_step_states
        self.is_decode = all(n == 1 for n in self.q_lens)
        self.is_verify = keep is not None and all(keep) and len(set(self.q_lens)) == 1
        self.is_step = (self.is_decode and keep is None) or self.is_verify
        self.num_seqs, self.max_q_len = len(self.q_lens), max(self.q_lens)

    @classmethod
    def build(cls, q_lens: list[int], start_positions: list[int], slots: list[int], page_table: list[list[int]],
              page_size: int, device="cpu", pad_context_to: int | None = None,
              keep_step_states: list[bool] | None = None) -> "BatchMeta":
        """`pad_context_to`: fix the attention key length (a CUDA graph captured for a context bucket)."""
        if not q_lens or any(n < 1 for n in q_lens):
            raise ValueError(f"every sequence in a batch needs at least one new token, got q_lens={q_lens}")
        ends = [s + n for s, n in zip(start_positions, q_lens)]
        for i, (r, e) in enumerate(zip(page_table, ends)):
            if len(r) * page_size < e:
                raise ValueError(f"sequence {i} needs {-(-e // page_size)} KV pages for {e} tokens, "
                                 f"its page table has {len(r)}")
        cu, seq_of, idx, positions, rows = [0], [], [], [], []
        for i, (s, n) in enumerate(zip(start_positions, q_lens)):
            cu.append(cu[-1] + n)
            for j in range(n):
                p = s + j
                seq_of.append(i)
                idx.append(j)
                positions.append(p)
                rows.append(page_table[i][p // page_size] * page_size + p % page_size)
        width = max(len(r) for r in page_table) or 1
        table = [list(r) + [0] * (width - len(r)) for r in page_table]
        max_ctx = max(ends) if pad_context_to is None else max(pad_context_to, max(ends))
        # one copy to the device, from pinned memory, not waited for (ops/transfer.py); then views of it, each
        # starting 128-byte aligned: Triton compiles a kernel anew for a pointer that is not 16-byte aligned (a
        # first 32K prompt beside decoding sequences compiled the conv twice more when these views were packed)
        parts = [cu, positions, slots, [p for r in table for p in r], ends, [int(s == 0) for s in start_positions],
                 rows, seq_of, idx]
        flat, starts = [], []
        for part in parts:
            flat += [0] * (-len(flat) % ALIGN)
            starts.append(len(flat))
            flat += part
        flat = to_device(flat, torch.long, device)
        dev = [flat[at:at + len(part)] for at, part in zip(starts, parts)]
        dev[3] = dev[3].view(len(table), width)
        dev[5] = dev[5].bool()
        return cls(*dev, q_lens=list(q_lens), start_positions=list(start_positions), page_size=page_size,
                   max_context_len=max_ctx, keep_step_states=keep_step_states,
                   cu_seqlens_cpu=torch.tensor(cu, dtype=torch.long))


@dataclass
class GDNState:
    conv: torch.Tensor           # [num_slots, conv_dim, K-1]
    recurrent: torch.Tensor      # [num_slots, Hv, dk, dv], fp32
    # after a speculative verification step: sequence index -> (conv [T, C, K-1], recurrent [T, Hv, dk, dv])
    steps: dict = field(default_factory=dict)
    # the same states as two batched tensors ([S, T, ...]) when every sequence verified the same number of drafts
    step_batch: tuple | None = None


@dataclass
class KVPages:
    k: torch.Tensor              # [num_pages, page_size, Hkv, D]
    v: torch.Tensor


class HybridCache:
    """Per-layer state for `num_slots` sequences and a pool of `num_pages` KV pages (main layers, then MTP layers)."""

    def __init__(self, cfg: ModelConfig, num_slots: int, num_pages: int, page_size: int = 16,
                 dtype: torch.dtype = torch.float32, device="cpu", include_mtp: bool = True):
        self.num_slots, self.num_pages, self.page_size = num_slots, num_pages, page_size
        self.include_mtp = include_mtp and cfg.mtp_layers > 0
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

    def commit_step_states(self, seq_index: int, slot: int, keep: int) -> None:
        """After speculative verification: the slot of sequence `seq_index` takes the state after its token
        `keep` (0 = only the token before the drafts), from what the verify step kept."""
        for layer in self.layers:
            if isinstance(layer, GDNState) and seq_index in layer.steps:
                conv, rec = layer.steps[seq_index]
                layer.conv[slot] = conv[keep].to(layer.conv.dtype)
                layer.recurrent[slot] = rec[keep].to(layer.recurrent.dtype)

    def clear_step_states(self) -> None:
        for layer in self.layers:
            if isinstance(layer, GDNState):
                layer.steps, layer.step_batch = {}, None

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
