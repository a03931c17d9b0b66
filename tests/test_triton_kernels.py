"""Our Triton kernels without a GPU: (1) executed by Triton's CPU interpreter against their torch references,
(2) compiled for sm_90 (Hopper) to PTX, which catches typing and lowering errors. The GPU run of the same
comparisons, with bf16 tolerances and timings, is benchmarks/check_gpu.py."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")

from qwen3next.ops import custom_ops, kernels, moe  # noqa: E402


def test_kernels_match_references_in_the_triton_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, str(Path(__file__).with_name("triton_interpreter_checks.py"))], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("max error") == 89, r.stdout


def _compile(fn, signature: dict, constants: dict):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    sig = {**signature, **{k: "constexpr" for k in constants}}
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constants), target=GPUTarget("cuda", 90, 32))


def _assert_pdl(kernel, loads_before_wait: bool = False):
    """Compiled with PDL (ops/pdl.py): it waits for its predecessor, then releases its successor; with
    `loads_before_wait`, global loads (weights, states) are issued before the wait."""
    ptx = kernel.asm["ptx"]
    wait, release = ptx.find("griddepcontrol.wait"), ptx.find("griddepcontrol.launch_dependents")
    assert 0 <= wait < release, "griddepcontrol.wait then launch_dependents"
    if loads_before_wait:
        assert "ld.global" in ptx[:wait], "no global load before griddepcontrol.wait"


def _ptrs(names, dtype):
    return {n: f"*{dtype}" for n in names.split()}


def _ints(names):
    return {n: "i32" for n in names.split()}


@pytest.mark.parametrize("dtype,rows", [("bf16", 1), ("bf16", 4), ("fp32", 4)])
def test_moe_kernels_compile_for_hopper(dtype, rows):
    from qwen3next.ops import triton_moe as m
    up = _compile(m._up_kernel, {**_ptrs("X", dtype), "IDS": "*i64", "W": "*fp32", "SW": f"*{dtype}",
                                 **_ptrs("GU SG SU", dtype),
                                 "Hbuf": "*fp32", **_ints("stride_x stride_e stride_gu stride_s stride_h")},
                  dict(K=10, S=11, I=512, IS=512, H=2048, BLOCK_I=rows, BLOCK_H=1024, PDL=True))
    down = _compile(m._down_kernel, {"Hbuf": "*fp32", "IDS": "*i64", **_ptrs("D SD", dtype), "Y": "*fp32",
                                     **_ints("stride_h stride_de stride_dr stride_sr stride_y")},
                    dict(K=10, S=11, I=512, IS=512, KMAX=512, H=2048, BLOCK_N=8, BLOCK_K=256, PDL=True))
    assert ".entry _up_kernel" in up.asm["ptx"] and ".entry _down_kernel" in down.asm["ptx"]
    _assert_pdl(up)
    _assert_pdl(down, loads_before_wait=True)      # the expert's first down rows are read before the wait


def test_route_kernel_compiles_for_hopper():
    from qwen3next.ops import triton_moe as m
    k = _compile(m._route_kernel, {"LOGITS": "*bf16", "W": "*bf16", "IDS": "*i64", "stride_l": "i32"},
                 dict(E=512, K=10, BLOCK_E=512, BLOCK_K=16, NORM=True, PDL=True))
    assert ".entry _route_kernel" in k.asm["ptx"]
    _assert_pdl(k)


@pytest.mark.parametrize("dtype,grouped", [("bf16", True), ("bf16", False), ("fp32", False)])
def test_conv_step_kernel_compiles_for_hopper(dtype, grouped):
    from qwen3next.ops import triton_conv as m
    k = _compile(m._conv_step_kernel, {**_ptrs("X W STATE", dtype), "SLOTS": "*i64", "FRESH": "*i1",
                                       "Y": f"*{dtype}", **_ints("C stride_x stride_y stride_ss")},
                 dict(K=4, BK=4, BC=256, ACT=True, GROUPED=grouped, HK=16, DK=128, RDV=256, PDL=grouped))
    assert ".entry _conv_step_kernel" in k.asm["ptx"] and "bar.sync" in k.asm["ptx"]
    if grouped:
        _assert_pdl(k, loads_before_wait=True)     # the conv state and weights are read before the wait
    else:
        assert "griddepcontrol" not in k.asm["ptx"]


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_gemv_kernel_compiles_for_hopper(dtype):
    from qwen3next.ops import triton_gemv as m
    k = _compile(m._gemv_kernel, {**_ptrs("X W Y", dtype), **_ints("N K stride_w")}, dict(BLOCK_N=2, BLOCK_K=2048, PDL=True))
    assert ".entry _gemv_kernel" in k.asm["ptx"]
    _assert_pdl(k, loads_before_wait=True)         # the weights are read before the wait
    k = _compile(m._gemv3_kernel, {**_ptrs("X W1 W2 W3 Y", dtype), **_ints("N1 N2 N3 K stride_w1 stride_w2 stride_w3")},
                 dict(BLOCK_N=2, BLOCK_K=2048, PDL=False))
    assert ".entry _gemv3_kernel" in k.asm["ptx"] and "griddepcontrol" not in k.asm["ptx"]


def test_gdn_verify_kernel_compiles_for_hopper():
    from qwen3next.ops import triton_gdn as g
    k = _compile(g._gdn_verify_kernel,
                 {**_ptrs("Q K V A B", "bf16"), **_ptrs("A_LOG DT_BIAS", "fp32"), "STATE": "*fp32", "SLOTS": "*i64",
                  "FRESH": "*i1", "O": "*bf16", "STEPS": "*fp32", "scale": "fp32", "T": "i32",
                  **_ints("sq_s sq_t sq_h sk_s sk_t sk_h sv_s sv_t sv_h sa_s sa_t sb_s sb_t ss_s ss_h so_s so_t so_h "
                          "st_s st_t st_h")},
                 dict(R=2, DK=128, DV=128, BK=128, BV=32, PDL=True))
    assert ".entry _gdn_verify_kernel" in k.asm["ptx"]
    _assert_pdl(k, loads_before_wait=True)         # the state tile is read before the wait


@pytest.mark.parametrize("norm,block_v", [(False, 32), (True, 32), (True, 128)])
def test_gdn_decode_kernel_compiles_for_hopper(norm, block_v):
    from qwen3next.ops import triton_gdn as g
    k = _compile(g._gdn_decode_kernel,
                 {**_ptrs("Q K V A B", "bf16"), **_ptrs("A_LOG DT_BIAS", "fp32"), "STATE": "*fp32", "SLOTS": "*i64",
                  "FRESH": "*i1", **_ptrs("O Z NORM_W", "bf16"), "COUNT": "*i32", "scale": "fp32", "eps": "fp32",
                  **_ints("stride_qs stride_qh stride_ks stride_kh stride_vs stride_vh stride_as stride_ag "
                          "stride_bs stride_bg stride_ss stride_sh stride_os stride_oh stride_zs stride_zg "
                          "stride_zr")},
                 dict(R=2, DK=128, DV=128, BK=128, BV=block_v, BDV=128, NORM=norm, PDL=True))
    ptx = k.asm["ptx"]
    assert ".entry _gdn_decode_kernel" in ptx
    # a head over several programs: the last to arrive norms it
    assert ("atom.global.gpu.acq_rel.add" in ptx) == (norm and block_v < 128)
    _assert_pdl(k, loads_before_wait=True)         # the state tile is read before the wait


@pytest.mark.parametrize("block_n", [32, 64])
def test_paged_attention_kernel_compiles_for_hopper(block_n):
    from qwen3next.ops import triton_attention as a
    k = _compile(a._decode_split_kernel,
                 {**_ptrs("Q K V", "bf16"), **_ptrs("PT CTX", "i64"), **_ptrs("O M L", "fp32"), "scale": "fp32",
                  **_ints("stride_qs stride_qh stride_kr stride_kh stride_pts table_width stride_os stride_oh "
                          "stride_osp stride_ms stride_mh SPLITS")},
                 dict(G=8, BLOCK_G=16, D=256, PAGE=64, BLOCK_N=block_n, PDL=True))
    assert ".entry _decode_split_kernel" in k.asm["ptx"]
    _assert_pdl(k)
    for gate in (True, False):
        merge = _compile(a._merge_kernel, {**_ptrs("O M L", "fp32"), **_ptrs("GATE OUT", "bf16"),
                                           **_ints("Hq stride_os stride_oh stride_osp stride_ms stride_mh stride_gs "
                                                   "stride_gh stride_outs stride_outh")},
                         dict(SPLITS=132, BLOCK_SP=256, CHUNK=16, BLOCK_D=64, HAS_GATE=gate, PDL=gate))
        assert ".entry _merge_kernel" in merge.asm["ptx"]
        assert ("griddepcontrol.wait" in merge.asm["ptx"]) == gate
    write = _compile(a._write_kv_kernel, {**_ptrs("KN VN KP VP", "bf16"), "SLOTS": "*i64",
                                          **_ints("stride_kn stride_kh stride_vn stride_vh stride_pr stride_ph")},
                     dict(D=256, BLOCK_D=256, PDL=True))
    assert ".entry _write_kv_kernel" in write.asm["ptx"]
    _assert_pdl(write)


@pytest.mark.parametrize("write,bt,zc", [(True, 1, True), (False, 16, True), (True, 16, False)])
def test_attention_prep_kernels_compile_for_hopper(write, bt, zc):
    from qwen3next.ops import triton_rope as r
    k = _compile(r._qk_norm_rope_kernel, {**_ptrs("Q K V WQ WK COS SIN QO KO KP VP", "bf16"), "SLOTS": "*i64",
                                          "N": "i32", "eps": "fp32",
                                          **_ints("sq_t sq_h sk_t sk_h sv_t sv_h sc_t ss_t sqo_t sqo_h sko_t sko_h "
                                                  "sp_r sp_h")},
                 dict(HQ=16, HKV=2, D=256, R=64, ZERO_CENTERED=zc, WRITE=write, BT=bt, PDL=True))
    _assert_pdl(k)
    rot = _compile(r._rotary_kernel, {"POS": "*i64", "INV_FREQ": "*fp32", **_ptrs("COS SIN", "bf16"), "N": "i32",
                                      "scaling": "fp32", **_ints("stride_c stride_s")},
                   dict(HALF=32, BHALF=32, BT=16))
    assert "cos.approx" not in rot.asm["ptx"] and "sin.approx" not in rot.asm["ptx"]   # CUDA's precise cos, sin


@pytest.mark.parametrize("mode,add,groups", [(0, False, 1), (1, False, 1), (2, False, 1), (0, True, 1),
                                             (2, False, 2)])
def test_norm_kernel_compiles_for_hopper(mode, add, groups):
    from qwen3next.ops import triton_norm as n
    k = _compile(n._rms_norm_kernel, {**_ptrs("X Wt G Y RES SUM", "bf16"),
                                      **_ints("n_rows stride_x stride_g stride_gg stride_gr stride_y stride_r "
                                              "stride_s"), "eps": "fp32"},
                 dict(N=2048, BLOCK_N=2048, ROWS=2, MODE=mode, ADD=add, GG=16 if groups > 1 else 1, GR=groups))
    assert ".entry _rms_norm_kernel" in k.asm["ptx"]


@pytest.mark.parametrize("dtype,unpack", [("bf16", True), ("fp32", True), ("bf16", False)])
def test_gdn_split_kernel_compiles_for_hopper(dtype, unpack):
    from qwen3next.ops import triton_gdn as t
    k = _compile(t._split_gate_kernel, {**_ptrs("QKVZ BA MIXED Z BETA", dtype), **_ptrs("A_LOG DT_BIAS G", "fp32"),
                                        **_ints("N stride_x stride_ba stride_m stride_z stride_b stride_g")},
                 dict(HK=16, DK=128, R=2, RDV=256, BT=16, BDK=128, BRDV=256, BR=2, UNPACK=unpack))
    assert ".entry _split_gate_kernel" in k.asm["ptx"]


@pytest.mark.parametrize("dtype,has_h0,grouped", [("bf16", True, False), ("bf16", False, False),
                                                  ("fp32", True, False), ("bf16", True, True)])
def test_conv_kernels_compile_for_hopper(dtype, has_h0, grouped):
    from qwen3next.ops import triton_conv as t
    layout = dict(GROUPED=grouped, HK=16, DK=128, RDV=256)   # grouped: reading whole in_proj_qkvz rows
    conv = _compile(t._conv_kernel, {**_ptrs("X W H0", dtype), "SEQ": "*i64", "IDX": "*i64", "Y": f"*{dtype}",
                                     **_ints("N C stride_x stride_y stride_hs")},
                    dict(K=4, BT=16, BC=128, HAS_H0=has_h0, ACT=True, SPLIT=has_h0, CQ=2048, NORM_QK=grouped,
                         **layout))
    final = _compile(t._final_state_kernel, {**_ptrs("X H0", dtype), "CU": "*i64", "OUT": f"*{dtype}",
                                             **_ints("C stride_x stride_hs stride_os")},
                     dict(K=4, BC=256, HAS_H0=has_h0, **layout))
    assert ".entry _conv_kernel" in conv.asm["ptx"] and ".entry _final_state_kernel" in final.asm["ptx"]


def test_grouped_glue_kernels_compile_for_hopper():
    from qwen3next.ops import triton_grouped as g
    s = _compile(g._swiglu_kernel, {**_ptrs("Hin", "bf16"), "Wt": "*bf16", "Out": "*bf16",
                                    **_ints("M stride_h stride_o")}, dict(I=512, ROWS=16, BLOCK_I=256))
    for extra in (False, True):     # with the gated shared expert and the residual added in the same pass
        c = _compile(g._combine_kernel, {"Y": "*bf16", "INV": "*i64", "Out": "*bf16", **_ptrs("SH SG RES", "bf16"),
                                         **_ints("stride_y stride_o stride_sh stride_sg stride_r")},
                     dict(K=10, H=2048, BLOCK_H=1024, GATHER=False, SHARED=extra, RESIDUAL=extra))
        assert ".entry _combine_kernel" in c.asm["ptx"]
    assert ".entry _swiglu_kernel" in s.asm["ptx"]


def test_prefill_expert_kernels_compile_for_hopper():
    from qwen3next.ops import triton_experts as m
    tiles = {"TILE_E": "*i32", "TILE_R0": "*i32", "TILE_R1": "*i32", "ORDER": "*i32"}
    up = _compile(m._up_kernel, {**_ptrs("X", "bf16"), "WTS": "*bf16", "GU": "*bf16", **tiles, "Hout": "*bf16",
                                 **_ints("stride_x stride_e stride_gu stride_h E")},
                  dict(K=10, I=512, H=2048, **{k: v for k, v in m.UP_BLOCKS.items() if k.startswith("B")}))
    down = _compile(m._down_kernel, {"Hin": "*bf16", "D": "*bf16", **tiles, "Y": "*bf16",
                                     **_ints("stride_h stride_de stride_dr stride_y E")},
                    dict(I=512, H=2048, **{k: v for k, v in m.DOWN_BLOCKS.items() if k.startswith("B")}))
    for k in (up, down):      # Hopper's warpgroup matrix instructions
        assert "wgmma.mma_async" in k.asm["ptx"]
    plan = _compile(m._plan_kernel, {"IDS": "*i64", **_ptrs("COUNTS ARRIVED CURSOR TILE_E TILE_R0 TILE_R1", "i32"),
                                     **_ints("M n_tiles")}, dict(E=512, BE=512, BM=128, BLOCK=1024))
    scatter = _compile(m._scatter_kernel, {"IDS": "*i64", **_ptrs("CURSOR ORDER", "i32"), **_ints("M")},
                       dict(BLOCK=1024))
    assert "atom.global" in plan.asm["ptx"] and "atom.global" in scatter.asm["ptx"]


def test_moe_reference_per_slot_sums_to_the_moe_block():
    """ops/moe.moe_per_slot (the fused kernel's oracle, and the custom op's CPU kernel) is the MoE block."""
    torch.manual_seed(1)
    T, H, E, inter, inter_s, k = 5, 24, 7, 6, 10, 3
    x = torch.randn(T, H, dtype=torch.float64)
    gate_up, down = torch.randn(E, 2 * inter, H, dtype=torch.float64), torch.randn(E, H, inter, dtype=torch.float64)
    weights, ids = moe.route(torch.randn(T, E, dtype=torch.float64), k, True)
    sg, su = torch.randn(inter_s, H, dtype=torch.float64), torch.randn(inter_s, H, dtype=torch.float64)
    sd, sw = torch.randn(H, inter_s, dtype=torch.float64), torch.rand(T, 1, dtype=torch.float64)
    shared = F.linear(F.silu(F.linear(x, sg)) * F.linear(x, su), sd)
    want = moe.experts_forward(x, gate_up, down, ids, weights) + sw * shared
    got = custom_ops.moe_decode(x, gate_up, down, ids, weights, sg, su, sd, sw)
    assert got.shape == (T, k + 1, H)
    torch.testing.assert_close(got.sum(1).double(), want, rtol=1e-5, atol=1e-5)


def test_model_moe_block_takes_the_fused_path_with_same_output():
    """SparseMoE hands the fused op the right tensors in the right order (routed and shared experts, the shared
    gate): forcing the fused path (its CPU kernel is the reference) leaves the model's logits unchanged."""
    from qwen3next.checkpoint import build_model
    from qwen3next.config import ModelConfig
    from qwen3next.model.init import init_weights
    cfg = ModelConfig(vocab_size=50, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4,
                      linear_key_head_dim=8, linear_value_head_dim=8, num_experts=6, num_experts_per_tok=2,
                      moe_intermediate_size=8, shared_expert_intermediate_size=12, num_nextn_predict_layers=0)
    model = build_model(cfg, torch.float64, "cpu")
    torch.manual_seed(0)
    init_weights(model)
    ids = torch.randint(0, cfg.vocab_size, (2, 5))
    want = model(ids).logits
    kernels.use(moe_decode=lambda *a: custom_ops.moe_decode(*a).sum(1).to(a[0].dtype))
    try:
        got = model(ids).logits
    finally:
        kernels.reset()
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_paged_attention_custom_op_cpu_kernel_is_the_decode_reference_with_gate():
    """The custom op's CPU kernel (what compiled CPU tests run in place of the GPU kernel) rebuilds the decode
    step's metadata from the page table and context lengths alone, and applies the output gate as the model did."""
    from qwen3next.model.cache import BatchMeta
    from qwen3next.ops import attention
    torch.manual_seed(3)
    page, Hkv, Hq, D = 4, 1, 2, 8
    kp, vp = torch.randn(6, page, Hkv, D, dtype=torch.float64), torch.randn(6, page, Hkv, D, dtype=torch.float64)
    meta = BatchMeta.build([1, 1], [2, 9], [0, 1], [[5], [0, 3, 1]], page)
    q, gate = torch.randn(2, Hq, D, dtype=torch.float64), torch.randn(2, Hq, D, dtype=torch.float64)
    want = attention.paged_attention(q, kp, vp, meta, 0.3) * torch.sigmoid(gate)
    got = custom_ops.paged_decode_attention(q, kp, vp, meta.page_table, meta.context_lens, meta.max_context_len,
                                            0.3, gate)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(kernels.paged_attention(q, kp, vp, meta, 0.3, gate=gate), want, rtol=0, atol=0)


def test_programmatic_dependent_launch_stays_off_without_a_hopper_gpu():
    """ops/pdl.py: PDL only for CUDA tensors on sm_90+ (not on CPU, not in Triton's interpreter), and the compiled
    decode layers ask Inductor for it only then."""
    from qwen3next.ops import fused, pdl
    x = torch.zeros(1, 1, 8)
    assert not pdl.launch_pdl(x)
    assert fused._inductor_options(x) == {}
