"""Peak training memory of lingmao's GPT per device, before any run.

Pure arithmetic (no torch import): the plan calls it for any preset on any
machine. Every term below follows what lingmao.model and the engine actually
keep alive, checked against PyTorch's saved-tensor hooks and against the
peak RSS of real CPU training steps (tests/test_estimate.py); `MARGIN` is the
relative error seen there, rounded up.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

GiB = 2**30

# Relative error of `estimate_memory` against measured peak memory, rounded up.
# CPU peak RSS of real fp32 training steps (tests/rss_train.py: small and
# medium, rotary on, context 512, micro-batch 4-8, dropout 0 and 0.1): within
# -2.8%..+2.7% after fitting the CPU constants below (eleven runs: -4.7%..+6.3%).
# The live-tensor part (all but workspace) equals what autograd saves to 0.1%
# (dense) and 1% (MoE). CUDA was not measured: its tensor terms are the same
# accounting, its context and fragmentation constants are not fitted.
MARGIN = 0.30

# Bytes per element of activations and logits under each precision: 16-bit
# autocast runs the matmuls in 16 bits; fp32 runs everything in 32.
ELEMENT_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}

# CUDA: the context (kernels, cuBLAS/cuDNN handles and workspaces: PyTorch's
# cuBLAS workspace is 8-32 MiB per stream) takes device memory that
# torch.cuda.max_memory_allocated never shows; nvidia-smi typically shows
# 0.3-0.6 GiB for an idle PyTorch process with lazy module loading: 0.5 GiB.
# A guess, not measured here (no GPU at hand), and kept a constant: it varies
# with the driver, the CUDA version, the GPU and which kernels load (cuBLAS,
# cuDNN, compile's Triton kernels), none of which the plan knows; the 30%
# margin covers it on any card that fits these models at all.
CUDA_CONTEXT_BYTES = GiB // 2
# CUDA caching allocator: blocks are rounded (512 B, 2 MiB segments) and split,
# so reserved memory runs above allocated. 10% of the per-step (activation and
# logits) churn is an assumption, not measured here: no GPU was at hand.
CUDA_FRAGMENTATION = 0.10
# CPU, fitted by least squares to the peak RSS of eleven real runs (the five
# above and six more: micro-batch 6, bf16 autocast, MoE, context 768, and
# checkpointed blocks; Linux x86-64, glibc, torch 2.13, 2 threads): ~136 MiB of
# kernels paged in and OpenMP threads on the first training step; one
# gradient-sized set that the heap keeps resident (zero_grad(set_to_none=True)
# frees the gradients, the next step allocates them again: fitted 0.98 of the
# fp32 gradients); and what glibc keeps beyond the live activations and
# logits: its mmap threshold rises to the size of freed blocks (up to 32 MiB),
# so later activation-sized blocks come from the heap and stay resident after
# free (RSS ran 1.18x their live peak).
CPU_RUNTIME_BYTES = 136 * 2**20
CPU_FRAGMENTATION = 0.18
CPU_HEAP_GRADIENT_SETS = 1


@dataclass
class MemoryEstimate:
    """Peak bytes per device during a training step."""

    params: int  # fp32 master weights (autocast keeps no 16-bit copy), every MoE expert
    grads: int  # fp32 gradients, live through gradient accumulation
    optimizer: int  # fp32: AdamW's exp_avg and exp_avg_sq; with Muon, one momentum buffer for the blocks' matrices
    ddp_buckets: int  # DDP's gradient buckets: one more fp32 copy of the gradients (0 on one process)
    activations: int  # tensors saved for backward, all layers
    logits: int  # head output, its fp32 cross-entropy copies and their gradients
    workspace: int  # autocast weight casts, CUDA context or CPU runtime, allocator and heap overheads
    total: int
    muon_params: int = 0  # not bytes: the parameters in Muon's state (optimizer="muon"), the rest AdamW's

    @property
    def n_params(self) -> int:
        """The parameter count: fp32 master weights take 4 bytes each."""
        return self.params // 4

    def gb(self) -> float:
        """Total in GiB (2**30 bytes), the unit GPU memory sizes are quoted in."""
        return self.total / GiB

    def table(self) -> str:
        rows = [f.name for f in fields(self) if f.name != "muon_params"]
        return "\n".join(f"{name:<12} {getattr(self, name) / GiB:8.3f} GiB" for name in rows)


def count_params(
    d_model: int,
    n_heads: int,
    n_layers: int,
    context_length: int,
    vocab_size: int,
    mlp_ratio: int = 4,
    *,
    rotary: bool = False,
    qk_norm: bool = False,
    moe_experts: int = 0,
    vocab_multiple: int = 1,
) -> int:
    """Exactly GPT(...).num_params(): the tied head is counted once, every expert counted.

    Per block: two LayerNorms (4d), qkv (3d^2 + 3d), attention proj (d^2 + d),
    and an MLP of fc (r d^2 + r d) and proj (r d^2 + d); with MoE, `moe_experts`
    such MLPs and a bias-free router (E d). qk_norm adds two RMSNorm gains of
    the head size. Rotary drops the learned position table; the embedding has
    the vocabulary padded to `vocab_multiple` rows.
    """
    d, r = d_model, mlp_ratio
    mlp = 2 * r * d * d + r * d + d
    attn_and_norms = 4 * d * d + 4 * d + 4 * d + (2 * (d // n_heads) if qk_norm else 0)
    per_layer = attn_and_norms + (moe_experts * mlp + moe_experts * d if moe_experts else mlp)
    padded = -(-vocab_size // vocab_multiple) * vocab_multiple
    return padded * d + (0 if rotary else context_length * d) + n_layers * per_layer + 2 * d


def _attention_is_fused(device: str, dropout: float) -> bool:
    """Whether SDPA runs a fused kernel that keeps only O and logsumexp.

    CUDA: flash or memory-efficient kernels for bf16, fp16 and fp32 (dropout is
    regenerated from a saved Philox seed). CPU: PyTorch's CPU flash kernel only
    when dropout_p == 0, else the math path. MPS: treated as the math path.
    """
    if device == "cuda":
        return True
    return device == "cpu" and dropout == 0.0


def _dropout_mask_bytes(device: str, element_bytes: int) -> int:
    """CUDA's fused dropout saves a bool mask; elsewhere dropout is
    `input * bernoulli_noise` and the noise is saved in the input's dtype."""
    return 1 if device == "cuda" else element_bytes


