"""Run by tests/test_triton_kernels.py in a subprocess with TRITON_INTERPRET=1: our Triton kernels executed by
Triton's CPU interpreter against their torch references. Prints one line per check; exits non-zero on a mismatch."""
import os
import sys

assert os.environ.get("TRITON_INTERPRET") == "1", "run me with TRITON_INTERPRET=1"

import torch  # noqa: E402
import triton.runtime.interpreter as _interp  # noqa: E402

# Triton 3.6's interpreter turns a loop bound that is a loaded or computed scalar into an int with int(array),
# which numpy >= 2.x refuses for its 1-element arrays; take the element explicitly (compiled kernels are unaffected)
_orig_patch = _interp._patch_lang_tensor


def _patch(tensor, scope):
    _orig_patch(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))


_interp._patch_lang_tensor = _patch

import torch.nn.functional as F  # noqa: E402

from qwen3next.model.cache import BatchMeta  # noqa: E402
from qwen3next.ops import attention, conv1d, gated_delta, gdn_projections, moe, triton_conv  # noqa: E402
from qwen3next.ops import norm as norm_ops  # noqa: E402
from qwen3next.ops import cuda as cuda_ops  # noqa: E402
from qwen3next.ops import triton_experts, triton_grouped, triton_norm  # noqa: E402
from qwen3next.ops.triton_gdn import (gated_delta_decode, gated_delta_verify, projection_gates,  # noqa: E402
                                     split_and_gate)
from qwen3next.ops.triton_attention import paged_decode_attention, write_kv  # noqa: E402
from qwen3next.ops.triton_moe import moe_decode, route  # noqa: E402
from qwen3next.ops.triton_gemv import gemv, gemv_multi  # noqa: E402

failures = []


def check(name, got, want, tol):
    err = ((got - want).abs().max() / want.abs().max()).item()
    print(f"{name}: max error / max value {err:.2e}")
    if not err < tol:
        failures.append(name)


torch.manual_seed(0)
# MoE: routed + shared (different intermediate sizes), routed only, one token
for T, H, E, inter, inter_s, k, shared in [(3, 64, 8, 16, 32, 2, True), (1, 48, 6, 16, 16, 3, True),
                                          (4, 40, 5, 8, 8, 2, False)]:
    x = torch.randn(T, H)
    gate_up, down = torch.randn(E, 2 * inter, H) / 8, torch.randn(E, H, inter) / 4
    weights, ids = moe.route(torch.randn(T, E), k, True)
    want = moe.experts_forward(x, gate_up, down, ids, weights)
    args = [None] * 4
    if shared:
        args = [torch.randn(inter_s, H) / 8, torch.randn(inter_s, H) / 8, torch.randn(H, inter_s) / 4,
                torch.sigmoid(torch.randn(T, 1))]
        sg, su, sd, sw = args
        want = want + sw * F.linear(F.silu(F.linear(x, sg)) * F.linear(x, su), sd)
        per_slot = moe_decode(x, gate_up, down, ids, weights, *args)
        check(f"moe_decode per slot T={T}", per_slot, moe.moe_per_slot(x, gate_up, down, ids, weights, *args), 1e-5)
    check(f"moe_decode T={T} shared={shared}", moe_decode(x, gate_up, down, ids, weights, *args).sum(1), want, 1e-5)

# routing: softmax over all experts, top-k (k not a power of two), renormalised or not
for T, E, k, norm in [(3, 512, 10, True), (2, 20, 3, False), (1, 8, 8, True)]:
    logits = torch.randn(T, E)
    w, ids = route(logits, k, norm)
    rw, rids = moe.route(logits, k, norm)
    check(f"route T={T} E={E} k={k} weights", w, rw, 1e-6)
    if not torch.equal(ids, rids) or ids.dtype != rids.dtype or w.dtype != rw.dtype:
        print(f"route T={T} E={E} k={k}: ids or dtypes differ")
        failures.append("route ids")

