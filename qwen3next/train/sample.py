"""A quick look at what a trained model says: greedy decoding of one chat answer by full recompute (no cache,
so only for small models; the engine is the real way to generate)."""
from __future__ import annotations

import torch

from ..chat import render_chat


@torch.no_grad()
def greedy_answer(model, tokenizer, question: str, max_new_tokens: int = 64) -> str:
    prompt = render_chat([{"role": "user", "content": question}], template=tokenizer.chat_template,
                         enable_thinking=False)
    ids = tokenizer.encode(prompt)
    stop = set(tokenizer.eos_token_ids)
    device = next(model.parameters()).device
    out: list[int] = []
    for _ in range(max_new_tokens):
        logits = model(torch.tensor([ids + out], device=device)).logits[0, -1]
        nxt = int(logits.argmax())
        if nxt in stop:
            break
        out.append(nxt)
    return tokenizer.decode(out, skip_special_tokens=True)
