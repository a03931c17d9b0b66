"""The engine's GPU switches as command-line flags, shared by `generate` / `chat` (cli.py) and `serve`
(server/run.py) so that both spell and document them the same way."""
from __future__ import annotations

import argparse


def add_gpu_engine_flags(p: argparse.ArgumentParser) -> None:
    """--no-cuda-graphs, --prefill-graph-tokens N, --no-overlap, --no-warm-up (dests: cuda_graphs,
    prefill_graph_tokens, overlap, warm_up; None where the engine's default applies)."""
    p.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                   help="run decode steps eagerly instead of replaying CUDA graphs (GPU only)")
    p.add_argument("--prefill-graph-tokens", type=int, default=None,
                   help="replay a prompt's first chunk of up to N tokens (alone, or beside decoding sequences) "
                        "from a CUDA graph per token bucket (GPU only; default 4096, 0 = never)")
    p.add_argument("--no-overlap", dest="overlap", action="store_false", default=None,
                   help="wait for each step's sampled tokens before scheduling the next (default: overlap the "
                        "host's work with the GPU's, on CUDA without speculative decoding)")
    p.add_argument("--no-warm-up", dest="warm_up", action="store_false",
                   help="skip compiling the prefill kernels and the one-sequence decode graph at start-up (GPU "
                        "only; the first requests then wait for them)")
