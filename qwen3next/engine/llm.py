"""LLM: the offline API, shaped like vLLM's so users feel at home.

    llm = LLM(model="path/to/checkpoint")          # or LLM() for the embedded default model
    outs = llm.generate(["Hello"], SamplingParams(max_tokens=32))
    print(outs[0].outputs[0].text)
"""
from __future__ import annotations

import dataclasses
from typing import Iterator

import torch
from tqdm import tqdm

from ..checkpoint import load_model, parse_dtype
from ..tokenizer import load_tokenizer
from .engine import LLMEngine, read_generation_config
from .sampling_params import SamplingParams
from .sequence import RequestOutput


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class LLM:
    def __init__(self, model: str | None = None, tokenizer: str | None = None, skip_tokenizer_init: bool = False,
                 dtype: str | torch.dtype = "auto", device: str | None = None, seed: int = 0, **engine_args):
        """engine_args: max_num_seqs, max_model_len, max_num_batched_tokens (the prefill chunk; default 8192 on a GPU,
        512 on a CPU), num_kv_pages, page_size, kv_cache_gib,
        speculative_tokens (k MTP drafts per step, 0 = off), speculative_disable_batch_size (never draft at this
        many decoding sequences), speculative_adaptive (draft only where it measures a gain; default True),
        cuda_graphs (decode steps replayed from CUDA graphs on a GPU; default True), prefill_graph_tokens (a
        prompt's first chunk of up to this many tokens, alone or beside decoding sequences, replayed from a CUDA
        graph per token bucket; default 4096, 0 = never), overlap (schedule and launch the next step before this
        step's sampled tokens reach the host; default: on for CUDA without speculative decoding), warm_up (on a GPU,
        compile the prefill kernels and capture the one-sequence decode graph and the prefill graphs at start-up;
        default True)."""
        if model is None:
            from .. import DEFAULT_MODEL
            if DEFAULT_MODEL is None:
                raise FileNotFoundError("no default model is embedded in this install: pass model=PATH")
            model = DEFAULT_MODEL
        device = device or default_device()
        if dtype == "auto":
            dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
        self.model_path = model
        net = load_model(model, dtype=parse_dtype(dtype), device=device)
        tok = None
        if not skip_tokenizer_init:
            tok = load_tokenizer(tokenizer or model)
        gen_cfg = read_generation_config(model) if isinstance(model, str) else {}
        self.engine = LLMEngine(net, tok, seed=seed, generation_config=gen_cfg, **engine_args)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def get_tokenizer(self):
        return self.engine.tokenizer

    def speculative_stats(self) -> dict | None:
        """Acceptance of MTP speculative decoding (None when it is off)."""
        return self.engine.speculative_stats()

    def get_default_sampling_params(self) -> SamplingParams:
        return self.engine.default_sampling_params()

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """prompts: a string, a {"prompt_token_ids": [...]} dict, or a list of those. Returns outputs in order."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} sampling params for {len(prompts)} prompts")
        # only the final outputs are returned, so the engine builds no others (vLLM's LLM does the same)
        params = [dataclasses.replace(sp or self.engine.default_sampling_params(), output_kind="final_only")
                  if sp is None or isinstance(sp, SamplingParams) else sp for sp in params]
        ids = [self.engine.add_request(p, sp) for p, sp in zip(prompts, params)]
        return self._run(ids, use_tqdm)

    def chat(self, messages, sampling_params: SamplingParams | None = None, chat_template: str | None = None,
             add_generation_prompt: bool = True, enable_thinking: bool | None = None, tools=None,
             use_tqdm: bool = False, **template_kwargs) -> list[RequestOutput]:
        """messages: one conversation (a list of {"role", "content"} dicts) or a list of conversations."""
        if self.tokenizer is None:
            raise ValueError("chat needs a tokenizer; this LLM was made with skip_tokenizer_init=True")
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.render_chat(c, chat_template, add_generation_prompt, enable_thinking, tools,
                                    **template_kwargs) for c in convs]
        return self.generate(prompts, sampling_params, use_tqdm)

    def render_chat(self, messages, chat_template=None, add_generation_prompt=True, enable_thinking=None, tools=None,
                    **kwargs) -> str:
        from ..chat import render_chat
        tok = self.tokenizer
        return render_chat(messages, chat_template or tok.chat_template, tools=tools,
                           add_generation_prompt=add_generation_prompt, enable_thinking=enable_thinking, **kwargs)

    def stream(self, prompt, sampling_params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yield a RequestOutput after each step that changed this request (`.outputs[0].delta_text` is new)."""
        rid = self.engine.add_request(prompt, sampling_params)
        try:
            while True:
                for out in self.engine.step():
                    if out.request_id == rid:
                        yield out
                        if out.finished:
                            return
        finally:
            if rid in self.engine.requests:
                self.engine.abort(rid)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        results: dict[str, RequestOutput] = {}
        wanted = set(ids)
        bar = tqdm(total=len(ids), desc="generating", unit="req", disable=not use_tqdm)
        try:
            while len(results) < len(ids):
                for out in self.engine.step():
                    if out.finished and out.request_id in wanted:
                        results[out.request_id] = out
                        bar.update(1)
        except BaseException:
            for rid in ids:
                if rid not in results:
                    self.engine.abort(rid)
            raise
        finally:
            bar.close()
        return [results[i] for i in ids]
