"""`qwen3next bench`: Qwen3-Next-80B-A3B vs dense Qwen3-32B vs transformers, side by side, on real layer shapes.

N layers of each model are built with random bf16 weights (as many as fit), timed, and scaled to the whole model:
whole = (t_N - t_out) * L / N + t_out, where t_out (the embedding lookup and rotary table before the layers, the
final norm and lm_head after them) is timed on its own. Every figure
comes with its physical floor, from rates measured in the same run: bytes that must move / measured copy
bandwidth (decode); for prefill, per layer the longer of its FLOPs / measured bf16 matmul rate and its
bytes / bandwidth (at 4K tokens a Qwen3-Next layer is bound by reading all its experts, not by FLOPs).
"""
from __future__ import annotations

import datetime
import json
import os
import time

import torch

from .checkpoint import build_model
from .config import FULL, ModelConfig, preset
from .model.cache import BatchMeta, HybridCache
from .model.init import init_weights
from .ops import fused, kernels, pdl


# the device everything is built on: "cuda" for real runs; tests run the bench's logic on "cpu" with tiny configs
DEV = {"device": "cuda", "dtype": torch.bfloat16}


def _on_gpu() -> bool:
    return DEV["device"] == "cuda"


# ---- timing and machine rates -------------------------------------------------------------------------------------
def timed(fn, warmup: int, iters: int, cuda: bool) -> list[float]:
    """Seconds of each of `iters` calls of fn() after `warmup` untimed ones (CUDA events on the GPU, the wall
    clock on the CPU)."""
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return times


