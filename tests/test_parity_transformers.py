"""Our model equals transformers' reference (float32) on random checkpoints with every parameter perturbed."""
import pytest
import torch
from conftest import rel_err
from hf_reference import hf_dense, hf_next

from qwen3next import load_model, save_model

NEXT_CASES = {
    "ratio2-untied": dict(),
    "ratio1-tied-dense-layer-no-norm-topk": dict(linear_num_value_heads=2, tie_word_embeddings=True,
                                                  mlp_only_layers=[1], norm_topk_prob=False),
    "odd-sizes-mha": dict(hidden_size=36, num_attention_heads=3, num_key_value_heads=3, head_dim=12,
                          linear_key_head_dim=6, linear_value_head_dim=10, vocab_size=89, num_experts=5,
                          num_experts_per_tok=2, moe_intermediate_size=14, shared_expert_intermediate_size=10),
    "sparse-step-2-layer-types": dict(decoder_sparse_step=2, num_hidden_layers=5,
                                      layer_types=["linear_attention", "full_attention", "linear_attention",
                                                   "linear_attention", "full_attention"]),
    "yarn": dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                                  "rope_theta": 10000.0, "partial_rotary_factor": 0.5}, max_position_embeddings=256),
}


def _compare(hf, tmp_path, T=150, B=2):
    hf.save_pretrained(tmp_path)
    ours = load_model(str(tmp_path))
    ids = torch.randint(0, hf.config.vocab_size, (B, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        out = ours(ids).logits
    assert out.shape == ref.shape
    return rel_err(out, ref), ours, ids


@pytest.mark.parametrize("case", sorted(NEXT_CASES))
def test_qwen3_next_logits_match_transformers(case, tmp_path):
    # T = 150: not a multiple of 64 and longer than two chunks
    err, _, _ = _compare(hf_next(seed=3, **NEXT_CASES[case]), tmp_path)
    assert err < 1e-5, err


@pytest.mark.parametrize("overrides", [dict(), dict(tie_word_embeddings=True, num_key_value_heads=6),
                                        dict(attention_bias=True)], ids=["gqa", "tied-mha", "bias"])
def test_dense_qwen3_logits_match_transformers(overrides, tmp_path):
    err, _, _ = _compare(hf_dense(seed=4, **overrides), tmp_path, T=70)
    assert err < 1e-5, err


def test_our_save_loads_in_transformers(tmp_path):
    from transformers import Qwen3NextForCausalLM
    hf = hf_next(seed=5, mlp_only_layers=[2])
    _, ours, ids = _compare(hf, tmp_path / "a", T=40)
    save_model(ours, str(tmp_path / "b"), max_shard_bytes=60_000)   # forces several shards + index
    assert (tmp_path / "b" / "model.safetensors.index.json").exists()
    back = Qwen3NextForCausalLM.from_pretrained(str(tmp_path / "b"), experts_implementation="eager").float().eval()
    with torch.no_grad():
        assert rel_err(back(ids).logits, ours(ids).logits) < 1e-5
    # and the sharded save loads back into ours with identical weights
    again = load_model(str(tmp_path / "b"))
    for (n1, p1), (n2, p2) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1


def test_dense_save_loads_in_transformers(tmp_path):
    from transformers import Qwen3ForCausalLM
    hf = hf_dense(seed=6)
    _, ours, ids = _compare(hf, tmp_path / "a", T=30)
    save_model(ours, str(tmp_path / "b"))
    back = Qwen3ForCausalLM.from_pretrained(str(tmp_path / "b")).float().eval()
    with torch.no_grad():
        assert rel_err(back(ids).logits, ours(ids).logits) < 1e-5
