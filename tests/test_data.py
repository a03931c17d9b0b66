"""Training data: prepare_dataset token files, the deterministic sampler, the BPE tokenizer trainer, the corpus."""
import json

import numpy as np
import pytest
import torch

from qwen3next.chat import QWEN3_CHAT_TEMPLATE, render_chat
from qwen3next.tokenizer import load_tokenizer
from qwen3next.train.bpe import ADDED_TOKENS, train_bpe_tokenizer
from qwen3next.train.data import (TokenFile, WindowSampler, eval_windows, prepare_dataset, read_windows,
                                  write_token_file)

DOCS = ["def add(a, b):\n    return a + b\n", "Héllo wörld, naïve café 🙂 — 12345.\n",
        "<|im_start|>user\nWhat does len do?<|im_end|>\n<|im_start|>assistant\nIt counts.<|im_end|>\n"]


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("texts")
    for i in range(12):
        (root / f"doc{i:02d}.txt").write_text(DOCS[i % 3] * (i + 1), encoding="utf-8")
    with open(root / "chats.jsonl", "w", encoding="utf-8") as f:
        for i in range(10):
            f.write(json.dumps({"text": f"<|im_start|>user\nQuestion {i}?<|im_end|>\n"}) + "\n")
    (root / "ignored.bin").write_bytes(b"\x00\x01")
    return root


@pytest.fixture(scope="module")
def tokenizer(text_dir, tmp_path_factory):
    return train_bpe_tokenizer([str(text_dir)], 400, str(tmp_path_factory.mktemp("tok")))


# ---- BPE tokenizer ------------------------------------------------------------------------------------------------
def test_bpe_tokenizer_round_trips_and_keeps_special_tokens_whole(tokenizer):
    ids = {content: tokenizer.token_to_id(content) for content, _ in ADDED_TOKENS}
    assert None not in ids.values() and len(set(ids.values())) == len(ADDED_TOKENS)
    assert min(ids.values()) == tokenizer.vocab_size - len(ADDED_TOKENS)   # appended after the learned ranks
    assert tokenizer.vocab_size <= 400
    for content, i in ids.items():
        assert tokenizer.encode(f"x{content}y").count(i) == 1
    text = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>assistant\n<think>\nhmm\n</think>\n\n"
            "<tool_call>\n{\"name\": \"f\"}\n</tool_call><tool_response>ok</tool_response> ünïcødé 🙂 \t x<|im_end|>"
            "<|endoftext|>")
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == ids["<|im_end|>"]
    assert tokenizer.chat_template == QWEN3_CHAT_TEMPLATE
    # Qwen3's split: control tokens are special (dropped by skip_special_tokens), think/tool markers are not
    assert tokenizer.decode(tokenizer.encode("<|im_start|>a<think>b"), skip_special_tokens=True) == "a<think>b"


def test_bpe_tokenizer_renders_chat_and_loads_in_transformers(tokenizer, tmp_path):
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert prompt == render_chat([{"role": "user", "content": "hi"}])
    transformers = pytest.importorskip("transformers")
    tokenizer.save(str(tmp_path))
    reloaded = load_tokenizer(str(tmp_path))
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for text in (prompt, DOCS[1], "<tool_call>x</tool_call>"):
        assert hf.encode(text, add_special_tokens=False) == tokenizer.encode(text) == reloaded.encode(text)


def test_bpe_vocab_too_small_is_an_error(text_dir, tmp_path):
    with pytest.raises(ValueError, match="vocab_size=100"):
        train_bpe_tokenizer([str(text_dir)], 100, str(tmp_path))


