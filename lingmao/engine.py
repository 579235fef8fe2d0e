"""The training loop. One loop for every preset; it reads the Plan.

Order of one optimizer step: `accumulation` micro-steps (forward under the
plan's autocast, backward of the token-summed loss over the whole effective
batch's token count), unscale, gradient norm, finiteness check, clip, step.
The LR is a pure function of the step. Losses stay on the device and are read
once per `log_every` steps.

A run survives interruptions: checkpoints (checkpoint.py) every
`checkpoint.every_steps` / `every_minutes` and at the end hold all an exact
resume needs; `resume=auto` continues from the newest one in the run
directory; SIGINT/SIGTERM finish the step, checkpoint and stop; a non-finite
loss or gradient stops the run, skips the step or rolls back
(`trainer.on_nan`).
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import json
import math
import os
import random
import resource
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import checkpoint
from .config import ConfigError
from .data import CorpusError, load_corpus
from .data.tokenizer import tokenizer_hash
from .data.windows import TokenWindows, default_stride, make_loader
from .evaluation import per_genre_loss
from .generate import complete
from .model import GPT, GPTConfig
from .optim import lr_factor, make_optimizer, set_lr, warmup_steps
from .night import NightMode, NightSettings
from .plan import Plan
from .textmetrics import mean_repetition

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
NAN_POLICIES = ("stop", "skip", "rollback")
# on_nan=skip gives up after this many non-finite steps in a row: the weights
# themselves are then broken, and skipping would spin without end.
MAX_SKIPS_IN_A_ROW = 10
# on_nan=rollback gives up after this many rollbacks with no checkpoint written in between.
MAX_ROLLBACKS = 3
AMP_ADVICE = ("Seed 000's advice for NaN under mixed precision, in this order: lower optim.lr, lower hardware.batch, "
              "raise hardware.accumulation, and only as a last resort hardware.precision=fp32.")
clock = time.monotonic  # checkpoint.every_minutes reads it; tests replace it to cross the interval
wall_clock = datetime.datetime.now  # night mode reads it; tests replace it to cross 21:00


class NonFiniteError(FloatingPointError):
    """A non-finite loss or gradient the run could not get past."""


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


@dataclass
class Progress:
    """Where a run is: what a checkpoint stores besides the tensors."""
    step: int = 0  # optimizer steps applied
    epoch: int = 0
    epoch_windows: int = 0  # windows of `epoch` trained on so far, all ranks together
    lr_scale: float = 1.0  # product of on_nan=rollback's LR cuts
    skipped_steps: int = 0  # non-finite steps dropped by on_nan=skip
    best_val: float = math.inf  # lowest val loss of a scheduled eval (early stopping)
    evals_since_best: int = 0
    best_saved_val: float = math.inf  # lowest val loss of a saved checkpoint (best.pt)

    def count_eval(self, val: float, patience: int | None) -> bool:
        """Early stopping (seed 004): True once `patience` evals in a row
        brought no improvement."""
        if val < self.best_val:
            self.best_val, self.evals_since_best = val, 0
        else:
            self.evals_since_best += 1
        return patience is not None and self.evals_since_best >= patience


def apply_runtime(plan: Plan) -> None:
    """Process-wide switches the plan decided."""
    if plan.device == "cpu" and plan.threads:
        torch.set_num_threads(plan.threads)
    if plan.device == "cuda":
        # The allocator reads PYTORCH_CUDA_ALLOC_CONF once, at its first use;
        # a value the user exported wins over the preset's.
        if plan.alloc_conf and "PYTORCH_CUDA_ALLOC_CONF" not in os.environ:
            os.environ["PYTORCH_CUDA_ALLOC_CONF"] = plan.alloc_conf
            if torch.cuda.is_initialized():  # too late for the variable alone
                torch.cuda.memory._set_allocator_settings(plan.alloc_conf)
        # The current TF32 API; the old allow_tf32 flags warn since torch 2.9.
        torch.backends.cuda.matmul.fp32_precision = "tf32" if plan.tf32 else "ieee"
        torch.backends.cudnn.conv.fp32_precision = "tf32" if plan.tf32 else "ieee"
        torch.backends.cudnn.benchmark = plan.cudnn_benchmark


def apply_night(ns: NightSettings, plan: Plan, device) -> None:
    if plan.device == "cpu":
        torch.set_num_threads(ns.threads)
    elif plan.device == "cuda":
        torch.cuda.set_per_process_memory_fraction(ns.memory_fraction, device)


def peak_memory_gb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def check_settings(cfg) -> None:
    """The keys only the engine reads; config.validate checks the rest."""
    t, every_minutes = cfg.trainer, cfg.checkpoint.every_minutes
    if t.on_nan not in NAN_POLICIES:
        raise ConfigError(f"trainer.on_nan={t.on_nan!r} is not valid; choose one of: {', '.join(NAN_POLICIES)}")
    if not 0 < t.nan_lr_factor < 1:
        raise ConfigError(f"trainer.nan_lr_factor={t.nan_lr_factor!r} must be in (0, 1)")
    if t.early_stop_patience is not None and not t.early_stop_patience > 0:
        raise ConfigError(f"trainer.early_stop_patience={t.early_stop_patience!r} must be > 0 (or null: off)")
    if every_minutes is not None and not every_minutes > 0:
        raise ConfigError(f"checkpoint.every_minutes={every_minutes!r} must be > 0 (or null: off)")


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
def evaluate(model, loader, plan: Plan, device, batches: int, dist: Dist, n_windows: int) -> float:
    """Mean per-token loss over the first `batches` val batches of every rank
    (a fixed set), summed over the ranks: the same number on every rank, and
    the one a single process with all ranks' batch would get."""
    model.eval()
    total = torch.zeros(2, device=device)  # loss sum, token count
    seen = 0
    for i, (x, y) in enumerate(loader):
        if i >= batches:
            break
        x, y = x.to(device), y.to(device)
        with autocast(plan):
            logits = model(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none").view(y.shape).sum(1)
        # Unshuffled, DistributedSampler gives rank r windows r, r + W, r + 2W, ...
        # and pads the last ones with repeats from the start: leave those out.
        index = dist.rank + (seen + torch.arange(len(y), device=device)) * dist.world_size
        real = (index < n_windows).float()
        total[0] += (loss * real).sum()
        total[1] += real.sum() * y.shape[1]
        seen += len(y)
    if dist.world_size > 1:
        torch.distributed.all_reduce(total)
    model.train()
    loss, count = total.tolist()
    return loss / max(1.0, count)


def sample(model, tokenizer, s, n_tokens: int, device, seed: int, greedy: bool = False) -> list[dict]:
    """One continuation per prompt of `s` (trainer.sample), decoded as it
    says, with its repetition metrics; `greedy`: argmax with no penalty, the
    decoding most prone to loops (seed 004's before its fixes)."""
    g = torch.Generator(device=device).manual_seed(seed)
    decoding = (dict(temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0) if greedy else
                dict(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, repetition_penalty=s.repetition_penalty))
    return [complete(model, tokenizer, prompt, 1, n_tokens, generator=g, **decoding)[0] for prompt in s.prompts]


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
        # os.write, not print: a handler may run in the middle of a print.
        os.write(2, f"\n{signal.Signals(signum).name}: stopping after this step with a checkpoint "
                    f"(again to stop at once)\n".encode())

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


class BatchStream:
    """Training batches epoch after epoch, from a position a checkpoint
    stored: (epoch, windows of it already seen, all ranks together)."""

    def __init__(self, windows: TokenWindows, micro_batch: int, seed: int, dist: Dist, loader_args: dict,
                 epoch: int = 0, seen: int = 0):
        self.windows, self.micro_batch, self.seed, self.dist, self.loader_args = (
            windows, micro_batch, seed, dist, loader_args)
        self.per_batch = micro_batch * dist.world_size
        self.epoch, self.seen = epoch, seen - seen % self.per_batch
        self._batches = None

    def __next__(self):
        while True:
            if self._batches is None:
                loader = make_loader(self.windows, self.micro_batch, shuffle=True, seed=self.seed, epoch=self.epoch,
                                     rank=self.dist.rank, world_size=self.dist.world_size, **self.loader_args)
                # A new DataLoader iterator draws a seed from torch's global RNG, the one
                # dropout uses; a resumed run makes one where the unbroken run did not.
                with torch.random.fork_rng(devices=[]):
                    batches = iter(loader)
                # The epoch's order is a pure function of (seed, epoch): dropping the
                # batches already seen restores the position exactly.
                self._batches = itertools.islice(batches, self.seen // self.per_batch, None)
            batch = next(self._batches, None)
            if batch is not None:
                self.seen += self.per_batch
                return batch
            self.epoch, self.seen, self._batches = self.epoch + 1, 0, None


def agree(flags: list, device, ddp: bool) -> list[bool]:
    """Decisions every rank takes together (one rank stopping or skipping
    alone would leave the others waiting in the next all-reduce), read with
    one host sync. Entries are bools or 0-dim device tensors."""
    if not ddp:
        return [bool(f) for f in flags]  # bool() of a device tensor is the sync
    t = torch.tensor([0.0 if torch.is_tensor(f) else float(f) for f in flags], device=device)
    for i, f in enumerate(flags):
        if torch.is_tensor(f):
            t[i] = f
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return [v > 0 for v in t.tolist()]


def nonfinite_report(step: int, lr: float, loss: float, grad_norm: float, scaler, raw, optimizer) -> str:
    """The failing step, its LR and loss scale, and the tensors (by optimizer
    parameter group) whose gradients or weights are non-finite."""
    names = {id(t): n for n, t in raw.named_parameters()}
    scale = f"{scaler.get_scale():g}" if scaler.is_enabled() else "1 (no GradScaler)"
    lines = [f"step {step}: non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'} "
             f"(loss {loss:.4g}, grad norm {grad_norm:.4g}, lr {lr:.3g}, loss scale {scale})"]
    for i, group in enumerate(optimizer.param_groups):
        bad = [f"{'weights' if not torch.isfinite(t).all() else 'grad'} of {names[id(t)]}" for t in group["params"]
               if not torch.isfinite(t).all() or (t.grad is not None and not torch.isfinite(t.grad).all())]
        if bad:
            more = f" and {len(bad) - 6} more" if len(bad) > 6 else ""
            lines.append(f"  param group {i} (weight_decay {group['weight_decay']:g}): {', '.join(bad[:6])}{more}")
    if len(lines) == 1:
        lines.append("  every gradient and weight is finite: the loss or the norm overflowed")
    return "\n".join(lines)


def restore(state: dict, raw, optimizer, scaler, device) -> Progress:
    """Load a checkpoint's tensors and RNG states; return its Progress."""
    raw.load_state_dict(state["model"])
    # The config's optimizer settings win over the checkpoint's (a resume may
    # change weight decay or betas); the moments and step counts come from it.
    settings = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    optimizer.load_state_dict(state["optimizer"])
    for group, s in zip(optimizer.param_groups, settings):
        group.update(s)
    if state["scaler"] and scaler.is_enabled():
        scaler.load_state_dict(state["scaler"])
    checkpoint.set_rng_state(state["rng"], device)
    return Progress(**state["progress"])


def resume(cfg, folder: checkpoint.Folder, tok_hash: str, schedule: dict, raw, optimizer, scaler, device,
           main: bool) -> tuple[Progress, Path | None, str | None]:
    """(progress, checkpoint path, its MLflow run id) of the checkpoint
    `cfg.resume` names, loaded into the model, optimizer, scaler and RNGs;
    a fresh Progress where there is none."""
    found = checkpoint.find_resume(cfg.resume, folder, quiet=not main)
    if found is None:
        return Progress(), None, None
    path, state = found
    checkpoint.check_compatible(state, cfg_dict(cfg), tok_hash, path)
    p = restore(state, raw, optimizer, scaler, device)
    if main:
        print(f"resuming from {path} at step {p.step} (epoch {p.epoch}, {p.epoch_windows} windows into it)")
        changed = [f"{k} {state['schedule'].get(k)} -> {v}" for k, v in schedule.items()
                   if state["schedule"].get(k) != v]
        if changed:  # e.g. a higher trainer.max_steps to train on
            print(f"note: the LR schedule differs from the checkpoint's ({', '.join(changed)}); "
                  f"the new one applies from step {p.step} on")
    return p, path, state["mlflow_run_id"]


def nan_action(policy: str, report: str, skips_in_a_row: int, rollbacks: int, last_good: Path | None,
               saved_at: int) -> str:
    """What trainer.on_nan does about a non-finite step: "skip" or
    "rollback", or raise NonFiniteError when it stops or gives up."""
    if policy == "skip" and skips_in_a_row < MAX_SKIPS_IN_A_ROW:
        return "skip"
    if policy == "rollback" and last_good and rollbacks < MAX_ROLLBACKS:
        return "rollback"
    why = {"stop": "stopped before this step changed the weights",
           "skip": f"gave up after {MAX_SKIPS_IN_A_ROW} non-finite steps in a row",
           "rollback": f"gave up after {MAX_ROLLBACKS} rollbacks" if last_good else "nothing to roll back to"}[policy]
    where = (f"the last checkpoint, {last_good}, holds step {saved_at}" if last_good else
             "no checkpoint was written yet (see checkpoint.every_steps / every_minutes)")
    raise NonFiniteError(f"{report}\ntrainer.on_nan={policy}: {why}; {where}. {AMP_ADVICE}")


def train(cfg, plan: Plan, tracker, run_dir: Path, dist: Dist | None = None) -> dict:
    """Train per `cfg` and `plan`; returns the final metrics."""
    dist = dist or Dist.from_env()
    check_settings(cfg)
    apply_runtime(plan)
    seed_everything(cfg.seed)
    device = torch.device(plan.device, dist.local_rank) if plan.device == "cuda" else torch.device(plan.device)
    ddp = dist.world_size > 1
    if ddp:
        torch.distributed.init_process_group(plan.ddp_backend, rank=dist.rank, world_size=dist.world_size)
    kill_at_step = int(os.environ.get("LINGMAO_TEST_KILL_AT_STEP", 0))  # test hook: SIGKILL after this checkpoint

    data = load_corpus(cfg.data, cfg.seed, progress=dist.main and cfg.trainer.progress)
    tokenizer = data.tokenizer()
    tok_hash = tokenizer_hash(tokenizer)
    tok_json = tokenizer.to_str()  # a checkpoint carries its vocabulary: generation needs nothing else
    if dist.main and data.meta.get("skipped_records"):
        print(f"warning: the corpus skipped {data.meta['skipped_records']} empty or bad record(s) "
              f"(data.on_bad_record={cfg.data.on_bad_record})", file=sys.stderr)
    ctx = cfg.model.context_length
    stride = default_stride(cfg.data.stride, ctx)
    train_windows = TokenWindows(data.tokens("train"), ctx, stride)
    val_windows = TokenWindows(data.tokens("val"), ctx, ctx)
    loader_args = dict(num_workers=plan.num_workers, pin_memory=plan.pin_memory,
                       persistent_workers=plan.persistent_workers, prefetch_factor=plan.prefetch_factor)
    val_loader = make_loader(val_windows, plan.micro_batch, shuffle=False, seed=cfg.seed,
                             rank=dist.rank, world_size=dist.world_size, drop_last=False)

    raw = GPT(GPTConfig.from_model_config(cfg.model, data.vocab_size)).to(device)
    model = torch.compile(raw, mode=plan.compile_mode) if plan.compile else raw
    if ddp:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.index is not None else None)
    o = cfg.optim
    optimizer = make_optimizer(raw, o, plan)
    scaler = torch.amp.GradScaler(plan.device, enabled=plan.grad_scaler)

    steps_per_epoch = len(train_windows) // (plan.micro_batch * dist.world_size * plan.accumulation)
    if steps_per_epoch < 1:
        raise CorpusError(f"the training split has {len(train_windows)} windows, fewer than one effective batch "
                         f"({plan.effective_batch}); lower hardware.batch / hardware.accumulation or add data")
    limits = [n for n in (cfg.trainer.max_steps,
                          cfg.trainer.max_epochs and cfg.trainer.max_epochs * steps_per_epoch) if n]
    total_steps = min(limits) if limits else None
    warmup = warmup_steps(o.warmup, total_steps or 0) if o.warmup < 1 else int(o.warmup)
    warmup = max(1, warmup)
    schedule = {"peak_lr": plan.lr, "warmup": warmup, "total_steps": total_steps, "min_lr_ratio": o.min_lr_ratio}
    n_params = raw.num_params()
    flops_per_tok = raw.flops_per_token()
    night = NightMode(cfg.night_mode, cfg.night.start, cfg.night.end, plan.micro_batch, plan.threads, clock=wall_clock)

    # Resume: weights, optimizer, scaler and RNGs from the checkpoint; the data
    # stream from its position; the LR from its step on this run's schedule.
    folder = checkpoint.Folder(run_dir / cfg.checkpoint.dir, cfg.checkpoint.keep_last)
    p, last_good, run_id_saved = resume(cfg, folder, tok_hash, schedule, raw, optimizer, scaler, device, dist.main)
    resumed = last_good is not None

    if dist.main:
        if not (resumed and run_id_saved == tracker.run_id):  # a resumed run already has its params
            tracker.log_params({"config": cfg_dict(cfg), "plan": plan.as_dict(),
                                "model": {"params": n_params, "active_params": raw.active_params(),
                                          "vocab_size": data.vocab_size},
                                "data": {"stride": stride, "train_windows": len(train_windows),
                                         "steps_per_epoch": steps_per_epoch}})
        if resumed:
            tracker.set_tags({"resumed_from": str(last_good), "resumed_at_step": p.step})
        tracker.log_dict(plan.as_dict(), "plan.json")
        tracker.log_dict(data.meta, "corpus.json")
        tracker.log_artifact(data.dir / "tokenizer.json")
        # Seed 004: a corpus that repeats itself teaches a model to repeat.
        dup = data.duplicate_windows(ctx, shingle=min(32, ctx))
        tracker.log_metrics({f"data/{k}": v for k, v in dup.items()}, p.step)
        print(f"corpus: {dup['exact']} exact and {dup['near']} near-duplicate windows of {dup['windows']}")
        print(f"model {n_params / 1e6:.2f}M params | vocab {data.vocab_size} | "
              f"{len(train_windows)} train windows | {total_steps or '∞'} steps")

    stream = BatchStream(train_windows, plan.micro_batch, cfg.seed, dist, loader_args, p.epoch, p.epoch_windows)
    run_dir.mkdir(parents=True, exist_ok=True)
    val_docs = np.load(data.dir / "val_docs.npy")
    samples_file = run_dir / "samples.jsonl"  # appended as samples come, so a resumed run keeps the earlier ones
    final: dict = {}
    loss_acc = torch.zeros((), device=device)
    steps_in_block = 0
    first_block = True  # holds start-up (and compilation): not timed
    timed_seconds, timed_steps = 0.0, 0
    start = time.perf_counter()
    bar = None
    if dist.main and cfg.trainer.progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=total_steps, initial=p.step, desc="train", dynamic_ncols=True, mininterval=1.0)

    # Per-genre loss costs about what the main eval does: eval_batches
    # micro-batches of documents, shared among the genres.
    genre_docs = max(16, cfg.trainer.eval_batches * plan.micro_batch // max(1, len(data.meta["genres"])))

    def run_eval() -> dict:
        val = evaluate(raw, val_loader, plan, device, cfg.trainer.eval_batches, dist, len(val_windows))
        m = {"val/loss": val, "val/perplexity": math.exp(min(val, 50)),
             "val/bpc": val / math.log(2) * data.meta.get("val_tokens_per_char", 1.0)}
        if dist.main:
            with autocast(plan):
                genres = per_genre_loss(raw, data.tokens("val"), val_docs, data.meta["genres"], ctx, device=device,
                                        batch_size=plan.micro_batch, max_docs_per_genre=genre_docs)
            m.update({f"val/loss_{g}": r["loss"] for g, r in genres.items()})
            decodings = ["sampled", "greedy"] if cfg.trainer.sample.greedy_baseline else ["sampled"]
            samples = []
            for decoding in decodings:
                out = sample(raw, tokenizer, cfg.trainer.sample, cfg.trainer.sample_tokens, device, cfg.seed,
                             greedy=decoding == "greedy")
                prefix = "samples/" if decoding == "sampled" else "samples/greedy_"
                m.update({prefix + k: v for k, v in mean_repetition([s["text"] for s in out]).items()})
                m[prefix + "new_tokens"] = sum(s["new_tokens"] for s in out) / len(out)  # <eos> ends a sample early
                samples += [{"decoding": decoding, **s} for s in out]
            with open(samples_file, "a", encoding="utf-8") as f:
                f.writelines(json.dumps({"step": p.step, **s}, ensure_ascii=False) + "\n" for s in samples)
            first = samples[0]["prompt"] + samples[0]["text"]
            greedy = f" (greedy {m['samples/greedy_rep4']:.2f})" if "samples/greedy_rep4" in m else ""
            (bar.write if bar else print)(f"step {p.step}: val/loss {val:.3f} ppl {m['val/perplexity']:.1f} "
                                          f"bpc {m['val/bpc']:.3f} rep4 {m['samples/rep4']:.2f}{greedy} | {first!r}")
            tracker.log_metrics(m, p.step)
            tracker.flush()
        return m

    saved_at = p.step if resumed else -1
    val_at = -1  # step of the latest eval
    last_save_time = clock()
    skips_in_a_row = rollbacks = 0

    def save() -> None:
        """Checkpoint the state after step p.step (rank 0 writes)."""
        nonlocal saved_at, last_good, last_save_time, rollbacks
        val = final.get("val/loss") if val_at == p.step else None
        best = val is not None and val < p.best_saved_val
        if best:
            p.best_saved_val = val
        path = folder.path / f"step{p.step:08d}.pt"
        if dist.main:
            tracker.flush(wait=True)  # the metrics up to this step survive whatever the checkpoint survives
            path = folder.write({
                "format": checkpoint.FORMAT, "model": checkpoint.model_state(raw), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(), "schedule": schedule, "progress": asdict(p),
                "rng": checkpoint.rng_state(device), "val_loss": val, "config": cfg_dict(cfg), "plan": plan.as_dict(),
                "tokenizer_hash": tok_hash, "tokenizer": tok_json, "mlflow_run_id": tracker.run_id or ""},
                p.step, best)
        saved_at, last_good, last_save_time, rollbacks = p.step, path, clock(), 0
        if p.step == kill_at_step:
            os.kill(os.getpid(), signal.SIGKILL)

    status = "FINISHED"
    with Stopper() as stopper:
        t_block = time.perf_counter()
        while total_steps is None or p.step < total_steps:
            lr = plan.lr * p.lr_scale * lr_factor(p.step, warmup, total_steps or 10**12, o.min_lr_ratio)
            set_lr(optimizer, lr)
            step_loss = torch.zeros((), device=device)
            ns, changed = night.settings()
            if changed and p.step:
                apply_night(ns, plan, device)
                if dist.main:
                    print(f"night mode {'on' if night.active else 'off'} at step {p.step}: micro-batch "
                          f"{plan.micro_batch // ns.chunks}, threads {ns.threads}, memory x{ns.memory_fraction}")
                    tracker.log_metrics({"night_mode": float(bool(night.active))}, p.step)
            for micro in range(plan.accumulation):
                x, y = next(stream)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                # Night mode halves the micro-batch by splitting it: same data, same
                # effective batch, same normalisation, so the maths does not change.
                for piece, (xc, yc) in enumerate(zip(x.chunk(ns.chunks), y.chunk(ns.chunks))):
                    last = micro == plan.accumulation - 1 and piece == ns.chunks - 1
                    sync = contextlib.nullcontext() if not ddp or last else model.no_sync()
                    with sync:
                        with autocast(plan):
                            logits = model(xc)
                        # Token-summed loss over the whole effective batch's tokens, so
                        # every token weighs the same under accumulation (seed 002 did not).
                        ce = F.cross_entropy(logits.float().flatten(0, 1), yc.flatten(), reduction="sum")
                        ce = ce / (y.numel() * plan.accumulation)
                        moe = raw.moe_stats()
                        # Switch Transformer load balancing, spread over micro-steps like the loss
                        loss = ce + cfg.model.moe.aux_loss_weight * moe["aux_loss"] / plan.accumulation if moe else ce
                        scaler.scale(loss).backward()
                    step_loss += ce.detach()
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.get_total_norm([t.grad for t in raw.parameters() if t.grad is not None])

            # One host sync per optimizer step (~20 us on CPU; on a GPU one drain of
            # the launch queue): a non-finite step must be caught before it touches
            # the weights, to skip it or roll back. fp16: the GradScaler skips such
            # steps itself, by design.
            nonfinite = False if plan.grad_scaler else ~(torch.isfinite(step_loss) & torch.isfinite(grad_norm))
            out_of_time = bool(cfg.trainer.max_time) and time.perf_counter() - start >= cfg.trainer.max_time
            minutes = cfg.checkpoint.every_minutes
            due_by_time = bool(minutes) and clock() - last_save_time >= minutes * 60
            nonfinite, stop, out_of_time, due_by_time = agree(
                [nonfinite, stopper.requested, out_of_time, due_by_time], device, ddp)

            if nonfinite:
                report = nonfinite_report(p.step + 1, lr, step_loss.item(), grad_norm.item(), scaler, raw, optimizer)
                optimizer.zero_grad(set_to_none=True)
                if nan_action(cfg.trainer.on_nan, report, skips_in_a_row, rollbacks, last_good, saved_at) == "skip":
                    skips_in_a_row += 1
                    p.skipped_steps += 1
                    print(f"warning: {report}\n  trainer.on_nan=skip: step dropped", file=sys.stderr)
                    continue
                lr_scale = p.lr_scale * cfg.trainer.nan_lr_factor  # rollback
                p = restore(checkpoint.load(last_good), raw, optimizer, scaler, device)
                p.lr_scale = lr_scale
                rollbacks += 1
                stream = BatchStream(train_windows, plan.micro_batch, cfg.seed, dist, loader_args,
                                     p.epoch, p.epoch_windows)
                loss_acc.zero_()
                steps_in_block, val_at = 0, -1
                print(f"warning: {report}\n  trainer.on_nan=rollback: back to step {p.step} ({last_good}), "
                      f"LR x{lr_scale:g}", file=sys.stderr)
                continue

            skips_in_a_row = 0
            torch.nn.utils.clip_grads_with_norm_(raw.parameters(), o.grad_clip, grad_norm)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            p.step += 1
            p.epoch, p.epoch_windows = stream.epoch, stream.seen
            loss_acc += step_loss
            if first_block and steps_in_block == 0:
                tracker.start_sending()  # MLflow's imports now overlap training, not start-up
            steps_in_block += 1
            if bar:
                bar.update(1)

            if p.step % cfg.trainer.log_every == 0 or p.step == total_steps:
                if ddp:  # each rank holds the loss of its share of the batch
                    torch.distributed.all_reduce(loss_acc)
                    loss_acc /= dist.world_size
                train_loss = loss_acc.item() / steps_in_block  # one host sync per log interval
                elapsed = time.perf_counter() - t_block
                if not first_block:
                    timed_seconds += elapsed
                    timed_steps += steps_in_block
                first_block = False
                sps = steps_in_block * plan.effective_batch / elapsed
                m = {"train/loss": train_loss, "lr": lr, "grad_norm": float(grad_norm),
                     "throughput/samples_per_sec": sps, "throughput/tokens_per_sec": sps * ctx,
                     # model FLOPs utilisation over the plan's peak (PaLM appendix B)
                     "mfu": sps * ctx * flops_per_tok / (plan.peak_tflops * 1e12),
                     "memory/peak_gb": peak_memory_gb(device)}
                if plan.grad_scaler:
                    m["loss_scale"] = scaler.get_scale()
                if p.skipped_steps:
                    m["train/skipped_steps"] = p.skipped_steps
                moe = raw.moe_stats()  # of the step's last micro-batch
                if moe:
                    m.update({"moe/aux_loss": moe["aux_loss"].item(), "moe/drop_rate": moe["drop_rate"].item(),
                              **{f"moe/load_{i}": v for i, v in enumerate(moe["load"].tolist())}})
                if dist.main:
                    tracker.log_metrics(m, p.step)
                    if bar:
                        bar.set_postfix(loss=f"{train_loss:.3f}", lr=f"{lr:.2e}", sps=f"{sps:.1f}", refresh=False)
                final.update(m)
                loss_acc.zero_()
                steps_in_block = 0
                t_block = time.perf_counter()

            # Early stopping (seed 004) counts the evals eval_every schedules; a
            # checkpoint brings its own eval so that best.pt compares like with like.
            scheduled_eval = p.step % cfg.trainer.eval_every == 0 or p.step == total_steps
            due = due_by_time or (bool(cfg.checkpoint.every_steps) and p.step % cfg.checkpoint.every_steps == 0)
            early_stop = False
            if scheduled_eval or due:
                final.update(run_eval())
                val_at = p.step
                early_stop = scheduled_eval and p.count_eval(final["val/loss"], cfg.trainer.early_stop_patience)
                if early_stop and dist.main:
                    print(f"early stop: val/loss has not improved on {p.best_val:.4f} for "
                          f"{p.evals_since_best} evals (trainer.early_stop_patience)")
                t_block = time.perf_counter()  # eval time is not training time
            if due and p.step != total_steps:  # the last step's checkpoint is written below
                save()
            if stop:
                status = "KILLED"
                break
            if out_of_time or early_stop:
                break

        # The final eval and checkpoint; a signal skips the eval to stop sooner.
        if status != "KILLED" and val_at != p.step:
            final.update(run_eval())
            val_at = p.step
        if saved_at != p.step:
            save()
    if bar:
        bar.close()
    wall = time.perf_counter() - start
    if timed_steps:
        final["throughput/samples_per_sec"] = timed_steps * plan.effective_batch / timed_seconds
        final["throughput/tokens_per_sec"] = final["throughput/samples_per_sec"] * ctx
    final.update({"step": p.step, "wall_seconds": wall, "tracking_seconds": tracker.seconds})
    if dist.main:
        tracker.log_artifact(samples_file)
        tracker.log_metrics({"summary/samples_per_sec": final.get("throughput/samples_per_sec", 0.0)}, p.step)
        val = (f"val/loss {final['val/loss']:.3f} ppl {final['val/perplexity']:.1f}" if val_at == p.step
               else "no final eval")
        print(f"{'stopped' if status == 'KILLED' else 'done'}: step {p.step} in {wall:.1f}s | {val} | "
              f"{final.get('throughput/samples_per_sec', 0):.1f} samples/s | checkpoint {last_good}")
    if ddp:
        # Leave together: a rank that tears its process group down while
        # rank 0 still saves and sends can abort in gloo at exit.
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    final["status"] = status
    return final


def cfg_dict(cfg) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
