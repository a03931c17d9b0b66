"""Decode and verification steps replayed from CUDA graphs, one graph per batch-size bucket.

A small decode step on a GPU is bound by the host time of launching its kernels. A pure decode step (every
sequence adds exactly its one last token, no drafts) has the same shapes every time for a given batch size, so it
is captured once per bucket (1, 2, 4, 8, 16, 24, ... up to max_num_seqs) and replayed: a step of B sequences runs
the graph of the smallest bucket >= B, the extra rows being padding. A speculative verification step (every
sequence: its last token and k drafts, the GDN state kept after each) is the same with q = k + 1 tokens per row
(`DecodeGraphs(drafts=k)`); after it, `commit` moves each sequence's state after its last accepted token into its
slot by a second, small graph.

Everything the graph reads lives in static device buffers, refilled before each replay:
  - one flat int64 tensor, filled by ONE host->device copy per step: per row the q input ids, positions and KV
    rows of the new tokens (slot_mapping), its state slot, plus up to Bk page-table updates (below);
  - the page table is a device tensor indexed by state slot, [slots + 1, max_pages_per_seq], updated
    incrementally (`PageTable`: the host keeps a mirror and sends only the entries that changed, so a step never
    ships whole page-table rows); the graph gathers its rows by slot. One table serves every kind of graph;
  - context_lens = first position + q and fresh = (first position == 0) are computed inside the graph;
  - cu_seqlens, token_seq, token_index are constants of a bucket; max_context_len is fixed to the engine's
    max_model_len (the GPU attention's work follows the device-side context_lens).
Padding rows use a scratch state slot and a scratch KV page that the cache manager never hands out (the runner's
HybridCache has one of each beyond what the manager knows): token 0 at positions 0..q-1, fresh (zero state), so
they are finite and identical to each other, and write only into the scratch slot and page.

The model's forward is the same code as an eager step: `model(ids, cache=cache, meta=static_meta)`.
`capture=False` runs the same static-buffer path eagerly (no graph): the CPU tests check the bucketing, padding
and buffer logic that way. After capturing, a bucket replays its graph once on padding inputs and compares the
outputs with the eager step's. A capture that fails (or fails that check) logs one warning, and that bucket runs
eagerly for good. `StaticSteps` is that machinery; the MTP drafting graphs (engine/draft_graphs.py) use it too.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

from ..model.cache import BatchMeta, GDNState, HybridCache
from ..ops.transfer import to_device

log = logging.getLogger("qwen3next.engine")

MAX_GRAPH_BATCH = 512      # larger decode batches run eagerly: their kernels are big enough to hide the launches
WARMUP_STEPS = 2           # eager runs before a capture: the first ones compile the decode layers (ops/fused.py)
ENV = "QWEN3NEXT_CUDA_GRAPHS"


def graphs_enabled(device: torch.device, requested: bool = True) -> bool:
    """CUDA graphs for decode steps: on CUDA only, unless switched off by argument or QWEN3NEXT_CUDA_GRAPHS=0."""
    return bool(requested) and torch.device(device).type == "cuda" and os.environ.get(ENV, "1") != "0"


def per_row(size: int, **lengths: int) -> dict[str, int]:
    """Input parts of a bucket of `size` rows, each part `length` ints per row."""
    return {name: n * size for name, n in lengths.items()}


def bucket_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, then multiples of 8, ending exactly at max_batch (capped at MAX_GRAPH_BATCH)."""
    top = min(max_batch, MAX_GRAPH_BATCH)
    if top < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    return [b for b in [1, 2, 4, *range(8, top, 8)] if b < top] + [top]


