"""The cached forward equals the full forward: prefill + decode, uneven prefill chunks, packed variable-length
batches, slot reuse, and the MTP head with its own KV.
Run in float64, so any mismatch beyond rounding (1e-10) is a real bug, not float32 noise."""
import pytest
import torch
from conftest import rel_err
from hf_reference import hf_next

from qwen3next import BatchMeta, HybridCache, ModelConfig, load_model, random_model


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("ck")
    hf_next(seed=7, mlp_only_layers=[1]).save_pretrained(d)
    return load_model(str(d), dtype=torch.float64)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 97, (2, 150), generator=torch.Generator().manual_seed(2))


@torch.no_grad()
def test_prefill_then_decode_equals_full_forward(model, ids):
    full = model(ids).logits
    cache = model.new_cache(2, 160)
    out = [model(ids[:, :140], cache=cache).logits]
    for t in range(140, 150):
        out.append(model(ids[:, t:t + 1], cache=cache).logits)
    assert rel_err(torch.cat(out, 1), full) < 1e-10


@torch.no_grad()
def test_three_uneven_prefill_chunks_equal_one_prefill(model, ids):
    one = model(ids, cache=model.new_cache(2, 150)).logits
    cache = model.new_cache(2, 150)
    parts = [model(ids[:, a:b], cache=cache).logits for a, b in ((0, 7), (7, 100), (100, 150))]
    assert rel_err(torch.cat(parts, 1), one) < 1e-10


@torch.no_grad()
def test_packed_variable_length_batch(model, ids):
    """Three sequences of different lengths and stages in one packed step equal each one run alone."""
    cfg = model.config
    cache = HybridCache(cfg, num_slots=4, num_pages=40, page_size=8, dtype=torch.float64)
    lens = [150, 33, 1]
    seqs = [ids[0], ids[1, :33], ids[1, 60:61]]
    refs = [model(s[None]).logits[0] for s in seqs]
    tables = [list(range(0, 19)), list(range(19, 24)), [39]]
    slots = [3, 0, 1]
    # step 1: seq0 prefills 100 tokens, seq1 prefills 20, seq2 (1 token) runs in full
    meta = BatchMeta.build([100, 20, 1], [0, 0, 0], slots, tables, 8)
    out1 = model(torch.cat([seqs[0][:100], seqs[1][:20], seqs[2]]), cache=cache, meta=meta).logits
    # step 2: seq0 finishes prefill (50), seq1 decodes token by token, one token in this step
    meta = BatchMeta.build([50, 1], [100, 20], slots[:2], tables[:2], 8)
    out2 = model(torch.cat([seqs[0][100:], seqs[1][20:21]]), cache=cache, meta=meta).logits
    rest = []
    for t in range(21, 33):
        meta = BatchMeta.build([1], [t], [slots[1]], [tables[1]], 8)
        rest.append(model(seqs[1][t:t + 1], cache=cache, meta=meta).logits)
    assert rel_err(torch.cat([out1[:100], out2[:50]]), refs[0]) < 1e-10
    assert rel_err(torch.cat([out1[100:120], out2[50:51], *rest]), refs[1]) < 1e-10
    assert rel_err(out1[120:], refs[2]) < 1e-10
    assert lens == [len(s) for s in seqs]


@torch.no_grad()
def test_reused_slot_starts_from_zero_state(model, ids):
    cache = HybridCache(model.config, num_slots=1, num_pages=20, page_size=8, dtype=torch.float64)
    pages = list(range(20))
    model(ids[0, :50], cache=cache, meta=BatchMeta.build([50], [0], [0], [pages], 8))     # old tenant
    # new tenant in the same slot and pages, without zeroing by hand: position 0 must ignore the old state
    out = model(ids[1, :40], cache=cache, meta=BatchMeta.build([40], [0], [0], [pages], 8)).logits
    assert rel_err(out, model(ids[1:2, :40]).logits[0]) < 1e-10


