"""The causal LM for Qwen3-Next (hybrid Gated DeltaNet + gated attention, sparse MoE, MTP head) and dense Qwen3.

One class serves both `model_type`s: the config decides, per layer, the token mixer (Gated DeltaNet or softmax
attention) and the feed-forward (sparse MoE or dense MLP). Module names match Hugging Face checkpoints.

Forward modes:
  model(input_ids [B, T])                    full sequences, no cache (training, scoring)
  model(input_ids [B, T], cache=SequenceCache)  append T tokens to each of B cached sequences (prefill chunk/decode)
  model(input_ids [N], cache=HybridCache, meta=BatchMeta)  packed variable-length batch (the engine's path)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import FULL, ModelConfig
from ..ops import fused
from ..ops.fused import decode_compiled
from .attention import Attention
from .cache import BatchMeta, HybridCache, SequenceCache
from .deltanet import GatedDeltaNet
from .moe import MLP, SparseMoE
from .norm import RMSNorm
from .rope import RotaryEmbedding


@dataclass
class ModelOutput:
    logits: torch.Tensor | None                       # [B, T, V] (or [N, V] for a packed batch)
    hidden_states: torch.Tensor | None = None         # after the final norm: what lm_head and the MTP head read
    router_logits: list[torch.Tensor] | None = None   # per MoE layer, [tokens, E]
    all_hidden_states: list[torch.Tensor] | None = None  # embeddings + every layer's output (before final norm)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, kind: str, moe: bool):
        super().__init__()
        zc = cfg.model_type == "qwen3_next"
        self.kind = kind
        if kind == FULL:
            self.self_attn = Attention(cfg)
        else:
            self.linear_attn = GatedDeltaNet(cfg)
        self.mlp = SparseMoE(cfg) if moe else MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, zero_centered=zc)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, zero_centered=zc)

    def forward(self, x, cos, sin, layer_cache=None, meta=None):
        h = self.input_layernorm(x)
        if self.kind == FULL:
            h = self.self_attn(h, cos, sin, layer_cache, meta)
        else:
            h = self.linear_attn(h, layer_cache, meta)
        x, h = self.post_attention_layernorm.add_and_norm(x, h)     # x + h and its norm
        out = self.mlp(h, residual=x)                                # x + mlp(h)
        return out if isinstance(out, tuple) else (out, None)       # (x, router logits of a MoE block)


def _call_layer(layer, x, cos, sin, layer_cache, meta):
    return layer(x, cos, sin, layer_cache, meta)


# decode and verification steps: the whole layer as one compiled graph on CUDA (ops/fused.py says why); two
# wrappers, so that a compiler failure on one kind of step leaves the other compiled
decode_layer = decode_compiled(_call_layer, limit_tokens=True)
verify_layer = decode_compiled(_call_layer, dynamic=False)


def _layer_runner(meta):
    if meta is None or not meta.is_step:
        return _call_layer
    if meta.is_verify:
        on = fused.DECODE["verify"]
        return verify_layer if (on is True or (on == "auto" and meta.fixed_shapes)) else _call_layer
    return decode_layer


class MTP(nn.Module):
    """Multi-token prediction head: from the main model's hidden h_p (after the final norm) and the embedding of
    token t_{p+1}, predict t_{p+2}:  x = fc([norm_e(embed(t_{p+1})) ; norm_h(h_p)]) -> decoder layer -> norm.
    It shares embed_tokens and lm_head with the main model; its attention layer keeps its own KV."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        zc = cfg.model_type == "qwen3_next"
        self.fc = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.pre_fc_norm_embedding = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, zero_centered=zc)
        self.pre_fc_norm_hidden = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, zero_centered=zc)
        self.layers = nn.ModuleList([DecoderLayer(cfg, FULL, moe=cfg.num_experts > 0)
                                     for _ in range(cfg.mtp_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, zero_centered=zc)


class Backbone(nn.Module):
    """The `model.` prefix of the checkpoint: embeddings, decoder layers, final norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(cfg, kind, cfg.is_moe_layer(i))
                                     for i, kind in enumerate(cfg.layer_types)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, zero_centered=cfg.model_type == "qwen3_next")


class CausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.mtp = MTP(cfg) if cfg.mtp_layers else None
        self.rotary = RotaryEmbedding(cfg)

    # ---- caches ---------------------------------------------------------------------------------------------------
    def new_cache(self, batch_size: int, max_seq_len: int, page_size: int = 16) -> SequenceCache:
        p = self.model.embed_tokens.weight
        return SequenceCache(self.config, batch_size, max_seq_len, page_size, p.dtype, p.device)

    # ---- forward --------------------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, cache: HybridCache | SequenceCache | None = None,
                meta: BatchMeta | None = None, output_hidden_states: bool = False,
                output_router_logits: bool = False, logits_to_keep: torch.Tensor | None = None) -> ModelOutput:
        """`logits_to_keep`: optional index of the token rows whose logits are wanted (saves the vocab matmul)."""
        if logits_to_keep is not None and isinstance(cache, SequenceCache):
            raise ValueError("logits_to_keep works without a cache or with a packed batch, not with a SequenceCache")
        input_ids, cache, meta, unpack = self._arrange(input_ids, cache, meta)
        x = self.model.embed_tokens(input_ids)
        positions = meta.positions[None] if meta is not None else torch.arange(x.shape[1], device=x.device)[None]
        cos, sin = self.rotary(positions, x.dtype)
        all_hidden, routers = ([x] if output_hidden_states else None), []
        run = _layer_runner(meta)
        for i, layer in enumerate(self.model.layers):
            x, rl = run(layer, x, cos, sin, cache[i] if cache is not None else None, meta)
            if rl is not None and output_router_logits:
                routers.append(rl)
            if all_hidden is not None:
                all_hidden.append(x)
        h = self.model.norm(x)
        h_out = h if logits_to_keep is None else h[:, logits_to_keep]
        logits = self.lm_head(h_out)
        if unpack is not None:
            logits, h = unpack(logits), unpack(h)
        return ModelOutput(logits, h, routers if output_router_logits else None, all_hidden)

    def _arrange(self, input_ids, cache, meta):
        """Normalise the three calling conventions to (ids [B, T], HybridCache | None, BatchMeta | None, unpack)."""
        if cache is None:
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must be [batch, tokens] without a cache, got shape {tuple(input_ids.shape)}")
            return input_ids, None, None, None
        if isinstance(cache, SequenceCache):
            if input_ids.dim() != 2:
                raise ValueError(f"with a SequenceCache input_ids must be [batch, tokens], got {tuple(input_ids.shape)}")
            B, T = input_ids.shape
            if B != len(cache.lengths):
                raise ValueError(f"cache was made for {len(cache.lengths)} sequences, input_ids has {B}")
            meta = cache.plan([T] * B)
            return input_ids.reshape(1, B * T), cache.cache, meta, (lambda t: t.reshape(B, T, *t.shape[2:]))
        if meta is None:
            raise ValueError("a HybridCache needs the BatchMeta that says which slots and pages each sequence uses")
        if input_ids.dim() == 1:  # packed [N] -> [1, N]; outputs come back as [N, ...]
            return input_ids[None], cache, meta, (lambda t: t[0])
        return input_ids, cache, meta, None

    def mtp_forward(self, hidden: torch.Tensor, next_ids: torch.Tensor, positions: torch.Tensor | None = None,
                    cache: HybridCache | None = None, meta: BatchMeta | None = None,
                    output_router_logits: bool = False, logits_to_keep: torch.Tensor | None = None):
        """hidden [B, T, H] = h_p (after the final norm), next_ids [B, T] = t_{p+1}.

        Returns (logits [B, T, V] predicting t_{p+2}, MTP hidden [B, T, H] (fed back for further drafts),
        router logits). Without a cache, positions default to 0..T-1 (those of h_p). `logits_to_keep`: the token
        indices whose logits are wanted (logits [B, len, V])."""
        if self.mtp is None:
            raise ValueError("this model has no MTP head (config num_nextn_predict_layers = 0)")
        m = self.mtp
        emb = self.model.embed_tokens(next_ids)
        x = m.fc(torch.cat([m.pre_fc_norm_embedding(emb), m.pre_fc_norm_hidden(hidden)], dim=-1))
        if positions is None:
            positions = meta.positions[None] if meta is not None else torch.arange(x.shape[1], device=x.device)[None]
        cos, sin = self.rotary(positions, x.dtype)
        routers = []
        n_main = len(self.model.layers)
        run = _layer_runner(meta)
        for j, layer in enumerate(m.layers):
            x, rl = run(layer, x, cos, sin, cache[n_main + j] if cache is not None else None, meta)
            if rl is not None:
                routers.append(rl)
        h = m.norm(x)
        logits = self.lm_head(h if logits_to_keep is None else h[:, logits_to_keep])
        return logits, h, (routers if output_router_logits else None)

    # ---- bookkeeping ------------------------------------------------------------------------------------------------
    def num_parameters(self, include_mtp: bool = True) -> int:
        seen, total = set(), 0
        for name, p in self.named_parameters():
            if id(p) in seen or (not include_mtp and name.startswith("mtp.")):
                continue
            seen.add(id(p))
            total += p.numel()
        return total
