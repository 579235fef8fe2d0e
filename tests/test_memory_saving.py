"""Training-memory savers applied to the model: the loss over chunks of
logits, and activation checkpointing. Same numbers, less kept for backward."""

import pytest
import torch
import torch.nn.functional as F

from lingmao.model.gpt import GPT, GPTConfig


def model(**kw):
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=300, d_model=32, n_heads=2, n_layers=2, context_length=16, dropout=0.1, **kw))


def saved_bytes(fn) -> tuple[torch.Tensor, int]:
    """fn's result, and the bytes of the storages autograd keeps for its
    backward (each once: a view or a shared weight costs nothing more)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(storages.values())


def grads(m):
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


def test_chunked_loss_is_the_full_loss_without_keeping_the_logits():
    x, y = torch.randint(0, 300, (4, 16)), torch.randint(0, 300, (4, 16))
    m = model()
    torch.manual_seed(1)
    full, full_bytes = saved_bytes(lambda: F.cross_entropy(m(x).flatten(0, 1), y.flatten(), reduction="sum"))
    full.backward()
    g_full = grads(m)
    m.zero_grad()
    torch.manual_seed(1)
    chunked, chunked_bytes = saved_bytes(lambda: m(x, targets=y, loss_chunk=16))
    chunked.backward()
    assert chunked.item() == pytest.approx(full.item(), rel=1e-6)
    for k, g in grads(m).items():
        torch.testing.assert_close(g, g_full[k], rtol=1e-5, atol=1e-6)
    logits_bytes = 4 * 16 * 300 * 4
    assert full_bytes - chunked_bytes > 0.8 * logits_bytes  # the (64 x 300) fp32 logits are no longer kept


def test_activation_checkpointing_recomputes_blocks_with_the_same_dropout():
    x, y = torch.randint(0, 300, (4, 16)), torch.randint(0, 300, (4, 16))
    plain, ckpt = model(), model()
    ckpt.activation_checkpointing = True
    torch.manual_seed(1)
    a, a_bytes = saved_bytes(lambda: plain(x, targets=y))
    a.backward()
    torch.manual_seed(1)
    b, b_bytes = saved_bytes(lambda: ckpt(x, targets=y))
    b.backward()
    assert b.item() == pytest.approx(a.item(), rel=1e-6)
    for k, g in grads(plain).items():
        torch.testing.assert_close(grads(ckpt)[k], g, rtol=1e-5, atol=1e-6)
    assert b_bytes < 0.6 * a_bytes


def test_a_run_with_both_savers_trains_like_one_without(tmp_path, shared_cache, monkeypatch):
    from test_resume import _keep_torch_threads, train_here  # noqa: F401

    from lingmao.plan import make as plan_module

    # AdamW: Muon's bf16 orthogonalisation would turn the savers' last-bit differences into ~1e-4
    base = ["trainer.max_steps=3", "tracking.enabled=false", "model.dropout=0.0", "optim=adamw"]
    plain = train_here(tmp_path, tmp_path / "plain", *base)
    real = plan_module.make_plan

    def saving(*a, **k):
        p = real(*a, **k)
        p.activation_checkpointing, p.loss_chunk = True, 24
        return p

    monkeypatch.setattr(plan_module, "make_plan", saving)
    saved = train_here(tmp_path, tmp_path / "saved", *base)
    assert saved["train/loss"] == pytest.approx(plain["train/loss"], rel=1e-5)
