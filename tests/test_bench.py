"""The GPU benchmark's own logic (scaling, floors, ratios, speculative round costs, table, JSON) on CPU with tiny
configs: the numbers are meaningless here, the code paths and the report's shape are what is checked."""
import json
import math

import pytest
import torch

from qwen3next import ModelConfig, bench


@pytest.fixture
def on_cpu():
    bench.DEV.update(device="cpu", dtype=torch.float32)   # CPU bf16 matmuls are emulated (slow)
    yield
    bench.DEV.update(device="cuda", dtype=torch.bfloat16)


def test_bench_runs_end_to_end_on_cpu(on_cpu, tmp_path):
    common = dict(vocab_size=128, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    nxt = ModelConfig(model_type="qwen3_next", num_hidden_layers=8, linear_num_key_heads=2, linear_num_value_heads=4,
                      linear_key_head_dim=16, linear_value_head_dim=16, num_experts=8, num_experts_per_tok=2,
                      moe_intermediate_size=32, shared_expert_intermediate_size=32, **common)
    dense = ModelConfig(model_type="qwen3", num_hidden_layers=16, intermediate_size=128, **common)
    res = bench.run(layers=4, dense_layers=2, contexts=(32, 64), batches=(2,), with_transformers=False,
                    out_dir=str(tmp_path), log=lambda *a: None, configs=(nxt, dense))
    r = res["ratios"]
    for key in ("prefill_4k_vs_dense", "prefill_32k_vs_dense", "decode_4k_vs_dense", "decode_32k_vs_dense",
                "decode_b1_over_floor", "speculative_b1_implied_speedup", "speculative_b2_implied_speedup"):
        assert math.isfinite(r[key]) and r[key] > 0, key
    sp = res["ours_next"]["speculative"]["b2"]
    assert sp["round_ms"] == pytest.approx(sp["verify_whole_ms"] + sp["drafting_ms"] + sp["commit_whole_ms"])
    assert sp["verify_whole_ms"] == min(sp["verify_whole_ms_by_path"].values()) > 0
    assert sp["verify_over_floor"] == pytest.approx(sp["verify_whole_ms"] / sp["verify_floor_ms"])
    assert sp["implied_speedup"] == pytest.approx(3.8 * sp["plain_step_ms"] / sp["round_ms"])
    saved = json.loads((tmp_path / "latest.json").read_text())
    assert saved["ratios"] == pytest.approx(r)
    assert "MTP speculative decoding" in (tmp_path / "latest.md").read_text()


def test_decode_bytes_counts_distinct_experts():
    cfg = ModelConfig(model_type="qwen3_next", num_hidden_layers=4, hidden_size=64, num_experts=64,
                      num_experts_per_tok=4, moe_intermediate_size=32, vocab_size=100)
    one, many = bench.decode_bytes(cfg, 1, 0), bench.decode_bytes(cfg, 10_000, 0)
    expert = 3 * 64 * 32 * 2
    # batch 1 reads 4 experts per layer; a huge batch reads all 64 (plus per-token state and embeddings)
    assert many - one > 4 * (64 - 4) * expert * 0.99


def test_verify_bytes_read_each_sequence_once_and_keep_every_state():
    cfg = ModelConfig(model_type="qwen3_next", num_hidden_layers=4, hidden_size=64, num_experts=64,
                      num_experts_per_tok=4, moe_intermediate_size=32, vocab_size=100)
    state = cfg.linear_num_value_heads * cfg.linear_key_head_dim * cfg.linear_value_head_dim * 4
    gdn = sum(t != "full_attention" for t in cfg.layer_types)
    # one token: a decode step plus the kept state; more tokens: the experts of all of them, the KV read once
    assert bench.verify_bytes(cfg, 2, 300, 1) == pytest.approx(bench.decode_bytes(cfg, 2, 300) + 2 * gdn * state)
    four = bench.verify_bytes(cfg, 1, 300, 4)
    assert four > bench.decode_bytes(cfg, 1, 300)
    assert four < bench.decode_bytes(cfg, 4, 300)            # not four sequences' KV and states


def test_prefill_floor_is_the_slower_of_compute_and_weight_traffic_per_layer():
    cfg = ModelConfig(model_type="qwen3_next", num_hidden_layers=4, hidden_size=64, num_experts=64,
                      num_experts_per_tok=4, moe_intermediate_size=32, vocab_size=100)
    flops, bw = 1e12, 1e9
    for T in (1, 64, 4096):
        by_flops = bench.prefill_flops(cfg, T) / flops
        assert bench.prefill_floor(cfg, T, flops, bw) >= by_flops
    # with free compute only the bytes are left: every expert read once, however many tokens hit it
    expert = 3 * 64 * 32 * 2
    kv_per_token = 2 * cfg.num_key_value_heads * cfg.head_dim * 2 * cfg.layer_types.count("full_attention")
    grow = bench.prefill_floor(cfg, 10_000, 1e30, 1.0) - bench.prefill_floor(cfg, 1, 1e30, 1.0)
    assert grow - 9_999 * kv_per_token == pytest.approx(4 * (64 - 4) * expert, rel=1e-6)


def test_serial_prefill_floor_runs_each_part_of_a_layer_at_its_own_bound():
    """At 4K tokens the projections are compute-bound and the experts bandwidth-bound: the layer's floor overlaps
    them, the part-by-part floor (kernels one after another) adds them, and it equals the layer floor when one
    resource bounds every part."""
    from qwen3next.config import preset
    cfg = preset("qwen3-next-80b-a3b")
    flops, bw = 738e12, 2.98e12
    layer, serial = bench.prefill_floor(cfg, 4096, flops, bw), bench.prefill_floor_serial(cfg, 4096, flops, bw)
    assert serial > 1.3 * layer
    parts = bench._prefill_parts(cfg, 4096)
    projections = sum(p[0][0] for p in parts) / flops
    experts = sum(p[1][1] for p in parts) / bw
    assert serial > projections + experts
    for only in ((flops, 1e30), (1e30, bw)):        # one resource free: the two floors agree
        assert bench.prefill_floor_serial(cfg, 4096, *only) == pytest.approx(bench.prefill_floor(cfg, 4096, *only))