class PageTable:
    """The KV page table by state slot on the device, [slots, width], and the host's mirror of it: graphs gather
    their rows' pages from it, and the host sends only the entries that changed since the last step."""

    def __init__(self, num_slots: int, width: int, scratch_slot: int, scratch_page: int, device):
        self.width, self.scratch_slot, self.scratch_page = width, scratch_slot, scratch_page
        # stale entries beyond a sequence's pages are never read (context_lens bounds it)
        self.table = torch.full((num_slots, width), scratch_page, dtype=torch.long, device=device)
        self.mirror: dict[int, list[int]] = {}                          # what `table` holds, per slot

    def updates(self, seqs) -> list[tuple[int, int]]:
        """(flat index, page) entries that bring the table up to date for `seqs`; the mirror assumes they will be
        written before the next call."""
        W, out = self.width, []
        for s in seqs:
            old, new = self.mirror.get(s.slot, []), s.pages
            if old != new:                             # usually equal, or one page appended
                j = next((i for i, (a, b) in enumerate(zip(old, new)) if a != b), min(len(old), len(new)))
                out += [(s.slot * W + i, new[i]) for i in range(j, len(new))]
                self.mirror[s.slot] = list(new)
        return out

    def inline(self, updates: list[tuple[int, int]], size: int) -> tuple[list[int], list[tuple[int, int]]]:
        """The first `size` updates as [indices..., pages...] for a graph's update area (padded with no-op writes
        to the scratch row), and the rest, which `write` applies before the replay."""
        inline, extra = updates[:size], updates[size:]
        inline += [(self.scratch_slot * self.width, self.scratch_page)] * (size - len(inline))
        return [i for i, _ in inline] + [v for _, v in inline], extra

    def write(self, updates: list[tuple[int, int]]) -> None:
        if updates:   # a row new to its slot (a request's first graph step, a slot changing hands)
            at, to = to_device(list(zip(*updates)), torch.long, self.table.device)
            self.table.view(-1).index_copy_(0, at, to)

    def apply(self, update_at: torch.Tensor, update_to: torch.Tensor) -> None:
        """Inside a graph: the inline updates."""
        self.table.view(-1).index_copy_(0, update_at, update_to)


@dataclass
class Bucket:
    """The static views of one bucket of `size` rows (the flat input buffer is laid out per bucket)."""
    size: int
    views: dict                # name -> view of the flat int64 input buffer
    meta: BatchMeta | None = None
    graph: object = None       # torch.cuda.CUDAGraph once captured
    outputs: tuple = ()        # the static outputs of the last run
    extra: dict = field(default_factory=dict)   # what a kind of graph keeps beside (e.g. the kept GDN states)


