"""Decode steps replayed from CUDA graphs, one graph per batch-size bucket.

A small decode step on a GPU is bound by the host time of launching its kernels. A pure decode step (every
sequence adds exactly its one last token, no drafts) has the same shapes every time for a given batch size, so it
is captured once per bucket (1, 2, 4, 8, 16, 24, ... up to max_num_seqs) and replayed: a step of B sequences runs
the graph of the smallest bucket >= B, the extra rows being padding.

Everything the graph reads lives in static device buffers, refilled before each replay:
  - one flat int64 tensor, filled by ONE host->device copy per step: per row the input id, position, state slot
    and KV row of the new token (slot_mapping), plus up to Bk page-table updates (below);
  - the page table is a device tensor indexed by state slot, [slots + 1, max_pages_per_seq], updated
    incrementally (a decode step adds at most one page per sequence; the host keeps a mirror and sends only the
    entries that changed, so a step never ships whole page-table rows); the graph gathers its rows by slot;
  - context_lens = position + 1 and fresh = (position == 0) are computed inside the graph;
  - cu_seqlens, token_seq, token_index are constants of a decode bucket; max_context_len is fixed to the
    engine's max_model_len (the GPU attention's work follows the device-side context_lens).
Padding rows use a scratch state slot and a scratch KV page that the cache manager never hands out (the runner's
HybridCache has one of each beyond what the manager knows): token 0 at position 0, fresh (zero state), so they are
finite and identical to each other, and write only into the scratch slot and page.

The model's forward is the same code as an eager step: `model(ids, cache=cache, meta=static_meta)`.
`capture=False` runs the same static-buffer path eagerly (no graph): the CPU tests check the bucketing, padding
and buffer logic that way. After capturing, a bucket replays its graph once on padding inputs and compares the
logits with the eager step's. A capture that fails (or fails that check) logs one warning, and that bucket runs
eagerly for good.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass

import torch

from ..model.cache import BatchMeta, HybridCache

log = logging.getLogger("qwen3next.engine")

MAX_GRAPH_BATCH = 512      # larger decode batches run eagerly: their kernels are big enough to hide the launches
WARMUP_STEPS = 2           # eager runs before a capture: the first ones compile the decode layers (ops/fused.py)
ENV = "QWEN3NEXT_CUDA_GRAPHS"


def graphs_enabled(device: torch.device, requested: bool = True) -> bool:
    """CUDA graphs for decode steps: on CUDA only, unless switched off by argument or QWEN3NEXT_CUDA_GRAPHS=0."""
    return bool(requested) and torch.device(device).type == "cuda" and os.environ.get(ENV, "1") != "0"


def bucket_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, then multiples of 8, ending exactly at max_batch (capped at MAX_GRAPH_BATCH)."""
    top = min(max_batch, MAX_GRAPH_BATCH)
    if top < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    return [b for b in [1, 2, 4, *range(8, top, 8)] if b < top] + [top]


@dataclass
class _Bucket:
    """The static views of one bucket of Bk rows (the flat input buffer is laid out per bucket)."""
    size: int
    ids: torch.Tensor          # [Bk]
    positions: torch.Tensor    # [Bk]
    slots: torch.Tensor        # [Bk]
    update_at: torch.Tensor    # [Bk] flat index into the per-slot page table
    update_to: torch.Tensor    # [Bk] page id written there
    meta: BatchMeta
    graph: object = None       # torch.cuda.CUDAGraph once captured
    logits: torch.Tensor | None = None   # outputs of the last run: [Bk, V], [Bk, H]
    hidden: torch.Tensor | None = None


