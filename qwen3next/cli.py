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


def _sampling(args, llm):
    """The checkpoint's generation_config.json defaults, overridden by the flags the user gave."""
    import dataclasses
    base = llm.get_default_sampling_params()
    given = {k: getattr(args, k) for k in ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed",
                                           "repetition_penalty", "presence_penalty", "stop")
             if getattr(args, k) is not None}
    if base.max_tokens is None or base.max_tokens == 16:   # vLLM's 16 is too short for a terminal
        given.setdefault("max_tokens", 512)
    return dataclasses.replace(base, **given)


def _llm(args):
    from .engine.llm import LLM
    extra = {k: getattr(args, k) for k in ("prefill_graph_tokens", "overlap") if getattr(args, k) is not None}
    return LLM(args.model, device=args.device, dtype=args.dtype, max_model_len=args.max_model_len,
               speculative_tokens=args.speculative_tokens, cuda_graphs=args.cuda_graphs, warm_up=args.warm_up,
               **extra)


def _cmd_generate(args) -> int:
    llm = _llm(args)
    params = _sampling(args, llm)
    prompt = args.prompt
    if args.chat:
        prompt = llm.render_chat([{"role": "user", "content": prompt}], enable_thinking=args.thinking)
    out = None
    parser = None
    if args.chat:   # split <think>…</think> off the answer; show the reasoning dimmed on a terminal
        from .parsers import ReasoningParser
        parser = ReasoningParser(starts_in_reasoning=prompt.rstrip().endswith("<think>"))
    dim, reset = ("\033[2m", "\033[0m") if sys.stdout.isatty() else ("", "")

    def show(reasoning: str, content: str) -> None:
        if reasoning.strip():
            sys.stdout.write(f"{dim}{reasoning}{reset}")
        sys.stdout.write(content)
        sys.stdout.flush()

    try:
        for out in llm.stream(prompt, params):
            delta = out.outputs[0].delta_text
            show(*parser.feed(delta)) if parser else show("", delta)
    except KeyboardInterrupt:
        pass
    if parser:
        show(*parser.flush())
    sys.stdout.write("\n")
    if out is not None and args.verbose:
        o = out.outputs[0]
        print(f"[{len(o.token_ids)} tokens, finish_reason={o.finish_reason}]", file=sys.stderr)
    return 0


def _cmd_chat(args) -> int:
    from .chat_repl import run_chat
    llm = _llm(args)
    return run_chat(llm, _sampling(args, llm), system=args.system, enable_thinking=args.thinking)


def _add_generation_args(s: argparse.ArgumentParser) -> None:
    from .engine.flags import add_gpu_engine_flags
    s.add_argument("--model", default=None, help="checkpoint directory (default: the embedded default model)")
    s.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    s.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), bf16, fp16, fp32")
    s.add_argument("--max-model-len", type=int, default=None, help="context length to reserve")
    s.add_argument("--speculative-tokens", type=int, default=0, help="MTP speculative decoding: K drafts (0 = off)")
    add_gpu_engine_flags(s)
    s.add_argument("--max-tokens", type=int, default=None, help="tokens to generate at most (default 512)")
    s.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: the checkpoint's generation_config)")
    s.add_argument("--top-p", type=float, default=None, help="nucleus sampling")
    s.add_argument("--top-k", type=int, default=None, help="top-k sampling, 0 = off")
    s.add_argument("--min-p", type=float, default=None)
    s.add_argument("--repetition-penalty", type=float, default=None)
    s.add_argument("--presence-penalty", type=float, default=None)
    s.add_argument("--seed", type=int, default=None, help="per-request seed for reproducible samples")
    s.add_argument("--stop", action="append", help="stop string (repeatable)")
    s.add_argument("--thinking", action=argparse.BooleanOptionalAction, default=None,
                   help="enable_thinking for the chat template")


def _cmd_bench(args) -> int:
    from .bench import run
    if args.no_fused_step_kernels:
        from .ops import kernels
        kernels.FUSED_STEP_KERNELS = False
    run(layers=args.layers, dense_layers=args.dense_layers,
        contexts=tuple(int(x) for x in args.contexts.split(",")), batches=tuple(int(x) for x in args.batches.split(",")),
        with_transformers=not args.skip_transformers, out_dir=args.out, spec_k=args.spec_k)
    return 0


def _missing(e: ImportError) -> int:
    print(f"qwen3next serve: error: {e} (pip install fastapi uvicorn prometheus-client)", file=sys.stderr)
    return 2


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

    s = sub.add_parser("generate", help="complete a prompt, streaming the text to stdout")
    s.add_argument("prompt", help="the prompt text")
    s.add_argument("--chat", action="store_true", help="send the prompt as a user message in the chat template")
    s.add_argument("-v", "--verbose", action="store_true", help="print token count and finish reason to stderr")
    _add_generation_args(s)
    s.set_defaults(fn=_cmd_generate)

    s = sub.add_parser("chat", help="interactive multi-turn chat in the terminal")
    s.add_argument("--system", default=None, help="system prompt")
    _add_generation_args(s)
    s.set_defaults(fn=_cmd_chat)

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server with a web chat page")
    try:
        from .server.run import add_serve_args, serve_main
        add_serve_args(s)
        s.set_defaults(fn=serve_main)
    except ImportError as e:   # a machine without the server's dependencies still gets every other command
        s.set_defaults(fn=lambda a, e=e: _missing(e))

    s = sub.add_parser("bench", help="GPU: Qwen3-Next-80B-A3B vs dense Qwen3-32B vs transformers on real shapes")
    s.add_argument("--layers", type=int, default=8, help="Qwen3-Next layers to build (scaled to 48)")
    s.add_argument("--dense-layers", type=int, default=8, help="Qwen3-32B layers to build (scaled to 64)")
    s.add_argument("--contexts", default="4096,32768", help="prefill lengths / decode contexts")
    s.add_argument("--batches", default="16,64", help="decode batch sizes besides 1 (at the first context)")
    s.add_argument("--skip-transformers", action="store_true", help="do not time the transformers peer")
    s.add_argument("--no-fused-step-kernels", action="store_true",
                   help="use torch's routing and the unfused Gated DeltaNet decode step (as "
                        "QWEN3NEXT_FUSED_STEP_KERNELS=0), to compare")
    s.add_argument("--spec-k", type=int, default=3,
                   help="drafts per MTP speculative round to time (0 skips the speculative measurement)")
    s.add_argument("--out", default="benchmarks/results", help="where the JSON, table and plot go")
    s.set_defaults(fn=_cmd_bench)

    s = sub.add_parser("train", help="train a model from a TOML/YAML config (docs/training.md)")
    s.add_argument("config", help="TOML or YAML training config, e.g. configs/default-model.toml")
    s.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. optim.lr=1e-3")
    s.set_defaults(fn=lambda a: __import__("qwen3next.train", fromlist=["train_main"]).train_main(a.config, a.overrides))

    s = sub.add_parser("data", help="training data: corpus | tokenizer | prepare | default", add_help=False)
    s.add_argument("argv", nargs=argparse.REMAINDER)
    s.set_defaults(fn=lambda a: __import__("qwen3next.train", fromlist=["data_main"]).data_main(a.argv))

    s = sub.add_parser("info", help="shape and parameter count of a checkpoint or preset (reads no weights)")
    s.add_argument("model", help="checkpoint directory or preset name")
    s.set_defaults(fn=_cmd_info)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["data"]:          # its own sub-commands and --help live in qwen3next.train
        from .train import data_main
        return data_main(argv[1:])
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