class StaticSteps(ABC):
    """Steps of fixed shapes per batch-size bucket, fed through static buffers and captured as CUDA graphs.

    A subclass says how a bucket's flat int64 inputs are laid out (`parts`: name -> length in a bucket), how a
    batch fills them (`row_values`) and what the graph computes (`forward`). Buckets are batch sizes here; a
    subclass may bucket by something else (`bucket_list`, `size_of`: prefill graphs bucket by tokens)."""

    kind = "step"

    def __init__(self, model, cache: HybridCache, pages: PageTable, *, max_model_len: int, max_size: int,
                 capture: bool = True):
        dev = model.model.embed_tokens.weight.device
        self.model, self.cache, self.pages, self.device, self.capture = model, cache, pages, dev, capture
        self.page_size, self.max_model_len = cache.page_size, max_model_len
        self.scratch_slot, self.scratch_page = pages.scratch_slot, pages.scratch_page
        self.sizes = self.bucket_list(max_size)
        top = self.sizes[-1]
        total = sum(self.parts(top).values())
        self.inputs = torch.zeros(total, dtype=torch.long, device=dev)   # refilled by one copy per step
        self.host = torch.zeros(total, dtype=torch.long, pin_memory=dev.type == "cuda")
        self.copied = torch.cuda.Event() if dev.type == "cuda" else None   # the host buffer may be reused
        self.arange = torch.arange(top + 1, dtype=torch.long, device=dev)
        self.buckets: dict[int, Bucket] = {}
        self.pool = None
        self.failed_buckets: set[int] = set()
        self.replays = 0            # steps run by this path (graph replays; static-path runs on CPU)
        self.padded_rows = 0

    # ---- what a subclass says -------------------------------------------------------------------------------------
    def bucket_list(self, max_size: int) -> list[int]:
        return bucket_sizes(max_size)

    def size_of(self, rows) -> int:
        """The size a step of `rows` needs (its bucket is the smallest size >= it)."""
        return len(rows)

    @abstractmethod
    def parts(self, size: int) -> dict[str, int]:
        """Lengths of the flat int64 input parts of a bucket of `size`, in order (`per_row` for batch buckets)."""

    @abstractmethod
    def row_values(self, size: int, seqs) -> tuple[list[int], list[tuple[int, int]]]:
        """The flat int64 inputs of a bucket of `size` rows for `seqs` (padded), in `parts` order, and the
        page-table updates that do not fit in its update area."""

    def setup(self, bk: Bucket) -> None:
        """Per-bucket constants (meta) once its views exist."""

    @abstractmethod
    def forward(self, bk: Bucket) -> tuple[torch.Tensor, ...]:
        """What the graph computes; returns its outputs (the first is the capture check's)."""

    def after_capture(self, bk: Bucket) -> None:
        """What the capture's Python side produced that replays must see again (e.g. the kept GDN states)."""

    # ---- when -----------------------------------------------------------------------------------------------------
    def bucket_for(self, batch_size: int) -> int:
        return next(b for b in self.sizes if b >= batch_size)

    def fits(self, batch_size: int) -> bool:
        return 0 < batch_size <= self.sizes[-1] and self.bucket_for(batch_size) not in self.failed_buckets

    @torch.inference_mode()     # as the engine's steps run: with autograd on, the ops would take their autograd paths
    def prepare(self, batch_size: int) -> bool:
        """Capture the bucket of `batch_size` now (start-up warm-up) rather than at its first step; False if it
        failed (its steps then run eagerly, as they would have)."""
        with self._on_device():
            return self._bucket(self.bucket_for(batch_size)) is not None

    # ---- one step -------------------------------------------------------------------------------------------------
    def run_rows(self, seqs, before_replay=None) -> tuple[Bucket, tuple[torch.Tensor, ...]] | None:
        """The bucket and its static outputs (valid until its next run) for `seqs`, or None when the graph could
        not be made (the caller runs the step eagerly). `before_replay(bk)`: device work after the inputs are
        filled and before the graph runs (in the stream order)."""
        B = self.size_of(seqs)
        with self._on_device():
            bk = self._bucket(self.bucket_for(B))
            if bk is None:
                return None
            self._fill(bk, seqs)
            if before_replay is not None:
                before_replay(bk)
            if bk.graph is not None:
                bk.graph.replay()
                self.after_replay(bk)
            else:   # the same static-buffer path, run eagerly; outputs kept in static tensors as a graph's are
                out = self.forward(bk)
                if not bk.outputs:
                    bk.outputs = tuple(torch.empty_like(t) for t in out)
                for o, t in zip(bk.outputs, out):
                    o.copy_(t)
        self.replays += 1
        self.padded_rows += bk.size - B
        return bk, bk.outputs

    def after_replay(self, bk: Bucket) -> None:
        """Restore what the capture's Python side produced (subclasses)."""

    def _bucket(self, size: int) -> Bucket | None:
        bk = self.buckets.get(size)
        if bk is not None:
            return bk
        x = self.inputs
        views, at = {}, 0
        for name, n in self.parts(size).items():
            views[name] = x[at:at + n]
            at += n
        bk = Bucket(size, views)
        self.setup(bk)
        if self.capture:
            try:
                started = time.perf_counter()
                self._capture(bk)
                log.info("captured the CUDA graph of %s bucket %d in %.2f s", self.kind, size,
                         time.perf_counter() - started)
            except Exception as e:  # noqa: BLE001 - a capture failure must not take the engine down
                # this bucket's steps run eagerly from now on; other buckets may still capture (e.g. an fp32 model
                # whose experts take a host-synchronising path above some batch size)
                self.failed_buckets.add(size)
                self.pool = None    # a failed capture can leave its memory pool unusable for the next capture
                log.warning("CUDA graph capture of %s bucket %d failed (%s: %s); these steps run eagerly from now "
                            "on", self.kind, size, type(e).__name__, str(e)[:300])
                log.debug("where the capture failed", exc_info=True)
                return None
        self.buckets[size] = bk
        return bk

    def _on_device(self):
        """The runner's GPU as the current device (streams, events and replay follow the current device; the
        engine may step from a thread whose current device is another one)."""
        return torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()

    def _capture(self, bk: Bucket) -> None:
        self._fill(bk, [])                             # every row padding: warm-up runs touch only the scratch
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(WARMUP_STEPS):
                eager = self.forward(bk)[0]
        torch.cuda.current_stream().wait_stream(stream)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            bk.outputs = self.forward(bk)              # tensors of the graph's pool: its static outputs
        self.after_capture(bk)
        # a replay of the padding inputs must give what the eager step gave (padding rows start from a zero state,
        # so both runs compute the same thing): a check that the graph reads its inputs from the static buffers
        graph.replay()
        got = bk.outputs[0]
        same = torch.equal(got, eager) if not got.is_floating_point() else \
            torch.allclose(got.float(), eager.float(), rtol=1e-3, atol=1e-3)
        if not same:
            err = (got.double() - eager.double()).abs().max().item()
            raise RuntimeError(f"the replayed graph's output differs from the eager step's (max abs error {err:.3g})")
        bk.graph = graph

    def _fill(self, bk: Bucket, seqs) -> None:
        values, extra = self.row_values(bk.size, seqs)
        self.pages.write(extra)
        n = len(values)
        if self.copied is not None:
            self.copied.synchronize()                  # the previous step's copy has left the pinned buffer
            self.host[:n] = torch.tensor(values, dtype=torch.long)
            self.inputs[:n].copy_(self.host[:n], non_blocking=True)
            self.copied.record()
        else:
            self.inputs[:n].copy_(torch.tensor(values, dtype=torch.long))

    def as_dict(self) -> dict:
        return {"buckets_captured": sorted(b for b, bk in list(self.buckets.items()) if bk.graph is not None),
                "replays": self.replays, "padded_rows": self.padded_rows, "failed": sorted(self.failed_buckets),
                "captured": self.capture}