class DecodeGraphs:
    def __init__(self, model, cache: HybridCache, *, scratch_slot: int, scratch_page: int, page_size: int,
                 max_model_len: int, max_batch: int, capture: bool = True):
        dev = model.model.embed_tokens.weight.device
        if not (0 <= scratch_slot < cache.num_slots and 0 <= scratch_page < cache.num_pages):
            raise ValueError("the scratch slot and page must exist in the cache")
        self.model, self.cache, self.device, self.capture = model, cache, dev, capture
        self.page_size, self.max_model_len = page_size, max_model_len
        self.scratch_slot, self.scratch_page = scratch_slot, scratch_page
        self.sizes = bucket_sizes(max_batch)
        top = self.sizes[-1]
        self.width = -(-max_model_len // page_size)                     # max pages per sequence
        long = dict(dtype=torch.long, device=dev)
        self.inputs = torch.zeros(6 * top, **long)                      # refilled by one copy per step
        self.host = torch.zeros(6 * top, dtype=torch.long, pin_memory=dev.type == "cuda")
        self.copied = torch.cuda.Event() if dev.type == "cuda" else None   # the host buffer may be reused
        # page table by state slot; stale entries beyond a sequence's pages are never read (context_lens bounds it)
        self.slot_pages = torch.full((cache.num_slots, self.width), scratch_page, **long)
        self.mirror: dict[int, list[int]] = {}                          # what slot_pages holds, per slot
        self.page_table = torch.zeros(top, self.width, **long)
        self.context_lens = torch.zeros(top, **long)
        self.fresh = torch.zeros(top, dtype=torch.bool, device=dev)
        self.arange = torch.arange(top + 1, **long)
        self.zeros = torch.zeros(top, **long)
        self.buckets: dict[int, _Bucket] = {}
        self.pool = None
        self.failed_buckets: set[int] = set()
        self.replays = 0            # decode steps run by this path (graph replays; static-path runs on CPU)
        self.padded_rows = 0

    # ---- when -----------------------------------------------------------------------------------------------------
    def applies(self, batch) -> bool:
        """A pure decode step that fits: every sequence computes its last known token, no drafts, <= top bucket."""
        B = len(batch.seqs)
        if not B or B > self.sizes[-1] or self.bucket_for(B) in self.failed_buckets:
            return False
        for s, n in zip(batch.seqs, batch.num_tokens):
            if n != 1 or (s.spec_k and s.draft_tokens) or s.num_computed + 1 != s.num_tokens:
                return False
            if len(s.pages) > self.width or s.num_tokens > self.max_model_len:
                return False
        return True

    def prepare(self, batch_size: int) -> bool:
        """Capture the bucket of `batch_size` now (start-up warm-up) rather than at its first step; False if it
        failed (its steps then run eagerly, as they would have)."""
        with self._on_device():
            return self._bucket(self.bucket_for(batch_size)) is not None

    def bucket_for(self, batch_size: int) -> int:
        return next(b for b in self.sizes if b >= batch_size)

    # ---- one step -------------------------------------------------------------------------------------------------
    def run(self, seqs) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Logits [B, V] and hiddens [B, H] (views of static outputs: valid until the next run), or None when the
        graph could not be made (graphs are off from then on; the caller runs the step eagerly)."""
        B = len(seqs)
        with self._on_device():
            bk = self._bucket(self.bucket_for(B))
            if bk is None:
                return None
            self._fill(bk, seqs)
            if bk.graph is not None:
                bk.graph.replay()
            else:   # the same static-buffer path, run eagerly; outputs kept in static tensors as a graph's are
                logits, hidden = self._forward(bk)
                if bk.logits is None:
                    bk.logits, bk.hidden = torch.empty_like(logits), torch.empty_like(hidden)
                bk.logits.copy_(logits)
                bk.hidden.copy_(hidden)
        self.replays += 1
        self.padded_rows += bk.size - B
        return bk.logits[:B], bk.hidden[:B]

    def _bucket(self, size: int) -> _Bucket | None:
        bk = self.buckets.get(size)
        if bk is not None:
            return bk
        bk = self._views(size)
        if self.capture:
            try:
                started = time.perf_counter()
                self._capture(bk)
                log.info("captured the CUDA graph of decode batch %d in %.2f s", size, time.perf_counter() - started)
            except Exception as e:  # noqa: BLE001 - a capture failure must not take the engine down
                # this bucket's steps run eagerly from now on; other buckets may still capture (e.g. an fp32 model
                # whose experts take a host-synchronising path above some batch size)
                self.failed_buckets.add(size)
                log.warning("CUDA graph capture of decode batch %d failed (%s: %s); decode steps of this bucket run "
                            "eagerly from now on", size, type(e).__name__, str(e)[:300])
                return None
        self.buckets[size] = bk
        return bk

    def _on_device(self):
        """The runner's GPU as the current device (streams, events and replay follow the current device; the
        engine may step from a thread whose current device is another one)."""
        return torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()

    def _views(self, size: int) -> _Bucket:
        x = self.inputs
        part = lambda i: x[i * size:(i + 1) * size]  # noqa: E731
        meta = BatchMeta(cu_seqlens=self.arange[:size + 1], positions=part(1), slots=part(2),
                         page_table=self.page_table[:size], context_lens=self.context_lens[:size],
                         fresh=self.fresh[:size], slot_mapping=part(3), token_seq=self.arange[:size],
                         token_index=self.zeros[:size], q_lens=[1] * size,
                         start_positions=[0] * size,       # host copy unused by decode steps (it changes per step)
                         page_size=self.page_size, max_context_len=self.max_model_len)
        return _Bucket(size, part(0), part(1), part(2), part(4), part(5), meta)

    def _forward(self, bk: _Bucket) -> tuple[torch.Tensor, torch.Tensor]:
        """What the graph holds: page-table updates, the derived metadata, the model's forward (all rows' logits)."""
        self.slot_pages.view(-1).index_copy_(0, bk.update_at, bk.update_to)
        torch.index_select(self.slot_pages, 0, bk.slots, out=bk.meta.page_table)
        torch.add(bk.positions, 1, out=bk.meta.context_lens)
        torch.eq(bk.positions, 0, out=bk.meta.fresh)       # a decode token at position 0: a 1-token prompt
        out = self.model(bk.ids, cache=self.cache, meta=bk.meta)
        return out.logits, out.hidden_states

    def _capture(self, bk: _Bucket) -> None:
        self._fill(bk, [])                             # every row padding: warm-up runs touch only the scratch
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(WARMUP_STEPS):
                eager_logits = self._forward(bk)[0]
        torch.cuda.current_stream().wait_stream(stream)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            bk.logits, bk.hidden = self._forward(bk)      # tensors of the graph's pool: its static outputs
        # a replay of the padding inputs must give what the eager step gave (padding rows start from a zero state,
        # so both runs compute the same thing): a check that the graph reads its inputs from the static buffers
        graph.replay()
        if not torch.allclose(bk.logits.float(), eager_logits.float(), rtol=1e-3, atol=1e-3):
            err = (bk.logits.float() - eager_logits.float()).abs().max().item()
            raise RuntimeError(f"the replayed graph's logits differ from the eager step's (max abs error {err:.3g})")
        bk.graph = graph

    # ---- static inputs --------------------------------------------------------------------------------------------
    def row_values(self, size: int, seqs) -> tuple[list[int], list[tuple[int, int]]]:
        """The flat int64 inputs of a bucket of `size` rows for `seqs` (padded), and the page-table updates that do
        not fit in its update area (applied separately). Updates the page-table mirror."""
        ps, W = self.page_size, self.width
        ids, pos, slots, rows, updates = [], [], [], [], []
        for s in seqs:
            p = s.num_computed
            ids.append(s.token_slice(p, p + 1)[0])
            pos.append(p)
            slots.append(s.slot)
            rows.append(s.pages[p // ps] * ps + p % ps)
            old, new = self.mirror.get(s.slot, []), s.pages
            if old != new:                             # usually equal, or one page appended
                j = next((i for i, (a, b) in enumerate(zip(old, new)) if a != b), min(len(old), len(new)))
                updates += [(s.slot * W + i, new[i]) for i in range(j, len(new))]
                self.mirror[s.slot] = list(new)
        pad = size - len(seqs)
        ids += [0] * pad
        pos += [0] * pad
        slots += [self.scratch_slot] * pad
        rows += [self.scratch_page * ps] * pad
        inline, extra = updates[:size], updates[size:]
        inline += [(self.scratch_slot * W, self.scratch_page)] * (size - len(inline))   # no-op writes
        return ids + pos + slots + rows + [i for i, _ in inline] + [v for _, v in inline], extra

    def _fill(self, bk: _Bucket, seqs) -> None:
        values, extra = self.row_values(bk.size, seqs)
        if extra:   # a row new to its slot (a request's first graph step, a slot changing hands): written apart
            at, to = zip(*extra)
            self.slot_pages.view(-1).index_copy_(0, torch.tensor(at, device=self.device),
                                                 torch.tensor(to, device=self.device))
        n = len(values)
        if self.copied is not None:
            self.copied.synchronize()                  # the previous step's copy has left the pinned buffer
            self.host[:n] = torch.tensor(values, dtype=torch.long)
            self.inputs[:n].copy_(self.host[:n], non_blocking=True)
            self.copied.record()
        else:
            self.inputs[:n].copy_(torch.tensor(values, dtype=torch.long))

    # ---- introspection --------------------------------------------------------------------------------------------
    def as_dict(self) -> dict:
        return {"buckets_captured": sorted(b for b, bk in list(self.buckets.items()) if bk.graph is not None),
                "replays": self.replays, "padded_rows": self.padded_rows, "failed": sorted(self.failed_buckets),
                "captured": self.capture}
