"""Validation loss per genre (诗 词 文 赋 曲): one number hides which genre a
model has learned and which it has not (seed 000's reason to balance genres)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .data.tokenizer import EOS_ID


@torch.no_grad()
def per_genre_loss(model, tokens: np.ndarray, val_docs: np.ndarray, genres: list[str], context_length: int, *,
                   device="cpu", batch_size: int = 16, max_docs_per_genre: int | None = 256) -> dict[str, dict]:
    """Mean per-token loss of the validation documents of each genre.

    `tokens` is the flat val split (every document followed by <eos>),
    `val_docs` its (start offset, genre index) rows and `genres` the names
    the indices point to (a prepared corpus' val.bin, val_docs.npy and
    meta["genres"]). Each document is scored on its own, after an <eos> as in
    training (where the previous document's <eos> precedes it): its text and
    its closing <eos> are the targets; a document longer than the context is
    scored in consecutive windows, each seeing the tokens before it in its
    window. The first `max_docs_per_genre` documents of each genre count
    (the split is in hash order, so that is a random sample); None: all.
    Returns {genre: {"loss", "tokens", "docs"}} for the genres present.
    """
    ends = np.append(val_docs[1:, 0], len(tokens))
    pieces: list[tuple[int, np.ndarray]] = []  # (genre index, window of up to context_length + 1 tokens)
    taken = np.zeros(len(genres), dtype=np.int64)
    for (start, g), end in zip(val_docs.tolist(), ends.tolist()):
        if max_docs_per_genre is not None and taken[g] >= max_docs_per_genre:
            continue
        taken[g] += 1
        seq = np.concatenate([[EOS_ID], np.asarray(tokens[start:end], dtype=np.int64)])
        for j in range(0, len(seq) - 1, context_length):
            pieces.append((g, seq[j:j + context_length + 1]))
    loss_sum = torch.zeros(len(genres), dtype=torch.float64)
    count = torch.zeros(len(genres), dtype=torch.int64)
    was_training = model.training
    model.eval()
    # Longest first, so each batch pads little (padding sits after the text:
    # under causal attention it changes nothing before it).
    pieces.sort(key=lambda p: -len(p[1]))
    for b in range(0, len(pieces), batch_size):
        batch = pieces[b:b + batch_size]
        width = len(batch[0][1]) - 1
        x = torch.zeros(len(batch), width, dtype=torch.long)
        y = torch.full((len(batch), width), -100, dtype=torch.long)  # -100: cross_entropy's ignore_index
        for i, (_, p) in enumerate(batch):
            x[i, :len(p) - 1] = torch.from_numpy(p[:-1])
            y[i, :len(p) - 1] = torch.from_numpy(p[1:])
        logits = model(x.to(device)).float()
        loss = F.cross_entropy(logits.flatten(0, 1), y.to(device).flatten(), reduction="none").view_as(y).sum(1)
        owner = torch.tensor([g for g, _ in batch])
        loss_sum.index_add_(0, owner, loss.double().cpu())  # one host copy per batch
        count.index_add_(0, owner, (y != -100).sum(1))
    model.train(was_training)
    return {genres[g]: {"loss": loss_sum[g].item() / count[g].item(), "tokens": int(count[g]), "docs": int(taken[g])}
            for g in range(len(genres)) if count[g] > 0}
