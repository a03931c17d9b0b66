"""Config reading (v4 and v5 keys), presets, meta-device construction, random init, and every checkpoint error."""
import json
import os

import pytest
import torch
from conftest import rel_err
from hf_reference import TINY_NEXT

from qwen3next import ModelConfig, load_model, random_model, save_model
from qwen3next.cli import main as cli_main
from qwen3next.model.deltanet import GatedDeltaNet
from qwen3next.model.norm import RMSNorm

TINY = ModelConfig(vocab_size=50, hidden_size=32, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1,
                   head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
                   linear_value_head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                   shared_expert_intermediate_size=16)


def test_80b_preset_on_meta_has_exact_parameter_counts():
    m = load_model("qwen3-next-80b-a3b", device="meta")
    assert m.num_parameters(include_mtp=False) == 79_674_391_296
    assert m.num_parameters() - m.num_parameters(include_mtp=False) == 1_650_471_424
    assert all(p.is_meta for p in m.parameters())
    cfg = m.config
    assert cfg.layer_types.count("full_attention") == 12 and cfg.layer_types[3] == "full_attention"
    assert m.model.layers[0].linear_attn.A_log.dtype == torch.float32


def test_dense_32b_preset_shape():
    m = load_model("qwen3-32b", device="meta", dtype=torch.bfloat16)
    assert 32.7e9 < m.num_parameters() < 32.8e9 and m.mtp is None
    assert not m.config.attn_output_gate and m.config.rotary_dim == 128


