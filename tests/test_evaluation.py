import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lingmao.data.tokenizer import EOS_ID
from lingmao.model.gpt import GPT, GPTConfig
from lingmao.train.validation import per_genre_loss

GENRES = ["文", "曲", "诗", "词"]


def corpus(rng, docs):
    """val.bin-style tokens (each document + <eos>) and val_docs rows for (genre index, length) pairs."""
    tokens, rows = [], []
    for g, n in docs:
        rows.append((sum(map(len, tokens)), g))
        tokens.append(np.append(rng.integers(4, 40, n), EOS_ID))
    return np.concatenate(tokens).astype(np.uint16), np.array(rows, dtype=np.int64)


def reference(model, tokens, val_docs, ctx):
    """Per-genre loss by the definition: each document after an <eos>, in
    consecutive windows of ctx targets, one document at a time."""
    ends = list(val_docs[1:, 0]) + [len(tokens)]
    sums, counts = {}, {}
    for (start, g), end in zip(val_docs.tolist(), ends):
        seq = torch.tensor([EOS_ID] + tokens[start:end].astype(np.int64).tolist())
        for j in range(0, len(seq) - 1, ctx):
            x, y = seq[j : j + ctx][None], seq[j + 1 : j + ctx + 1][None]
            x = x[:, : y.shape[1]]
            loss = F.cross_entropy(model(x)[0], y[0], reduction="sum").item()
            sums[g] = sums.get(g, 0.0) + loss
            counts[g] = counts.get(g, 0) + y.numel()
    return {GENRES[g]: (sums[g] / counts[g], counts[g]) for g in sums}


def test_per_genre_loss_matches_scoring_each_document_alone():
    rng = np.random.default_rng(0)
    # short and long documents (longer than the context: several windows), genre 1 (曲) absent
    tokens, val_docs = corpus(rng, [(2, 5), (0, 40), (2, 9), (3, 16), (0, 3), (2, 33)])
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=40, d_model=32, n_heads=4, n_layers=2, context_length=16, dropout=0.0)).train()
    got = per_genre_loss(model, tokens, val_docs, GENRES, 16, batch_size=3)
    assert model.training  # left as it was found
    want = reference(model.eval(), tokens, val_docs, 16)
    assert set(got) == {"文", "诗", "词"}
    for genre, (loss, count) in want.items():
        assert got[genre]["loss"] == pytest.approx(loss, rel=1e-5)
        assert got[genre]["tokens"] == count
    assert got["文"]["tokens"] == 41 + 4 and got["文"]["docs"] == 2  # text + <eos> of each document


def test_max_docs_per_genre_takes_the_first_ones():
    rng = np.random.default_rng(1)
    tokens, val_docs = corpus(rng, [(2, 6)] * 5 + [(3, 6)])
    model = GPT(GPTConfig(vocab_size=40, d_model=16, n_heads=2, n_layers=1, context_length=8, dropout=0.0))
    got = per_genre_loss(model, tokens, val_docs, GENRES, 8, max_docs_per_genre=2)
    assert got["诗"]["docs"] == 2 and got["诗"]["tokens"] == 14 and got["词"]["docs"] == 1
    assert math.isfinite(got["诗"]["loss"])


def test_every_eval_logs_verse_form_beside_rep4_and_the_corpus_reference(tmp_path, mlflow_db, shared_cache):
    from mlflow.tracking import MlflowClient
    from test_resume import mlflow_runs, train_here

    final = train_here(tmp_path, tmp_path / "run", "trainer.max_steps=2", "tracking.run_name=form")
    assert 0.0 <= final["val/samples/form"] <= 1.0 and "val/samples/rep4" in final
    _, runs = mlflow_runs(mlflow_db, "form")
    reference = float(runs[0].data.params["data.verse_form"])
    assert reference > 0.9  # the fixture corpus is five- and seven-character verse
    assert MlflowClient(f"sqlite:///{mlflow_db}").get_metric_history(runs[0].info.run_id, "val/samples/form")


def test_each_prompt_gets_per_prompt_sampled_continuations_and_one_greedy():
    from lingmao.config.schema import SampleConfig
    from lingmao.data.tokenizer import build_char_tokenizer
    from lingmao.train.validation import sample

    tok = build_char_tokenizer(["床前明月光，疑是地上霜。举头望明月，低头思故乡。"])
    model = GPT(
        GPTConfig(vocab_size=tok.get_vocab_size(), d_model=16, n_heads=2, n_layers=1, context_length=32, dropout=0.0)
    )
    s = SampleConfig(prompts=["床前", "举头"], per_prompt=3)
    sampled = sample(model, tok, s, 8, "cpu", seed=0)
    assert [r["prompt"] for r in sampled] == ["床前"] * 3 + ["举头"] * 3
    assert len({r["text"] for r in sampled[:3]}) > 1  # three draws, not one copied
    assert [r["prompt"] for r in sample(model, tok, s, 8, "cpu", seed=0, greedy=True)] == ["床前", "举头"]