def _qk_bytes(*, d: int, h: int, a: int, fused: bool, rotary: bool, qk_norm: bool) -> int:
    """What rotary and QK-norm add per token to one block's saved tensors,
    beyond q, k and v as views of the qkv output (fitted to PyTorch's
    saved-tensor hooks: tests/test_estimate.py). Rotated or normalised q and k
    are new tensors that SDPA saves, and a fused kernel then keeps one more
    d-sized tensor; the math path copies q, k, v anyway. RMSNorm saves its
    normalised fp32 input for the gain's gradient, its rstd per head, and under
    autocast the fp32 upcast of q and k it normalises."""
    extra = 0
    if fused and (rotary or qk_norm):
        extra += 3 * a * d
    if qk_norm:
        extra += 2 * 4 * d + 2 * 4 * h
        extra += 2 * 4 * d if a < 4 else (0 if fused else 3 * a * d)
    return extra


def _mlp_bytes(*, d: int, r: int, a: int, experts: int, top_k: int, dropout: float, device: str) -> int:
    """Saved per token by the feed-forward: the fc output and the activation's
    output; with MoE, for each of a token's top_k experts: its row index, the
    fc input (the gathered fp32 row, or its 16-bit cast under autocast), fc and
    activation outputs, the fp32 expert output and its gate-weighted copy; and
    the router's fp32 probabilities, choices and gates."""
    mask = _dropout_mask_bytes(device, a) if dropout > 0 else 0
    if not experts:
        return 2 * r * a * d + mask * d
    per_choice = (a + 2 * r * a + 8 + mask) * d + 8
    routing = 4 * experts + 12 * top_k + 4
    return top_k * per_choice + routing