# Gated DeltaNet decode step, state in place: grouped value heads (2 key / 4 value heads), a fresh sequence whose
# slot holds garbage, slots out of order, dv wider than one block of value columns
Hk, Hv, dk, dv, S = 2, 4, 16, 48, 3
q, k, v = torch.randn(S, Hk, dk), torch.randn(S, Hk, dk), torch.randn(S, Hv, dv)
a, b = torch.randn(S, Hv) * 3, torch.randn(S, Hv)
A_log, dt_bias = torch.randn(Hv), torch.randn(Hv)
pool = torch.randn(5, Hv, dk, dv)
slots, fresh = torch.tensor([4, 0, 2]), torch.tensor([False, True, False])
want_pool = pool.clone()
want = gated_delta.gated_delta_decode(q, k, v, a, b, A_log, dt_bias, want_pool, slots, fresh)
got_pool = pool.clone()
got = gated_delta_decode(q, k, v, a, b, A_log, dt_bias, got_pool, slots, fresh)
check("gated_delta_decode output", got, want, 1e-5)
check("gated_delta_decode state pool (in place)", got_pool, want_pool, 1e-5)
# with the gated norm: a whole head per program, and a head over three programs (the last one norms it)
z, norm_w = torch.randn(S, Hv, dv), torch.rand(dv) + 0.5
want_normed = norm_ops.gated_rms_norm(want, z, norm_w, 1e-6)
for block_v in (64, 16):
    got_pool = pool.clone()
    got = gated_delta_decode(q, k, v, a, b, A_log, dt_bias, got_pool, slots, fresh, None, z, norm_w, 1e-6, block_v)
    check(f"gated_delta_decode + gated norm, {block_v} columns per program", got, want_normed, 1e-5)
    check(f"gated_delta_decode + gated norm, {block_v} columns per program, state", got_pool, want_pool, 1e-5)

# Gated DeltaNet verification (T = 3 tokens per sequence, the state after each kept): q, k, v as strided views of
# one conv output, as the model hands them over; a fresh sequence whose slot holds garbage
# (token-major, and channels-first as the torch conv of a verification step leaves them)
T = 3
C = 2 * Hk * dk + Hv * dv
for layout, y in (("token-major", torch.randn(S, T, C)), ("channels-first", torch.randn(S, C, T).transpose(1, 2))):
    qv, kv_, vv = y.split([Hk * dk, Hk * dk, Hv * dv], -1)
    qv, kv_, vv = qv.reshape(S, T, Hk, dk), kv_.reshape(S, T, Hk, dk), vv.reshape(S, T, Hv, dv)
    a3, b3 = torch.randn(S, T, Hv) * 3, torch.randn(S, T, Hv)
    want_pool, got_pool = pool.clone(), pool.clone()
    want_o, want_states = gated_delta.gated_delta_verify(qv, kv_, vv, a3, b3, A_log, dt_bias, want_pool, slots,
                                                         fresh)
    got_o, got_states = gated_delta_verify(qv, kv_, vv, a3, b3, A_log, dt_bias, got_pool, slots, fresh)
    check(f"gated_delta_verify output, {layout}", got_o, want_o, 1e-5)
    check(f"gated_delta_verify states after every token, {layout}", got_states, want_states, 1e-5)
    check(f"gated_delta_verify state pool (in place), {layout}", got_pool, want_pool, 1e-5)

# paged decode attention: ragged contexts (1 token, a page boundary, several pages), GQA, with the batch's key
# length as the bound and with a much larger bound (a CUDA graph captured for the longest context); blocks of a
# whole page and of half a page; the output gate applied in the merge
Hq, Hkv, D, page = 4, 2, 32, 16
ctx, pages = [1, 17, 40], [[0], [1, 2], [3, 4, 5]]
k_pages, v_pages = torch.randn(8, page, Hkv, D), torch.randn(8, page, Hkv, D)
q, gate = torch.randn(len(ctx), Hq, D), torch.randn(len(ctx), Hq, 2 * D)[..., D:]   # the gate: a strided view
for bound, block_n in ((None, 16), (200, 8)):
    meta = BatchMeta.build([1] * 3, [c - 1 for c in ctx], [0, 1, 2], pages, page, pad_context_to=bound)
    want = attention.paged_attention(q, k_pages, v_pages, meta, D ** -0.5)
    got = paged_decode_attention(q, k_pages, v_pages, meta.page_table, meta.context_lens, meta.max_context_len,
                                 D ** -0.5, config=dict(programs=8, block_n=block_n))
    check(f"paged_decode_attention bound={meta.max_context_len} block_n={block_n}", got, want, 1e-5)
