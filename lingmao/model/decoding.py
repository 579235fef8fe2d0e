"""Decoding text: continuations of a prompt from a trained GPT, with the
repetition metrics of each; the generate command and the engine's samples
at every eval both use it."""

from __future__ import annotations

import torch

from lingmao.data.textmetrics import repetition
from lingmao.data.tokenizer import EOS_ID
from lingmao.model.gpt import GPT


def complete(
    model: GPT,
    tokenizer,
    prompt: str,
    n: int,
    max_new_tokens: int,
    *,
    temperature: float,
    top_k: int,
    top_p: float,
    repetition_penalty: float,
    generator: torch.Generator,
    stop_at_eos: bool = True,
    use_cache: bool = True,
) -> list[dict]:
    """`n` continuations of `prompt`, sampled as one batch in eval mode (no
    dropout; the model's mode is restored). Each: prompt, text (the
    continuation alone), new_tokens, and its repetition metrics. Also what
    the engine's periodic samples use."""
    device = next(model.parameters()).device
    ids = tokenizer.encode(prompt).ids
    idx = torch.tensor([ids] * n, device=device)
    was_training = model.training
    out = model.eval().generate(
        idx,
        max_new_tokens,
        temperature,
        top_k,
        generator,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        use_cache=use_cache,
        eos_id=EOS_ID if stop_at_eos else None,
    )
    model.train(was_training)
    results = []
    for row in out[:, len(ids) :].tolist():
        if stop_at_eos and EOS_ID in row:
            row = row[: row.index(EOS_ID)]
        text = tokenizer.decode(row)
        results.append({"prompt": prompt, "text": text, "new_tokens": len(row), **repetition(text)})
    return results