# ---- prepare_dataset ----------------------------------------------------------------------------------------------
def test_prepare_dataset_writes_documents_with_separators(text_dir, tokenizer, tmp_path):
    out = prepare_dataset([str(text_dir)], tokenizer, str(tmp_path), eval_fraction=0.2, seed=3)
    train, ev = TokenFile(str(tmp_path / "train.bin")), TokenFile(str(tmp_path / "eval.bin"))
    assert train.dtype == np.uint16 and len(ev) > 0
    sep = tokenizer.token_to_id("<|endoftext|>")
    n_docs = 12 + 10
    assert out["train"]["documents"] + out["eval"]["documents"] == n_docs
    ids = np.concatenate([train.tokens, ev.tokens])
    assert (ids == sep).sum() == n_docs and train.tokens[-1] == sep
    assert out["train"]["tokenizer"]["vocab_size"] == tokenizer.vocab_size
    docs = tokenizer.decode(train.tokens.tolist()).split("<|endoftext|>")[:-1]
    assert all(d in [t * k for t in DOCS for k in range(1, 13)] or d.startswith("<|im_start|>user\nQuestion")
               for d in docs)
    # deterministic: same inputs and seed, same bytes
    prepare_dataset([str(text_dir)], tokenizer, str(tmp_path / "again"), eval_fraction=0.2, seed=3)
    assert (tmp_path / "again" / "train.bin").read_bytes() == (tmp_path / "train.bin").read_bytes()


def test_prepare_dataset_always_holds_out_something_and_picks_uint32_for_big_vocabularies(tmp_path):
    class BigVocab:   # a stand-in tokenizer whose vocabulary does not fit in uint16
        vocab_size, eos_token_id = 70000, 69999

        def token_to_id(self, token):
            return None

        def encode(self, text):
            return [65536 + len(text), 1]

    (tmp_path / "a.txt").write_text("aa")
    (tmp_path / "b.txt").write_text("bbb")
    out = prepare_dataset([str(tmp_path)], BigVocab(), str(tmp_path / "tok"), eval_fraction=0.01)
    assert out["train"]["dtype"] == "uint32" and out["eval"]["documents"] == 1
    assert TokenFile(str(tmp_path / "tok" / "train.bin")).tokens.tolist() == [65538, 1, 69999]


def test_token_file_errors_name_the_file(tmp_path):
    path = str(tmp_path / "t.bin")
    write_token_file(path, range(100), vocab_size=128)
    with open(path, "ab") as f:
        f.write(b"\x00")
    with pytest.raises(ValueError, match="t.bin"):
        TokenFile(path)
    with pytest.raises(FileNotFoundError, match="nothing.bin"):
        TokenFile(str(tmp_path / "nothing.bin"))
    with pytest.raises(FileNotFoundError, match="neither a file nor a folder"):
        prepare_dataset([str(tmp_path / "missing")], None, str(tmp_path / "x"))


# ---- sampler ------------------------------------------------------------------------------------------------------
@pytest.fixture
def tokens(tmp_path):
    return write_token_file(str(tmp_path / "train.bin"), np.arange(1000) % 251, vocab_size=256)


def test_sampler_is_a_function_of_seed_and_step(tokens):
    a = WindowSampler(tokens, seq_len=16, micro_batch=3, grad_accum=2, seed=7)
    b = WindowSampler(tokens, seq_len=16, micro_batch=3, grad_accum=2, seed=7)
    for step in (0, 5, 40, 3):   # any order, as after a resume
        for x, y in zip(a.micro_batches(step), b.micro_batches(step)):
            assert x.shape == (3, 17) and x.dtype.is_floating_point is False
            assert (x == y).all()
    assert not (a.micro_batches(1)[0] == a.micro_batches(2)[0]).all()
    c = WindowSampler(tokens, seq_len=16, micro_batch=3, grad_accum=2, seed=8)
    assert not (a.micro_batches(0)[0] == c.micro_batches(0)[0]).all()
    # windows are contiguous slices of the stream
    row = a.micro_batches(0)[0][0].numpy()
    assert (np.diff(row) % 251 == 1).all()


