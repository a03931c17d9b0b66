"""Block-shape sweep for the batch-1 decode kernels, on the real Qwen3-Next-80B-A3B shapes (GPU only).

The decode profile (benchmarks/profile_gpu.py --only b1) puts the fused MoE's up kernel at ~1.9 TB/s and cuBLAS's
one-row projection GEMMs at 0.4-2.5 TB/s against a ~2.9 TB/s copy rate. This script times, per configuration:

  moe up / down   ops/triton_moe kernels, T tokens, 10 routed + 1 shared expert, 512 experts
  route           the softmax/top-k kernel's warp count, at 1 and 4096 tokens
  gemv            a one-row Triton matrix-vector product against F.linear (cuBLAS) on each projection shape
  attention       the paged decode attention (split + merge) at 4K and 32K cached tokens, batch 1 and 16: keys per
                  inner step, warps, pipeline stages, programs per step; 80B-A3B (16 q / 2 kv heads, head_dim 256)
                  and Qwen3-32B (64 / 8, 128) shapes, against the time to read the keys and values once

Each timing replays a CUDA graph of R launches that read different weights (rotating expert ids or weight copies),
so the L2 cache (50 MB) does not serve them; time per launch = graph time / R. Prints the best configurations and
their bandwidth as a fraction of a measured copy, and writes JSON.

    python benchmarks/tune_decode_kernels.py [--out tune.json] [--only moe,route,gemv,attention]
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from qwen3next.ops import triton_attention, triton_gemv, triton_moe  # noqa: E402

R = 32  # launches per graph


def graph_time_us(launches) -> float:
    """launches: list of zero-arg callables; one CUDA graph runs them all; returns µs per launch (median of 5)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in launches[:2]:
            f()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in launches:
            f()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / len(launches))
    return sorted(times)[2]


def copy_gbs() -> float:
    x = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    t = graph_time_us([lambda: y.copy_(x)] * 8)
    return 2 * x.numel() / t / 1e3


def sweep_moe(rows: list, bw: float):
    E, I, H, K = 512, 512, 2048, 10
    dt = torch.bfloat16
    gate_up = torch.randn(E, 2 * I, H, device="cuda", dtype=dt) * 0.02
    down_w = torch.randn(E, H, I, device="cuda", dtype=dt) * 0.02
    sg, su = torch.randn(I, H, device="cuda", dtype=dt) * 0.02, torch.randn(I, H, device="cuda", dtype=dt) * 0.02
    sd = torch.randn(H, I, device="cuda", dtype=dt) * 0.02
    for T in (1, 4, 16, 64):
        S = K + 1
        x = torch.randn(T, H, device="cuda", dtype=dt)
        ids = [torch.stack([torch.randperm(E, device="cuda")[:K] for _ in range(T)]) for _ in range(R)]
        w = torch.softmax(torch.randn(T, K, device="cuda"), -1).to(dt)
        sw = torch.rand(T, device="cuda", dtype=dt)
        hbuf = torch.empty(T * S, I, device="cuda", dtype=torch.float32)
        y = torch.empty(T * S, H, device="cuda", dtype=torch.float32)
        experts = sum(r.unique().numel() for r in ids) / R + 1      # distinct experts per launch, + the shared
        up_bytes = experts * 2 * I * H * 2
        down_bytes = experts * H * I * 2

        def up(ids_i, bi, bh, nw, ns):
            return lambda: triton_moe._up_kernel[(T * S, triton.cdiv(I, bi))](
                x, ids_i, w, sw, gate_up, sg, su, hbuf, x.stride(0), gate_up.stride(0), gate_up.stride(1),
                sg.stride(0), hbuf.stride(0), K=K, S=S, I=I, IS=I, H=H, BLOCK_I=bi, BLOCK_H=bh,
                PDL=False, num_warps=nw, num_stages=ns)

        def down(ids_i, bn, bk, nw, ns):
            return lambda: triton_moe._down_kernel[(T * S, triton.cdiv(H, bn))](
                hbuf, ids_i, down_w, sd, y, hbuf.stride(0), down_w.stride(0), down_w.stride(1), sd.stride(0),
                y.stride(0), K=K, S=S, I=I, IS=I, KMAX=I, H=H, BLOCK_N=bn, BLOCK_K=bk, PDL=False,
                num_warps=nw, num_stages=ns)

        for kernel, launch, names, sizes, nbytes, shipped in (
                ("moe_up", up, ("BLOCK_I", "BLOCK_H"), ((1, 2, 4, 8), (256, 512, 1024, 2048)), up_bytes,
                 triton_moe.decode_blocks(T)[0] + (1,)),
                ("moe_down", down, ("BLOCK_N", "BLOCK_K"), ((2, 4, 8, 16), (128, 256, 512)), down_bytes,
                 triton_moe.decode_blocks(T)[1] + (1,))):
            mine = []
            for b0, b1, nw, ns in itertools.product(*sizes, (2, 4, 8), (1,)):   # stages 1 vs 3: within 1% (2026-11-23)
                if b0 * b1 > 16384:
                    continue
                try:
                    t = graph_time_us([launch(ids[i], b0, b1, nw, ns) for i in range(R)])
                except Exception as e:  # noqa: BLE001 (out of resources for a shape: skip it)
                    print(f"  {kernel} T={T} {b0}x{b1} w{nw} s{ns}: {type(e).__name__}", flush=True)
                    continue
                mine.append({"kernel": kernel, "T": T, names[0]: b0, names[1]: b1, "num_warps": nw,
                             "num_stages": ns, "us": t, "bw_frac": nbytes / t / 1e3 / bw})
            rows.extend(mine)
            print(f"{kernel:8s} T={T:3d}: best {min(mine, key=lambda r: r['us'])}", flush=True)
            ref = [r for r in mine if (r[names[0]], r[names[1]], r["num_warps"], r["num_stages"]) == shipped]
            if ref:
                print(f"           shipped {shipped}: {ref[0]['us']:.1f} us, {ref[0]['bw_frac']:.2f} of copy")


