"""The feed-forward of a block: a two-layer MLP and its activations (also
each expert of the mixture of experts)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

if TYPE_CHECKING:
    from lingmao.model.gpt import GPTConfig


def gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")  # GPT-2's


def relu2(x: torch.Tensor) -> torch.Tensor:
    """ReLU squared (So et al. 2021, Primer): cheaper than GELU and trained
    faster in Primer's search and in the nanoGPT speedrun."""
    return F.relu(x).square()


ACTIVATIONS = {"gelu": gelu, "relu2": relu2}


class MLP(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(c.d_model, c.mlp_ratio * c.d_model)
        self.proj = nn.Linear(c.mlp_ratio * c.d_model, c.d_model)
        self.dropout = nn.Dropout(c.dropout)
        self.act = ACTIVATIONS[c.mlp]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(self.act(self.fc(x))))