def test_v4_and_v5_config_keys_agree():
    base = {"model_type": "qwen3_next", **TINY_NEXT, "full_attention_interval": 2}
    base.pop("rope_theta"), base.pop("partial_rotary_factor")
    v4 = ModelConfig.from_hf_dict({**base, "rope_theta": 5e6, "partial_rotary_factor": 0.5,
                                   "rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                                    "original_max_position_embeddings": 128}})
    v5 = ModelConfig.from_hf_dict({**base, "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 5e6,
                                                              "original_max_position_embeddings": 128,
                                                              "partial_rotary_factor": 0.5}})
    for c in (v4, v5):
        assert c.rope_theta == 5e6 and c.partial_rotary_factor == 0.5 and c.rope_scaling["factor"] == 4.0
        assert c.layer_types == ["linear_attention", "full_attention"] * 2
    # write -> read is the identity
    again = ModelConfig.from_hf_dict(json.loads(json.dumps(v5.to_hf_dict())))
    assert again.to_hf_dict() == v5.to_hf_dict()


def test_layer_types_override_interval_and_legacy_names():
    c = ModelConfig.from_hf_dict({"model_type": "qwen3_next", **TINY_NEXT, "full_attention_interval": 4,
                                  "layer_types": ["linear", "attention", "linear", "linear"]})
    assert c.layer_types == ["linear_attention", "full_attention", "linear_attention", "linear_attention"]


@pytest.mark.parametrize("bad,needle", [
    ({"model_type": "llama"}, "model_type"),
    ({"layer_types": ["linear_attention"]}, "layer_types"),
    ({"layer_types": ["mamba"] * 4}, "mamba"),
    ({"num_experts_per_tok": 20}, "num_experts_per_tok"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "dynamic"),
])
def test_bad_config_fields_are_named(bad, needle):
    with pytest.raises(ValueError, match=needle):
        ModelConfig.from_hf_dict({"model_type": "qwen3_next", **TINY_NEXT, **bad})


def test_random_init_follows_recipe():
    m = random_model(TINY, seed=1)
    for mod in m.modules():
        if isinstance(mod, RMSNorm):
            assert torch.all(mod.weight == 0)
        if isinstance(mod, GatedDeltaNet):
            a = mod.A_log.exp()
            assert mod.A_log.dtype == torch.float32 and torch.all((a >= 1) & (a <= 16))
            dt = torch.nn.functional.softplus(mod.dt_bias)
            assert torch.all((dt > 9e-4) & (dt < 0.11))
            assert torch.all(mod.norm.weight == 1)
    router = m.model.layers[0].mlp.gate.weight
    norms = router.norm(dim=1)
    assert torch.allclose(norms, norms[0].expand_as(norms))      # no expert favoured at the start
    assert abs(m.model.embed_tokens.weight.std().item() - 0.02) < 0.002
    # bf16 model keeps the decay parameters in fp32
    mb = random_model(TINY, dtype=torch.bfloat16, seed=1)
    assert mb.model.layers[0].linear_attn.A_log.dtype == torch.float32
    assert mb.model.layers[0].linear_attn.in_proj_qkvz.weight.dtype == torch.bfloat16


def test_bf16_model_runs_and_tracks_fp32(tmp_path):
    m32 = random_model(TINY, seed=2)
    save_model(m32, str(tmp_path))
    m16 = load_model(str(tmp_path), dtype=torch.bfloat16)
    ids = torch.randint(0, 50, (1, 70))
    with torch.no_grad():
        a, b = m32(ids).logits, m16(ids).logits.float()
    assert rel_err(b, a) < 0.05


def test_mtp_saved_and_loaded(tmp_path):
    m = random_model(TINY, seed=3)
    assert m.mtp is not None
    save_model(m, str(tmp_path))
    back = load_model(str(tmp_path))
    assert back.mtp is not None
    for (n, p), (n2, p2) in zip(m.named_parameters(), back.named_parameters()):
        assert n == n2 and torch.equal(p, p2)
    # a checkpoint without the key but with mtp.* tensors still gets its MTP head
    cfg = json.load(open(tmp_path / "config.json"))
    cfg.pop("num_nextn_predict_layers")
    json.dump(cfg, open(tmp_path / "config.json", "w"))
    assert load_model(str(tmp_path)).mtp is not None


@pytest.fixture()
def saved(tmp_path):
    save_model(random_model(TINY.replace(num_nextn_predict_layers=0), seed=4), str(tmp_path))
    return tmp_path


def _rewrite(path, fn):
    from safetensors.torch import load_file, save_file
    f = path / "model.safetensors"
    tensors = load_file(str(f))
    fn(tensors)
    save_file(tensors, str(f))


def test_missing_tensor_is_named(saved):
    _rewrite(saved, lambda t: t.pop("model.layers.2.mlp.experts.3.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing.*model\.layers\.2\.mlp\.experts\.3\.up_proj\.weight"):
        load_model(str(saved))


def test_unexpected_tensor_is_named(saved):
    _rewrite(saved, lambda t: t.__setitem__("model.layers.9.extra.weight", torch.zeros(2)))
    with pytest.raises(ValueError, match=r"no place for.*model\.layers\.9\.extra\.weight"):
        load_model(str(saved))


def test_misshaped_tensor_is_named(saved):
    _rewrite(saved, lambda t: t.__setitem__("model.norm.weight", torch.zeros(31)))
    with pytest.raises(ValueError, match=r"model\.norm\.weight has shape \(31,\).*expects \(32,\)"):
        load_model(str(saved))


def test_corrupt_file_is_named(saved):
    f = saved / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(ValueError, match="model.safetensors"):
        load_model(str(saved))


def test_unknown_model_type_and_missing_files(saved, tmp_path_factory):
    cfg = json.load(open(saved / "config.json"))
    json.dump({**cfg, "model_type": "mixtral"}, open(saved / "config.json", "w"))
    with pytest.raises(ValueError, match="mixtral"):
        load_model(str(saved))
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(str(empty))
    with pytest.raises(FileNotFoundError, match="neither a checkpoint directory nor a preset"):
        load_model("no-such-model")


def test_sharded_index_pointing_at_missing_shard(tmp_path):
    m = random_model(TINY, seed=5)
    save_model(m, str(tmp_path), max_shard_bytes=50_000)
    shards = sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors"))
    assert len(shards) > 2
    back = load_model(str(tmp_path))
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), back.state_dict().values()))
    os.remove(tmp_path / shards[1])
    with pytest.raises(FileNotFoundError, match=shards[1]):
        load_model(str(tmp_path))


def test_cli_init_writes_a_loadable_checkpoint(tmp_path):
    TINY.save(str(tmp_path / "cfg"))
    out = tmp_path / "ck"
    assert cli_main(["init", "--config", str(tmp_path / "cfg" / "config.json"), "--num-layers", "2", "--out", str(out),
                     "--dtype", "bf16", "--seed", "7"]) == 0
    m = load_model(str(out))
    assert m.config.num_hidden_layers == 2 and m.config.layer_types == ["linear_attention"] * 2
    assert json.load(open(out / "config.json"))["dtype"] == "bfloat16"
    assert m.model.layers[0].linear_attn.A_log.dtype == torch.float32   # loaded as fp32 model here
    ref = random_model(TINY.replace(num_hidden_layers=2), seed=7, dtype=torch.bfloat16)
    assert torch.equal(m.model.embed_tokens.weight, ref.model.embed_tokens.weight.float())
    assert cli_main(["init", "--preset", "qwen3-32b", "--num-layers", "0", "--out", str(out)]) == 2


def test_cli_info_and_errors(capsys):
    assert cli_main(["info", "qwen3-next-80b-a3b"]) == 0
    assert "79,674,391,296" in capsys.readouterr().out
    assert cli_main(["info", "/no/such/dir"]) == 2
    assert "neither a checkpoint directory" in capsys.readouterr().err
