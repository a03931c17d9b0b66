"""Train a small Qwen-style tokenizer: byte-level BPE with Qwen2/Qwen3's pre-tokenisation regex and NFC, and the
ChatML / thinking / tool-call markers as added tokens after the learned ranks (as in Qwen, where they start at
151643). Saved as tokenizer.json + tokenizer_config.json (built-in Qwen3 chat template, eos `<|im_end|>`), so
`qwen3next.tokenizer.load_tokenizer(out_dir)` and transformers' AutoTokenizer both load it.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable

from ..chat import QWEN3_CHAT_TEMPLATE
from ..tokenizer import QWEN_PRETOKENIZE_PATTERN
from .data import iter_documents, iter_input_files

# (content, special): like Qwen3, only the <|...|> control tokens are "special" (skipped when decoding with
# skip_special_tokens); the think and tool markers are ordinary added tokens that output parsers must see.
ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<think>", False),
    ("</think>", False),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
)


def train_bpe_tokenizer(files: Iterable[str], vocab_size: int, out_dir: str, min_frequency: int = 2,
                        max_document_chars: int = 1 << 20):
    """Learn `vocab_size - len(ADDED_TOKENS)` byte-level BPE tokens from the documents of `files` (files or
    folders; .jsonl lines are documents), add the markers, save to `out_dir`. Returns the loaded Tokenizer.

    Documents are fed whole (not line by line), so merges that span newlines and indentation are learned.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    n_learned = vocab_size - len(ADDED_TOKENS)
    if n_learned < 256:
        raise ValueError(f"vocab_size={vocab_size} leaves {n_learned} learned tokens; byte-level BPE needs at least "
                         f"the 256 byte tokens plus {len(ADDED_TOKENS)} added ones ({256 + len(ADDED_TOKENS)})")
    paths = iter_input_files(list(files))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_PATTERN), behavior="isolated", invert=False),
        byte_level,
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(vocab_size=n_learned, min_frequency=min_frequency, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    docs = (d[:max_document_chars] for d in iter_documents(paths))
    tok.train_from_iterator(docs, trainer)
    for content, special in ADDED_TOKENS:
        added = AddedToken(content, special=special, normalized=False, lstrip=False, rstrip=False, single_word=False)
        (tok.add_special_tokens if special else tok.add_tokens)([added])
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": {
            str(tok.token_to_id(content)): {"content": content, "lstrip": False, "normalized": False,
                                            "rstrip": False, "single_word": False, "special": special}
            for content, special in ADDED_TOKENS
        },
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "bos_token": None,
        "chat_template": QWEN3_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 262144,
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, ensure_ascii=False, indent=2)
        f.write("\n")
    from ..tokenizer import load_tokenizer
    return load_tokenizer(out_dir)