class DecodeGraphs(StaticSteps):
    """Decode steps (drafts=0: one token per sequence) or speculative verification steps (drafts=k: the last
    token and k drafts per sequence, the GDN states after every token kept), per batch-size bucket."""

    def __init__(self, model, cache: HybridCache, pages: PageTable, *, max_model_len: int, max_batch: int,
                 drafts: int = 0, capture: bool = True, sampled: torch.Tensor | None = None):
        if drafts < 0:
            raise ValueError(f"drafts must be >= 0, got {drafts}")
        self.drafts, self.q = drafts, drafts + 1
        # overlap scheduling: a row's input token may be one the last step sampled, read from `sampled` inside
        # the graph (row part `pending`: its index there, or -1 when the host knows the token)
        self.sampled = sampled
        self.kind = "decode" if drafts == 0 else f"verification (k={drafts})"
        super().__init__(model, cache, pages, max_model_len=max_model_len, max_size=max_batch, capture=capture)
        self.keeps = torch.zeros(self.sizes[-1], dtype=torch.long, device=self.device)   # commit's input
        self.commits = 0

    def parts(self, size: int) -> dict[str, int]:
        q, pending = self.q, int(self.sampled is not None)
        return per_row(size, ids=q, positions=q, slots=1, rows=q, update_at=1, update_to=1, pending=pending)

    # ---- when -----------------------------------------------------------------------------------------------------
    def applies(self, batch) -> bool:
        """Every sequence computes its last known token (and, for verification, exactly k drafts after it), and
        the batch fits a bucket that did not fail."""
        if not self.fits(len(batch.seqs)):
            return False
        k = self.drafts
        for s, n in zip(batch.seqs, batch.num_tokens):
            d = len(s.draft_tokens) if s.spec_k else 0
            if n != self.q or d != k or s.num_computed + 1 != s.num_tokens:
                return False
            if len(s.pages) > self.pages.width or s.num_tokens + k > self.max_model_len:
                return False
        return True

    # ---- one step -------------------------------------------------------------------------------------------------
    def run(self, seqs) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Logits [B * q, V] and hiddens [B * q, H] (views of static outputs: valid until the next run), or None
        when the graph could not be made (the caller runs the step eagerly)."""
        got = self.run_rows(seqs)
        if got is None:
            return None
        bk, (logits, hidden) = got
        n = len(seqs) * self.q
        return logits[:n], hidden[:n]

    def setup(self, bk: Bucket) -> None:
        size, q, v = bk.size, self.q, bk.views
        dev = self.device
        first = v["positions"].view(size, q)[:, 0]
        bk.extra["first"] = first
        bk.extra["page_table"] = torch.empty(size, self.pages.width, dtype=torch.long, device=dev)
        bk.extra["context_lens"] = torch.empty(size, dtype=torch.long, device=dev)
        bk.extra["fresh"] = torch.empty(size, dtype=torch.bool, device=dev)
        seq = torch.arange(size, device=dev)
        bk.meta = BatchMeta(cu_seqlens=self.arange[:size + 1] * q, positions=v["positions"], slots=v["slots"],
                            page_table=bk.extra["page_table"], context_lens=bk.extra["context_lens"],
                            fresh=bk.extra["fresh"], slot_mapping=v["rows"],
                            token_seq=seq.repeat_interleave(q), token_index=torch.arange(q, device=dev).repeat(size),
                            q_lens=[q] * size,
                            start_positions=[0] * size,    # host copy unused by these steps (it changes per step)
                            page_size=self.page_size, max_context_len=self.max_model_len,
                            keep_step_states=[True] * size if self.drafts else None,
                            fixed_shapes=True)

    def forward(self, bk: Bucket) -> tuple[torch.Tensor, torch.Tensor]:
        """What the graph holds: page-table updates, the derived metadata, the model's forward (all rows' logits)."""
        v, e = bk.views, bk.extra
        self.pages.apply(v["update_at"], v["update_to"])
        torch.index_select(self.pages.table, 0, v["slots"], out=e["page_table"])
        torch.add(e["first"], self.q, out=e["context_lens"])
        torch.eq(e["first"], 0, out=e["fresh"])        # a row starting at position 0: a 1-token prompt
        ids = v["ids"]
        if self.sampled is not None:
            src = v["pending"]
            last = ids.view(bk.size, self.q)[:, 0]
            last.copy_(torch.where(src >= 0, self.sampled[src.clamp(min=0)], last))
        out = self.model(ids, cache=self.cache, meta=bk.meta)
        return out.logits, out.hidden_states

    def after_capture(self, bk: Bucket) -> None:
        if self.drafts:   # the kept GDN states are tensors of the graph's pool, refilled by every replay
            bk.extra["steps"] = {i: layer.steps for i, layer in enumerate(self.cache.layers)
                                 if isinstance(layer, GDNState)}
            bk.extra["step_batch"] = {i: self.cache.layers[i].step_batch for i in bk.extra["steps"]}
            self.cache.clear_step_states()

    def after_replay(self, bk: Bucket) -> None:
        for i, steps in bk.extra.get("steps", {}).items():
            layer = self.cache.layers[i]
            layer.steps, layer.step_batch = steps, bk.extra["step_batch"][i]

    # ---- after verification ---------------------------------------------------------------------------------------
    def commit(self, keeps: list[int]) -> None:
        """After a verification step run by `run`: sequence i's slot takes the GDN state after its token keeps[i]
        (0 = the token before the drafts), in one graph (or its eager twin) for the whole bucket."""
        bk = self.buckets.get(self.bucket_for(len(keeps))) if self.fits(len(keeps)) else None
        if bk is None or not self.drafts:
            raise RuntimeError("commit follows a verification step run through these graphs")
        with self._on_device():
            self.keeps[:bk.size].copy_(torch.tensor(keeps + [0] * (bk.size - len(keeps)), dtype=torch.long))
            graph = bk.extra.get("commit_graph")
            if graph is None and bk.graph is not None:
                graph = bk.extra["commit_graph"] = self._capture_commit(bk)
            if graph is not None:
                graph.replay()
            else:
                self._commit(bk)
        self.cache.clear_step_states()
        self.commits += 1

    def _commit(self, bk: Bucket) -> None:
        rows, keep = self.arange[:bk.size], self.keeps[:bk.size]
        for layer in self.cache.layers:
            if isinstance(layer, GDNState) and layer.step_batch is not None:
                conv, rec = layer.step_batch
                layer.conv.index_copy_(0, bk.views["slots"], conv[rows, keep].to(layer.conv.dtype))
                layer.recurrent.index_copy_(0, bk.views["slots"], rec[rows, keep].to(layer.recurrent.dtype))

    def _capture_commit(self, bk: Bucket):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            self._commit(bk)
        return graph

    # ---- static inputs --------------------------------------------------------------------------------------------
    def row_values(self, size: int, seqs) -> tuple[list[int], list[tuple[int, int]]]:
        ps, q = self.page_size, self.q
        ids, pos, slots, rows, pending = [], [], [], [], []
        for s in seqs:
            p = s.num_computed
            ids += s.token_slice(p, p + 1) + (list(s.draft_tokens) if self.drafts else [])
            pending.append(s.pending_row if p == s.num_known else -1)
            for j in range(q):
                pos.append(p + j)
                rows.append(s.pages[(p + j) // ps] * ps + (p + j) % ps)
            slots.append(s.slot)
        pad = size - len(seqs)
        ids += [0] * (pad * q)
        pos += list(range(q)) * pad
        slots += [self.scratch_slot] * pad
        rows += [self.scratch_page * ps + j % ps for j in range(q)] * pad
        updates, extra = self.pages.inline(self.pages.updates(seqs), size)
        pending = pending + [-1] * pad if self.sampled is not None else []
        return ids + pos + slots + rows + updates + pending, extra

    def as_dict(self) -> dict:
        return {**super().as_dict(), **({"commits": self.commits} if self.drafts else {})}
