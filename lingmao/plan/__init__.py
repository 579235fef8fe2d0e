"""The plan: what a run will do on this hardware, decided before any work.

`make.make_plan(cfg, machine)` is a pure function to a `Plan`; the engine
reads the Plan, never the raw hardware preset, and `plan=true` prints it
(`summary.render`) for any preset on any machine, a CUDA preset on a
CPU-only laptop too: nothing in this package touches a GPU or the data.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class Plan:
    preset: str
    model: str  # model.name
    preset_reason: str
    device: str
    device_name: str  # the detected GPU's name; "" when none was detected
    devices: int
    world_size: int
    ddp_backend: str
    precision: str  # bf16 | fp16 | fp32
    precision_reason: str
    grad_scaler: bool
    tf32: bool
    cudnn_benchmark: bool
    alloc_conf: str
    compile: bool
    compile_mode: str
    threads: int
    num_workers: int
    pin_memory: bool
    persistent_workers: bool
    prefetch_factor: int | None
    micro_batch: int
    accumulation: int
    effective_batch: int
    target_effective_batch: int  # the preset's (or hardware.effective_batch's) target
    batch_reason: str
    activation_checkpointing: bool  # the model recomputes each block's activations in backward
    context_length: int
    lr_scaling: str
    base_lr: float
    base_batch: int
    lr: float
    lr_source: str  # where base_lr came from: optim.lr, or optim.lr_by_size.<model> by default
    muon_lr: float | None  # optim=muon: Muon's LR for the blocks' matrices, not batch-scaled; None: AdamW alone
    fused_optimizer: bool
    params: int
    memory_gb: float  # per device: the detected GPU's, the preset's, or the machine's RAM on CPU
    estimate_gb: float  # training memory per device as planned (checkpointing included when on), ± margin
    estimate_parts_gb: dict  # the estimate's terms (params, grads, ..., logits), GiB
    estimate_checkpointed_gb: float | None  # with activation checkpointing; only where it was considered
    estimate_margin: float
    headroom_gb: float
    fits: bool
    refusal: str  # why it does not fit and what would; "" when it fits
    vocab_assumed: int
    peak_tflops_per_device: float | None  # datasheet peak of ONE device at the plan's precision; None: unknown
    peak_source: str
    assumed_mfu: float | None  # of the peak, for the time estimates; None: the time was measured (CPU calibration)
    est_step_seconds: float | None
    est_run_seconds: float | None  # trainer.max_steps steps; None without max_steps or a peak
    est_tokens_per_sec: float | None
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    loss_chunk: int = 0  # tokens of logits at a time in the training loss (0: the whole micro-batch)
    muon_ns_dtype: str | None = None  # optim=muon: Newton-Schulz's dtype, by the GPU's capability; None: AdamW alone
    muon_params: int = 0  # parameters Muon trains (the blocks' matrices); AdamW trains the rest

    cpu_candidates: list = field(default_factory=list)  # (precision, compile) pairs a CPU calibration times

    def as_dict(self) -> dict:
        return asdict(self)


def exit_status(plan: Plan) -> int:
    """The process exit status for `plan=true`: 0 when the plan fits, 3 when it does not."""
    return 0 if plan.fits else 3
