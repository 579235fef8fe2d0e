"""Evaluation during a run: the validation loss (all ranks together), the
loss per genre (诗 词 文 赋 曲: one number hides which genre a model has
learned and which it has not), and sampled continuations with their
repetition metrics."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lingmao.data.textmetrics import POEM_LINE_LENGTHS, mean_repetition, verse_form
from lingmao.data.tokenizer import EOS_ID
from lingmao.model.decoding import complete
from lingmao.train.backend import autocast, peak_memory_bytes, reset_peak_memory


@torch.no_grad()
def evaluate(model, loader, plan, device, batches: int, dist, n_windows: int) -> float:
    """Mean per-token loss over the first `batches` val batches of every rank
    (a fixed set), summed over the ranks: the same number on every rank, and
    the one a single process with all ranks' batch would get."""
    model.eval()
    total = torch.zeros(2, device=device)  # loss sum, token count
    seen = 0
    for i, (x, y) in enumerate(loader):
        if i >= batches:
            break
        x, y = x.to(device), y.to(device)
        with autocast(plan):
            logits = model(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none").view(y.shape).sum(1)
        # Unshuffled, DistributedSampler gives rank r windows r, r + W, r + 2W, ...
        # and pads the last ones with repeats from the start: leave those out.
        index = dist.rank + (seen + torch.arange(len(y), device=device)) * dist.world_size
        real = (index < n_windows).float()
        total[0] += (loss * real).sum()
        total[1] += real.sum() * y.shape[1]
        seen += len(y)
    if dist.world_size > 1:
        torch.distributed.all_reduce(total)
    model.train()
    loss, count = total.tolist()
    return loss / max(1.0, count)


def sample(model, tokenizer, s, n_tokens: int, device, seed: int, greedy: bool = False) -> list[dict]:
    """`s.per_prompt` continuations of each prompt of `s` (trainer.sample),
    decoded as it says, with their repetition metrics; `greedy`: one, by
    argmax with no penalty, the decoding most prone to loops."""
    g = torch.Generator(device=device).manual_seed(seed)
    decoding = (
        dict(temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0)
        if greedy
        else dict(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, repetition_penalty=s.repetition_penalty)
    )
    n = 1 if greedy else s.per_prompt  # argmax would repeat itself
    return [
        out for prompt in s.prompts for out in complete(model, tokenizer, prompt, n, n_tokens, generator=g, **decoding)
    ]


def _genre_windows(tokens, val_docs, n_genres: int, context_length: int, max_docs: int | None):
    """([(genre index, window of up to context_length + 1 tokens)], documents
    taken per genre): each document after an <eos>, in consecutive windows."""
    ends = np.append(val_docs[1:, 0], len(tokens))
    pieces: list[tuple[int, np.ndarray]] = []
    taken = np.zeros(n_genres, dtype=np.int64)
    for (start, g), end in zip(val_docs.tolist(), ends.tolist()):
        if max_docs is not None and taken[g] >= max_docs:
            continue
        taken[g] += 1
        seq = np.concatenate([[EOS_ID], np.asarray(tokens[start:end], dtype=np.int64)])
        for j in range(0, len(seq) - 1, context_length):
            pieces.append((g, seq[j : j + context_length + 1]))
    return pieces, taken


@torch.no_grad()
def per_genre_loss(
    model,
    tokens: np.ndarray,
    val_docs: np.ndarray,
    genres: list[str],
    context_length: int,
    *,
    device="cpu",
    batch_size: int = 16,
    max_docs_per_genre: int | None = 256,
) -> dict[str, dict]:
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
    pieces, taken = _genre_windows(tokens, val_docs, len(genres), context_length, max_docs_per_genre)
    loss_sum = torch.zeros(len(genres), dtype=torch.float64)
    count = torch.zeros(len(genres), dtype=torch.int64)
    was_training = model.training
    model.eval()
    # Longest first, so each batch pads little (padding sits after the text:
    # under causal attention it changes nothing before it).
    pieces.sort(key=lambda p: -len(p[1]))
    for b in range(0, len(pieces), batch_size):
        batch = pieces[b : b + batch_size]
        width = len(batch[0][1]) - 1
        x = torch.zeros(len(batch), width, dtype=torch.long)
        y = torch.full((len(batch), width), -100, dtype=torch.long)  # -100: cross_entropy's ignore_index
        for i, (_, p) in enumerate(batch):
            x[i, : len(p) - 1] = torch.from_numpy(p[:-1])
            y[i, : len(p) - 1] = torch.from_numpy(p[1:])
        logits = model(x.to(device)).float()
        loss = F.cross_entropy(logits.flatten(0, 1), y.to(device).flatten(), reduction="none").view_as(y).sum(1)
        owner = torch.tensor([g for g, _ in batch])
        loss_sum.index_add_(0, owner, loss.double().cpu())  # one host copy per batch
        count.index_add_(0, owner, (y != -100).sum(1))
    model.train(was_training)
    return {
        genres[g]: {"loss": loss_sum[g].item() / count[g].item(), "tokens": int(count[g]), "docs": int(taken[g])}
        for g in range(len(genres))
        if count[g] > 0
    }


# ASCII metric names for the genres (val/loss_shi): MLflow's charts and
# viewers without a CJK font show them; the Chinese name is in the run's
# `genre.<name>` tags.
GENRE_NAMES = {"诗": "shi", "词": "ci", "文": "wen", "赋": "fu", "曲": "qu", "其他": "other"}


def genre_metric_names(genres: list[str]) -> dict[str, str]:
    """{genre: its ASCII metric name}: the table's, the genre itself if
    already ASCII, else `genre<i>` by its index in the corpus."""
    out = {}
    for i, g in enumerate(genres):
        ascii_name = g if g.isascii() and g.replace("_", "").isalnum() else f"genre{i}"
        out[g] = GENRE_NAMES.get(g, ascii_name)
    return out


def corpus_verse_form(
    tokens: np.ndarray, docs: np.ndarray, genres: list[str], tokenizer, genre: str = "诗", max_docs: int = 2000
) -> float | None:
    """`verse_form` of the corpus's own `genre` documents in the val split
    (the first `max_docs`): the reference val/samples/form is read against."""
    if genre not in genres:
        return None
    g = genres.index(genre)
    ends = np.append(docs[1:, 0], len(tokens))
    texts = [
        tokenizer.decode(np.asarray(tokens[start:end], dtype=np.int64).tolist())
        for (start, kind), end in zip(docs.tolist(), ends.tolist())
        if kind == g
    ][:max_docs]
    return verse_form(texts)


@dataclass
class ValData:
    """What an eval reads: the val loader (every rank's share), and the flat
    val split with its documents for the per-genre loss (rank 0)."""

    loader: object
    n_windows: int
    tokens: np.ndarray
    docs: np.ndarray
    genres: list[str]
    tokens_per_char: float


class Evaluator:
    """One eval: val loss, perplexity and bits per character on every rank;
    on rank 0 also the loss per genre and samples (appended to
    `samples_file`, so a resumed run keeps the earlier ones), printed in one
    line and sent to the tracker."""

    def __init__(
        self,
        raw,
        plan,
        device,
        dist,
        val: ValData,
        cfg,
        tokenizer,
        samples_file: Path,
        tracker,
        say: Callable[[str], None] = print,
    ):
        self.raw, self.plan, self.device, self.dist, self.val = raw, plan, device, dist, val
        self.trainer, self.seed, self.tokenizer = cfg.trainer, cfg.seed, tokenizer
        self.context_length = cfg.model.context_length
        self.samples_file, self.tracker, self.say = samples_file, tracker, say
        # The per-genre loss costs about what the main eval does: eval_batches
        # micro-batches of documents, shared among the genres.
        self.genre_docs = max(16, self.trainer.eval_batches * plan.micro_batch // max(1, len(val.genres)))
        self.genre_names = genre_metric_names(val.genres)

    def run(self, step: int) -> dict:
        """The eval's metrics; its peak memory (val/peak_memory_gb) is measured
        apart from training's, and the peak starts over after it, so that the
        next training interval's peak_memory_gb is training's own."""
        reset_peak_memory(self.device)
        m = self._metrics(step)
        m["val/peak_memory_gb"] = peak_memory_bytes(self.device) / 2**30
        if self.dist.main:
            self.tracker.log_metrics(m, step)
            self.tracker.flush()
        reset_peak_memory(self.device)
        return m

    def _metrics(self, step: int) -> dict:
        v = self.val
        val = evaluate(self.raw, v.loader, self.plan, self.device, self.trainer.eval_batches, self.dist, v.n_windows)
        m = {
            "val/loss": val,
            "val/perplexity": math.exp(min(val, 50)),
            "val/bpc": val / math.log(2) * v.tokens_per_char,
        }
        if self.dist.main:
            with autocast(self.plan):
                genres = per_genre_loss(
                    self.raw,
                    v.tokens,
                    v.docs,
                    v.genres,
                    self.context_length,
                    device=self.device,
                    batch_size=self.plan.micro_batch,
                    max_docs_per_genre=self.genre_docs,
                )
            m.update({f"val/loss_{self.genre_names[g]}": r["loss"] for g, r in genres.items()})
            samples = self._samples(step, m)
            first = samples[0]["prompt"] + samples[0]["text"]
            greedy = f" (greedy {m['val/samples/greedy_rep4']:.2f})" if "val/samples/greedy_rep4" in m else ""
            self.say(
                f"step {step}: val/loss {val:.3f} ppl {m['val/perplexity']:.1f} bpc {m['val/bpc']:.3f} "
                f"rep4 {m['val/samples/rep4']:.2f}{greedy} | {' / '.join(first.splitlines())}"
            )
        return m

    def _samples(self, step: int, m: dict) -> list[dict]:
        """Decode the prompts (and greedily, with trainer.sample.greedy_baseline), record their metrics in `m`."""
        decodings = ["sampled", "greedy"] if self.trainer.sample.greedy_baseline else ["sampled"]
        samples = []
        for decoding in decodings:
            out = sample(
                self.raw,
                self.tokenizer,
                self.trainer.sample,
                self.trainer.sample_tokens,
                self.device,
                self.seed,
                greedy=decoding == "greedy",
            )
            prefix = "val/samples/" if decoding == "sampled" else "val/samples/greedy_"
            m.update({prefix + k: v for k, v in mean_repetition([s["text"] for s in out]).items()})
            # Lines of verse: the samples that continue a 5- or 7-character line (a 诗 prompt)
            form = verse_form([s["prompt"] + s["text"] for s in out if len(s["prompt"]) in POEM_LINE_LENGTHS])
            if form is not None:
                m[prefix + "form"] = form
            m[prefix + "new_tokens"] = sum(s["new_tokens"] for s in out) / len(out)  # <eos> ends a sample early
            samples += [{"decoding": decoding, **s} for s in out]
        with open(self.samples_file, "a", encoding="utf-8") as f:
            f.writelines(json.dumps({"step": step, **s}, ensure_ascii=False) + "\n" for s in samples)
        return samples