def cuda_time(fn, warmup: int = 3, iters: int = 10) -> float:
    """Median seconds of fn() on the bench's device."""
    times = sorted(timed(fn, warmup, iters, _on_gpu()))
    return times[len(times) // 2]


def copy_bandwidth() -> float:
    """Bytes/s of a device-to-device copy, counting bytes read + written."""
    x = torch.empty(1 << (30 if _on_gpu() else 24), dtype=torch.uint8, device=DEV["device"])
    y = torch.empty_like(x)
    t = cuda_time(lambda: y.copy_(x), 3, 20)
    return 2 * x.numel() / t


def matmul_rate() -> float:
    """bf16 FLOP/s of an 8192^3 matrix product on random data."""
    n = 8192 if _on_gpu() else 256
    a = torch.randn(n, n, device=DEV["device"], dtype=DEV["dtype"])
    b = torch.randn(n, n, device=DEV["device"], dtype=DEV["dtype"])
    t = cuda_time(lambda: a @ b, 3, 10)
    return 2 * n ** 3 / t


# ---- analytic work: FLOPs and bytes -------------------------------------------------------------------------------
def layer_params(cfg: ModelConfig, kind: str, moe: bool) -> dict:
    H = cfg.hidden_size
    if kind == FULL:
        q = H * cfg.num_attention_heads * cfg.head_dim * (2 if cfg.attn_output_gate else 1)
        mixer = q + 2 * H * cfg.num_key_value_heads * cfg.head_dim + cfg.num_attention_heads * cfg.head_dim * H
    else:
        mixer = H * (2 * cfg.linear_key_dim + 2 * cfg.linear_value_dim) + H * 2 * cfg.linear_num_value_heads + \
            cfg.linear_value_dim * H + cfg.linear_conv_dim * cfg.linear_conv_kernel_dim
    if moe:
        expert = 3 * H * cfg.moe_intermediate_size
        dense = H * cfg.num_experts + 3 * H * cfg.shared_expert_intermediate_size + H
        return {"mixer": mixer, "dense_ffn": dense, "expert": expert, "experts": cfg.num_experts,
                "top_k": cfg.num_experts_per_tok}
    return {"mixer": mixer, "dense_ffn": 3 * H * cfg.intermediate_size, "expert": 0, "experts": 0, "top_k": 0}


def _experts_hit(p: dict, tokens: int) -> float:
    """Expected number of distinct experts that `tokens` tokens, each routed to top_k of E, read."""
    return p["experts"] * (1 - (1 - p["top_k"] / p["experts"]) ** tokens) if p["experts"] else 0


def _prefill_parts(cfg: ModelConfig, T: int, wbytes: int = 2):
    """Per layer of a T-token prefill (batch 1), its three parts, each (FLOPs, bytes that must move): the
    projections and dense / shared-expert FFN, the routed experts, and the sequence mixing (causal attention or
    the chunked delta rule). Bytes: every weight the tokens touch read once (at 4K tokens all 512 experts: a
    80B-A3B layer's 3.2 GB of experts outweighs its 0.26 TFLOP), K/V or the recurrent state written once."""
    C = 64
    out = []
    for i, kind in enumerate(cfg.layer_types):
        p = layer_params(cfg, kind, cfg.is_moe_layer(i))
        dense = (2 * T * (p["mixer"] + p["dense_ffn"]), (p["mixer"] + p["dense_ffn"]) * wbytes)
        routed = (2 * T * p["top_k"] * p["expert"], _experts_hit(p, T) * p["expert"] * wbytes)
        if kind == FULL:
            mixing = (2 * T * T * cfg.num_attention_heads * cfg.head_dim,          # QK^T and PV, causal half
                      T * 2 * cfg.num_key_value_heads * cfg.head_dim * wbytes)
        else:
            dk, dv, Hv = cfg.linear_key_head_dim, cfg.linear_value_head_dim, cfg.linear_num_value_heads
            mixing = (T * Hv * (2 * C * (3 * dk + 2 * dv) + 6 * dk * dv), Hv * dk * dv * 4)
        out.append((dense, routed, mixing))
    return out


def _prefill_layers(cfg: ModelConfig, T: int, wbytes: int = 2):
    """Per layer of a T-token prefill (batch 1): (FLOPs, bytes that must move), its parts summed."""
    return [(sum(f for f, _ in parts), sum(b for _, b in parts)) for parts in _prefill_parts(cfg, T, wbytes)]


def prefill_flops(cfg: ModelConfig, T: int) -> float:
    """FLOPs of a T-token prefill (batch 1), lm_head for the last token only."""
    return 2 * cfg.hidden_size * cfg.vocab_size + sum(f for f, _ in _prefill_layers(cfg, T))


def prefill_floor(cfg: ModelConfig, T: int, flops_per_s: float, bytes_per_s: float) -> float:
    """Seconds a T-token prefill cannot beat: each layer takes at least the longer of its FLOPs at the measured
    matmul rate and its bytes at the measured copy bandwidth (a layer is compute- or bandwidth-bound, not both)."""
    head = max(2 * cfg.hidden_size * cfg.vocab_size / flops_per_s, cfg.hidden_size * cfg.vocab_size * 2 / bytes_per_s)
    return head + sum(max(f / flops_per_s, b / bytes_per_s) for f, b in _prefill_layers(cfg, T))


def prefill_floor_serial(cfg: ModelConfig, T: int, flops_per_s: float, bytes_per_s: float) -> float:
    """prefill_floor with each part of a layer (_prefill_parts) at its own bound, one after another, as kernels
    run: a 4K-token Qwen3-Next layer's projections are compute-bound and its experts bandwidth-bound, and the
    layer's floor overlaps the two, which a sequence of kernels does not."""
    head = max(2 * cfg.hidden_size * cfg.vocab_size / flops_per_s, cfg.hidden_size * cfg.vocab_size * 2 / bytes_per_s)
    return head + sum(max(f / flops_per_s, b / bytes_per_s) for parts in _prefill_parts(cfg, T) for f, b in parts)


def decode_bytes(cfg: ModelConfig, batch: int, ctx: int, wbytes: int = 2) -> float:
    """Bytes one decode step must move: weights read (routed experts: the expected number of distinct experts hit
    by `batch` tokens), KV read, recurrent state read + written, lm_head."""
    total = cfg.vocab_size * cfg.hidden_size * wbytes + batch * cfg.hidden_size * wbytes
    for i, kind in enumerate(cfg.layer_types):
        p = layer_params(cfg, kind, cfg.is_moe_layer(i))
        total += (p["mixer"] + p["dense_ffn"] + _experts_hit(p, batch) * p["expert"]) * wbytes
        if kind == FULL:
            total += batch * ctx * 2 * cfg.num_key_value_heads * cfg.head_dim * wbytes
        else:
            total += batch * 2 * cfg.linear_num_value_heads * cfg.linear_key_head_dim * cfg.linear_value_head_dim * 4
    return total


def verify_bytes(cfg: ModelConfig, batch: int, ctx: int, q: int, wbytes: int = 2) -> float:
    """Bytes a speculative verification step of q tokens per sequence must move: as a decode step of batch * q
    tokens for the weights (the routed experts hit by all of them), but each sequence's KV read once and its
    recurrent state read once and written q + 1 times (the state after every token, and the slot's)."""
    total = decode_bytes(cfg, batch * q, 0, wbytes)
    for kind in cfg.layer_types:
        if kind == FULL:
            total += batch * ctx * 2 * cfg.num_key_value_heads * cfg.head_dim * wbytes
        else:
            state = cfg.linear_num_value_heads * cfg.linear_key_head_dim * cfg.linear_value_head_dim * 4
            total += batch * state * (q + 2) - batch * q * 2 * state      # decode_bytes counted 2 per token
    return total


# ---- our model ----------------------------------------------------------------------------------------------------
def random_gpu_model(cfg: ModelConfig, layers: int, seed: int = 0, mtp: bool = False):
    cfg = cfg.replace(num_hidden_layers=layers, num_nextn_predict_layers=1 if mtp else 0,
                      layer_types=cfg.layer_types[:layers] if cfg.model_type == "qwen3_next" else [])
    model = build_model(cfg, DEV["dtype"], DEV["device"])
    torch.manual_seed(seed)
    init_weights(model)
    return model


def _pages_for(tokens: int, page_size: int) -> int:
    return -(-tokens // page_size)


@torch.inference_mode()
def time_prefill(model, T: int, page_size: int = 64) -> tuple[float, dict]:
    """Seconds of a T-token prefill through the engine's path (paged cache, last token's logits), on the faster
    of the two elementwise paths (Triton passes, or torch ops: kernels.FUSED_ELEMENTWISE), both timed side by
    side, and up to the engine's prefill-graph size (engine/prefill_graphs.py: a new prompt's first chunk
    of up to 4K tokens) also replayed from a CUDA graph, as the engine runs it. Returns (seconds, {path: seconds})."""
    from .engine.prefill_graphs import PREFILL_GRAPH_MAX_TOKENS
    cache = HybridCache(model.config, 1, _pages_for(T, page_size), page_size, DEV["dtype"], DEV["device"],
                        include_mtp=False)
    ids = torch.randint(0, model.config.vocab_size, (T,), device=DEV["device"])
    meta = BatchMeta.build([T], [0], [0], [list(range(_pages_for(T, page_size)))], page_size, DEV["device"])
    keep = torch.tensor([T - 1], device=DEV["device"])
    paths, default = {}, kernels.FUSED_ELEMENTWISE
    for path, on in (("fused_elementwise", True), ("torch_elementwise", False)):
        kernels.FUSED_ELEMENTWISE = on
        try:
            paths[path] = cuda_time(lambda: model(ids, cache=cache, meta=meta, logits_to_keep=keep), 2, 5)
        except Exception as e:  # noqa: BLE001 - one failing path is reported; the other still times
            print(f"  prefill on the {path} path failed: {type(e).__name__}: {str(e)[:300]}")
            if not on:
                raise
        finally:
            kernels.FUSED_ELEMENTWISE = default
    if _on_gpu() and T <= PREFILL_GRAPH_MAX_TOKENS:
        try:
            graph = capture_graph(lambda: model(ids, cache=cache, meta=meta, logits_to_keep=keep))
            paths["cuda_graph"] = cuda_time(graph.replay, 2, 5)
            del graph
        except Exception as e:  # noqa: BLE001 - reported; the eager paths stand
            print(f"  prefill in a CUDA graph failed: {type(e).__name__}: {str(e)[:300]}")
        torch.cuda.synchronize()
    return min(paths.values()), paths


def capture_graph(step) -> torch.cuda.CUDAGraph:
    """`step` captured in a CUDA graph, after one run on a side stream (which settles its allocations). What the
    captured call returned is kept as `graph.output` (its tensors are rewritten by every replay)."""
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        g.output = step()
    return g


def time_step(step, warmup: int = 3, graph: bool = True) -> tuple[float, bool]:
    """Seconds per call of `step`, captured in a CUDA graph when possible (the first calls compile)."""
    for _ in range(warmup):
        step()
    if not _on_gpu():
        return cuda_time(step, 0, 5), False
    torch.cuda.synchronize()
    if graph:
        try:
            return cuda_time(capture_graph(step).replay, 3, 20), True
        except Exception as e:  # noqa: BLE001 - report and fall back to eager timing
            print(f"  (CUDA graph capture failed: {type(e).__name__}: {str(e)[:200]}; timing eagerly)")
            torch.cuda.synchronize()
    return cuda_time(step, 3, 20), False


def _decode_batch(model, batch: int, ctx: int, q_len: int = 1, page_size: int = 64, include_mtp: bool = False,
                  keep_step_states: bool = False):
    """A cache with `batch` sequences of `ctx` cached tokens (zeros: the work does not depend on the values) and
    the BatchMeta of a step that appends q_len tokens to each."""
    per_seq = _pages_for(ctx + q_len, page_size)
    cache = HybridCache(model.config, batch, batch * per_seq, page_size, DEV["dtype"], DEV["device"],
                        include_mtp=include_mtp)
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(batch)]
    meta = BatchMeta.build([q_len] * batch, [ctx] * batch, list(range(batch)), tables, page_size, DEV["device"],
                           keep_step_states=[True] * batch if keep_step_states else None)
    ids = torch.randint(0, model.config.vocab_size, (batch * q_len,), device=DEV["device"])
    return cache, meta, ids


@torch.inference_mode()
def time_decode(model, batch: int, ctx: int, page_size: int = 64, graph: bool = True) -> tuple[float, bool, dict]:
    """Seconds per decode step of `batch` sequences that each have `ctx` tokens cached, on the faster of the two
    layer paths (compiled decode layers, or eager ones; both inside a CUDA graph): every model gets its best
    path. Returns (seconds, graphed, {path: seconds})."""
    cache, meta, ids = _decode_batch(model, batch, ctx, page_size=page_size)
    paths, limit = {}, fused.DECODE["max_tokens"]
    for path, mode in (("compiled", "auto"), ("eager", False)):
        fused.DECODE.update(enabled=mode, max_tokens=None)     # "compiled" means compiled at every batch size
        try:
            paths[path], graphed = time_step(lambda: model(ids, cache=cache, meta=meta), graph=graph)
        finally:
            fused.DECODE.update(enabled="auto", max_tokens=limit)
    return min(paths.values()), graphed, paths


@torch.inference_mode()
def time_speculative(model, batch: int, ctx: int, k: int, page_size: int = 64) -> dict:
    """The device time of one MTP speculative round of `batch` sequences with `ctx` cached tokens, through the
    engine's own CUDA graphs: the drafting graph (MTP catch-up over k+1 positions, the worst case, and k-1 further
    greedy drafts; engine/draft_graphs.py), the verification graph (k+1 tokens per sequence keeping the GDN state
    after each, logits of every row; engine/graphs.py) with eager layers (the engine's default) and with compiled
    ones, and the commit of the kept states. On a CPU the same static paths run eagerly."""
    from .engine.draft_graphs import DraftGraphs
    from .engine.graphs import DecodeGraphs, PageTable
    from .engine.sampling_params import SamplingParams
    from .engine.sequence import Sequence
    cfg, dev, gpu = model.config, DEV["device"], _on_gpu()
    per_seq = _pages_for(ctx + 2 * k + 2, page_size)
    # one slot and one page more: the scratch that a capture's padding rows write into
    cache = HybridCache(cfg, batch + 1, batch * per_seq + 1, page_size, DEV["dtype"], dev, include_mtp=True)
    pages = PageTable(batch + 1, per_seq, scratch_slot=batch, scratch_page=batch * per_seq, device=dev)
    seqs = []
    for i in range(batch):
        s = Sequence(str(i), None, torch.randint(0, cfg.vocab_size, (ctx + 1,)).tolist(), SamplingParams(temperature=0))
        s.slot, s.pages, s.num_computed = i, list(range(i * per_seq, (i + 1) * per_seq)), ctx
        s.spec_k, s.draft_tokens = k, [1] * k
        seqs.append(s)
    kw = dict(max_model_len=per_seq * page_size, max_batch=batch, capture=gpu)

    def replay_time(graphs, run):
        run()                                               # captures (GPU) or runs the static path once
        bk = graphs.buckets[batch]
        return cuda_time(bk.graph.replay if gpu else (lambda: graphs.forward(bk)), 3, 20)

    drafting = DraftGraphs(model, cache, pages, k=k, **kw)
    hid = [torch.randn(k + 1, cfg.hidden_size, device=dev, dtype=DEV["dtype"]) for _ in seqs]
    out = {"drafting_s": replay_time(drafting, lambda: drafting.run([(s, ctx - 1 - k, h) for s, h in
                                                                       zip(seqs, hid)]))}
    for name, compiled in (("eager_layers", False), ("compiled_layers", True)):
        fused.DECODE["verify"] = compiled
        try:
            verify = DecodeGraphs(model, cache, pages, drafts=k, **kw)
            out[f"verify_{name}_s"] = replay_time(verify, lambda: verify.run(seqs))
        finally:
            fused.DECODE["verify"] = "auto"
    verify.commit([k] * batch)                              # captures the commit graph (GPU)
    bk = verify.buckets[batch]
    out["commit_s"] = cuda_time(bk.extra["commit_graph"].replay if gpu else (lambda: verify._commit(bk)), 3, 20)
    from .model.qwen3_next import verify_layer
    out["verify_compiled"] = not verify_layer.failed()
    out["graphs"] = gpu and not (drafting.failed_buckets or verify.failed_buckets)
    return out


@torch.inference_mode()
def time_outside_layers(model, tokens: int, logit_rows: int | None = None) -> float:
    """The per-step work outside the decoder layers, in a CUDA graph like the steps it is subtracted from: the
    embedding lookup and rotary table of `tokens` tokens, the final norm and lm_head of `logit_rows` rows (default:
    all). Done once per step whatever the depth, so a step is scaled as whole = (t_N - this) * L / N + this. (The
    head timed eagerly made the scaled step up to 0.2 ms too fast at batch 1, 2026-11-23; the embedding and rotary
    table scaled with the layers counted their ~15 us five more times, 2026-11-24.)"""
    dev, cfg = DEV["device"], model.config
    ids = torch.randint(0, cfg.vocab_size, (tokens,), device=dev)
    pos = torch.arange(tokens, device=dev)[None]
    h = torch.randn(1, logit_rows or tokens, cfg.hidden_size, device=dev, dtype=DEV["dtype"])

    def step():
        model.model.embed_tokens(ids)
        model.rotary(pos, DEV["dtype"])
        return model.lm_head(model.model.norm(h))
    return time_step(step)[0]


def scale_to_model(t_n: float, outside: float, layers: int, built: int) -> float:
    """A step of `built` layers (t_n, s) scaled to `layers`; `outside` from time_outside_layers is not scaled."""
    return (t_n - outside) * layers / built + outside


def speculative_round(m, cfg: ModelConfig, n: int, sp: dict, plain: float, k: int, acceptance: float, log=print,
                      name: str = "next", B: int = 1, ctx: int = 4096, bw: float | None = None) -> dict:
    """A round's cost scaled to the whole model from `time_speculative`'s parts for n built layers: the
    verification (faster of its two layer paths) and the commit scale with the layers, the MTP drafting does not;
    `plain` is the whole-model plain decode step (s) it is compared with."""
    L = cfg.num_hidden_layers
    th = time_outside_layers(m, B * (k + 1))
    gdn = sum(t != "full_attention" for t in m.config.layer_types)      # layers whose states commit
    gdn_whole = sum(t != "full_attention" for t in cfg.layer_types)
    scaled = {p: scale_to_model(sp[f"verify_{p}_s"], th, L, n) for p in ("eager_layers", "compiled_layers")}
    path = min(scaled, key=scaled.get)
    verify_whole = scaled[path]
    commit_whole = sp["commit_s"] * gdn_whole / max(gdn, 1)
    round_s = verify_whole + sp["drafting_s"] + commit_whole
    verify_floor = verify_bytes(cfg, B, ctx, k + 1) / bw if bw else None
    log(f"  {name} speculative k={k} b{B}: round {round_s * 1e3:.2f} ms = verify {verify_whole * 1e3:.2f} ({path}; "
        + ", ".join(f"{p} {v * 1e3:.2f}" for p, v in scaled.items())
        + (f", {verify_whole / verify_floor:.2f}x its floor" if verify_floor else "")
        + f") + MTP drafting {sp['drafting_s'] * 1e3:.2f} + commit {commit_whole * 1e3:.2f}; plain step "
        f"{plain * 1e3:.2f} ms -> implied speedup at acceptance {acceptance}: {acceptance * plain / round_s:.2f}x "
        f"(break-even {round_s / plain:.2f})")
    return {**{(key[:-2] + "_ms" if key.endswith("_s") else key): (v * 1e3 if key.endswith("_s") else v)
               for key, v in sp.items()},
            "k": k, "verify_path": path, "verify_whole_ms": verify_whole * 1e3,
            "verify_whole_ms_by_path": {p: v * 1e3 for p, v in scaled.items()},
            "commit_whole_ms": commit_whole * 1e3, "round_ms": round_s * 1e3,
            "verify_floor_ms": verify_floor * 1e3 if verify_floor else None,
            "verify_over_floor": verify_whole / verify_floor if verify_floor else None,
            "plain_step_ms": plain * 1e3, "verify_over_plain": verify_whole / plain,
            "round_over_plain": round_s / plain, "break_even_acceptance": round_s / plain,
            "acceptance": acceptance, "implied_speedup": acceptance * plain / round_s}


# ---- transformers peer --------------------------------------------------------------------------------------------
def hf_model(cfg: ModelConfig, layers: int):
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM
    d = cfg.replace(num_hidden_layers=layers, layer_types=cfg.layer_types[:layers]).to_hf_dict()
    for k in ("architectures", "model_type", "num_nextn_predict_layers", "rope_theta", "rope_scaling",
              "partial_rotary_factor", "extra"):
        d.pop(k, None)
    hcfg = Qwen3NextConfig(**d)
    with torch.device(DEV["device"]):
        m = Qwen3NextForCausalLM(hcfg)
    return m.to(DEV["dtype"]).eval()


@torch.inference_mode()
def time_hf_prefill(m, T: int) -> float:
    ids = torch.randint(0, m.config.vocab_size, (1, T), device=DEV["device"])
    return cuda_time(lambda: m(ids, use_cache=False, logits_to_keep=1), 1, 3)


@torch.inference_mode()
def time_hf_decode(m, ctx: int, steps: int = 10) -> float:
    ids = torch.randint(0, m.config.vocab_size, (1, ctx), device=DEV["device"])
    out = m(ids, use_cache=True, logits_to_keep=1)
    cache = out.past_key_values
    tok = ids[:, -1:]
    pos = ctx

    def step():
        nonlocal pos
        m(tok, past_key_values=cache, use_cache=True, position_ids=torch.tensor([[pos]], device=DEV["device"]))
        pos += 1
    return cuda_time(step, 2, steps)


# ---- the run ------------------------------------------------------------------------------------------------------
def run(layers: int = 8, dense_layers: int = 8, contexts=(4096, 32768), batches=(16, 64),
        with_transformers: bool = True, out_dir: str = "benchmarks/results", log=print,
        spec_k: int = 3, spec_acceptance: float = 3.8, configs: tuple[ModelConfig, ModelConfig] | None = None) -> dict:
    if _on_gpu() and not torch.cuda.is_available():
        raise RuntimeError("qwen3next bench needs a CUDA GPU")
    dev = torch.cuda.get_device_name() if _on_gpu() else "cpu"
    next_cfg, dense_cfg = configs or (preset("qwen3-next-80b-a3b"), preset("qwen3-32b"))
    res: dict = {"date": datetime.date.today().isoformat(), "device": dev, "torch": torch.__version__,
                 "kernels": {"fused_step_kernels": kernels.FUSED_STEP_KERNELS,
                             "fused_elementwise": kernels.FUSED_ELEMENTWISE, "moe_decode_max_tokens": kernels.MOE_DECODE_MAX_TOKENS,
                             "programmatic_dependent_launch": pdl.ENABLED},
                 "layers_measured": {"qwen3_next": layers, "qwen3_32b_dense": dense_layers},
                 "layers_full": {"qwen3_next": next_cfg.num_hidden_layers, "qwen3_32b_dense": dense_cfg.num_hidden_layers}}
    bw, flops = copy_bandwidth(), matmul_rate()
    res["machine"] = {"copy_bandwidth_GBps": bw / 1e9, "bf16_matmul_TFLOPs": flops / 1e12}
    log(f"{dev}: copy {bw / 1e9:.0f} GB/s, bf16 matmul {flops / 1e12:.0f} TFLOP/s")

    def measure(cfg, n, name, mtp=False):
        m = random_gpu_model(cfg, n, mtp=mtp)
        L = cfg.num_hidden_layers
        r: dict = {"prefill": {}, "decode": {}}
        for T in contexts:
            (t, paths), th = time_prefill(m, T), time_outside_layers(m, T, logit_rows=1)
            whole = scale_to_model(t, th, L, n)
            floor, serial = prefill_floor(cfg, T, flops, bw), prefill_floor_serial(cfg, T, flops, bw)
            r["prefill"][T] = {"ms_measured": t * 1e3, "ms_outside_layers": th * 1e3, "ms_whole": whole * 1e3,
                               "tok_s_whole": T / whole,
                               "floor_ms_whole": floor * 1e3, "over_floor": whole / floor,
                               "floor_serial_ms_whole": serial * 1e3, "over_floor_serial": whole / serial,
                               "ms_measured_by_path": {p: v * 1e3 for p, v in paths.items()},
                               "path": min(paths, key=paths.get)}
            log(f"  {name} prefill {T}: {T / whole:,.0f} tok/s whole-model ({whole / floor:.2f}x floor; "
                + ", ".join(f"{p} {v * 1e3:.2f} ms" for p, v in paths.items()) + " measured)")
        for B in (1, *batches):
            for ctx in (contexts if B == 1 else contexts[:1]):
                t, graphed, paths = time_decode(m, B, ctx)
                th = time_outside_layers(m, B)
                whole = scale_to_model(t, th, L, n)
                floor = decode_bytes(cfg, B, ctx) / bw
                r["decode"][f"b{B}_ctx{ctx}"] = {"ms_step_measured": t * 1e3, "ms_outside_layers": th * 1e3,
                                                 "ms_step_whole": whole * 1e3,
                                                 "tok_s_whole": B / whole, "floor_ms_whole": floor * 1e3,
                                                 "over_floor": whole / floor, "cuda_graph": graphed,
                                                 "ms_step_measured_by_path": {p: v * 1e3 for p, v in paths.items()},
                                                 "path": min(paths, key=paths.get)}
                log(f"  {name} decode b{B} ctx{ctx}: {whole * 1e3:.2f} ms/step whole-model, {B / whole:,.0f} tok/s "
                    f"({whole / floor:.2f}x floor, graph={graphed}, "
                    + ", ".join(f"{p} {v * 1e3:.2f} ms" for p, v in paths.items()) + " measured)")
        if mtp and spec_k:
            r["speculative"] = {}
            for B in (1, *batches):
                plain = r["decode"][f"b{B}_ctx{contexts[0]}"]["ms_step_whole"] / 1e3
                try:
                    sp = time_speculative(m, B, contexts[0], spec_k)
                except Exception as e:  # noqa: BLE001 - e.g. out of memory at a large batch: report, go on
                    r["speculative"][f"b{B}"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
                    log(f"  {name} speculative b{B} failed: {e}")
                    continue
                r["speculative"][f"b{B}"] = speculative_round(m, cfg, n, sp, plain, spec_k, spec_acceptance,
                                                              log, name, B, contexts[0], bw)
        del m
        if _on_gpu():
            torch.cuda.empty_cache()
        return r

    log("Qwen3-Next-80B-A3B (ours)")
    res["ours_next"] = measure(next_cfg, layers, "next", mtp=True)
    log("dense Qwen3-32B (ours, same code paths)")
    res["ours_dense"] = measure(dense_cfg, dense_layers, "dense")
    if with_transformers:
        log(f"transformers Qwen3-Next, {layers} layers")
        try:
            m = hf_model(next_cfg, layers)
            T = contexts[0]
            res["transformers_next"] = {"prefill_ms": time_hf_prefill(m, T) * 1e3, "prefill_T": T,
                                        "decode_b1_ms": time_hf_decode(m, T) * 1e3, "decode_ctx": T,
                                        "layers": layers}
            log(f"  transformers prefill {T}: {res['transformers_next']['prefill_ms']:.1f} ms, decode b1: "
                f"{res['transformers_next']['decode_b1_ms']:.1f} ms/step ({layers} layers)")
            del m
            if _on_gpu():
                torch.cuda.empty_cache()
        except Exception as e:  # noqa: BLE001 - the peer's failure is reported, not fatal
            res["transformers_next"] = {"error": f"{type(e).__name__}: {e}"}
            log(f"  transformers failed: {e}")
    res["ratios"] = ratios(res, contexts)
    res["table"] = markdown_table(res, contexts, batches)
    log(res["table"])
    save(res, out_dir)
    return res


def ratios(res: dict, contexts) -> dict:
    on, od = res["ours_next"], res["ours_dense"]
    c0, c1 = contexts[0], contexts[-1]
    r = {
        "prefill_4k_vs_dense": od["prefill"][c0]["ms_whole"] / on["prefill"][c0]["ms_whole"],
        "prefill_32k_vs_dense": od["prefill"][c1]["ms_whole"] / on["prefill"][c1]["ms_whole"],
        "decode_4k_vs_dense": od["decode"][f"b1_ctx{c0}"]["ms_step_whole"] / on["decode"][f"b1_ctx{c0}"]["ms_step_whole"],
        "decode_32k_vs_dense": od["decode"][f"b1_ctx{c1}"]["ms_step_whole"] / on["decode"][f"b1_ctx{c1}"]["ms_step_whole"],
        "decode_b1_over_floor": on["decode"][f"b1_ctx{c0}"]["over_floor"],
        "dense_decode_b1_over_floor": od["decode"][f"b1_ctx{c0}"]["over_floor"],
    }
    # what the hardware allows: both models at their floors (the dense one runs at 1.01-1.28x of its own)
    for name, c in (("4k", c0), ("32k", c1)):
        a, b = on["prefill"][c], od["prefill"][c]
        r[f"prefill_{name}_ceiling"] = b["floor_ms_whole"] / a["floor_ms_whole"]
        r[f"prefill_{name}_ceiling_serial"] = b["floor_serial_ms_whole"] / a["floor_serial_ms_whole"]
        r[f"decode_{name}_ceiling"] = (od["decode"][f"b1_ctx{c}"]["floor_ms_whole"]
                                       / on["decode"][f"b1_ctx{c}"]["floor_ms_whole"])
    for key in on["decode"]:
        if not key.startswith("b1_"):
            r[f"decode_{key}_tok_s_vs_dense"] = on["decode"][key]["tok_s_whole"] / od["decode"][key]["tok_s_whole"]
    for key, sp in on.get("speculative", {}).items():
        if "implied_speedup" in sp:
            r[f"speculative_{key}_implied_speedup"] = sp["implied_speedup"]
    hf = res.get("transformers_next", {})
    if "prefill_ms" in hf:
        r["prefill_vs_transformers"] = hf["prefill_ms"] / on["prefill"][c0]["ms_measured"]
        r["decode_vs_transformers"] = hf["decode_b1_ms"] / on["decode"][f"b1_ctx{c0}"]["ms_step_measured"]
    return r


def markdown_table(res: dict, contexts, batches) -> str:
    on, od = res["ours_next"], res["ours_dense"]
    rows = ["| measurement (whole model, scaled) | Qwen3-Next-80B-A3B (ours) | ÷ floor | dense Qwen3-32B (ours) | ÷ floor | "
            "Next vs dense | ceiling (both at their floors) |",
            "|---|---|---|---|---|---|---|"]
    for T in contexts:
        a, b = on["prefill"][T], od["prefill"][T]
        ceiling = b["floor_ms_whole"] / a["floor_ms_whole"]
        serial = b["floor_serial_ms_whole"] / a["floor_serial_ms_whole"]
        rows.append(f"| prefill {T // 1024}K, tokens/s | {a['tok_s_whole']:,.0f} | {a['over_floor']:.2f} | "
                    f"{b['tok_s_whole']:,.0f} | {b['over_floor']:.2f} | {b['ms_whole'] / a['ms_whole']:.2f}× | "
                    f"{ceiling:.1f}× ({serial:.1f}× part by part) |")
    for key in on["decode"]:
        a, b = on["decode"][key], od["decode"][key]
        B, ctx = key[1:].split("_ctx")
        label = f"decode b{B} @{int(ctx) // 1024}K, " + ("ms/token" if B == "1" else "tokens/s")
        va = f"{a['ms_step_whole']:.2f}" if B == "1" else f"{a['tok_s_whole']:,.0f}"
        vb = f"{b['ms_step_whole']:.2f}" if B == "1" else f"{b['tok_s_whole']:,.0f}"
        rows.append(f"| {label} | {va} | {a['over_floor']:.2f} | {vb} | {b['over_floor']:.2f} | "
                    f"{b['ms_step_whole'] / a['ms_step_whole']:.2f}× | "
                    f"{b['floor_ms_whole'] / a['floor_ms_whole']:.1f}× |")
    hf = res.get("transformers_next", {})
    if "prefill_ms" in hf:
        rows.append(f"| vs transformers ({hf['layers']} layers): prefill {hf['prefill_T'] // 1024}K | "
                    f"{on['prefill'][contexts[0]]['ms_measured']:.1f} ms | | transformers {hf['prefill_ms']:.1f} ms | | "
                    f"{res['ratios']['prefill_vs_transformers']:.2f}× |")
        rows.append(f"| vs transformers ({hf['layers']} layers): decode b1 @{hf['decode_ctx'] // 1024}K | "
                    f"{on['decode'][f'b1_ctx{contexts[0]}']['ms_step_measured']:.2f} ms | | transformers "
                    f"{hf['decode_b1_ms']:.2f} ms | | {res['ratios']['decode_vs_transformers']:.2f}× |")
    spec = on.get("speculative")
    if spec:
        rows += ["", "MTP speculative decoding through the engine's CUDA graphs (random weights: cost measured, "
                 "acceptance assumed), per round, whole model:", "",
                 "| batch | plain step, ms | MTP drafting (catch-up + k-1 drafts), ms | verify k+1, ms (eager / compiled "
                 "layers; the faster ÷ its floor) | commit, ms | round ÷ plain (break-even acceptance) | implied "
                 "speedup at acceptance |",
                 "|---|---|---|---|---|---|---|"]
        for key, sp in spec.items():
            if "error" in sp:
                rows.append(f"| {key[1:]} | failed: {sp['error'][:80]} | | | | | |")
                continue
            by = sp["verify_whole_ms_by_path"]
            rows.append(f"| {key[1:]} | {sp['plain_step_ms']:.2f} | {sp['drafting_ms']:.2f} | "
                        f"{by['eager_layers']:.2f} / {by['compiled_layers']:.2f}; {sp['verify_over_floor'] or 0:.2f}× | "
                        f"{sp['commit_whole_ms']:.2f} | "
                        f"{sp['round_over_plain']:.2f} | {sp['implied_speedup']:.2f}× at {sp['acceptance']} |")
    return "\n".join(rows)


def save(res: dict, out_dir: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    slug = res["device"].lower().replace("nvidia", "").strip().replace(" ", "-")
    path = os.path.join(out_dir, f"{res['date']}-{slug}.json")
    for p in (path, os.path.join(out_dir, "latest.json")):
        with open(p, "w") as f:
            json.dump(res, f, indent=2, default=str)
    with open(os.path.join(out_dir, "latest.md"), "w") as f:
        f.write(f"{res['date']}, {res['device']}, torch {res['torch']}\n\n{res['table']}\n")
    try:
        plot(res, os.path.join(out_dir, "latest.png"))
    except Exception as e:  # noqa: BLE001 - the plot is a nicety
        print(f"(no plot: {e})")
    return path


def plot(res: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    on, od = res["ours_next"], res["ours_dense"]
    labels, nx, dn, fl = [], [], [], []
    for T, a in on["prefill"].items():
        labels.append(f"prefill {int(T) // 1024}K")
        nx.append(a["tok_s_whole"])
        dn.append(od["prefill"][T]["tok_s_whole"])
        fl.append(int(T) / (a["floor_ms_whole"] / 1e3))
    for key, a in on["decode"].items():
        labels.append(key.replace("_ctx", " @").replace("b", "decode b", 1))
        nx.append(a["tok_s_whole"])
        dn.append(od["decode"][key]["tok_s_whole"])
        fl.append(a["tok_s_whole"] * a["over_floor"])
    fig, ax = plt.subplots(figsize=(10, 4.5))
    x = range(len(labels))
    ax.bar([i - 0.27 for i in x], nx, 0.27, label="Qwen3-Next-80B-A3B (ours)")
    ax.bar(list(x), dn, 0.27, label="dense Qwen3-32B (ours)")
    ax.bar([i + 0.27 for i in x], fl, 0.27, label="Qwen3-Next physical limit", alpha=0.35)
    ax.set_yscale("log")
    ax.set_xticks(list(x), labels, rotation=20)
    ax.set_ylabel("tokens/s (whole model, log scale)")
    ax.set_title(f"{res['device']}, {res['date']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
