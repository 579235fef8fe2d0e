"""One continuation, a token at a time as it is decided: what a page that
shows the text as it is generated reads. The same loop as GPT.generate for
one row (KV cache; the window slides past context_length by refilling the
cache from the last context_length tokens), so with the same generator it
yields exactly the tokens `decoding.complete` returns."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from lingmao.data.tokenizer import EOS_ID
from lingmao.model.attention import KVCache
from lingmao.model.gpt import GPT
from lingmao.model.sampling import next_token


@torch.no_grad()
def tokens(
    model: GPT,
    ids: list[int],
    max_new_tokens: int,
    *,
    temperature: float,
    top_k: int,
    top_p: float,
    repetition_penalty: float,
    generator: torch.Generator | None = None,
    stop_at_eos: bool = True,
) -> Iterator[int]:
    """The ids after `ids`, one by one; stops before <eos> with `stop_at_eos`.
    The model must be in eval mode (no dropout)."""
    device = next(model.parameters()).device
    idx = torch.tensor([ids], device=device)
    cache = KVCache(model.config, 1, device, model.tok_emb.weight.dtype)
    for _ in range(max_new_tokens):
        logits = model.next_logits(idx, cache)
        nxt = next_token(logits[:, -1, :], idx, temperature, top_k, top_p, repetition_penalty, generator)
        idx = torch.cat([idx, nxt], dim=1)
        token = int(nxt[0, 0])
        if stop_at_eos and token == EOS_ID:
            return
        yield token


def pieces(model: GPT, tokenizer, prompt: str, max_new_tokens: int, **decoding) -> Iterator[str]:
    """The continuation of `prompt` as text, a character (token) at a time."""
    for token in tokens(model, tokenizer.encode(prompt).ids, max_new_tokens, **decoding):
        piece = tokenizer.decode([token])  # "" for a special token
        if piece:
            yield piece
