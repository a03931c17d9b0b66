"""Command-line entry points of training, callable from `qwen3next train|data` or `python -m qwen3next.train`.

  train_main(config_path, overrides)   train from a TOML/YAML config with key=value overrides
  data_main(argv)                      data subcommands: corpus, tokenizer, prepare, default (all three)
"""
from __future__ import annotations

import argparse
import json
import os


def train_main(config_path: str | None, overrides: list[str] | None = None) -> int:
    from .config import load_config
    from .trainer import Trainer
    cfg = load_config(config_path, overrides or [])
    trainer = Trainer(cfg)
    try:
        if trainer.layout.is_main:
            n = trainer.lm.num_parameters()
            print(f"model: {n:,} parameters ({n * 4 / 1e6:.1f} MB in fp32), "
                  f"{trainer.tokens_per_step:,} tokens per step, {cfg.run.steps} steps -> {cfg.run.out_dir}")
            if trainer.step:
                print(f"resumed at step {trainer.step}")
        records = trainer.train()
        if trainer.layout.is_main and records:
            last = records[-1]
            keys = ("step", "loss", "lm_loss", "mtp_loss", "eval_loss", "mtp_accuracy", "tokens_per_s")
            print("final: " + ", ".join(f"{k}={last[k]:.4g}" for k in keys if last.get(k) is not None))
            print(f"checkpoint: {os.path.join(cfg.run.out_dir, 'latest')} -> step_{trainer.step:06d}")
            small = trainer.lm.num_parameters() < 200_000_000   # the sample decodes by full recompute
            if trainer.tokenizer is not None and trainer.tokenizer.chat_template and small and \
                    not trainer.layout.distributed:
                from .sample import greedy_answer
                question = "What does json.dumps do?"
                print(f"sample: {question!r} -> {greedy_answer(trainer.lm.eval(), trainer.tokenizer, question)!r}")
    finally:
        trainer.close()
    return 0


def data_main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return args.fn(args)


def _corpus(args) -> int:
    from .corpus import build_corpus
    manifest = build_corpus(args.out, seed=args.seed, phrasings=args.phrasings)
    print(json.dumps(manifest, indent=2))
    return 0


def _tokenizer(args) -> int:
    from .bpe import train_bpe_tokenizer
    tok = train_bpe_tokenizer(args.inputs, args.vocab_size, args.out)
    print(f"wrote {args.out}: {tok.vocab_size} tokens (eos {tok.eos_token!r} = {tok.eos_token_id})")
    return 0


def _prepare(args) -> int:
    from ..tokenizer import load_tokenizer
    from .data import prepare_dataset
    tok = load_tokenizer(args.tokenizer)
    result = prepare_dataset(args.inputs, tok, args.out, eval_fraction=args.eval_fraction, seed=args.seed,
                             tokenizer_path=args.tokenizer, progress=True)
    for split, meta in result.items():
        print(f"{os.path.join(args.out, split + '.bin')}: {meta['count']:,} tokens, {meta['documents']:,} documents")
    return 0


def _default(args) -> int:
    """Corpus -> tokenizer -> token files under one folder: what configs/default-model.toml reads."""
    corpus, tokenizer, tokens = (os.path.join(args.out, d) for d in ("corpus", "tokenizer", "tokens"))
    _corpus(argparse.Namespace(out=corpus, seed=args.seed, phrasings=4))
    _tokenizer(argparse.Namespace(inputs=[corpus], vocab_size=args.vocab_size, out=tokenizer))
    return _prepare(argparse.Namespace(inputs=[corpus], tokenizer=tokenizer, out=tokens,
                                       eval_fraction=args.eval_fraction, seed=args.seed))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qwen3next data", description="Build training data: corpus, tokenizer, tokens.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("corpus", help="write the default corpus (stdlib sources, pydoc topics, docstring chats)")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--phrasings", type=int, default=4, help="chat conversations per documented object")
    s.set_defaults(fn=_corpus)

    s = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer with the ChatML special tokens")
    s.add_argument("inputs", nargs="+", help="text files or folders (.txt .md .py .rst .jsonl)")
    s.add_argument("--vocab-size", type=int, default=8192)
    s.add_argument("--out", required=True, help="output folder (tokenizer.json + tokenizer_config.json)")
    s.set_defaults(fn=_tokenizer)

    s = sub.add_parser("prepare", help="tokenize text into train.bin / eval.bin token files")
    s.add_argument("inputs", nargs="+", help="text files or folders (.txt .md .py .rst .jsonl)")
    s.add_argument("--tokenizer", required=True, help="tokenizer folder (or a checkpoint with tokenizer.json)")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--eval-fraction", type=float, default=0.01, help="share of documents held out")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=_prepare)

    s = sub.add_parser("default", help="corpus + tokenizer + token files for configs/default-model.toml")
    s.add_argument("--out", default="data/default", help="output folder (default data/default)")
    s.add_argument("--vocab-size", type=int, default=8192)
    s.add_argument("--eval-fraction", type=float, default=0.01)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=_default)
    return p
