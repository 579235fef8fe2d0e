import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lingmao.model.gpt import GPT, GPTConfig
from lingmao.plan.estimate import estimate_step_time, flops_per_token
from lingmao.plan.memory import MARGIN, MemoryEstimate, count_params, estimate_memory, fit_micro_batch

ROOT = Path(__file__).resolve().parents[1]
SHAPES = [  # (d_model, n_heads, n_layers, context_length, vocab_size, mlp_ratio)
    (32, 4, 2, 16, 50, 4),
    (64, 2, 3, 32, 257, 4),
    (128, 4, 2, 128, 8000, 4),
    (96, 6, 1, 24, 1000, 2),
    (48, 3, 5, 40, 77, 3),
]
SMALL = dict(d_model=512, n_heads=8, n_layers=8, context_length=512, vocab_size=8000)
TINY = dict(d_model=128, n_heads=4, n_layers=2, context_length=128, vocab_size=8000)


def gpt(d, h, L, T, V, r, dropout=0.0, **switches):
    torch.manual_seed(0)
    return GPT(
        GPTConfig(
            vocab_size=V, d_model=d, n_heads=h, n_layers=L, context_length=T, dropout=dropout, mlp_ratio=r, **switches
        )
    )


SWITCHES = [
    dict(),
    dict(rotary=True),
    dict(qk_norm=True),
    dict(rotary=True, qk_norm=True),
    dict(moe_experts=4),
    dict(rotary=True, moe_experts=3, vocab_multiple=64),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("switches", SWITCHES)
def test_count_params_equals_the_model(shape, switches):
    assert count_params(*shape, **switches) == gpt(*shape, **switches).num_params()


def test_minimind_moe_parameters():
    """experiments/minimind_t4x2: small with 4 experts is 82.6M parameters, not the dense 32.2M."""
    kw = dict(d_model=512, n_heads=8, n_layers=8, context_length=512, vocab_size=13563, rotary=True)
    assert count_params(**kw) == 32_164_352
    assert count_params(**kw, moe_experts=4) == 82_573_824
    assert gpt(512, 8, 8, 512, 13563, 4, rotary=True, moe_experts=4).num_params() == 82_573_824
    dense, moe = (estimate_memory(**kw, micro_batch=8, precision="fp16", moe_experts=e) for e in (0, 4))
    assert moe.params == 4 * 82_573_824 and moe.activations > 1.5 * dense.activations


@pytest.mark.parametrize("shape", SHAPES)
def test_flops_per_token_equals_the_model(shape):
    d, h, L, T, V, r = shape
    no_pos = count_params(*shape) - T * d
    assert flops_per_token(d, L, T, no_pos) == gpt(*shape).flops_per_token()


def mem(**kw) -> MemoryEstimate:
    return estimate_memory(**{**SMALL, "micro_batch": 8, "precision": "bf16", **kw})


def test_total_is_the_sum_of_its_terms():
    e = mem()
    assert e.total == e.params + e.grads + e.optimizer + e.activations + e.logits + e.workspace
    assert e.gb() == pytest.approx(e.total / 2**30)
    d = mem(ddp=True)
    assert d.total == d.params + d.grads + d.optimizer + d.ddp_buckets + d.activations + d.logits + d.workspace


@pytest.mark.parametrize("device", ["cuda", "cpu", "mps"])
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_memory_grows_with_batch_and_context(device, precision, dropout):
    kw = dict(device=device, precision=precision, dropout=dropout)
    by_batch = [mem(micro_batch=b, **kw).total for b in (1, 2, 4, 8, 16)]
    by_ctx = [mem(context_length=t, **kw).total for t in (64, 128, 256, 512, 1024)]
    assert by_batch == sorted(set(by_batch)) and by_ctx == sorted(set(by_ctx))


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_checkpointing_reduces_activations(device):
    plain, ckpt = mem(device=device), mem(device=device, activation_checkpointing=True)
    assert ckpt.activations < plain.activations / 2
    assert ckpt.total < plain.total
    assert (ckpt.params, ckpt.logits) == (plain.params, plain.logits)


def test_ddp_holds_one_more_copy_of_the_gradients():
    one, many = mem(), mem(ddp=True)
    assert one.ddp_buckets == 0 and many.ddp_buckets == many.grads
    assert many.total - one.total == many.grads


def test_logits_are_their_own_term_and_a_large_share_for_small():
    e = estimate_memory(**{**SMALL, "vocab_size": 13563}, micro_batch=16, precision="fp32", device="cpu", rotary=True)
    assert e.logits == 16 * 16 * 512 * 13563  # head output, log_softmax output, two fp32 gradients
    assert e.logits > 0.2 * e.total


@pytest.mark.parametrize("half", ["bf16", "fp16"])
def test_16_bit_activations_are_smaller_than_fp32(half):
    for dropout in (0.0, 0.1):
        h, f = mem(precision=half, dropout=dropout), mem(precision="fp32", dropout=dropout)
        assert h.activations < f.activations and h.logits < f.logits
        assert (h.params, h.grads, h.optimizer) == (f.params, f.grads, f.optimizer)  # fp32 master weights


def test_cpu_dropout_takes_the_math_attention_path():
    # PyTorch's CPU flash kernel has no dropout: the math path keeps T x T matrices.
    fused = mem(device="cpu", dropout=0.0).activations
    math = mem(device="cpu", dropout=0.1).activations
    assert math > 2 * fused
    assert mem(device="cuda", dropout=0.1).activations < 1.2 * mem(device="cuda", dropout=0.0).activations


@pytest.mark.parametrize("memory_gb", [4, 12, 16, 24])
@pytest.mark.parametrize(
    "model", [dict(SMALL), dict(SMALL, d_model=1024, n_heads=16, n_layers=16, context_length=1024)]
)
def test_fit_micro_batch_is_the_largest_that_fits(memory_gb, model):
    kw = dict(model, precision="bf16", device="cuda", dropout=0.1)
    memory, headroom = memory_gb * 2**30, 0.9
    b = fit_micro_batch(memory, headroom=headroom, **kw)
    if b:  # the large model's weights and AdamW states alone overflow 4 GB
        assert estimate_memory(micro_batch=b, **kw).total <= headroom * memory
    assert estimate_memory(micro_batch=b + 1, **kw).total > headroom * memory


def test_fit_micro_batch_edges():
    kw = dict(SMALL, precision="bf16", device="cuda")
    assert fit_micro_batch(2**30 // 4, **kw) == 0  # 256 MiB holds not even the CUDA context
    assert fit_micro_batch(2**50, max_batch=64, **kw) == 64


def test_step_time():
    t = estimate_step_time(flops_per_token=1e9, tokens_per_step=100_000, peak_tflops=100.0, mfu=0.5)
    assert t == pytest.approx(1e9 * 1e5 / (100e12 * 0.5))
    assert estimate_step_time(flops_per_token=1e9, tokens_per_step=100_000, peak_tflops=100.0) > t
    with pytest.raises(ValueError):
        estimate_step_time(flops_per_token=1e9, tokens_per_step=1, peak_tflops=0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="precision"):
        mem(precision="int8")
    with pytest.raises(ValueError, match="device"):
        mem(device="tpu")


def saved_bytes(model, x, autocast: bool) -> int:
    """Bytes of the distinct storages autograd saves for backward in the
    engine's forward and loss, parameters and buffers left out."""
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in own:
            saved[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(x)
        F.cross_entropy(logits.float().flatten(0, 1), x.flatten())
    return sum(saved.values())


def weight_casts(model) -> int:
    """The 16-bit copies of the matrices autocast makes and autograd keeps (workspace), not biases or norms."""
    return 2 * sum(p.numel() for name, p in model.named_parameters() if p.ndim == 2 and not name.startswith("pos_emb"))


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize(
    "switches",
    [
        dict(),
        dict(rotary=True),
        dict(rotary=True, qk_norm=True),
        dict(qk_norm=True),
        dict(rotary=True, moe_experts=4),
        dict(moe_experts=4, moe_top_k=1),
    ],
)
def test_activations_equal_what_autograd_saves(autocast, dropout, switches):
    """The activation term (plus log_softmax's saved fp32 output, counted under
    logits) is what autograd keeps for backward on CPU: with rotary, QK-norm
    and MoE too (MoE routing depends on the batch: within 1%)."""
    d, h, L, T, V, B = 64, 4, 2, 64, 500, 4
    model = gpt(d, h, L, T, V, 4, dropout, **switches)
    x = torch.randint(0, V, (B, T))
    e = estimate_memory(
        d_model=d,
        n_heads=h,
        n_layers=L,
        context_length=T,
        vocab_size=V,
        micro_batch=B,
        precision="bf16" if autocast else "fp32",
        dropout=dropout,
        device="cpu",
        **switches,
    )
    expected = e.activations + 4 * B * T * V + (weight_casts(model) if autocast else 0)
    assert saved_bytes(model, x, autocast) == pytest.approx(
        expected, rel=0.01 if switches.get("moe_experts") else 0.001
    )


@pytest.mark.parametrize("autocast", [False, True])
def test_checkpointed_blocks_keep_only_their_input(autocast, monkeypatch):
    """Per-block activation checkpointing (torch.utils.checkpoint, non-reentrant):
    the forward keeps each block's fp32 input; the estimate adds the one block
    that backward recomputes at a time."""
    from torch.utils.checkpoint import checkpoint

    from lingmao.model.gpt import Block
    from lingmao.plan.memory import _layer_activation_bytes

    d, h, L, T, V, B = 64, 4, 3, 64, 500, 4
    plain = Block.forward
    monkeypatch.setattr(Block, "forward", lambda self, x, kv=None: checkpoint(plain, self, x, kv, use_reentrant=False))
    model = gpt(d, h, L, T, V, 4, 0.1, rotary=True)
    x = torch.randint(0, V, (B, T))
    a = 2 if autocast else 4
    e = estimate_memory(
        d_model=d,
        n_heads=h,
        n_layers=L,
        context_length=T,
        vocab_size=V,
        micro_batch=B,
        precision="bf16" if autocast else "fp32",
        dropout=0.1,
        device="cpu",
        rotary=True,
        activation_checkpointing=True,
    )
    recomputed = (
        (_layer_activation_bytes(d=d, h=h, T=T, r=4, a=a, dropout=0.1, device="cpu", rotary=True) - 4 * d) * B * T
    )
    # the head's weight cast is saved outside the blocks; the blocks' casts are recomputed
    head_cast = 2 * V * d if autocast else 0
    assert saved_bytes(model, x, autocast) == pytest.approx(
        e.activations - recomputed + 4 * B * T * V + head_cast, rel=0.001
    )


def measured_rss(**cfg) -> int:
    """Peak RSS of real training steps (tests/rss_train.py, the engine's step)
    in a fresh process, minus its RSS after the imports."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "rss_train.py"), json.dumps(cfg)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=600,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_minus_base"]


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status; ru_maxrss in KiB")
@pytest.mark.parametrize("size, micro_batch, loss_chunk", [("small", 4, 0), ("medium", 2, 0), ("small", 8, 1024)])
def test_estimate_matches_measured_rss(size, micro_batch, loss_chunk):
    """Memory, not time: the real peak RSS of small and medium (rotary on,
    dropout 0.1 as in conf/model, fp32, context 512) within 15%, with the
    whole batch's logits and with the plan's chunked loss. Not the tiny
    model: its ~360 MiB sits beside a few hundred MiB of library pages that
    load lazily after the baseline, which no model-size estimate can predict."""
    shape = {"small": dict(d=512, h=8, L=8), "medium": dict(d=768, h=12, L=12)}[size]
    measured = measured_rss(
        **shape, T=512, V=13563, B=micro_batch, dropout=0.1, rotary=True, steps=2, loss_chunk=loss_chunk
    )
    est = estimate_memory(
        d_model=shape["d"],
        n_heads=shape["h"],
        n_layers=shape["L"],
        context_length=512,
        vocab_size=13563,
        micro_batch=micro_batch,
        precision="fp32",
        dropout=0.1,
        device="cpu",
        rotary=True,
        loss_chunk=loss_chunk,
    ).total
    err = est / measured - 1
    assert abs(err) <= 0.15, f"estimate {est / 2**20:.0f} MiB vs measured {measured / 2**20:.0f} MiB ({err:+.0%})"
    assert MARGIN <= 0.30


def optimizer_state_bytes(optimizer) -> int:
    """What the optimizer keeps per parameter: its state tensors, less AdamW's
    one-element step counters."""
    inner = [optimizer.adamw, optimizer.muon] if hasattr(optimizer, "muon") else [optimizer]
    return sum(
        t.numel() * t.element_size()
        for o in inner
        for state in o.state.values()
        for t in state.values()
        if torch.is_tensor(t) and t.numel() > 1
    )


@pytest.mark.parametrize("name", ["adamw", "muon"])
@pytest.mark.parametrize("shape", SHAPES[:3])
@pytest.mark.parametrize("switches", [dict(), dict(rotary=True, qk_norm=True), dict(moe_experts=3)])
def test_the_optimizer_term_is_the_optimizers_own_state(name, shape, switches):
    """AdamW keeps two moments for every parameter; optim=muon keeps one
    momentum buffer for the blocks' matrices and AdamW's two for the rest."""
    from lingmao.train.optim import build_optimizer

    model = gpt(*shape, **switches)
    optimizer = build_optimizer(model, 1e-3, (0.9, 0.95), 1e-8, 0.1, False, name=name)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    d, h, L, T, V, r = shape
    kw = dict(d_model=d, n_heads=h, n_layers=L, context_length=T, vocab_size=V, mlp_ratio=r, **switches)
    assert estimate_memory(**kw, micro_batch=1, precision="bf16", optimizer=name).optimizer == (
        optimizer_state_bytes(optimizer)
    )