def _layer_activation_bytes(
    *,
    d: int,
    h: int,
    T: int,
    r: int,
    a: int,
    dropout: float,
    device: str,
    rotary: bool = False,
    qk_norm: bool = False,
    experts: int = 0,
    top_k: int = 2,
) -> int:
    """Bytes saved for backward per token in one block (Korthikanti et al. 2022,
    "Reducing Activation Recomputation in Large Transformer Models", sec. 4.1,
    re-derived for this block and autocast: LayerNorm runs in fp32, matmuls in `a` bytes)."""
    saved = 2 * 4 * d  # ln1 and ln2 inputs: the fp32 residual stream
    saved += 2 * 2 * 4  # their mean and rstd
    saved += 2 * a * d  # ln1 and ln2 outputs (their 16-bit casts under autocast), saved by qkv and fc
    saved += a * d  # attention output O, which is also attn.proj's input (a view, not a copy)
    saved += _mlp_bytes(d=d, r=r, a=a, experts=experts, top_k=top_k, dropout=dropout, device=device)
    fused = _attention_is_fused(device, dropout)
    if fused:
        saved += 3 * a * d  # q, k, v (views of the qkv output)
        saved += 4 * h  # fp32 logsumexp per head
    else:
        # Math path (upcast to fp32 on CPU): scaled q and k and v copies, then per
        # head a T x T softmax, and with dropout its noise and the dropped matrix.
        saved += 3 * 4 * d
        tt = 4 + ((_dropout_mask_bytes(device, 4) + 4) if dropout > 0 else 0)
        saved += tt * h * T
    saved += _qk_bytes(d=d, h=h, a=a, fused=fused, rotary=rotary, qk_norm=qk_norm)
    if dropout > 0:
        saved += d * _dropout_mask_bytes(device, a)  # the attention residual dropout
    return saved


def _activation_bytes(*, L: int, tokens: int, checkpointing: bool, **layer_kw) -> int:
    d, a = layer_kw["d"], layer_kw["a"]
    layer = _layer_activation_bytes(**layer_kw)
    # Outside the blocks: token indices (int64), the embedding dropout mask,
    # ln_f's fp32 input, stats and output (cast), which the head saves.
    outer = 8 + 4 * d + 8 + a * d
    if layer_kw["dropout"] > 0:
        outer += d * _dropout_mask_bytes(layer_kw["device"], 4)
    if checkpointing:
        # Each block keeps only its fp32 input (ln1's input, counted in `layer`);
        # backward recomputes one block at a time, whose tensors then live at once.
        per_token = L * 4 * d + (layer - 4 * d) + outer
    else:
        per_token = L * layer + outer
    return per_token * tokens


def _logits_bytes(*, a: int, tokens: int, vocab: int) -> int:
    """Peak bytes of the logits during the cross-entropy backward.

    The engine holds the head's output (`a` bytes, referenced by `logits`
    through backward) and computes F.cross_entropy(logits.float()): log_softmax
    saves its fp32 output, and its backward holds the fp32 incoming gradient
    and the fp32 gradient it produces at once: a + 4 + 4 + 4 bytes per logit
    (fp32: .float() is a no-op, 16). A separate term because a chunked or fused
    cross-entropy removes most of it: with the 13.5k-character vocabulary it is
    the largest activation term of the small model.
    """
    return (a + 12) * tokens * vocab


def hidden_matrix_params(d_model: int, n_layers: int, mlp_ratio: int = 4, moe_experts: int = 0) -> int:
    """Exactly sum(p.numel() for p in GPT(...).hidden_matrices()): per block qkv
    (3d^2) and proj (d^2), and each MLP's (every expert's) fc and proj (2 r d^2);
    not the embeddings, norms, biases or the MoE router."""
    return n_layers * (4 + 2 * mlp_ratio * max(1, moe_experts)) * d_model * d_model


def _optimizer_bytes(optimizer: str, n: int, matrices: int) -> tuple[int, int]:
    """(the optimizer's fp32 state, the parameters Muon trains): AdamW's
    exp_avg and exp_avg_sq for every parameter, or for optim=muon Muon's one
    momentum buffer for the blocks' matrices and AdamW's two moments for the
    rest. Muon's Newton-Schulz temporaries (a few copies of one matrix at a
    time) live only in the step, after backward has freed the activations,
    so they add nothing to the peak."""
    if optimizer == "muon":
        return 4 * matrices + 8 * (n - matrices), matrices
    if optimizer == "adamw":
        return 8 * n, 0
    raise ValueError(f"optimizer={optimizer!r}: expected adamw or muon")


def _check(precision: str, device: str, micro_batch: int) -> None:
    if precision not in ELEMENT_BYTES:
        raise ValueError(f"precision={precision!r}: expected one of {', '.join(ELEMENT_BYTES)}")
    if device not in ("cuda", "cpu", "mps"):
        raise ValueError(f"device={device!r}: expected cuda, cpu or mps")
    if micro_batch < 0:
        raise ValueError(f"micro_batch={micro_batch} must be >= 0")


