"""The routed experts of a prefill chunk as Triton kernels over expert-sorted tiles.

ops/cuda.experts_forward runs torch._grouped_mm, which needs its rows gathered into expert order first (at a
4K-token prefill of Qwen3-Next-80B-A3B, 40,960 (token, expert) rows: a 168 MB copy written and read again), an
argsort and ~10 small torch ops to find the groups, and a SwiGLU pass between the GEMMs. Here:

  plan kernel     rows per expert (a histogram of the ids, over many programs), then, in the last program to
                  finish, each expert's first sorted row and the tiles of at most BM rows of one expert (expert,
                  first row, end row);
  scatter kernel  each (token, slot) assignment takes the next free row of its expert (an atomic counter);
  up kernel       program (tile, column block of I): gathers its tokens' rows of x itself, multiplies them by the
                  expert's gate and up rows (two accumulators), and writes silu(gate) * up * routing weight,
                  [M, I] in sorted order: the intermediate is written once, already activated;
  down kernel     program (tile, column block of H): the activated rows times the expert's down rows, written to
                  the row's (token, slot) position, so the sum over each token's k slots reads contiguous rows
                  (ops/triton_grouped.combine without its gather).

Each tile reads its expert's weights once per column block; with BM at least the mean rows per expert, every hit
expert's weights are read once. The launch grids are upper bounds known on the host (programs past the last
tile return at once), so nothing is read back from the GPU: no sync, capturable in a CUDA graph.

The weights [E, 2I, H] / [E, H, I] are those of model/moe.Experts. Reference: ops/moe.experts_forward (and
sorted_tiles below for the plan); tests/triton_interpreter_checks.py runs these kernels in Triton's CPU
interpreter, benchmarks/check_gpu.py --only moe_prefill on a GPU against the reference and torch._grouped_mm.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .arrival import arrive_last, counters


@triton.jit
def _tile(TILE_E, TILE_R0, TILE_R1, t, BM: tl.constexpr):
    """(expert, sorted rows, row mask) of tile t."""
    e = tl.load(TILE_E + t)
    r0 = tl.load(TILE_R0 + t)
    r1 = tl.load(TILE_R1 + t)
    rows = r0 + tl.arange(0, BM)
    return e, rows, rows < r1


@triton.jit
def _up_kernel(X, ORDER, WTS, GU, TILE_E, TILE_R0, TILE_R1, Hout, stride_x, stride_e, stride_gu, stride_h,
               E, K: tl.constexpr, I: tl.constexpr, H: tl.constexpr,
               BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid = tl.program_id(0)
    n_blocks: tl.constexpr = (I + BN - 1) // BN
    t = pid // n_blocks              # the column blocks of a tile are neighbours: they share its rows of x in L2
    nb = pid % n_blocks
    e, rows, row_ok = _tile(TILE_E, TILE_R0, TILE_R1, t, BM)
    if e >= E:                       # past the last tile
        return
    src = tl.load(ORDER + rows, mask=row_ok, other=0)          # the row's flat (token, slot) index
    w = tl.load(WTS + src, mask=row_ok, other=0.0).to(tl.float32)
    cols = nb * BN + tl.arange(0, BN)
    col_ok = cols < I
    kk = tl.arange(0, BK)
    a_ptr = X + (src // K).to(tl.int64)[:, None] * stride_x + kk[None, :]
    g_ptr = GU + e.to(tl.int64) * stride_e + cols[None, :].to(tl.int64) * stride_gu + kk[:, None]   # [BK, BN]
    u_ptr = g_ptr + I * stride_gu
    acc_g = tl.zeros([BM, BN], tl.float32)
    acc_u = tl.zeros([BM, BN], tl.float32)
    for k0 in range(0, H, BK):
        k_ok = (k0 + kk) < H
        a = tl.load(a_ptr, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b_mask = k_ok[:, None] & col_ok[None, :]
        acc_g = tl.dot(a, tl.load(g_ptr, mask=b_mask, other=0.0), acc_g)
        acc_u = tl.dot(a, tl.load(u_ptr, mask=b_mask, other=0.0), acc_u)
        a_ptr += BK
        g_ptr += BK
        u_ptr += BK
    h = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u * w[:, None]
    tl.store(Hout + rows.to(tl.int64)[:, None] * stride_h + cols[None, :], h.to(Hout.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _down_kernel(Hin, ORDER, D, TILE_E, TILE_R0, TILE_R1, Y, stride_h, stride_de, stride_dr, stride_y,
                 E, I: tl.constexpr, H: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid = tl.program_id(0)
    n_blocks: tl.constexpr = (H + BN - 1) // BN
    t = pid // n_blocks
    nb = pid % n_blocks
    e, rows, row_ok = _tile(TILE_E, TILE_R0, TILE_R1, t, BM)
    if e >= E:
        return
    cols = nb * BN + tl.arange(0, BN)
    col_ok = cols < H
    kk = tl.arange(0, BK)
    a_ptr = Hin + rows.to(tl.int64)[:, None] * stride_h + kk[None, :]
    b_ptr = D + e.to(tl.int64) * stride_de + cols[None, :].to(tl.int64) * stride_dr + kk[:, None]     # [BK, BN]
    acc = tl.zeros([BM, BN], tl.float32)
    for k0 in range(0, I, BK):
        k_ok = (k0 + kk) < I
        a = tl.load(a_ptr, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(a, tl.load(b_ptr, mask=k_ok[:, None] & col_ok[None, :], other=0.0), acc)
        a_ptr += BK
        b_ptr += BK
    dst = tl.load(ORDER + rows, mask=row_ok, other=0).to(tl.int64)     # back to (token, slot) order
    tl.store(Y + dst[:, None] * stride_y + cols[None, :], acc.to(Y.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


# Token-count arguments are not specialised on (Triton compiles anew for each class of an integer: divisible by 16
# or not), and the tile rows start 16-byte aligned whatever their length (a pointer's alignment is specialised on
# too): otherwise new prompt lengths recompiled these kernels, ~0.1-0.9 s each (H100, engine_prefill.py, 2026-11-24)
@triton.jit(do_not_specialize=["M", "n_tiles"])
def _plan_kernel(IDS, COUNTS, ARRIVED, CURSOR, TILE_E, TILE_R0, TILE_R1, M, n_tiles, E: tl.constexpr,
                 BE: tl.constexpr, BM: tl.constexpr, BLOCK: tl.constexpr):
    """Grid (blocks of BLOCK assignments): each program adds its block's histogram of the ids to COUNTS; the last
    to arrive (ops/arrival.py) turns the counts into each expert's first sorted row (their exclusive prefix sum,
    which the scatter kernel counts up from) and the tiles of BM rows, and puts COUNTS back to zero.
    (One program looping over the ids took 0.75 ms per layer at a 32K-token prefill, H100, 2026-11-24.)"""
    experts = tl.arange(0, BE)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < M
    part = tl.histogram(tl.load(IDS + offs, mask=ok, other=0).to(tl.int32), BE)
    part -= tl.where(experts == 0, BLOCK - tl.sum(ok.to(tl.int32), 0), 0)          # the masked lanes counted 0
    tl.atomic_add(COUNTS + experts, part, mask=(experts < E) & (part > 0), sem="relaxed", scope="gpu")
    if arrive_last(ARRIVED, tl.num_programs(0)):
        real = experts < E
        # read and reset with atomics: the other programs' (and this one's) adds are atomics too, so these are
        # ordered after them; a plain load after the arrival read stale counts on an H100 (2026-11-24)
        counts = tl.atomic_xchg(COUNTS + experts, tl.zeros([BE], tl.int32), mask=real, sem="acq_rel", scope="gpu")
        counts = tl.where(real, counts, 0)
        ends = tl.cumsum(counts, 0)
        starts = ends - counts
        tiles = (counts + BM - 1) // BM
        first_tile = tl.cumsum(tiles, 0) - tiles
        tl.store(CURSOR + experts, starts, mask=real)
        for t0 in range(0, n_tiles, BLOCK):             # every tile past the real ones: "no expert"
            t = t0 + tl.arange(0, BLOCK)
            tl.store(TILE_E + t, tl.full([BLOCK], E, tl.int32), mask=t < n_tiles)
        tl.debug_barrier()                              # the real tiles overwrite those marks, after them
        for j in range(0, tl.max(tiles, 0)):
            has = real & (j < tiles)
            r0 = starts + j * BM
            tl.store(TILE_E + first_tile + j, experts, mask=has)
            tl.store(TILE_R0 + first_tile + j, r0, mask=has)
            tl.store(TILE_R1 + first_tile + j, tl.minimum(r0 + BM, ends), mask=has)


@triton.jit(do_not_specialize=["M"])
def _scatter_kernel(IDS, CURSOR, ORDER, M, BLOCK: tl.constexpr):
    """Each assignment takes the next free sorted row of its expert. The order of rows within an expert depends
    on the atomics' order, which changes no result: every row is computed alone and written back to its own
    (token, slot) position."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < M
    e = tl.load(IDS + offs, mask=ok, other=0)
    row = tl.atomic_add(CURSOR + e, 1, mask=ok)
    tl.store(ORDER + row, offs, mask=ok)


