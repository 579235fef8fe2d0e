"""Decoding: the logits of the next token -> the next token (repetition
penalty, greedy or temperature, top-k, top-p)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def next_token(
    logits: torch.Tensor,
    seen: torch.Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float,
    repetition_penalty: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """One token per row (B, 1), in the order Hugging Face applies them:
    repetition penalty, then greedy or temperature, top-k, top-p."""
    logits = logits.float()
    if repetition_penalty != 1.0:
        logits = penalize_repetition(logits, seen, repetition_penalty)
    if temperature <= 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        logits = nucleus(logits, top_p)
    return torch.multinomial(F.softmax(logits, -1), 1, generator=generator)


def penalize_repetition(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL (Keskar et al. 2019): the logit of every token already in the
    sequence (prompt included) is divided by `penalty` if positive and
    multiplied by it if negative, so its probability falls either way."""
    score = logits.gather(1, seen)
    return logits.scatter(1, seen, torch.where(score > 0, score / penalty, score * penalty))


def nucleus(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus sampling (Holtzman et al. 2019): keep the smallest set of most
    likely tokens whose probabilities sum to at least top_p."""
    sorted_logits, order = logits.sort(-1, descending=True)
    probs = sorted_logits.softmax(-1)
    outside = probs.cumsum(-1) - probs >= top_p  # the tokens before it already reach top_p
    return logits.masked_fill(outside.scatter(-1, order, outside), float("-inf"))