def _runtime_bytes(device: str, grads: int, churn: int) -> int:
    """The context or runtime, and what the allocator or heap keeps beyond
    the live per-step tensors (`churn`: activations and logits)."""
    if device == "cuda":
        return CUDA_CONTEXT_BYTES + int(CUDA_FRAGMENTATION * churn)
    fixed = CPU_RUNTIME_BYTES
    if device == "cpu":  # a caching allocator (CUDA, MPS) hands the freed gradient blocks back as they were
        fixed += CPU_HEAP_GRADIENT_SETS * grads
    return fixed + int(CPU_FRAGMENTATION * churn)


def estimate_memory(
    *,
    d_model: int,
    n_heads: int,
    n_layers: int,
    context_length: int,
    vocab_size: int,
    micro_batch: int,
    precision: str,
    mlp_ratio: int = 4,
    activation_checkpointing: bool = False,
    dropout: float = 0.0,
    device: str = "cuda",
    rotary: bool = False,
    qk_norm: bool = False,
    moe_experts: int = 0,
    moe_top_k: int = 2,
    vocab_multiple: int = 1,
    ddp: bool = False,
    loss_chunk: int = 0,
    optimizer: str = "adamw",
) -> MemoryEstimate:
    """Peak training memory per device for one micro-batch of full-length sequences.

    Totals add all terms: gradients exist during every micro-batch's forward
    and backward under accumulation (at accumulation 1 they appear as backward
    frees the activations: the sum is then an upper bound); the fused AdamW
    step needs no extra buffers. `ddp`: DDP's gradient buckets beside the
    gradients. `loss_chunk`: the loss takes that many tokens' logits at a time
    (model.token_loss_sum). `optimizer`: optim.name (adamw holds the most state).
    """
    _check(precision, device, micro_batch)
    a = ELEMENT_BYTES[precision]
    switches = dict(rotary=rotary, qk_norm=qk_norm, moe_experts=moe_experts, vocab_multiple=vocab_multiple)
    n = count_params(d_model, n_heads, n_layers, context_length, vocab_size, mlp_ratio, **switches)
    tokens = micro_batch * context_length
    padded = -(-vocab_size // vocab_multiple) * vocab_multiple
    params, grads = 4 * n, 4 * n  # fp32 weights, fp32 grads
    state, muon = _optimizer_bytes(optimizer, n, hidden_matrix_params(d_model, n_layers, mlp_ratio, moe_experts))
    buckets = 4 * n if ddp else 0
    layer = dict(d=d_model, h=n_heads, T=context_length, r=mlp_ratio, a=a, dropout=dropout, device=device)
    moe = dict(rotary=rotary, qk_norm=qk_norm, experts=moe_experts, top_k=moe_top_k)
    activations = _activation_bytes(L=n_layers, tokens=tokens, checkpointing=activation_checkpointing, **layer, **moe)
    logits = _logits_bytes(a=a, tokens=min(tokens, loss_chunk) if loss_chunk else tokens, vocab=padded)
    # Autocast casts each weight per op and autograd keeps the 16-bit copy until
    # backward: every weight but the position table (embedding lookups stay fp32).
    casts = a * (n - (0 if rotary else context_length * d_model)) if a < 4 else 0
    workspace = casts + _runtime_bytes(device, grads, activations + logits)
    total = params + grads + state + buckets + activations + logits + workspace
    terms = dict(params=params, grads=grads, optimizer=state, ddp_buckets=buckets, activations=activations)
    return MemoryEstimate(**terms, logits=logits, workspace=workspace, total=total, muon_params=muon)


def fit_micro_batch(memory_bytes: int, *, headroom: float = 0.9, max_batch: int = 1024, **model_kw) -> int:
    """The largest micro-batch whose estimate fits in headroom * memory_bytes;
    0 if even 1 does not. `model_kw` are estimate_memory's other arguments."""
    budget = headroom * memory_bytes

    def fits(b: int) -> bool:
        return estimate_memory(micro_batch=b, **model_kw).total <= budget

    if not fits(1):
        return 0
    lo, hi = 1, max_batch  # invariant: fits(lo); the estimate grows with the batch
    if fits(hi):
        return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def estimate(shape: dict, micro: int, ckpt: bool) -> MemoryEstimate:
    return estimate_memory(micro_batch=max(micro, 1), activation_checkpointing=ckpt, **shape)


def fits(shape: dict, budget: int, micro: int, ckpt: bool) -> bool:
    return estimate(shape, micro, ckpt).total <= budget
