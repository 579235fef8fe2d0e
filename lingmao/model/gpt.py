"""A decoder-only GPT: pre-norm blocks, causal attention, tied embeddings,
an optional mixture-of-experts feed-forward, and cached generation. Read top
to bottom: the config, a block, the model, the loss. The parts a block is
made of have their own modules: attention (rotary positions, q/k norm, the
KV cache), mlp (the feed-forward and its activations), moe (routed experts).

Switches from the modded-nanoGPT speedrun line of work (`model.*`, defaults
in lingmao/config/schema.py): rotary positions (on by default), q/k
normalisation, a ReLU-squared MLP, a padded vocabulary and zero-initialised
output projections.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lingmao.config.keys import fill_absent, value_when_absent
from lingmao.config.rules import check_model
from lingmao.model.attention import Attention, KVCache
from lingmao.model.mlp import MLP
from lingmao.model.moe import MoE, moe_stats
from lingmao.model.sampling import next_token


def _key(name: str) -> str:
    """The run config's `model` key a GPTConfig field holds: moe_top_k is moe.top_k."""
    return name.replace("moe_", "moe.", 1)


def _unset(name: str):
    return value_when_absent(f"model.{_key(name)}")


@dataclass
class GPTConfig:
    """The run config's `model` section, flat, plus the vocabulary size.

    A field left out means what it means in a checkpoint whose config lacks
    it (config.value_when_absent): the schema's default, except that a switch
    added later is as it was before it existed. So GPTConfig(vocab_size=V) is
    the plain GPT-2-style model (learned positions); model=small, the run a
    bare `python -m lingmao.run` trains, is from_model_config(ModelConfig(), V).
    The values are checked by config.RULES, as the CLI's are."""

    vocab_size: int
    d_model: int = _unset("d_model")
    n_heads: int = _unset("n_heads")
    n_layers: int = _unset("n_layers")
    context_length: int = _unset("context_length")
    dropout: float = _unset("dropout")
    mlp_ratio: int = _unset("mlp_ratio")
    moe_experts: int = _unset("moe_experts")  # 0: a dense MLP in every block
    moe_top_k: int = _unset("moe_top_k")
    moe_capacity_factor: float = _unset("moe_capacity_factor")
    rotary: bool = _unset("rotary")  # rotary positions on q and k instead of the learned pos_emb
    qk_norm: bool = _unset("qk_norm")  # RMSNorm of q and k per head before attention
    mlp: str = _unset("mlp")  # the MLP's activation: a key of ACTIVATIONS
    vocab_multiple: int = _unset("vocab_multiple")  # embedding/head rows padded to a multiple of this
    zero_init_proj: bool = _unset("zero_init_proj")  # attention/MLP output projections start at zero

    def __post_init__(self):
        section: dict = {"moe": {}}
        for f in fields(self)[1:]:  # all but vocab_size
            *parent, leaf = _key(f.name).split(".")
            (section[parent[0]] if parent else section)[leaf] = getattr(self, f.name)
        check_model(section)

    @property
    def padded_vocab(self) -> int:
        """Rows of the embedding and the head: vocab_size rounded up to vocab_multiple."""
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple

    @classmethod
    def from_model_config(cls, m, vocab_size: int) -> GPTConfig:
        """From a run config's `model` section: a ModelConfig, a DictConfig, or
        the plain dict a checkpoint stores (a key it lacks takes its value
        from before the key existed)."""
        m = fill_absent(m, "model")
        values = {f.name: m["moe"][f.name[4:]] if f.name.startswith("moe_") else m[f.name] for f in fields(cls)[1:]}
        return cls(vocab_size=vocab_size, **values)


