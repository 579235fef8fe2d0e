"""The mixture-of-experts feed-forward: top-k routing, expert capacity, and
the statistics of the last forward (load-balancing loss, drops, load)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from lingmao.model.mlp import MLP

if TYPE_CHECKING:
    from lingmao.model.gpt import GPTConfig


class MoE(nn.Module):
    """Top-k routed experts in place of the MLP (Shazeer et al. 2017), with
    Switch Transformer capacity and load balancing (Fedus et al. 2021).

    After each forward, `aux_loss` (E * sum_i f_i * P_i: f_i the share of
    routed assignments that chose expert i, P_i its mean router probability;
    1.0 when balanced, E when collapsed), `dropped` and `drop_rate`
    (assignments over capacity) and `load` (f) describe the batch just seen.
    """

    def __init__(self, c: GPTConfig):
        super().__init__()
        self.top_k, self.capacity_factor = c.moe_top_k, c.moe_capacity_factor
        self.router = nn.Linear(c.d_model, c.moe_experts, bias=False)
        self.experts = nn.ModuleList(MLP(c) for _ in range(c.moe_experts))

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(router probabilities (N, E), renormalised gates (N, k), chosen experts (N, k)) for tokens x (N, C)."""
        probs = self.router(x).float().softmax(-1)
        gates, chosen = probs.topk(self.top_k, dim=-1)
        return probs, gates / gates.sum(-1, keepdim=True), chosen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        E, k = len(self.experts), self.top_k
        # Position-major token order: when capacity runs out, the later
        # positions lose, so no token is ever dropped because of a token after
        # it (that would leak the future) and drops spread over the batch.
        tokens = x.transpose(0, 1).reshape(T * B, C)
        probs, gates, chosen = self.route(tokens)
        choice = F.one_hot(chosen.reshape(-1), E)  # (N * k, E); a token's first choice queues first
        self.load = choice.float().mean(0)
        self.aux_loss = E * (self.load * probs.mean(0)).sum()
        keep = torch.ones(T * B * k, dtype=torch.bool, device=x.device)
        if self.training:
            # Capacity bounds an expert's work per step; at eval and generation
            # every token gets its experts, so its output never depends on
            # which other tokens share the batch.
            capacity = math.ceil(self.capacity_factor * T * B * k / E)
            keep = (choice.cumsum(0) * choice).sum(-1) <= capacity  # place in the expert's queue
        self.dropped, self.drop_rate = (~keep).sum(), (~keep).float().mean()
        token = torch.arange(T * B, device=x.device).repeat_interleave(k)
        expert_of = chosen.reshape(-1)
        rows, outputs = [], []
        # Every expert runs, on zero rows if none chose it, so all parameters
        # stay in the graph (DDP expects a gradient for each).
        for e, expert in enumerate(self.experts):
            idx = ((expert_of == e) & keep).nonzero().squeeze(1)
            rows.append(idx)
            outputs.append(expert(tokens[token[idx]]))
        # One row per (token, choice), zero where dropped; a copy, not an
        # index_add_, so the result is deterministic on CUDA.
        y = tokens.new_zeros(T * B * k, C).index_copy(0, torch.cat(rows), torch.cat(outputs).to(tokens.dtype))
        out = (y.view(T * B, k, C) * gates.unsqueeze(-1).to(y.dtype)).sum(1)
        return out.view(T, B, C).transpose(0, 1)


def moe_stats(feed_forwards: Iterable[nn.Module]) -> dict:
    """Of the last forward, averaged over the MoE layers among `feed_forwards`:
    `aux_loss` (a tensor in the graph, for the loss), `dropped` assignments
    (summed), `drop_rate` and per-expert `load`. Empty if none is MoE."""
    layers = [m for m in feed_forwards if isinstance(m, MoE)]
    if not layers:
        return {}
    return {
        "aux_loss": torch.stack([m.aux_loss for m in layers]).mean(),
        "dropped": torch.stack([m.dropped for m in layers]).sum(),
        "drop_rate": torch.stack([m.drop_rate for m in layers]).mean(),
        "load": torch.stack([m.load for m in layers]).mean(0),
    }