def sweep_route(rows: list):
    E, K = 512, 10
    for T in (1, 4096):
        logits = torch.randn(T, E, device="cuda", dtype=torch.bfloat16)
        w = torch.empty(T, K, device="cuda", dtype=torch.bfloat16)
        ids = torch.empty(T, K, device="cuda", dtype=torch.int64)
        for nw in (1, 2, 4, 8):
            f = lambda nw=nw: triton_moe._route_kernel[(T,)](  # noqa: E731
                logits, w, ids, logits.stride(0), E=E, K=K, BLOCK_E=512, BLOCK_K=16, NORM=True, PDL=False,
                num_warps=nw)
            t = graph_time_us([f] * R)
            rows.append({"kernel": "route", "T": T, "num_warps": nw, "us": t})
            print(f"route T={T:5d} num_warps={nw}: {t:.2f} us", flush=True)


def sweep_gemv(rows: list, bw: float):
    shapes = {"gdn in_proj_qkvz": (12288, 2048), "gdn in_proj_ba": (64, 2048), "out/o_proj": (2048, 4096),
              "router": (512, 2048), "attn q_proj (+gate)": (8192, 2048), "attn k/v_proj": (512, 2048),
              "shared expert gate_up": (1024, 2048), "shared expert down": (2048, 512)}
    for name, (N, K) in shapes.items():
        copies = max(2, int(200e6 // (N * K * 2)) + 1)
        ws = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(min(copies, 16))]
        x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
        y = torch.empty(1, N, device="cuda", dtype=torch.bfloat16)
        nbytes = N * K * 2
        t_cublas = graph_time_us([(lambda w=w: torch.nn.functional.linear(x, w)) for w in ws] * (R // len(ws) + 1))
        err_ref = torch.nn.functional.linear(x.float(), ws[0].float())
        best = None
        for bn, bk, nw in itertools.product((1, 2, 4, 8, 16, 32), (256, 512, 1024, 2048), (2, 4, 8)):
            if bk > K or bn * bk > 16384 or bn * bk < 32 * nw:
                continue
            f = lambda w, bn=bn, bk=bk, nw=nw: triton_gemv._gemv_kernel[(triton.cdiv(N, bn),)](  # noqa: E731
                x, w, y, N, K, w.stride(0), BLOCK_N=bn, BLOCK_K=bk, PDL=False, num_warps=nw)
            try:
                t = graph_time_us([(lambda w=w: f(w)) for w in ws] * (R // len(ws) + 1))
            except Exception as e:  # noqa: BLE001
                print(f"  gemv {name} {bn}x{bk} w{nw}: {type(e).__name__}", flush=True)
                continue
            f(ws[0])
            err = ((y.float() - err_ref).norm() / err_ref.norm()).item()
            row = {"kernel": "gemv", "shape": name, "N": N, "K": K, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": nw,
                   "us": t, "cublas_us": t_cublas, "bw_frac": nbytes / t / 1e3 / bw, "rel_err": err}
            rows.append(row)
            best = row if best is None or t < best["us"] else best
        if best is None:
            print(f"gemv {name}: no configuration ran", flush=True)
            continue
        print(f"gemv {name:22s} N={N:5d} K={K}: cuBLAS {t_cublas:6.2f} us ({nbytes / t_cublas / 1e3 / bw:.2f} of "
              f"copy); best triton {best['us']:6.2f} us ({best['bw_frac']:.2f}) BLOCK {best['BLOCK_N']}x"
              f"{best['BLOCK_K']} w{best['num_warps']} err {best['rel_err']:.1e}", flush=True)


def sweep_attention(rows: list, bw: float):
    page, dt = 64, torch.bfloat16
    old = {"block_n": 64, "num_warps": 4, "num_stages": 3, "programs": 264}     # the kernel before this sweep
    grid = [dict(block_n=bn, num_warps=nw, num_stages=ns, programs=pr) for bn, nw, ns, pr in
            itertools.product((16, 32, 64), (4, 8), (1, 2, 3), (264, 528, 1056))]
    for name, Hq, Hkv, D in (("80b-a3b", 16, 2, 256), ("32b", 64, 8, 128)):
        for S, ctx in ((1, 4096), (1, 32768), (16, 4096)):
            per_seq = ctx // page + 1
            n_pools = max(2, min(R, int(3e9 // (2 * S * per_seq * page * Hkv * D * 2))))   # past the L2 cache
            pools = [(torch.randn(S * per_seq, page, Hkv, D, device="cuda", dtype=dt),
                      torch.randn(S * per_seq, page, Hkv, D, device="cuda", dtype=dt)) for _ in range(n_pools)]
            table = torch.arange(S * per_seq, device="cuda").view(S, per_seq)
            lens = torch.full((S,), ctx, device="cuda")
            q = torch.randn(S, Hq, D, device="cuda", dtype=dt)
            gate = torch.randn(S, Hq, D, device="cuda", dtype=dt)
            floor_us = S * ctx * Hkv * D * 2 * 2 / bw / 1e3
            ref = triton_attention.paged_decode_attention(q, *pools[0], table, lens, ctx, D ** -0.5, config=old)
            best = None
            for cfg in [old] + grid:
                out = triton_attention.paged_decode_attention(q, *pools[0], table, lens, ctx, D ** -0.5, config=cfg)
                err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
                launches = [lambda p=p, cfg=cfg: triton_attention.paged_decode_attention(
                    q, *p, table, lens, ctx, D ** -0.5, gate=gate, config=cfg) for p in pools]
                t = graph_time_us(launches * max(1, R // n_pools))
                row = {"kernel": "attention", "model": name, "S": S, "ctx": ctx, **cfg, "us": t,
                       "floor_us": floor_us, "over_floor": t / floor_us, "rel_err_vs_old": err,
                       "old_config": cfg is old}
                rows.append(row)
                if best is None or t < best["us"]:
                    best = row
                if cfg is old:
                    print(f"attention {name} S={S} ctx={ctx}: old config {t:.1f} us ({t / floor_us:.2f}x floor "
                          f"{floor_us:.1f} us)", flush=True)
            print(f"attention {name} S={S} ctx={ctx}: best {best['us']:.1f} us ({best['over_floor']:.2f}x floor) "
                  f"block_n={best['block_n']} warps={best['num_warps']} stages={best['num_stages']} "
                  f"programs={best['programs']} (err vs old {best['rel_err_vs_old']:.1e})", flush=True)
            default = [r for r in rows[-len(grid) - 1:] if all(r[k] == v for k, v in
                                                                 triton_attention.DECODE_CONFIG.items())]
            if default:
                print(f"   current default {default[0]['us']:.1f} us ({default[0]['over_floor']:.2f}x floor)")
            del pools
            torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="tune_decode.json")
    ap.add_argument("--only", default="moe,route,gemv,attention")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("tune_decode_kernels.py needs a CUDA GPU")
    only = set(a.only.split(","))
    bw = copy_gbs()
    print(f"{torch.cuda.get_device_name()}: copy {bw:.0f} GB/s", flush=True)
    rows: list = []
    if "route" in only:
        sweep_route(rows)
    if "gemv" in only:
        sweep_gemv(rows, bw)
    if "moe" in only:
        sweep_moe(rows, bw)
    if "attention" in only:
        sweep_attention(rows, bw)
    with open(a.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "copy_gbs": bw, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
