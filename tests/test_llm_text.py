"""The text side of the engine with the real Qwen vocabulary: stop strings, streaming deltas, chat, the CLI."""
import pytest
import torch

from qwen3next import LLM, ModelConfig, SamplingParams, random_model, save_model
from qwen3next.cli import main as cli_main

CFG = ModelConfig(vocab_size=151936, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
                  linear_key_head_dim=8, linear_value_head_dim=8, num_experts=4, num_experts_per_tok=2,
                  moe_intermediate_size=16, shared_expert_intermediate_size=16, num_nextn_predict_layers=0)


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    d = tmp_path_factory.mktemp("text_ck")
    m = random_model(CFG, seed=5)
    with torch.no_grad():   # make the random model prefer plain ASCII word tokens, so texts are readable
        m.lm_head.weight[:, 1000:].mul_(0.2)
    save_model(m, str(d))
    return LLM(str(d), device="cpu")


def test_stop_string_truncates_and_never_leaks(llm):
    p = "The quick brown fox"
    free = llm.generate(p, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))[0].outputs[0].text
    assert len(free) > 12
    stop = free[6:9]
    out = llm.generate(p, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=[stop]))[0].outputs[0]
    assert out.text == free[:free.index(stop)]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    streamed = "".join(o.outputs[0].delta_text
                       for o in llm.stream(p, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True,
                                                             stop=[stop])))
    assert streamed == out.text


def test_streamed_deltas_add_up_to_the_text(llm):
    sp = SamplingParams(temperature=1.0, max_tokens=30, seed=3, ignore_eos=True)
    outs = list(llm.stream("日本語とemoji 🎉 mixed", sp))
    text = "".join(o.outputs[0].delta_text for o in outs)
    final = outs[-1].outputs[0]
    assert outs[-1].finished and text == final.text and "\ufffd" not in text
    assert final.text == llm.tokenizer.decode(final.token_ids, skip_special_tokens=True)


def test_chat_renders_chatml(llm):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    prompt = llm.render_chat(msgs)
    assert prompt.startswith("<|im_start|>system\nBe brief.<|im_end|>\n") and prompt.endswith("<|im_start|>assistant\n")
    out = llm.chat(msgs, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))[0]
    assert out.prompt == prompt and len(out.outputs[0].token_ids) == 5
    ids = llm.tokenizer.encode(prompt)
    assert out.prompt_token_ids == ids and ids.count(151644) == 3      # <|im_start|> is one token


def test_cli_generate_streams(llm, capsys):
    rc = cli_main(["generate", "Hello", "--model", llm.model_path, "--max-tokens", "8", "--temperature", "0",
                   "--device", "cpu", "-v"])
    cap = capsys.readouterr()
    assert rc == 0 and "[8 tokens" in cap.err and len(cap.out.strip()) > 0
    rc = cli_main(["generate", "Hello", "--model", llm.model_path, "--temperature", "-3", "--device", "cpu"])
    assert rc == 2 and "temperature" in capsys.readouterr().err
