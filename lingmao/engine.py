"""The training loop. One loop for every preset; it reads the Plan.

Order of one optimizer step: `accumulation` micro-steps (forward under the
plan's autocast, backward of the token-summed loss over the whole effective
batch's token count), unscale, clip, step, schedule. Losses stay on the device
and are read once per `log_every` steps: no host sync per micro-step.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import checkpoint
from .data import load_corpus
from .data.windows import TokenWindows, make_loader
from .model import GPT, GPTConfig
from .optim import build_optimizer, lr_factor, warmup_steps
from .plan import Plan

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @staticmethod
    def from_env() -> "Dist":
        return Dist(int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
                    int(os.environ.get("WORLD_SIZE", 1)))


def apply_runtime(plan: Plan) -> None:
    """Process-wide switches the plan decided."""
    if plan.device == "cpu" and plan.threads:
        torch.set_num_threads(plan.threads)
    if plan.device == "cuda":
        # The current TF32 API; the old allow_tf32 flags warn since torch 2.9.
        torch.backends.cuda.matmul.fp32_precision = "tf32" if plan.tf32 else "ieee"
        torch.backends.cudnn.conv.fp32_precision = "tf32" if plan.tf32 else "ieee"
        torch.backends.cudnn.benchmark = plan.cudnn_benchmark


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def autocast(plan: Plan):
    dtype = DTYPES[plan.precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=plan.device, dtype=dtype)


@torch.no_grad()
def evaluate(model, loader, plan: Plan, device, batches: int) -> float:
    """Mean per-token loss over the first `batches` val batches (a fixed set)."""
    model.eval()
    total, count = torch.zeros((), device=device), 0
    for i, (x, y) in enumerate(loader):
        if i >= batches:
            break
        x, y = x.to(device), y.to(device)
        with autocast(plan):
            logits = model(x)
        total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum")
        count += y.numel()
    model.train()
    return total.item() / max(1, count)


def sample(model, tokenizer, prompt: str, n_tokens: int, device, seed: int) -> str:
    ids = tokenizer.encode(prompt).ids
    g = torch.Generator(device=device).manual_seed(seed)
    out = model.generate(torch.tensor([ids], device=device), n_tokens, temperature=0.8, top_k=50, generator=g)
    model.train()
    return tokenizer.decode(out[0].tolist())


class Stopper:
    """SIGINT/SIGTERM: finish the current step, checkpoint, stop. A second
    signal exits at once."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def train(cfg, plan: Plan, tracker, run_dir: Path, dist: Dist | None = None) -> dict:
    """Train per `cfg` and `plan`; returns the final metrics."""
    dist = dist or Dist.from_env()
    apply_runtime(plan)
    seed_everything(cfg.seed)
    device = torch.device(plan.device, dist.local_rank) if plan.device == "cuda" else torch.device(plan.device)
    ddp = dist.world_size > 1
    if ddp:
        torch.distributed.init_process_group(plan.ddp_backend, rank=dist.rank, world_size=dist.world_size)

    data = load_corpus(cfg.data, cfg.seed, progress=dist.main and cfg.trainer.progress)
    tokenizer = data.tokenizer()
    ctx = cfg.model.context_length
    stride = cfg.data.stride or max(1, ctx // 2)
    train_windows = TokenWindows(data.tokens("train"), ctx, stride)
    val_windows = TokenWindows(data.tokens("val"), ctx, ctx)
    loader_args = dict(num_workers=plan.num_workers, pin_memory=plan.pin_memory,
                       persistent_workers=plan.persistent_workers, prefetch_factor=plan.prefetch_factor)
    val_loader = make_loader(val_windows, plan.micro_batch, shuffle=False, seed=cfg.seed,
                             rank=dist.rank, world_size=dist.world_size, drop_last=False)

    mc = cfg.model
    raw = GPT(GPTConfig(vocab_size=data.vocab_size, d_model=mc.d_model, n_heads=mc.n_heads, n_layers=mc.n_layers,
                        context_length=ctx, dropout=mc.dropout, mlp_ratio=mc.mlp_ratio)).to(device)
    model = torch.compile(raw, mode=plan.compile_mode) if plan.compile else raw
    if ddp:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.index is not None else None)
    o = cfg.optim
    optimizer = build_optimizer(raw, plan.lr, o.betas, o.eps, o.weight_decay, plan.fused_optimizer)
    scaler = torch.amp.GradScaler(plan.device, enabled=plan.grad_scaler)

    steps_per_epoch = len(train_windows) // (plan.micro_batch * dist.world_size * plan.accumulation)
    if steps_per_epoch < 1:
        raise ValueError(f"the training split has {len(train_windows)} windows, fewer than one effective batch "
                         f"({plan.effective_batch}); lower hardware.batch / hardware.accumulation or add data")
    limits = [n for n in (cfg.trainer.max_steps,
                          cfg.trainer.max_epochs and cfg.trainer.max_epochs * steps_per_epoch) if n]
    total_steps = min(limits) if limits else None
    warmup = warmup_steps(o.warmup, total_steps or 0) if o.warmup < 1 else int(o.warmup)
    warmup = max(1, warmup)
    n_params = raw.num_params()
    tokens_per_step = plan.effective_batch * ctx

    if dist.main:
        tracker.log_params({"config": cfg_dict(cfg), "plan": plan.as_dict(),
                            "model": {"params": n_params, "vocab_size": data.vocab_size},
                            "data": {"stride": stride, "train_windows": len(train_windows),
                                     "steps_per_epoch": steps_per_epoch}})
        tracker.log_dict(plan.as_dict(), "plan.json")
        tracker.log_dict(data.meta, "corpus.json")
        tracker.log_artifact(data.dir / "tokenizer.json")
        print(f"model {n_params / 1e6:.2f}M params | vocab {data.vocab_size} | "
              f"{len(train_windows)} train windows | {total_steps or '∞'} steps")

    def batches():
        epoch = 0
        while True:
            loader = make_loader(train_windows, plan.micro_batch, shuffle=True, seed=cfg.seed, epoch=epoch,
                                 rank=dist.rank, world_size=dist.world_size, **loader_args)
            yield from loader
            epoch += 1

    stream = batches()
    samples: list[dict] = []
    final: dict = {}
    step = 0
    loss_acc = torch.zeros((), device=device)
    timed_seconds, timed_steps = 0.0, 0
    start = time.perf_counter()
    bar = None
    if dist.main and cfg.trainer.progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=total_steps, desc="train", dynamic_ncols=True, mininterval=1.0)

    def run_eval() -> dict:
        val = evaluate(raw, val_loader, plan, device, cfg.trainer.eval_batches)
        m = {"val/loss": val, "val/perplexity": math.exp(min(val, 50)),
             "val/bpc": val / math.log(2) * data.meta.get("val_tokens_per_char", 1.0)}
        if dist.main:
            text = sample(raw, tokenizer, cfg.trainer.sample_prompt, cfg.trainer.sample_tokens, device, cfg.seed)
            samples.append({"step": step, "prompt": cfg.trainer.sample_prompt, "text": text})
            msg = (f"step {step}: val/loss {val:.3f} ppl {m['val/perplexity']:.1f} bpc {m['val/bpc']:.3f} | "
                   f"{text!r}")
            (bar.write if bar else print)(msg)
        if dist.main:
            tracker.log_metrics(m, step)
            tracker.flush()
        return m

    status = "FINISHED"
    last_eval = -1
    with Stopper() as stopper:
        t_block = time.perf_counter()
        steps_in_block = 0
        while True:
            if total_steps is not None and step >= total_steps:
                break
            if cfg.trainer.max_time and time.perf_counter() - start >= cfg.trainer.max_time:
                break
            if stopper.requested:
                status = "KILLED"
                break
            lr = plan.lr * lr_factor(step, warmup, total_steps or 10**12, o.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            for micro in range(plan.accumulation):
                x, y = next(stream)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                sync = contextlib.nullcontext() if not ddp or micro == plan.accumulation - 1 else model.no_sync()
                with sync:
                    with autocast(plan):
                        logits = model(x)
                    # Token-summed loss over the whole effective batch's tokens, so
                    # every token weighs the same under accumulation (seed 002 did not).
                    loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum")
                    loss = loss / (y.numel() * plan.accumulation)
                    scaler.scale(loss).backward()
                loss_acc += loss.detach()
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), o.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            steps_in_block += 1
            if bar:
                bar.update(1)

            if step % cfg.trainer.log_every == 0 or step == total_steps:
                train_loss = loss_acc.item() / steps_in_block  # one host sync per log interval
                elapsed = time.perf_counter() - t_block
                if step > steps_in_block:  # the first block holds start-up and compile: not timed
                    timed_seconds += elapsed
                    timed_steps += steps_in_block
                sps = steps_in_block * plan.effective_batch / elapsed
                m = {"train/loss": train_loss, "lr": lr, "grad_norm": float(grad_norm),
                     "throughput/samples_per_sec": sps, "throughput/tokens_per_sec": sps * ctx}
                if plan.grad_scaler:
                    m["loss_scale"] = scaler.get_scale()
                if not math.isfinite(train_loss):
                    raise FloatingPointError(
                        f"step {step}: loss is {train_loss} (lr {lr:.3g}). Seed 000's advice for NaN under mixed "
                        f"precision: lower optim.lr, lower hardware.batch, raise hardware.accumulation, "
                        f"or as a last resort hardware.precision=fp32")
                if dist.main:
                    tracker.log_metrics(m, step)
                    if bar:
                        bar.set_postfix(loss=f"{train_loss:.3f}", lr=f"{lr:.2e}", sps=f"{sps:.1f}", refresh=False)
                final.update(m)
                loss_acc.zero_()
                steps_in_block = 0
                if step % cfg.trainer.eval_every == 0 or step == total_steps:
                    final.update(run_eval())
                    last_eval = step
                t_block = time.perf_counter()  # eval time is not training time

            if cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0 and dist.main:
                save_checkpoint(run_dir, cfg, raw, optimizer, scaler, step, tracker.run_id, data)

    if last_eval != step:  # stopped by time or signal between evals
        final.update(run_eval())
    if bar:
        bar.close()
    wall = time.perf_counter() - start
    if timed_steps:
        final["throughput/samples_per_sec"] = timed_steps * plan.effective_batch / timed_seconds
        final["throughput/tokens_per_sec"] = final["throughput/samples_per_sec"] * ctx
    final.update({"step": step, "wall_seconds": wall, "tracking_seconds": tracker.seconds})
    if dist.main:
        path = save_checkpoint(run_dir, cfg, raw, optimizer, scaler, step, tracker.run_id, data, name="last.pt")
        (run_dir / "samples.jsonl").write_text("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))
        tracker.log_artifact(run_dir / "samples.jsonl")
        tracker.log_metrics({"summary/samples_per_sec": final.get("throughput/samples_per_sec", 0.0)}, step)
        print(f"done: {step} steps in {wall:.1f}s | val/loss {final['val/loss']:.3f} "
              f"ppl {final['val/perplexity']:.1f} | {final.get('throughput/samples_per_sec', 0):.1f} samples/s "
              f"| checkpoint {path}")
    if ddp:
        torch.distributed.destroy_process_group()
    final["status"] = status
    return final


def cfg_dict(cfg) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)


def save_checkpoint(run_dir: Path, cfg, raw, optimizer, scaler, step: int, run_id, data, name: str | None = None) -> Path:
    from .data.tokenizer import tokenizer_hash

    state = {"model": checkpoint.model_state(raw), "optimizer": optimizer.state_dict(),
             "scaler": scaler.state_dict(), "step": step, "config": json.dumps(cfg_dict(cfg), ensure_ascii=False),
             "tokenizer_hash": tokenizer_hash(data.tokenizer()), "mlflow_run_id": run_id or ""}
    folder = run_dir / cfg.checkpoint.dir
    return checkpoint.save(state, folder / (name or f"step{step:08d}.pt"))
