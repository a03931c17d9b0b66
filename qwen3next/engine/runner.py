"""Model runner: owns the device work — the cache tensors, batch tensors and the forward pass.

It turns a scheduled batch into packed input ids + BatchMeta, runs the model, and returns the logits of the
sequences that need a new token (those whose last scheduled token is their last known token). On CUDA, pure
decode steps, and with speculative decoding uniform verification steps and MTP drafting, are replayed from CUDA
graphs captured per batch-size bucket (graphs.py, draft_graphs.py), and a step that is one prompt's first chunk
of up to 4K tokens from a graph per token bucket (prefill_graphs.py); everything else runs eagerly.
"""
from __future__ import annotations

import logging
import time

import torch

from ..model.cache import BatchMeta, HybridCache
from ..ops.transfer import to_device
from .draft_graphs import DraftGraphs
from .graphs import DecodeGraphs, PageTable, graphs_enabled
from .prefill_graphs import PREFILL_GRAPH_MAX_TOKENS, PrefillGraphs
from .scheduler import ScheduledBatch

log = logging.getLogger("qwen3next.engine")


class ModelRunner:
    def __init__(self, model, num_slots: int, num_pages: int, page_size: int, include_mtp: bool = False,
                 max_model_len: int | None = None, cuda_graphs: bool = True,
                 prefill_graph_tokens: int = PREFILL_GRAPH_MAX_TOKENS, overlap: bool = False):
        self.model = model
        p = model.model.embed_tokens.weight
        self.device, self.dtype = p.device, p.dtype
        # overlap scheduling (engine.py): the last step's sampled tokens stay on the device, row j of `sampled`
        # for the step's j-th sampling sequence; the next step reads a pending input token from there
        self.sampled: torch.Tensor | None = (
            torch.zeros(num_slots + 1, dtype=torch.long, device=self.device) if overlap else None)
        # one state slot and one KV page more than the cache manager hands out (it knows only slots < num_slots,
        # pages < num_pages): the scratch that padding rows of graph-replayed decode steps write into
        self.cache = HybridCache(model.config, num_slots + 1, num_pages + 1, page_size, self.dtype, self.device,
                                 include_mtp=include_mtp)
        self.num_slots, self.num_pages, self.page_size = num_slots, num_pages, page_size
        self.max_model_len = max_model_len or num_pages * page_size
        self._pages: PageTable | None = None        # the graphs' page table by slot (made with the first graphs)
        on = graphs_enabled(self.device, cuda_graphs)
        self.graphs: DecodeGraphs | None = self.decode_graphs() if on else None
        # bf16 only: in other dtypes the prefill experts take a path that reads counts back to the host
        # (ops/kernels.experts_forward), which no graph can capture
        self.prefill_graphs: PrefillGraphs | None = (
            self.make_prefill_graphs(prefill_graph_tokens)
            if on and prefill_graph_tokens > 0 and self.dtype == torch.bfloat16 else None)
        self.verify_graphs: DecodeGraphs | None = None    # speculation_graphs()
        self.draft_graphs: DraftGraphs | None = None
        self.verified_by_graph = False              # the last step was a verification through verify_graphs
        self.eager_steps = 0
        self.prefills_beside_decode = 0             # prefill graphs replayed beside a decode step's

    @property
    def pages(self) -> PageTable:
        if self._pages is None:
            self._pages = PageTable(self.num_slots + 1, -(-self.max_model_len // self.page_size),
                                    scratch_slot=self.num_slots, scratch_page=self.num_pages, device=self.device)
        return self._pages

    def decode_graphs(self, capture: bool = True) -> DecodeGraphs:
        """Decode steps through static buffers, captured in CUDA graphs (capture=False: the same path run eagerly,
        how the CPU tests check it)."""
        return DecodeGraphs(self.model, self.cache, self.pages, max_model_len=self.max_model_len,
                            max_batch=self.num_slots, capture=capture, sampled=self.sampled)

    def make_prefill_graphs(self, max_tokens: int = PREFILL_GRAPH_MAX_TOKENS, capture: bool = True) -> PrefillGraphs:
        """A prompt's first chunk of up to `max_tokens` tokens through static buffers padded to a token bucket,
        captured in CUDA graphs (capture=False: the same path eagerly, for the CPU tests)."""
        return PrefillGraphs(self.model, self.cache, self.pages, max_model_len=self.max_model_len,
                             max_tokens=min(max_tokens, self.max_model_len), capture=capture)

    def speculation_graphs(self, k: int, max_batch: int, capture: bool = True,
                           force: bool = False) -> DraftGraphs | None:
        """Verification steps of k drafts and MTP drafting as graphs per bucket of up to `max_batch` sequences;
        only where decode steps use graphs (or `force`: capture=False on a CPU, for tests). Returns the drafting
        graphs, which the speculator runs (None: none made)."""
        if (self.graphs is None and not force) or max_batch < 1 or k < 1:
            return None
        max_batch = min(max_batch, self.num_slots)
        self.verify_graphs = DecodeGraphs(self.model, self.cache, self.pages, max_model_len=self.max_model_len,
                                          max_batch=max_batch, drafts=k, capture=capture)
        self.draft_graphs = DraftGraphs(self.model, self.cache, self.pages, k=k, max_model_len=self.max_model_len,
                                        max_batch=max_batch, capture=capture)
        return self.draft_graphs

    @torch.inference_mode()
    def forward(self, batch: ScheduledBatch) -> tuple[torch.Tensor, dict[int, slice], torch.Tensor]:
        """Returns (logits [R, V] in fp32, {seq index: its rows in logits}, hidden [N, H] of every token).

        A sequence gets logits rows when its last known token is in this step: one row, or 1 + k rows when it
        verifies k drafts (its drafts are appended to its tokens, and the GDN states after each are kept)."""
        self.verified_by_graph = False
        if self.prefill_graphs is not None:
            out = self._prefill_by_graph(batch)
            if out is not None:
                return out
        return self._step(batch)

    def _step(self, batch: ScheduledBatch) -> tuple[torch.Tensor, dict[int, slice], torch.Tensor]:
        if self.graphs is not None and self.graphs.applies(batch):
            out = self.graphs.run(batch.seqs)
            if out is not None:   # copies: the next replay overwrites the static outputs
                logits, hidden = out
                return (logits.to(torch.float32, copy=True), {i: slice(i, i + 1) for i in range(len(batch))},
                        hidden.clone())
        if self.verify_graphs is not None and self.verify_graphs.applies(batch):
            out = self.verify_graphs.run(batch.seqs)
            if out is not None:
                logits, hidden = out
                q = self.verify_graphs.q
                self.verified_by_graph = True
                return (logits.to(torch.float32, copy=True), {i: slice(i * q, (i + 1) * q) for i in range(len(batch))},
                        hidden.clone())
        self.eager_steps += 1
        seqs, counts = batch.seqs, batch.num_tokens
        ids, keep, rows, r = [], [], {}, 0
        offset, pending = 0, []
        for i, (s, n) in enumerate(zip(seqs, counts)):
            d = s.draft_tokens if s.spec_k else []
            ids += s.token_slice(s.num_computed, s.num_computed + n - len(d)) + d
            if s.num_computed + n - len(d) > s.num_known:
                pending.append((offset + s.num_known - s.num_computed, _pending_row(s, n - len(d))))
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
        input_ids = to_device(ids, torch.long, self.device)
        if pending:     # tokens the last step sampled, still on the device
            at, src = to_device(list(zip(*pending)), torch.long, self.device)
            input_ids[at] = self.sampled[src]
        out = self.model(input_ids, cache=self.cache, meta=meta,
                         logits_to_keep=to_device(keep, torch.long, self.device))
        return out.logits.float(), rows, out.hidden_states

    def _prefill_by_graph(self, batch: ScheduledBatch):
        """A step with one prompt's first chunk that fits a prefill graph, beside only sequences decoding one token
        each (a prompt arriving at a busy server) or none: the prompt replays its prefill graph and the others
        their decode graph, two replays instead of one eager step whose launches would set its pace (the prompt
        and the decoders touch different slots and pages). None where that does not apply."""
        if self.graphs is not None and self.graphs.applies(batch):
            return None     # one-token prompts among decoding sequences: the decode graph takes them all at once
        pg = self.prefill_graphs
        fresh = [i for i, (s, n) in enumerate(zip(batch.seqs, batch.num_tokens)) if pg.takes(s, n)]
        if len(fresh) != 1:
            return None
        i = fresh[0]
        others = ScheduledBatch(batch.seqs[:i] + batch.seqs[i + 1:], batch.num_tokens[:i] + batch.num_tokens[i + 1:])
        if others.seqs and (self.graphs is None or not self.graphs.applies(others)):
            return None
        s, n = batch.seqs[i], batch.num_tokens[i]
        out = pg.run(s, n)
        if out is None:
            return None
        logits, hidden = out
        want = int(n == s.num_tokens)   # the chunk ends at the last known token: its logits are wanted
        # copies: the next replay overwrites the static outputs
        mine = (logits[:want].to(torch.float32, copy=True), {0: slice(0, 1)} if want else {}, hidden.clone())
        if not others.seqs:
            return mine
        self.prefills_beside_decode += 1
        return _merge(batch, [i], mine, [j for j in range(len(batch)) if j != i], self._step(others))

    @torch.inference_mode()
    def commit_drafts(self, commits: list[tuple[int, int, int]]) -> None:
        """After a verification step: (sequence index in the batch, its slot, index of its last kept token) for
        every verifying sequence; its slot takes the GDN state after that token."""
        if self.verified_by_graph:     # every sequence of the batch verified, in batch order
            self.verify_graphs.commit([keep for _, _, keep in sorted(commits)])
        else:
            for i, slot, keep in commits:
                self.cache.commit_step_states(i, slot, keep)
            self.cache.clear_step_states()
        self.verified_by_graph = False

    @torch.inference_mode()
    def warm_up(self, force: bool = False) -> float:
        """Compile at start-up what a first request would otherwise wait for (on CUDA; `force` runs it anywhere,
        for tests): Triton compiles every kernel variant on its first use, and the prefill of one sequence takes
        other variants of fla's chunked kernels than a packed batch of several (no packed boundaries); in a fresh
        process the first request alone, after batched ones, waited 38-64 s for them (H100, 2026-11-23). Runs a
        one-sequence and a two-sequence prefill, a later prefill chunk (each also through the MTP head when the
        engine speculates), and the decode step of one sequence (its CUDA graph captured, which compiles the decode
        layers), all in the scratch slot and page that no request uses. Returns seconds."""
        if self.device.type != "cuda" and not force:
            return 0.0
        started = time.perf_counter()
        n = max(1, min(self.page_size // 2, 8))
        slot, page = self.num_slots, self.num_pages
        # (sequences, start): one and two sequences from their first token, then a later chunk of one and of two
        # (the kernels' variants with an initial state, attention over cached keys): fla autotunes those anew,
        # which made the first long prompt through 8K chunks wait 22 s on an H100 (engine_prefill.py, 2026-11-24);
        # two with initial states are what a prompt's eager chunk beside decoding sequences runs (a first 32K
        # prompt beside 8 of them waited 21 s for 12 compiles of fla's chunk_fwd_h without it)
        for seqs, start in ((1, 0), (2, 0), (1, n), (2, n)):
            if start + n > self.page_size:
                continue
            meta = BatchMeta.build([n] * seqs, [start] * seqs, [slot] * seqs, [[page]] * seqs, self.page_size,
                                   self.device)
            ids = torch.zeros(n * seqs, dtype=torch.long, device=self.device)
            keep = torch.tensor([n * seqs - 1], device=self.device)
            self.model(ids, cache=self.cache, meta=meta, logits_to_keep=keep)
            if self.cache.include_mtp and seqs == 1:
                # the MTP head's eager catch-up over unseen positions (engine/speculative.py): its first call
                # compiled the head's prefill kernels, 3.2 s inside the first requests (H100, 2026-11-24)
                hidden = torch.zeros(1, n, self.model.config.hidden_size, device=self.device, dtype=self.dtype)
                self.model.mtp_forward(hidden, ids[None], cache=self.cache, meta=meta, logits_to_keep=keep)
        for graphs in (self.graphs, self.verify_graphs, self.draft_graphs):
            if graphs is not None:
                graphs.prepare(1)
        if self.prefill_graphs is not None:   # every token bucket: a prompt's first step never waits for a capture
            for size in self.prefill_graphs.sizes:
                self.prefill_graphs.prepare(size)
        seconds = time.perf_counter() - started
        log.info("warm-up (prefill kernels, decode graph of one sequence, prefill graphs) took %.1f s", seconds)
        return seconds

    def graph_stats(self) -> dict | None:
        if self.graphs is None:
            return None
        out = {**self.graphs.as_dict(), "eager_steps": self.eager_steps}
        if self.prefill_graphs is not None:
            out["prefill"] = {**self.prefill_graphs.as_dict(), "beside_decode": self.prefills_beside_decode}
        if self.verify_graphs is not None:
            out["verification"] = self.verify_graphs.as_dict()
            out["drafting"] = self.draft_graphs.as_dict()
        return out


def _pending_row(s, n: int) -> int:
    """Where the one pending token among a sequence's n scheduled tokens (its last) was sampled."""
    if s.pending_row is None or s.num_computed + n != s.num_known + 1:
        raise RuntimeError(f"request {s.request_id}: only its last scheduled token may be pending (computed "
                           f"{s.num_computed}, scheduled {n}, known {s.num_known}, pending {s.num_pending})")
    return s.pending_row


def _merge(batch: ScheduledBatch, idx_a: list[int], a, idx_b: list[int], b):
    """Two sub-steps' (logits, rows, hidden) as one step's: sub-step rows renumbered to `batch`'s sequence
    indices, hiddens in `batch`'s packed token order."""
    (la, ra, ha), (lb, rb, hb) = a, b
    rows = {idx_a[j]: sl for j, sl in ra.items()}
    rows.update({idx_b[j]: slice(sl.start + la.shape[0], sl.stop + la.shape[0]) for j, sl in rb.items()})
    where, counts = {}, batch.num_tokens
    for idx, h in ((idx_a, ha), (idx_b, hb)):
        at = 0
        for j in idx:
            where[j] = h[at:at + counts[j]]
            at += counts[j]
    return torch.cat([la, lb]), rows, torch.cat([where[j] for j in range(len(batch))])
