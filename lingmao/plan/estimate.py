"""Parameter counts, FLOPs and step time of lingmao's GPT, and the shape
the plan's estimates take, before any run (pure arithmetic, no torch)."""

from __future__ import annotations


def flops_per_token(d_model: int, n_layers: int, context_length: int, n_params_no_pos: int) -> int:
    """Training FLOPs per token, 6N + 12 L T d (PaLM, Chowdhery et al. 2022, appendix B;
    Kaplan et al. 2020 sec. 2.1): equals lingmao.model.gpt.GPT.flops_per_token()."""
    return 6 * n_params_no_pos + 12 * n_layers * context_length * d_model


def estimate_step_time(*, flops_per_token: float, tokens_per_step: int, peak_tflops: float, mfu: float = 0.4) -> float:
    """Seconds per optimizer step at model FLOPs utilisation `mfu`.

    0.4 is optimistic-typical for a single GPU with bf16 autocast, flash
    attention and torch.compile at these widths (PaLM reports 46% at 540B on
    TPU; GPT-2-small-sized models on one A100 reach roughly 30-45%). Small
    d_model and CPU/MPS runs land far lower: pass a measured mfu there.
    """
    if peak_tflops <= 0 or mfu <= 0:
        raise ValueError(f"peak_tflops={peak_tflops} and mfu={mfu} must be positive")
    return flops_per_token * tokens_per_step / (peak_tflops * 1e12 * mfu)


# Tokens of logits the training loss takes at a time (model.token_loss_sum):
# the fp32 logits of a whole micro-batch (tokens x 13.5k, a third of the small
# model's training memory at batch 16) never exist at once, for one more head
# matmul per token in backward (python -m lingmao.bench suite=cpu parts=loss).
LOSS_CHUNK = 1024


def model_shape(mc, *, vocab: int, precision: str, device: str, ddp: bool, optimizer: str = "adamw") -> dict:
    """estimate_memory's keyword arguments for the model node `mc`; `optimizer`:
    optim.name (adamw, the default, holds the most state)."""
    return dict(
        d_model=mc.d_model,
        n_heads=mc.n_heads,
        n_layers=mc.n_layers,
        context_length=mc.context_length,
        vocab_size=vocab,
        mlp_ratio=mc.mlp_ratio,
        precision=precision,
        dropout=mc.dropout,
        device=device,
        rotary=bool(mc.rotary),
        qk_norm=bool(mc.qk_norm),
        moe_experts=mc.moe.experts,
        moe_top_k=mc.moe.top_k,
        vocab_multiple=mc.vocab_multiple,
        ddp=ddp,
        loss_chunk=LOSS_CHUNK,
        optimizer=optimizer,
    )


def step_seconds(shape: dict, n_params: int, tokens: int, checkpointing: bool, peak: float | None, mfu: float):
    """Seconds per optimizer step of `tokens` at `mfu` of `peak` TFLOPS; None without a peak."""
    if not peak:
        return None
    d, ctx = shape["d_model"], shape["context_length"]
    no_pos = n_params - (0 if shape["rotary"] else ctx * d)
    per_token = flops_per_token(d, shape["n_layers"], ctx, no_pos)
    s = estimate_step_time(flops_per_token=per_token, tokens_per_step=tokens, peak_tflops=peak, mfu=mfu)
    return s * 4 / 3 if checkpointing else s  # checkpointing runs each block's forward twice: ~1 more of 3 passes
