"""The typed schema of a run: every key, its type and its default.

The defaults here are the run that `python -m lingmao.run` composes with no
arguments (model=small, optim=muon, data=poetry, hardware=auto): a test holds
conf/ equal to them, so `RunConfig()` in Python and the CLI train the same
model. The model presets state their shape and leave the switches to these
defaults; GPTConfig takes its defaults from here, and a checkpoint's config
gets the keys it lacks from here (`added_later`). The valid values of every
key are in config.RULES.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def added_later(default: Any, before: Any) -> Any:
    """A key added after checkpoints already existed. `before` is how a model
    behaved before the key existed: what a stored config that lacks the key
    means (config.fill_absent), which may differ from today's default."""
    return field(default=default, metadata={"absent": before})


@dataclass
class HardwareConfig:
    # Optional everywhere so `auto` can leave a key to the detected preset; the
    # plan checks that every key has a value once the preset is resolved.
    name: str = "auto"
    device: str | None = None
    devices: int | None = None
    memory_gb: float | None = None  # 0: the machine's RAM as detected
    peak_tflops: float | None = None  # 0: estimated from the cores
    compute_capability: float | None = None
    precision: str | None = None
    effective_batch: int | None = None  # the preset's target: samples per optimizer step, all devices
    batch: Any | None = None  # preferred (largest) micro-batch per device: int, or "auto" (the preset's)
    accumulation: int | None = None
    activation_checkpointing: bool | None = None  # false: only when nothing fits without it
    num_workers: int | None = None
    pin_memory: bool | None = None
    persistent_workers: bool | None = None
    prefetch_factor: int | None = None
    compile: Any | None = None  # true | false | auto (CUDA: on; CPU: measured, lingmao/calibrate.py)
    compile_mode: str | None = None
    tf32: bool | None = None
    cudnn_benchmark: bool | None = None
    alloc_conf: str | None = None  # PYTORCH_CUDA_ALLOC_CONF, e.g. max_split_size_mb:128
    threads: int | None = None  # 0: one per core
    ddp_backend: str | None = None
    fallback: bool = False  # run on what exists when the preset's device is absent


@dataclass
class MoEConfig:
    # experts > 0 swaps each MLP for a top-k routed mixture of experts.
    # MiniMind's defaults (4 experts, top 2, aux 0.01) but off, and the Switch
    # Transformer's capacity factor 1.25.
    experts: int = 0  # 0: a dense MLP in every block
    top_k: int = 2
    capacity_factor: float = 1.25
    aux_loss_weight: float = 0.01


@dataclass
class ModelConfig:
    # These defaults are model=small: 32.2M parameters with the 13,563-character vocabulary.
    name: str = "small"
    d_model: int = 512
    n_heads: int = 8
    n_layers: int = 8
    context_length: int = 512
    dropout: float = 0.1
    mlp_ratio: int = 4
    moe: MoEConfig = field(default_factory=MoEConfig)
    # Switches from the modded-nanoGPT speedrun line of work, added after
    # checkpoints existed; before then every model was the plain GPT-2 one.
    # Rotary positions on q and k (Su et al. 2021) instead of the learned
    # position table: suite=speedrun (small, CPU) reached the AdamW baseline's
    # val loss in 0.33x its steps.
    rotary: bool = added_later(True, before=False)
    # RMS-normalise q and k per head (Dehghani et al. 2023; Wortsman et al. 2023).
    qk_norm: bool = added_later(False, before=False)
    # gelu, or relu2: ReLU squared (So et al. 2021, Primer).
    mlp: str = added_later("gelu", before="gelu")
    # Embedding/head rows padded to a multiple of this: GPU matmuls run faster
    # on whole tiles (nanoGPT: 50257 -> 50304 rows, ~25%). On every preset, so
    # that a model is the same on all hardware: the default 13,563-character
    # vocabulary gains 5 rows, which are no token (forward slices them off).
    vocab_multiple: int = added_later(64, before=1)
    # Attention/MLP output projections start at zero: each block starts as the identity.
    zero_init_proj: bool = added_later(False, before=False)


# AdamW's peak LR per model size. tiny and small: measured here (README,
# "Batch size and learning rate": the best of an LR grid on the CPU, the same
# at effective batch 8, 16 and 32, hence lr_scaling none). medium and large:
# the from-scratch values of GPT-3's same-width models (Brown et al. 2020,
# Table 2.1: d_model 768 -> 6e-4, 1024 -> 3e-4), until a GPU measures them.
LR_BY_SIZE = {"tiny": 3e-3, "small": 1e-3, "medium": 6e-4, "large": 3e-4}