# Block shapes (BM rows of one expert, BN output columns, BK reduction step, warps, pipeline stages), from the
# sweeps of benchmarks/check_gpu.py --only moe_prefill --sweep (H100, 80B-A3B shapes, 2026-11-24): at 4K tokens
# the shapes tried were within 1-2% of each other; at 32K the up kernel's 128 columns and 4 stages were the best of
# both sweeps (10% ahead of 64 columns and 3 stages in the first, 0.5% ahead of 3 stages in the second). BM is at
# least the mean rows per expert of a 4K-token prefill (~80), so each hit expert's weights are read once there.
UP_BLOCKS = dict(BM=128, BN=128, BK=64, num_warps=8, num_stages=4)
DOWN_BLOCKS = dict(BM=128, BN=128, BK=64, num_warps=8, num_stages=3)


def sorted_tiles(ids: torch.Tensor, num_experts: int, bm: int):
    """Torch reference of the plan kernels: expert-sorted assignments cut into tiles of at most bm rows of one
    expert.

    Returns (order [M]: flat (token, slot) index of each sorted row, tile_expert, tile_row0, tile_row1 [n_tiles]);
    n_tiles = ceil(M / bm) + min(E, M) bounds the real count, and the tiles past the real ones have expert E."""
    flat = ids.reshape(-1)
    M = flat.numel()
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=ids.device).scatter_add_(
        0, flat, torch.ones_like(flat))
    ends = torch.cumsum(counts, 0)
    tiles = (counts + bm - 1) // bm
    tile_end = torch.cumsum(tiles, 0)
    t = torch.arange(n_tiles_bound(M, num_experts, bm), device=ids.device)
    tile_expert = torch.searchsorted(tile_end, t, right=True)         # == E past the last tile
    e = tile_expert.clamp(max=num_experts - 1)
    row0 = ends[e] - counts[e] + (t - (tile_end[e] - tiles[e])) * bm
    return order, tile_expert, row0, torch.minimum(row0 + bm, ends[e])