@torch.no_grad()
def test_mtp_cached_equals_full():
    cfg = ModelConfig(vocab_size=61, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
                      linear_key_head_dim=8, linear_value_head_dim=8, num_experts=6, num_experts_per_tok=2,
                      moe_intermediate_size=16, shared_expert_intermediate_size=16, num_nextn_predict_layers=1)
    m = random_model(cfg, dtype=torch.float64, seed=3)
    ids = torch.randint(0, 61, (1, 40))
    h = m(ids).hidden_states
    full, _, _ = m.mtp_forward(h[:, :-1], ids[:, 1:])
    cache = HybridCache(cfg, 1, 8, 8, dtype=torch.float64)
    meta = BatchMeta.build([25], [0], [0], [list(range(8))], 8)
    a, _, _ = m.mtp_forward(h[:, :25], ids[:, 1:26], cache=cache, meta=meta)
    outs = [a[0]]
    for t in range(25, 39):
        meta = BatchMeta.build([1], [t], [0], [list(range(8))], 8)
        outs.append(m.mtp_forward(h[:, t:t + 1], ids[:, t + 1:t + 2], cache=cache, meta=meta)[0][0])
    assert rel_err(torch.cat(outs), full[0]) < 1e-10


@torch.no_grad()
def test_packed_prefill_hands_host_boundaries_to_the_gdn_ops(model, ids):
    """fla's varlen kernels read cu_seqlens back from the device unless given a host copy (a sync per layer); the
    model passes BatchMeta's host copy to the conv and the chunked rule, and the ops agree with and without it."""
    from qwen3next.ops import conv1d, cuda, gated_delta, kernels
    seen = []

    def spy(ref):
        def op(*a, **kw):
            seen.append(kw.get("cu_seqlens_cpu"))
            return ref(*a, **kw)
        return op
    kernels.use(causal_conv1d=spy(conv1d.causal_conv1d), chunk_gated_delta_rule=spy(gated_delta.chunk_gated_delta_rule))
    try:
        cache = HybridCache(model.config, num_slots=2, num_pages=30, page_size=8, dtype=torch.float64)
        meta = BatchMeta.build([100, 20], [0, 0], [0, 1], [list(range(13)), list(range(13, 16))], 8)
        model(torch.cat([ids[0, :100], ids[1, :20]]), cache=cache, meta=meta)
    finally:
        kernels.reset()
    n_gdn = model.config.layer_types.count("linear_attention")
    assert len(seen) == 2 * n_gdn
    assert all(h is not None and h.device.type == "cpu" and h.tolist() == [0, 100, 120] for h in seen)
    # an fla without the argument is called without it; one with it gets it
    assert cuda._host_bounds(lambda x, cu_seqlens=None: 0, meta.cu_seqlens_cpu) == {}
    assert cuda._host_bounds(lambda x, cu_seqlens_cpu=None: 0, meta.cu_seqlens_cpu)["cu_seqlens_cpu"] is \
        meta.cu_seqlens_cpu


def test_batch_meta_tensors_are_views_of_one_aligned_buffer():
    """One copy to the device, and every tensor starts 16 int64s (128 bytes) into its buffer (Triton compiles a
    kernel anew for a pointer that is not 16-byte aligned); the values are the per-field ones."""
    meta = BatchMeta.build([3, 1, 2], [0, 7, 4], [2, 0, 1], [[5], [1, 3], [4, 6]], 4)
    fields = [meta.cu_seqlens, meta.positions, meta.slots, meta.page_table, meta.context_lens, meta.fresh,
              meta.slot_mapping, meta.token_seq, meta.token_index]
    # (the buffer itself is allocated aligned: 512 bytes on CUDA, 64 on CPU)
    assert all(t.storage_offset() % 16 == 0 for t in fields if t.dtype == torch.long)
    assert len({t.untyped_storage().data_ptr() for t in fields if t.dtype == torch.long}) == 1
    assert meta.cu_seqlens.tolist() == [0, 3, 4, 6] and meta.positions.tolist() == [0, 1, 2, 7, 4, 5]
    assert meta.page_table.tolist() == [[5, 0], [1, 3], [4, 6]] and meta.context_lens.tolist() == [3, 8, 6]
    assert meta.fresh.tolist() == [True, False, False] and meta.slots.tolist() == [2, 0, 1]
    assert meta.slot_mapping.tolist() == [20, 21, 22, 3 * 4 + 3, 6 * 4 + 0, 6 * 4 + 1]
    assert meta.token_seq.tolist() == [0, 0, 0, 1, 2, 2] and meta.token_index.tolist() == [0, 1, 2, 0, 0, 1]
    assert meta.cu_seqlens_cpu.tolist() == [0, 3, 4, 6] and meta.cu_seqlens_cpu.device.type == "cpu"