@dataclass
class OptimConfig:
    # muon: Muon for the blocks' matrices, AdamW for the rest; it beat tuned
    # AdamW at equal training time on the CPU for tiny and small (README, "Experiments").
    name: str = "muon"
    # The peak LR at base_batch (scaled to the effective batch by lr_scaling):
    # by default the model size's entry in lr_by_size.
    lr: float = "${.lr_by_size.${model.name}}"  # type: ignore[assignment]  # an interpolation until resolved
    lr_by_size: dict[str, float] = field(default_factory=lambda: dict(LR_BY_SIZE))
    base_batch: int = 32
    lr_scaling: str = "none"
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.05
    warmup: float = 0.1  # < 1: a fraction of max_steps; >= 1: a step count
    min_lr_ratio: float = 0.1  # the cosine schedule's floor, as a fraction of the peak
    grad_clip: float = 1.0  # the gradient's largest global L2 norm
    fused: bool | None = None  # None: fused kernels where the device has them
    # optim=muon only: Muon for the blocks' matrices, at its own LR (not batch-scaled);
    # 0.02 was the best of 0.01/0.02/0.05 on tiny and of 0.01/0.02 on small here
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    muon_weight_decay: float = 0.0


@dataclass
class DataConfig:
    source: str = "poetry"
    paths: list[str] = field(default_factory=list)
    text_field: str = "text"
    hf_name: str = ""
    hf_split: str = "train"
    hf_config: str | None = None
    script: str = "simplified"
    genre_caps: dict[str, int] = field(default_factory=dict)
    val_fraction: float = 0.02
    split_seed: int = 1337  # which documents are val: fixed, so a sweep over `seed` keeps one val set
    stride: int | None = None
    cache_dir: str | None = None
    on_bad_record: str = "error"
    prepared_dir: str | None = None  # data=prepared: a folder prepare() wrote, loaded as it is


@dataclass
class SampleConfig:
    """Decoding of the generation test at every eval."""

    temperature: float = 0.8  # 0: greedy
    top_k: int = 50  # 0: off
    top_p: float = 1.0  # 1.0: off
    repetition_penalty: float = 1.0  # 1.0: off; 1.2 breaks most loops
    prompts: list[str] = field(default_factory=lambda: ["床前明月光", "明月几时有", "子曰"])
    per_prompt: int = 4  # continuations of each prompt; the samples' metrics average them all
    greedy_baseline: bool = False  # also decode greedily, no penalty: val/samples/greedy_rep4 ...


@dataclass
class TrainerConfig:
    max_steps: int | None = 1000
    max_epochs: int | None = None
    max_time: float | None = None
    eval_every: int = 100
    eval_batches: int = 20
    log_every: int = 10
    sample_tokens: int = 48
    sample: SampleConfig = field(default_factory=SampleConfig)
    progress: bool = True
    on_nan: str = "stop"  # stop | skip | rollback, for a non-finite loss or gradient (fp16: the GradScaler's)
    nan_lr_factor: float = 0.5  # on_nan=rollback multiplies the LR by this
    early_stop_patience: int | None = None  # scheduled evals without a val/loss improvement; None: off
    overfit_batches: int = 0  # > 0: train on the first N batches over and over (debug=overfit)
    profile_steps: int = 0  # > 0: torch.profiler over that many steps after two warm-up ones (debug=profile)


@dataclass
class CheckpointConfig:
    dir: str = "checkpoints"
    every_steps: int | None = None
    every_minutes: float | None = 30.0
    keep_last: int = 2


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str | None = None
    experiment_name: str = "lingmao"
    run_name: str | None = None
    system_metrics: bool = True  # CPU/RAM/disk/network (and GPU with nvidia-ml-py) every 10 s
    timeout: float = 30.0  # seconds any wait on the store may last; then the spool takes the records
    tags: dict[str, str] = field(default_factory=dict)  # your own run tags: '+tracking.tags={team: poetry}'
    log_model: bool = True  # the best checkpoint's weights (no optimizer state) as an MLflow artifact and model
    register: str | None = None  # with log_model: also register that MLflow model under this name (models:/NAME/N)


@dataclass
class NightConfig:
    start: str = "21:00"
    end: str = "08:00"


@dataclass
class RunConfig:
    seed: int = 1337
    plan: bool = False
    resume: str = "auto"
    experiment: str | None = None
    night_mode: bool = False
    night: NightConfig = field(default_factory=NightConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