got = paged_decode_attention(q, k_pages, v_pages, meta.page_table, meta.context_lens, meta.max_context_len,
                             D ** -0.5, gate=gate, config=dict(programs=8))
check("paged_decode_attention with output gate", got, want * torch.sigmoid(gate), 1e-5)
# one long sequence split 38 ways: the merge reads the splits in several chunks
pages1 = list(range(40))
kp, vp = torch.randn(40, page, Hkv, D), torch.randn(40, page, Hkv, D)
meta = BatchMeta.build([1], [600], [0], [pages1], page)
got = paged_decode_attention(q[:1], kp, vp, meta.page_table, meta.context_lens, meta.max_context_len, D ** -0.5,
                             config=dict(programs=76, block_n=16))
check("paged_decode_attention 38 splits", got, attention.paged_attention(q[:1], kp, vp, meta, D ** -0.5), 1e-5)

# KV write: three new tokens at scattered rows of the pages, in place
slots = torch.tensor([5, 70, 33])
kn, vn = torch.randn(3, Hkv, D), torch.randn(3, Hkv, D)
want_k, want_v = k_pages.clone(), v_pages.clone()
attention.write_kv(want_k, want_v, kn, vn, slots)
got_k, got_v = k_pages.clone(), v_pages.clone()
write_kv(got_k, got_v, kn, vn, slots)
check("write_kv keys", got_k, want_k, 1e-7)
check("write_kv values", got_v, want_v, 1e-7)