def n_tiles_bound(M: int, num_experts: int, bm: int) -> int:
    return triton.cdiv(M, bm) + min(num_experts, M)


# assignments per program of the plan kernel's histogram
PLAN_BLOCK = 1024


def plan(ids: torch.Tensor, num_experts: int, bm: int):
    """sorted_tiles in two kernels (a histogram whose last program cuts the tiles, then an atomic scatter), int32;
    rows within an expert in no fixed order."""
    flat = ids.reshape(-1)
    M, dev = flat.numel(), ids.device
    n_tiles = n_tiles_bound(M, num_experts, bm)
    cursor = torch.empty(num_experts, dtype=torch.int32, device=dev)
    order = torch.empty(M, dtype=torch.int32, device=dev)
    tiles = torch.empty(3, -(-n_tiles // 32) * 32, dtype=torch.int32, device=dev)[:, :n_tiles]   # aligned rows
    # the histogram's sums and the arrival counter: zero between kernels (the plan's last program resets them)
    zeros = counters(dev, "expert_plan", num_experts + 1)
    _plan_kernel[(triton.cdiv(M, PLAN_BLOCK),)](
        flat, zeros[1:], zeros[:1], cursor, tiles[0], tiles[1], tiles[2], M, n_tiles, E=num_experts,
        BE=triton.next_power_of_2(num_experts), BM=bm, BLOCK=PLAN_BLOCK, num_warps=4)
    _scatter_kernel[(triton.cdiv(M, 1024),)](flat, cursor, order, M, BLOCK=1024, num_warps=4)
    return order, tiles[0], tiles[1], tiles[2]


def experts_forward(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, ids: torch.Tensor,
                    weights: torch.Tensor, up_blocks: dict | None = None, down_blocks: dict | None = None,
                    shared: torch.Tensor | None = None, shared_logit: torch.Tensor | None = None,
                    residual: torch.Tensor | None = None):
    """Routed experts; same contract as ops/moe.experts_forward (x [N, H]; ids, weights [N, k] -> [N, H]); the
    optional shared expert output (with its gate's logit) and residual are added in the combine
    (ops/triton_grouped.combine)."""
    from .triton_grouped import combine
    up_blocks, down_blocks = up_blocks or UP_BLOCKS, down_blocks or DOWN_BLOCKS
    N, k = ids.shape
    E, H, inter = gate_up.shape[0], x.shape[1], down.shape[-1]
    if gate_up.shape[1:] != (2 * inter, H) or down.shape != (E, H, inter):
        raise ValueError(f"expert weights gate_up {tuple(gate_up.shape)} / down {tuple(down.shape)} do not match "
                         f"hidden {H}, intermediate {inter}, {E} experts")
    if x.stride(-1) != 1 or gate_up.stride(-1) != 1 or down.stride(-1) != 1:
        raise ValueError("x and the expert weights must be contiguous in their last dimension")
    M = N * k
    if M == 0:
        out = torch.zeros_like(x)
        if shared is not None:
            out = out + torch.sigmoid(shared_logit) * shared
        return out if residual is None else residual + out
    h = torch.empty(M, inter, dtype=x.dtype, device=x.device)
    y = torch.empty(M, H, dtype=x.dtype, device=x.device)
    wts = weights.reshape(-1)
    ub, db = dict(up_blocks), {**down_blocks, "BM": up_blocks["BM"]}   # one BM: both kernels share the tiles
    order, tile_e, row0, row1 = plan(ids, E, ub["BM"])
    n_tiles = tile_e.numel()
    _up_kernel[(n_tiles * triton.cdiv(inter, ub["BN"]),)](
        x, order, wts, gate_up, tile_e, row0, row1, h, x.stride(0), gate_up.stride(0), gate_up.stride(1),
        h.stride(0), E, K=k, I=inter, H=H, **ub)
    _down_kernel[(n_tiles * triton.cdiv(H, db["BN"]),)](
        h, order, down, tile_e, row0, row1, y, h.stride(0), down.stride(0), down.stride(1), y.stride(0), E,
        I=inter, H=H, **db)
    return combine(y, None, k, shared, shared_logit, residual)
