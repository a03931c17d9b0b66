"""Tiny model configurations shared by the engine tests (a few thousand parameters: fast, every layer kind), and
the prompt / output helpers of the graph tests."""
import torch

from qwen3next import ModelConfig

# 4 layers (3 Gated DeltaNet + 1 attention), MoE of 4 experts top-2 + shared, one MTP layer, no EOS
ENGINE_CFG = ModelConfig(vocab_size=97, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
                         linear_key_head_dim=8, linear_value_head_dim=8, num_experts=4, num_experts_per_tok=2,
                         moe_intermediate_size=16, shared_expert_intermediate_size=16, num_nextn_predict_layers=1,
                         eos_token_id=None)


def engine_checkpoint(tmp_path_factory, name: str, seed: int) -> str:
    """A random ENGINE_CFG model saved in the checkpoint format, in a fresh temporary directory."""
    from qwen3next import random_model, save_model
    d = tmp_path_factory.mktemp(name)
    save_model(random_model(ENGINE_CFG, seed=seed), str(d))
    return str(d)


def random_prompts(lengths, seed=0, vocab=ENGINE_CFG.vocab_size):
    """Token-id prompts of the given lengths, reproducible."""
    g = torch.Generator().manual_seed(seed)
    return [{"prompt_token_ids": torch.randint(0, vocab, (n,), generator=g).tolist()} for n in lengths]


def output_tokens(outs):
    """The generated token ids of each request's first completion."""
    return [o.outputs[0].token_ids for o in outs]
