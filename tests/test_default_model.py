"""The embedded default model: ships inside the package within 40 MB, loads by default everywhere, answers chat in
ChatML, and its MTP head predicts two tokens ahead better than chance."""
import os

import torch

import qwen3next
from qwen3next import LLM, SamplingParams, load_model, load_tokenizer


def test_default_model_is_embedded_and_small():
    d = qwen3next.DEFAULT_MODEL
    files = set(os.listdir(d))
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= files
    assert sum(os.path.getsize(os.path.join(d, f)) for f in files) <= 40 * 1024 * 1024


def test_default_model_has_every_part():
    m = load_model(None)
    cfg = m.config
    assert cfg.layer_types.count("full_attention") * 3 == cfg.layer_types.count("linear_attention")
    assert cfg.num_experts > cfg.num_experts_per_tok and m.mtp is not None
    assert all(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    assert m.model.layers[0].mlp.shared_expert is not None


def test_tokenizer_round_trip_and_special_tokens():
    tok = load_tokenizer(qwen3next.DEFAULT_MODEL)
    text = "def f(x):\n    return json.dumps({'a': 1})  # ünïcode"
    assert tok.decode(tok.encode(text)) == text
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == tok.token_to_id("<|im_start|>") and ids[-1] == tok.eos_token_id   # one id each


def test_llm_without_a_model_chats_in_chatml():
    llm = LLM(device="cpu")
    assert llm.model_path == qwen3next.DEFAULT_MODEL
    out = llm.chat([{"role": "user", "content": "What does json.dumps do?"}],
                   SamplingParams(temperature=0, max_tokens=80))[0].outputs[0]
    # trained on docstring chats: the answer names the function and ends with <|im_end|> on its own
    assert out.finish_reason == "stop" and "json" in out.text
    assert "<|im_start|>" not in out.text


def test_mtp_head_predicts_two_ahead():
    m = load_model(None)
    tok = load_tokenizer(qwen3next.DEFAULT_MODEL)
    import json
    with open(json.__file__, encoding="utf-8") as f:   # stdlib source: in-distribution text
        ids = torch.tensor([tok.encode(f.read())[:300]])
    with torch.no_grad():
        h = m(ids).hidden_states
        logits, _, _ = m.mtp_forward(h[:, :-2], ids[:, 1:-1])
    acc = (logits.argmax(-1) == ids[:, 2:]).float().mean().item()
    assert acc > 0.3, acc     # chance is ~1/8192
