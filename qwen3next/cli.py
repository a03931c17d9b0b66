"""`qwen3next` command line: one subcommand per job."""
from __future__ import annotations

import argparse
import sys

import torch


def _cmd_init(args) -> int:
    from .checkpoint import parse_dtype, random_model, save_model
    from .checkpoint import load_config
    from .config import preset
    if (args.preset is None) == (args.config is None):
        raise ValueError("give exactly one of --preset NAME or --config PATH")
    if args.preset is not None:
        cfg = preset(args.preset)
    else:
        import os
        from .config import ModelConfig
        cfg = load_config(args.config) if os.path.isdir(args.config) else ModelConfig.from_json(args.config)
    if args.num_layers is not None:
        if args.num_layers < 1:
            raise ValueError(f"--num-layers must be >= 1, got {args.num_layers}")
        cfg = cfg.replace(num_hidden_layers=args.num_layers)
    if args.no_mtp:
        cfg = cfg.replace(num_nextn_predict_layers=0)
    model = random_model(cfg, dtype=parse_dtype(args.dtype), seed=args.seed)
    save_model(model, args.out, max_shard_bytes=int(args.max_shard_gb * (1 << 30)), progress=True)
    n = model.num_parameters()
    print(f"wrote {args.out}: {cfg.model_type}, {cfg.num_hidden_layers} layers, {n:,} parameters, {args.dtype}")
    return 0


def _cmd_info(args) -> int:
    from .checkpoint import load_model
    model = load_model(args.model, device="meta")
    cfg = model.config
    print(f"model_type      {cfg.model_type}")
    print(f"layers          {cfg.num_hidden_layers} ({cfg.layer_types.count('linear_attention')} Gated DeltaNet, "
          f"{cfg.layer_types.count('full_attention')} attention) + {cfg.mtp_layers} MTP")
    print(f"parameters      {model.num_parameters(include_mtp=False):,} (+{model.num_parameters() - model.num_parameters(include_mtp=False):,} MTP)")
    if cfg.num_experts:
        print(f"experts         {cfg.num_experts}, top-{cfg.num_experts_per_tok} + shared")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .config import PRESETS
    p = argparse.ArgumentParser(prog="qwen3next", description="Qwen3-Next in plain PyTorch: models, training, serving.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("init", help="write a random-weight checkpoint of a preset (Hugging Face format)")
    s.add_argument("--preset", choices=sorted(PRESETS), help="model shape by name")
    s.add_argument("--config", help="model shape from a config.json (or a checkpoint directory)")
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument("--num-layers", type=int, default=None, help="keep only the first N decoder layers")
    s.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="weight dtype (default bf16)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--no-mtp", action="store_true", help="leave out the MTP head")
    s.add_argument("--max-shard-gb", type=float, default=4.0, help="shard size limit in GiB")
    s.set_defaults(fn=_cmd_init)

    s = sub.add_parser("info", help="shape and parameter count of a checkpoint or preset (reads no weights)")
    s.add_argument("model", help="checkpoint directory or preset name")
    s.set_defaults(fn=_cmd_info)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"qwen3next {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