class Block(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(c.d_model)
        self.attn = Attention(c)
        self.ln2 = nn.LayerNorm(c.d_model)
        self.mlp = MoE(c) if c.moe_experts else MLP(c)

    def forward(self, x: torch.Tensor, kv: tuple | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), kv)
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.config = c
        # Padded rows (vocab_multiple) make the head's matmul a multiple of the
        # GPU's tile size (nanoGPT: 50257 -> 50304 rows ran ~25% faster); they
        # are no token and forward slices their logits off.
        self.tok_emb = nn.Embedding(c.padded_vocab, c.d_model)
        self.pos_emb = None if c.rotary else nn.Embedding(c.context_length, c.d_model)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.n_layers))
        self.ln_f = nn.LayerNorm(c.d_model)
        self.head = nn.Linear(c.d_model, c.padded_vocab, bias=False)
        self.head.weight = self.tok_emb.weight  # weight tying (Press & Wolf, 2017)
        self.activation_checkpointing = False  # set by the engine from the plan: training memory for compute
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                if c.zero_init_proj:
                    # modded-nanoGPT: every block starts as the identity, x + 0,
                    # and the residual stream opens up as training needs.
                    nn.init.zeros_(p)
                else:
                    # GPT-2: scale residual projections by 1/sqrt(2 * n_layers) so
                    # the residual stream's variance does not grow with depth.
                    nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * c.n_layers))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def num_params(self) -> int:
        """Real parameter count, every expert included; the tied head is counted once."""
        return sum(p.numel() for p in self.parameters())

    def hidden_matrices(self) -> list[nn.Parameter]:
        """The 2-D weights inside the blocks' attention and MLPs (every
        expert's too): what Muon optimises. Not the embeddings, the tied head,
        norms, biases or the MoE router."""
        return [
            lin.weight
            for m in self.blocks.modules()
            if isinstance(m, (Attention, MLP))
            for lin in m.children()
            if isinstance(lin, nn.Linear)
        ]

    def active_params(self) -> int:
        """Parameters one token uses: of each MoE layer's experts, only top_k."""
        c = self.config
        if not c.moe_experts:
            return self.num_params()
        per_expert = sum(p.numel() for p in self.blocks[0].mlp.experts[0].parameters())
        return self.num_params() - c.n_layers * (c.moe_experts - c.moe_top_k) * per_expert

    def flops_per_token(self) -> int:
        """Training FLOPs per token: 6N over the active parameters plus
        attention scores, 6 * 2 * L * T * d (PaLM, Chowdhery et al. 2022, appendix B).
        N leaves out position embeddings (a lookup, no matmul) and the padded
        vocabulary rows (computed, but no useful work: MFU counts model FLOPs)."""
        c = self.config
        n = self.active_params() - (c.padded_vocab - c.vocab_size) * c.d_model
        if self.pos_emb is not None:
            n -= self.pos_emb.weight.numel()
        return 6 * n + 12 * c.n_layers * c.context_length * c.d_model

    def moe_stats(self) -> dict:
        """Of the last forward, averaged over the MoE layers (moe.moe_stats); empty for a dense model."""
        return moe_stats(b.mlp for b in self.blocks)

    def forward(
        self, idx: torch.Tensor, cache: KVCache | None = None, targets: torch.Tensor | None = None, loss_chunk: int = 0
    ) -> torch.Tensor:
        """Logits (B, T, vocab), or with `targets` the sum of the tokens'
        cross-entropy, `loss_chunk` tokens of logits at a time (0: all at once)."""
        T = idx.shape[1]
        start = cache.pos if cache is not None else 0
        if start + T > self.config.context_length:
            raise ValueError(
                f"sequence of {start + T} tokens exceeds model.context_length={self.config.context_length}"
            )
        x = self.tok_emb(idx)
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(start, start + T, device=idx.device))
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            if self.activation_checkpointing and self.training and cache is None:
                # Keep only each block's input; recompute its inside in backward
                # (the saved RNG state gives dropout the same masks again).
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x, None if cache is None else (cache.k[i], cache.v[i], start))
        if cache is not None:
            cache.pos += T
        x = self.ln_f(x)
        if targets is not None:
            return token_loss_sum(
                x.flatten(0, 1), self.head.weight, targets.flatten(), self.config.vocab_size, loss_chunk
            )
        logits = self.head(x)
        # Only real tokens: the padded rows never enter the softmax, so they
        # cannot be sampled, win an argmax, or take probability from the loss.
        c = self.config
        return logits[..., : c.vocab_size] if c.padded_vocab > c.vocab_size else logits

    def next_logits(self, idx: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        """Logits after each row of idx (B, T): with a cache, only the newest
        token is fed, but for the first step and once the window is full,
        when the cache is refilled from the last context_length tokens."""
        ctx = self.config.context_length
        if cache is None:
            return self(idx[:, -ctx:])
        if cache.pos in (0, ctx):
            cache.pos = 0
            return self(idx[:, -ctx:], cache)
        return self(idx[:, -1:], cache)

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = 50,
        generator: torch.Generator | None = None,
        *,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        use_cache: bool = True,
        eos_id: int | None = None,
    ) -> torch.Tensor:
        """Extend each row of idx (B, T) by up to max_new_tokens sampled
        tokens; temperature <= 0 is greedy. With `eos_id`, stop early once
        every row has produced it. Beyond context_length the window slides:
        each step then re-reads the last context_length tokens, as uncached
        generation does. Learned positions shift; rotary keys would stay
        valid as they are, but in layers past the first the kept tokens' keys
        and values also saw the tokens that left the window, so rolling the
        cache would not be what the model computes on the window."""
        cache = KVCache(self.config, idx.shape[0], idx.device, self.tok_emb.weight.dtype) if use_cache else None
        done = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):
            logits = self.next_logits(idx, cache)
            nxt = next_token(logits[:, -1, :], idx, temperature, top_k, top_p, repetition_penalty, generator)
            idx = torch.cat([idx, nxt], dim=1)
            if eos_id is not None:
                done |= nxt[:, 0] == eos_id
                if done.all():
                    break
        return idx


def _loss_sum(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_size: int) -> torch.Tensor:
    logits = F.linear(h, weight)[:, :vocab_size]
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def token_loss_sum(
    h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_size: int, chunk: int
) -> torch.Tensor:
    """Summed cross-entropy of the head's logits for hidden states h (N, C).
    With `chunk`, `chunk` tokens at a time, each chunk's logits recomputed in
    backward instead of kept: the fp32 logits of a whole batch (N x 13.5k
    for our vocabulary, a third of the small model's training memory at
    batch 16) never exist at once, for one more head matmul per token."""
    if not chunk or chunk >= len(targets):
        return _loss_sum(h, weight, targets, vocab_size)
    return sum(
        checkpoint(_loss_sum, h[i : i + chunk], weight, targets[i : i + chunk], vocab_size, use_reentrant=False)
        for i in range(0, len(targets), chunk)
    )
