"""Causal self-attention: rotary positions, q/k normalisation, and the
key/value cache that generation writes into.

Every attention call is causal: a plain `nn.TransformerEncoder` without a
causal mask would see the future.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

if TYPE_CHECKING:
    from lingmao.model.gpt import GPTConfig

ROPE_BASE = 10000.0  # RoFormer's (Su et al. 2021) base of the rotation frequencies


def rope_angles(c: GPTConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (context_length, head_dim/2) of rotary position embedding
    (Su et al. 2021): channel pair (i, i + head_dim/2) at position p turns by
    p * ROPE_BASE^(-2i/head_dim), so q.k depends on the two positions only
    through their offset. float32: bf16 cannot hold position * frequency.
    Computed once per model, not per layer and step."""
    hd = c.d_model // c.n_heads
    inv_freq = ROPE_BASE ** (-torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    angles = torch.outer(torch.arange(c.context_length, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, head_dim) turned by the angles of its T positions (cos, sin: (T, head_dim/2))."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.n_heads = c.n_heads
        self.qkv = nn.Linear(c.d_model, 3 * c.d_model)
        self.proj = nn.Linear(c.d_model, c.d_model)
        self.dropout = c.dropout
        self.resid_dropout = nn.Dropout(c.dropout)
        self.rotary = c.rotary
        if c.rotary:  # buffers follow .to(device); not persistent: nothing new in checkpoints
            cos, sin = rope_angles(c)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        # QK-norm (Dehghani et al. 2023; Wortsman et al. 2023): bounded q.k keeps
        # the attention logits from growing until softmax saturates, which
        # tolerates higher LRs. A learned gain per channel lets heads sharpen.
        head = c.d_model // c.n_heads
        self.q_norm = nn.RMSNorm(head) if c.qk_norm else None
        self.k_norm = nn.RMSNorm(head) if c.qk_norm else None

    def heads(self, x: torch.Tensor, start: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v (B, H, T, head_dim) of x (B, T, C), whose first token sits at position `start`."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, C // self.n_heads).permute(2, 0, 3, 1, 4)
        if self.q_norm is not None:
            # In float32, the gain's dtype: under autocast a bf16 q would miss
            # the fused RMSNorm kernel; rotate then computes in float32 anyway.
            q, k = self.q_norm(q.float()), self.k_norm(k.float())
        if self.rotary:
            cos, sin = self.rope_cos[start : start + T], self.rope_sin[start : start + T]
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        return q.to(v.dtype), k.to(v.dtype), v

    def forward(self, x: torch.Tensor, kv: tuple | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.heads(x, 0 if kv is None else kv[2])
        if kv is None:
            y = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
            )
        else:
            # Generation: write this step's keys/values after the `pos` cached
            # ones; query i sits at position pos + i and sees keys 0..pos + i.
            # With rotary the cached keys are already rotated to their positions.
            k_cache, v_cache, pos = kv
            k_cache[:, :, pos : pos + T], v_cache[:, :, pos : pos + T] = k, v
            mask = torch.ones(T, pos + T, dtype=torch.bool, device=x.device).tril(pos)
            y = F.scaled_dot_product_attention(q, k_cache[:, :, : pos + T], v_cache[:, :, : pos + T], attn_mask=mask)
        return self.resid_dropout(self.proj(y.transpose(1, 2).reshape(B, T, C)))


class KVCache:
    """Keys and values of every layer for the tokens generated so far,
    allocated once for the whole context: a new token costs one position of
    attention instead of a forward over the whole prefix."""

    def __init__(self, c: GPTConfig, batch: int, device, dtype):
        shape = (batch, c.n_heads, c.context_length, c.d_model // c.n_heads)
        self.k = [torch.empty(shape, device=device, dtype=dtype) for _ in range(c.n_layers)]
        self.v = [torch.empty(shape, device=device, dtype=dtype) for _ in range(c.n_layers)]
        self.pos = 0  # tokens cached