def test_sampler_visits_every_window_once_per_epoch(tokens):
    s = WindowSampler(tokens, seq_len=16, micro_batch=2, grad_accum=1, seed=1)
    offset, perm = s._epoch(0)
    n = len(perm)
    starts = np.concatenate([s.window_starts(step) for step in range(n // 2)])   # the whole first epoch
    assert sorted(starts.tolist()) == [offset + i * 16 for i in range(n // 2 * 2)]
    assert starts.tolist() != sorted(starts.tolist())   # shuffled


def test_sampler_splits_the_global_batch_over_ranks_and_micro_batches(tokens):
    whole = WindowSampler(tokens, seq_len=8, micro_batch=4, grad_accum=1, seed=2)
    ranks = [WindowSampler(tokens, seq_len=8, micro_batch=2, grad_accum=1, seed=2, rank=r, world_size=2)
             for r in (0, 1)]
    accum = WindowSampler(tokens, seq_len=8, micro_batch=2, grad_accum=2, seed=2)
    for step in (0, 9):
        full = whole.micro_batches(step)[0]
        per_rank = [r.micro_batches(step)[0] for r in ranks]
        assert (full.sort(0).values == torch.cat(per_rank).sort(0).values).all()
        assert (torch.cat(accum.micro_batches(step)) == full).all()


def test_sampler_state_refuses_another_batch_shape(tokens):
    s = WindowSampler(tokens, seq_len=8, micro_batch=2, seed=0)
    s.step = 12
    t = WindowSampler(tokens, seq_len=8, micro_batch=2, seed=0)
    t.load_state_dict(s.state_dict())
    assert t.step == 12
    with pytest.raises(ValueError, match="global_batch"):
        WindowSampler(tokens, seq_len=8, micro_batch=3, seed=0).load_state_dict(s.state_dict())
    with pytest.raises(ValueError, match="too few"):
        WindowSampler(tokens, seq_len=600, micro_batch=1)


def test_eval_windows_are_fixed_and_span_the_file(tokens):
    starts = eval_windows(tokens, 16, 5)
    assert starts[0] == 0 and starts[-1] == len(tokens) - 17
    assert read_windows(tokens, starts, 17).shape == (5, 17)


# ---- corpus -------------------------------------------------------------------------------------------------------
def test_corpus_is_deterministic_and_skips_tests_and_generated_files(tmp_path):
    from qwen3next.train.corpus import build_corpus, first_paragraph
    lib = tmp_path / "lib"
    (lib / "pkg").mkdir(parents=True)
    (lib / "test").mkdir()
    (lib / "mod.py").write_text("def f():\n    return 1\n")
    (lib / "pkg" / "__init__.py").write_text("X = 1\n")
    (lib / "test" / "test_mod.py").write_text("assert True\n")
    (lib / "gen.py").write_text("# This file is generated by a script. DO NOT EDIT.\nT = {}\n")
    a = build_corpus(str(tmp_path / "a"), seed=5, phrasings=1, stdlib_root=str(lib))
    b = build_corpus(str(tmp_path / "b"), seed=5, phrasings=1, stdlib_root=str(lib))
    assert a == b and a["files"]["stdlib.jsonl"]["documents"] == 2
    for name in ("stdlib.jsonl", "topics.jsonl", "chat.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    stdlib = [json.loads(line)["text"] for line in open(tmp_path / "a" / "stdlib.jsonl")]
    assert stdlib[0].startswith("# mod.py\n") and not any("generated" in t or "assert True" in t for t in stdlib)
    chats = [json.loads(line)["text"] for line in open(tmp_path / "a" / "chat.jsonl")]
    assert all(c.startswith(("<|im_start|>system\n", "<|im_start|>user\n")) and c.endswith("<|im_end|>\n")
               for c in chats)
    assert any("json.dumps" in c.split("<|im_end|>")[-3] and "Serialize ``obj`` to a JSON formatted ``str``" in c
               for c in chats)   # a question about json.dumps answered with its docstring's first paragraph
    assert any(c.startswith("<|im_start|>system\n") for c in chats)
    assert first_paragraph("int([x]) -> integer\nint(x, base=10) -> integer\n\nConvert a number or string to an "
                           "integer.") == "Convert a number or string to an integer."