# attention's input preparation (ops/triton_rope.py): the rotary table; q/k norms + partial rotation, q a strided
# view (its gates between heads), zero-centred and plain weights, with and without the KV write; fp32 (the
# interpreter's bf16 rounding is not the GPU's: benchmarks/check_gpu.py compares bf16)
from qwen3next.ops import rope as rope_ops, triton_rope  # noqa: E402
pos = torch.tensor([0, 3, 17, 4095, 262143, 9])
inv = 1.0 / (1e7 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
for got, want, part in zip(triton_rope.rotary_cos_sin(pos[None], inv, 1.3, torch.float32),
                           rope_ops.rotary_cos_sin(pos[None], inv, 1.3, torch.float32), ("cos", "sin")):
    check(f"rotary {part}", got, want, 1e-6)
N, Hq, Hkv, D, R = 5, 4, 2, 32, 16
qg = torch.randn(N, Hq, 2 * D)                    # [query | gate] per head, as the q projection's rows
q, kk, vv = qg[..., :D], torch.randn(N, Hkv, D), torch.randn(N, Hkv, D)
wq, wk = torch.randn(D) * 0.2, torch.randn(D) * 0.2
cos, sin = rope_ops.rotary_cos_sin(torch.tensor([7, 0, 130, 131, 2]), inv, 1.0, torch.float32)
for zc in (True, False):
    want_q, want_k = rope_ops.qk_norm_rope(q, kk, wq + (0 if zc else 1), wk + (0 if zc else 1), 1e-6, zc, cos, sin)
    got_q, got_k = triton_rope.qk_norm_rope(q, kk, None, wq + (0 if zc else 1), wk + (0 if zc else 1), 1e-6, zc,
                                            cos, sin)
    check(f"qk_norm_rope q ({'zero-centred' if zc else 'plain'})", got_q, want_q, 1e-5)
    check(f"qk_norm_rope k ({'zero-centred' if zc else 'plain'})", got_k, want_k, 1e-5)
kp, vp = torch.zeros(6, 4, Hkv, D), torch.zeros(6, 4, Hkv, D)
want_kp, want_vp = kp.clone(), vp.clone()
slots = torch.tensor([9, 0, 23, 4, 12])
attention.write_kv(want_kp, want_vp, want_k, vv, slots)
got_q, got_k = triton_rope.qk_norm_rope(q, kk, vv, wq + 1, wk + 1, 1e-6, False, cos, sin, kp, vp, slots)
check("qk_norm_rope with the KV write: keys", kp, want_kp, 1e-5)
check("qk_norm_rope with the KV write: values", vp, want_vp, 1e-7)

# RMS norms: zero-centred, plain, gated; a row width that is not a power of two, a strided (non-contiguous) input
x, z = torch.randn(7, 3, 48), torch.randn(7, 3, 48)
w = torch.randn(48) * 0.2
check("rms_norm zero-centred", triton_norm.rms_norm(x, w, 1e-6, True), norm_ops.rms_norm(x, w, 1e-6, True), 1e-5)
xs = torch.randn(5, 96)[:, ::2]
check("rms_norm plain, strided rows", triton_norm.rms_norm(xs, w + 1, 1e-6, False),
      norm_ops.rms_norm(xs, w + 1, 1e-6, False), 1e-5)
check("gated_rms_norm", triton_norm.gated_rms_norm(x, z, w + 1, 1e-6), norm_ops.gated_rms_norm(x, z, w + 1, 1e-6), 1e-5)
# the gate read in place as z inside in_proj_qkvz rows ([N, Hk, r, dv] view: 2 key heads x 3 value heads each)
qkvz_rows = torch.randn(7, 2, 2 * 5 + 2 * 3 * 48)
z_in = qkvz_rows[..., 2 * 5 + 3 * 48:].unflatten(-1, (3, 48))
xo = torch.randn(7, 6, 48)
check("gated_rms_norm, z read in place from qkvz rows", triton_norm.gated_rms_norm(xo, z_in, w + 1, 1e-6),
      norm_ops.gated_rms_norm(xo, z_in.reshape(xo.shape), w + 1, 1e-6), 1e-5)
# a residual add and the norm after it in one pass (fp32 here: the interpreter's bf16 rounding is not the GPU's;
# benchmarks/check_gpu.py compares bf16 bit for bit)
h = torch.randn_like(x)
s_got, y_got = triton_norm.add_rms_norm(x, h, w, 1e-6, True)
check("add_rms_norm sum", s_got, x + h, 1e-7)
check("add_rms_norm norm", y_got, norm_ops.rms_norm(x + h, w, 1e-6, True), 1e-5)

# the grouped experts' glue: weighted SwiGLU (intermediate not a power of two) and the combine back to tokens
M, inter, N, kk, Hd = 37, 24, 9, 3, 40
h, rw = torch.randn(M, 2 * inter), torch.rand(M)
check("weighted_swiglu", triton_grouped.weighted_swiglu(h, rw, inter), cuda_ops._weighted_swiglu(h, rw, inter), 1e-5)
y, inverse = torch.randn(N * kk, Hd), torch.randperm(N * kk)
check("combine", triton_grouped.combine(y, inverse, kk), cuda_ops._combine(y, inverse, kk), 1e-5)
check("combine, rows in token order", triton_grouped.combine(y, None, kk), y.view(N, kk, Hd).sum(1), 1e-5)
sh, sg, res = torch.randn(N, Hd), torch.randn(N, 1), torch.randn(N, Hd)
check("combine + gated shared expert + residual", triton_grouped.combine(y, None, kk, sh, sg, res),
      res + (y.view(N, kk, Hd).sum(1) + torch.sigmoid(sg) * sh), 1e-5)

# the routed experts of a prefill chunk as two GEMM kernels over expert-sorted tiles (fp32 here: the
# interpreter's dot of bf16 inputs is wrong; bf16 is checked on the GPU): tiles of several experts, experts with
# no rows, a tile cut short, widths that are not multiples of the blocks, one token
for N, Hd, E, inter, kk in [(20, 64, 8, 32, 2), (7, 48, 5, 24, 3), (1, 64, 4, 32, 2)]:
    x = torch.randn(N, Hd)
    gate_up, down = torch.randn(E, 2 * inter, Hd) / 8, torch.randn(E, Hd, inter) / 4
    rw, ids = moe.route(torch.randn(N, E), kk, True)
    got = triton_experts.experts_forward(x, gate_up, down, ids, rw, up_blocks=dict(BM=16, BN=16, BK=16),
                                         down_blocks=dict(BM=16, BN=32, BK=16))
    check(f"triton experts N={N} H={Hd} E={E} I={inter} k={kk}", got,
          moe.experts_forward(x, gate_up, down, ids, rw), 1e-5)
order, tile_e, row0, row1 = triton_experts.sorted_tiles(torch.tensor([[3, 0], [3, 1], [3, 0]]), 5, 2)
if not (tile_e.tolist() == [0, 1, 3, 3, 5, 5, 5, 5] and row0[:4].tolist() == [0, 2, 3, 5]
        and row1[:4].tolist() == [2, 3, 5, 6]):
    print("sorted_tiles: wrong tiles", tile_e.tolist(), row0.tolist(), row1.tolist())
    failures.append("sorted_tiles")
# the plan kernels (histogram, tiles, atomic scatter) against that reference: the same tiles, and the same rows
# in each expert (in any order); more assignments than one block of the histogram loop, experts never hit
ids = torch.randint(0, 37, (700, 4))
ids[ids == 5] = 6
want, got = triton_experts.sorted_tiles(ids, 40, 16), triton_experts.plan(ids, 40, 16)
n_real = int((want[1] < 40).sum())
same_tiles = torch.equal(got[1].long(), want[1]) and all(torch.equal(g[:n_real].long(), w[:n_real])
                                                          for g, w in zip(got[2:], want[2:]))   # rows: real tiles
same_rows = all(sorted(got[0][a:b].tolist()) == sorted(want[0][a:b].tolist())
                for a, b in zip(want[2][:n_real].tolist(), want[3][:n_real].tolist()))
print(f"plan kernels vs sorted_tiles: max error / max value {0.0 if same_tiles and same_rows else 1.0:.2e}")
if not (same_tiles and same_rows):
    failures.append("plan")

# Gated DeltaNet's prefill input unpacking: power-of-two widths, and odd ones (3 value heads per key head)
for hk, dk, r, dv in ((4, 16, 2, 8), (2, 12, 3, 10)):
    N = 37
    qkvz, ba = torch.randn(N, hk * (2 * dk + 2 * r * dv)), torch.randn(N, 2 * hk * r) * 3
    A_log, dt_bias = torch.randn(hk * r), torch.randn(hk * r)
    ba[0, 0] = 30.0                                   # past softplus's threshold
    got = split_and_gate(qkvz, ba, A_log, dt_bias, hk, dk, r, dv)
    want = gdn_projections.split_and_gate(qkvz, ba, A_log, dt_bias, hk, dk, r, dv)
    for name, a, b in zip(("conv input", "z", "beta", "g"), got, want):
        check(f"split_and_gate hk={hk} dk={dk} r={r} dv={dv} {name}", a, b, 1e-6)
    got = projection_gates(ba, A_log, dt_bias, hk, r)
    for name, a, b in zip(("beta", "g"), got, want[2:]):
        check(f"projection_gates hk={hk} r={r} {name}", a, b, 1e-6)

# the short conv over packed chunks: sequences shorter than the kernel (state partly carried), a fresh one
# without a state, channels not a multiple of the block
C, K = 200, 4
for lens, starts, h0 in (([1, 2, 9, 5], [3, 7, 0, 12], True), ([6, 3], [0, 0], False)):
    meta = BatchMeta.build(lens, starts, list(range(len(lens))), [[i] for i in range(len(lens))], 64)
    x, w = torch.randn(1, sum(lens), C), torch.randn(C, K)
    init = torch.randn(len(lens), C, K - 1) if h0 else None
    got = triton_conv.causal_conv1d(x, w, init, meta.cu_seqlens, meta.token_seq, meta.token_index)
    want = conv1d.causal_conv1d(x, w, init, cu_seqlens=meta.cu_seqlens)
    check(f"causal_conv1d lens={lens} state={h0} y", got[0], want[0], 1e-5)
    check(f"causal_conv1d lens={lens} state={h0} final state", got[1], want[1], 1e-6)
    # q, k, v written as three contiguous parts (Cq = 48 channels each for q and k, 104 for v)
    parts, _ = triton_conv.causal_conv1d(x, w, init, meta.cu_seqlens, meta.token_seq, meta.token_index,
                                         split_qk=48)
    if not all(p.is_contiguous() for p in parts) or [p.shape[-1] for p in parts] != [48, 48, 104]:
        failures.append("causal_conv1d split parts not contiguous [1, N, C_i]")
    check(f"causal_conv1d lens={lens} state={h0} q, k, v apart", torch.cat(parts, -1), want[0], 1e-5)
    # q and k l2-normalised per head of 16 channels in the same pass (3 heads each), v as it was
    normed, _ = triton_conv.causal_conv1d(x, w, init, meta.cu_seqlens, meta.token_seq, meta.token_index,
                                          split_qk=48, l2norm_head=16)
    wq, wk, wv = want[0].split([48, 48, 104], -1)
    wq, wk = (gated_delta.l2norm(t.reshape(*t.shape[:-1], 3, 16)).reshape(t.shape) for t in (wq, wk))
    check(f"causal_conv1d lens={lens} state={h0} q, k l2-normed", torch.cat(normed, -1),
          torch.cat([wq, wk, wv], -1), 1e-5)

# the prefill conv reading q, k, v straight out of whole in_proj_qkvz rows (grouped per key head), with the parts
# apart and q, k l2-normalised: 2 key heads of dk = 16, 3 value heads of 8 per key head
hk, dk, r, dv = 2, 16, 3, 8
C = hk * (2 * dk + r * dv)
lens, starts = [1, 2, 9, 5], [3, 7, 0, 12]
meta = BatchMeta.build(lens, starts, list(range(4)), [[i] for i in range(4)], 64)
qkvz = torch.randn(1, sum(lens), hk * (2 * dk + 2 * r * dv))
w, init = torch.randn(C, K), torch.randn(4, C, K - 1)
want = conv1d.causal_conv1d(gdn_projections.conv_input(qkvz[0], hk, dk, r * dv)[None], w, init,
                            cu_seqlens=meta.cu_seqlens)
got = triton_conv.causal_conv1d(qkvz, w, init, meta.cu_seqlens, meta.token_seq, meta.token_index,
                                qkvz_layout=(hk, dk, r * dv))
check("causal_conv1d reading grouped qkvz rows y", got[0], want[0], 1e-5)
check("causal_conv1d reading grouped qkvz rows final state", got[1], want[1], 1e-6)
normed, _ = triton_conv.causal_conv1d(qkvz, w, init, meta.cu_seqlens, meta.token_seq, meta.token_index,
                                      split_qk=hk * dk, l2norm_head=dk, qkvz_layout=(hk, dk, r * dv))
wq, wk, wv = want[0].split([hk * dk, hk * dk, hk * r * dv], -1)
wq, wk = (gated_delta.l2norm(t.reshape(*t.shape[:-1], hk, dk)).reshape(t.shape) for t in (wq, wk))
check("causal_conv1d reading grouped qkvz rows, q, k l2-normed apart", torch.cat(normed, -1),
      torch.cat([wq, wk, wv], -1), 1e-5)

# conv decode step: the pool updated in place in shuffled slots, a fresh sequence ignoring its old slot, K = 4 and 3
for K, dtype in ((4, torch.float32), (3, torch.float32), (4, torch.bfloat16)):
    S, C, N = 3, 300, 5
    x, w = torch.randn(S, C, dtype=dtype), torch.randn(C, K, dtype=dtype)
    pool = torch.randn(N, C, K - 1, dtype=dtype)
    slots, fresh = torch.tensor([4, 0, 2]), torch.tensor([False, True, False])
    want_pool = pool.clone()
    want = conv1d.causal_conv1d_step(x, w, want_pool, slots, fresh)
    got = triton_conv.causal_conv1d_step(x, w, pool, slots, fresh)
    check(f"causal_conv1d_step K={K} {dtype} y", got.float(), want.float(), 1e-2 if dtype == torch.bfloat16 else 1e-5)
    check(f"causal_conv1d_step K={K} {dtype} pool", pool.float(), want_pool.float(), 1e-6)

# the GDN decode step as the model runs it: the conv reads q, k, v out of whole in_proj_qkvz rows (grouped per key
# head), and the delta rule reads a, b as [S, Hk, r] views of in_proj_ba's rows
hk, dk, r, dv, S, K = 2, 8, 3, 4, 3, 4
qkvz, ba = torch.randn(S, hk * (2 * dk + 2 * r * dv)), torch.randn(S, hk * 2 * r)
C = hk * (2 * dk + r * dv)
w, pool = torch.randn(C, K), torch.randn(5, C, K - 1)
slots, fresh = torch.tensor([4, 0, 2]), torch.tensor([False, True, False])
want_pool = pool.clone()
want = conv1d.causal_conv1d_step(gdn_projections.conv_input(qkvz, hk, dk, r * dv), w, want_pool, slots, fresh)
got = triton_conv.causal_conv1d_step(qkvz, w, pool, slots, fresh, qkvz_layout=(hk, dk, r * dv))
check("causal_conv1d_step reading grouped qkvz rows y", got, want, 1e-5)
check("causal_conv1d_step reading grouped qkvz rows pool", pool, want_pool, 1e-6)
q, k = got[:, :hk * dk].reshape(S, hk, dk), got[:, hk * dk:2 * hk * dk].reshape(S, hk, dk)
v = got[:, 2 * hk * dk:].reshape(S, hk * r, dv)
b3, a3 = ba.view(S, hk, 2 * r).split(r, dim=-1)
A_log, dt_bias, rec = torch.randn(hk * r), torch.randn(hk * r), torch.randn(5, hk * r, dk, dv)
want_rec = rec.clone()
want = gated_delta.gated_delta_decode(q, k, v, a3.reshape(S, -1), b3.reshape(S, -1), A_log, dt_bias, want_rec,
                                      slots, fresh)
got = gated_delta_decode(q, k, v, a3, b3, A_log, dt_bias, rec, slots, fresh)
check("gated_delta_decode reading a, b as grouped views", got, want, 1e-5)
check("gated_delta_decode reading a, b as grouped views, pool", rec, want_rec, 1e-5)
# ... and with the gated RMSNorm in the kernel, its gate z read as a grouped view of the qkvz rows (3 value heads
# per key head, dv = 4)
z = qkvz.view(S, hk, -1)[..., 2 * dk + r * dv:].view(S, hk, r, dv)
norm_w = torch.randn(dv)
want_rec = rec.clone()
want = gated_delta.gated_delta_decode(q, k, v, a3.reshape(S, -1), b3.reshape(S, -1), A_log, dt_bias, want_rec,
                                      slots, fresh)
want = norm_ops.gated_rms_norm(want, z.reshape(S, hk * r, dv), norm_w, 1e-6)
got = gated_delta_decode(q, k, v, a3, b3, A_log, dt_bias, rec, slots, fresh, z=z, norm_weight=norm_w, eps=1e-6)
check("gated_delta_decode with the gated norm", got, want, 1e-5)
check("gated_delta_decode with the gated norm, pool", rec, want_rec, 1e-5)

# one-row linear: odd row counts, a width past one block (2048) with a ragged tail, a weight with padded rows
for N, K in ((5, 48), (33, 3000), (7, 2048)):
    x, w = torch.randn(1, 1, K), torch.randn(N, K + 3)[:, :K]
    check(f"gemv N={N} K={K}", gemv(x, w), F.linear(x, w), 1e-5)
# several projections of one row in one launch: odd row counts (a program straddles no boundary), one weight padded
x = torch.randn(1, 1, 300)
ws = [torch.randn(7, 300), torch.randn(4, 303)[:, :300], torch.randn(9, 300)]
for n in (3, 2, 1):
    check(f"gemv_multi {n} weights", gemv_multi(x, ws[:n]), torch.cat([F.linear(x, w) for w in ws[:n]], -1), 1e-5)

# every arrival counter is back at zero (ops/arrival.py): the next call, or the next replay of a graph, starts clean
from qwen3next.ops import arrival  # noqa: E402
if not arrival._BUFFERS or any(int(b.count_nonzero()) for b in arrival._BUFFERS.values()):
    failures.append("arrival counters not reset")

if failures:
    sys.exit(f"mismatches: {failures}")
