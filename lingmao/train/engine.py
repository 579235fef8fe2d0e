"""The training loop: one for every preset; it reads the Plan.

    job = prepare(cfg, plan, run_dir)       # train/job.py: corpus, batches, the checkpoint to resume, checked first
    train(cfg, plan, tracker, run_dir, job=job)

The loop, top to bottom (`Run.loop`): the next step (step.py), the NaN
policy for a step that was not finite, then at boundaries the log, an eval
(validation.py) and a checkpoint (recovery.py). A run survives
interruptions: checkpoints every `checkpoint.every_steps` / `every_minutes`
and at the end hold all an exact resume needs; SIGINT/SIGTERM finish the
step, checkpoint and stop.
"""

from __future__ import annotations

import datetime
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from lingmao.data.stream import BatchStream, Replay, loader_args
from lingmao.data.tokenizer import tokenizer_hash
from lingmao.data.windows import make_loader
from lingmao.plan import Plan
from lingmao.tracking.record import record_start
from lingmao.train import checkpoint, clock
from lingmao.train.backend import apply_night, apply_runtime
from lingmao.train.console import Progress
from lingmao.train.distributed import Dist, agree, finish, from_rank0, gather, rank_seed, start
from lingmao.train.job import Job, cfg_dict, prepare
from lingmao.train.metrics import Meter
from lingmao.train.nan_policy import NanPolicy, NonFiniteError, nonfinite_report  # noqa: F401 (NonFiniteError: the CLI's)
from lingmao.train.night import NightMode
from lingmao.train.profiling import StepProfiler
from lingmao.train.recovery import Checkpointer
from lingmao.train.signals import Stopper
from lingmao.train.step import build_step
from lingmao.train.validation import Evaluator, ValData, corpus_verse_form

wall_clock = datetime.datetime.now  # night mode reads it


def train(cfg, plan: Plan, tracker, run_dir: Path, dist: Dist | None = None, job: Job | None = None) -> dict:
    """Train per `cfg` and `plan`; returns the final metrics and `status`."""
    if job is None:
        with prepare(cfg, plan, run_dir, dist) as job:
            return train(cfg, plan, tracker, run_dir, dist, job)
    try:
        return Run(job, tracker).loop()
    finally:
        finish(job.dist)


class Run:
    """One training run's parts, built in an order that makes the initial
    weights a function of the seed alone: seed, model, optimizer, resume,
    then compile and DDP around the restored model."""

    def __init__(self, job: Job, tracker):
        cfg, plan, dist = job.cfg, job.plan, job.dist
        self.job, self.cfg, self.plan, self.dist, self.tracker = job, cfg, plan, dist, tracker
        job.run_dir.mkdir(parents=True, exist_ok=True)
        apply_runtime(plan)
        self.device = start(plan, dist)
        self.tokenizer = job.data.tokenizer()
        self.checkpointer = self._checkpointer()
        found = from_rank0(job.found, dist)  # rank 0 read it: every rank starts from the same state

        def restore(raw, optimizer, scaler) -> None:
            if dist.rank:  # the same initial weights on every rank, other dropout masks
                torch.manual_seed(rank_seed(cfg.seed, dist.rank))
            self.state = self.checkpointer.start(found, raw, optimizer, scaler, self.device, dist)

        parts = build_step(cfg, plan, job.data.vocab_size, self.device, dist, restore)
        self.raw, self.optimizer, self.scaler, self.model = parts.raw, parts.optimizer, parts.scaler, parts.model
        self.train_step = parts.step
        self.resumed, self.started_at = found is not None, self.state.step
        self.stream = self._stream()
        self.nan = NanPolicy(cfg.trainer.on_nan)
        self.night = NightMode(
            cfg.night_mode, cfg.night.start, cfg.night.end, plan.micro_batch, plan.threads, clock=wall_clock
        )
        self.meter = Meter(plan, self.raw.flops_per_token(), self.device, dist.ddp, dist.world_size)
        t = cfg.trainer
        self.progress = Progress(dist.main and t.progress, job.schedule.total_steps, self.state.step, t.max_time)
        self.say = self.progress.say
        self.evaluator = self._evaluator()
        self.budget = clock.Budget(t.max_time, eval_guess(plan, t))
        self.profiler = StepProfiler(t.profile_steps if dist.main else 0, job.run_dir, self.device, self.say)
        self.final: dict = {}
        self.val_at = -1  # step of the latest eval
        saved_val = found[1].get("val_loss") if found else None
        if saved_val is not None:  # the checkpoint's own eval: a finished run rerun adds no second one
            self.final.update({"val/loss": saved_val, "val/perplexity": math.exp(min(saved_val, 50))})
            self.val_at = self.state.step
        self.status = "FINISHED"
        self.linked = False  # the MLflow run's link was printed

    # -- the loop ---------------------------------------------------------------

    def loop(self) -> dict:
        s, t, total = self.state, self.cfg.trainer, self.job.schedule.total_steps
        self.record_start()
        start, before = time.perf_counter(), s.seconds  # a resumed run counts the time of the earlier ones
        self.budget.begin()
        if self.plan.compile and self.dist.main:
            self.say(f"compiling the training step ({self.plan.precision}): the first steps take longer")
        with Stopper(  # a first signal may abandon a long step when no finished step is left unsaved
            self.plan.est_step_seconds,
            nothing_to_lose=lambda: self.state.step in (self.started_at, self.checkpointer.saved_at),
        ) as stopper:
            while total is None or s.step < total:
                chunks = self.night_chunks(s.step)
                lr = self.job.schedule.lr(s.step, s.lr_scale, s.seconds, self.budget.reserved)
                with stopper.step():
                    stats = self.train_step.step(self.stream, lr, chunks)
                if not stats.applied:
                    self.non_finite(stats)
                    s = self.state  # a rollback replaced it
                    continue
                self.nan.good_step()
                s.step += 1
                s.seconds = before + time.perf_counter() - start
                s.epoch, s.epoch_windows = self.stream.epoch, self.stream.seen
                self.meter.add(stats)
                self.profiler.step()
                if s.step == self.started_at + 1:
                    self.tracker.start_sending()  # MLflow's imports now overlap training, not start-up
                self.progress.step()
                if s.step % t.log_every == 0 or s.step == total:
                    self.log(stats)
                out_of_time = self.budget.out(s.seconds)
                stop, out_of_time, due_by_time = agree(
                    [stopper.requested, out_of_time, self.checkpointer.due_by_time()], self.device, self.dist.ddp
                )
                # Early stopping counts the evals eval_every schedules; a checkpoint
                # brings its own eval so that best.pt compares like with like.
                scheduled = s.step % t.eval_every == 0 or s.step == total
                due = due_by_time or self.checkpointer.due(s.step)
                early_stop = self.evaluate(scheduled) if scheduled or due else False
                if due and s.step != total:  # the last step's checkpoint is written below
                    self.save()
                if stop:
                    self.status = "KILLED"
                    break
                if out_of_time or early_stop:
                    break
            # The final eval and checkpoint; a signal skips the eval to stop sooner.
            if self.status != "KILLED" and self.val_at != s.step:
                self.evaluate(scheduled=False)
            if self.checkpointer.saved_at != s.step:
                self.save()
        self.profiler.stop()
        return self.close(time.perf_counter() - start)

    # -- the steps of the loop ----------------------------------------------------

    def night_chunks(self, step: int) -> int:
        """Pieces per micro-batch now; applies night mode's threads and memory when it switches."""
        ns, changed = self.night.settings()
        # A run that starts by day has nothing to switch; one that starts at night switches at once.
        if changed and (self.night.active or step > self.started_at):
            apply_night(ns, self.plan, self.device)
            if self.dist.main:
                self.say(
                    f"night mode {'on' if self.night.active else 'off'} at step {step}: micro-batch "
                    f"{self.plan.micro_batch // ns.chunks}, threads {ns.threads}, memory x{ns.memory_fraction}"
                )
                self.tracker.log_metrics({"night_mode": float(bool(self.night.active))}, step)
        return ns.chunks

    def non_finite(self, stats) -> None:
        """trainer.on_nan for a step that was not applied: skip, roll back, or raise NonFiniteError."""
        s = self.state
        report = nonfinite_report(
            s.step + 1, stats.lr, stats.loss.item(), stats.grad_norm.item(), self.scaler, self.raw, self.optimizer
        )
        ck = self.checkpointer
        if self.nan.decide(report, ck.last_good, ck.saved_at) == "skip":
            s.skipped_steps += 1
            print(f"warning: {report}\n  trainer.on_nan=skip: step dropped", file=sys.stderr)
            return
        lr_scale = s.lr_scale * self.cfg.trainer.nan_lr_factor
        self.state = ck.rollback(self.raw, self.optimizer, self.scaler, self.device, self.dist, lr_scale)
        self.stream = self._stream()
        self.meter.drop()
        self.val_at = -1
        print(
            f"warning: {report}\n  trainer.on_nan=rollback: back to step {self.state.step} ({ck.last_good}), "
            f"LR x{lr_scale:g}",
            file=sys.stderr,
        )

    def log(self, stats) -> None:
        m = self.meter.read(stats, self.scaler, self.state.skipped_steps)
        if self.dist.main:
            self.tracker.log_metrics(m, self.state.step)
            if not self.linked and (link := self.tracker.run_link()):  # the run opens off the start-up path
                self.linked = True
                self.say(f"MLflow run: {link}")
            self.progress.metrics(m, self.state.step, self.state.seconds)
        self.final.update(m)

    def evaluate(self, scheduled: bool) -> bool:
        """Eval now; True when early stopping says stop."""
        s, began = self.state, time.perf_counter()
        self.final.update(self.evaluator.run(s.step))
        self.budget.timed(eval_seconds=time.perf_counter() - began)
        self.val_at = s.step
        early_stop = scheduled and s.count_eval(self.final["val/loss"], self.cfg.trainer.early_stop_patience)
        if early_stop and self.dist.main:
            self.say(
                f"early stop: val/loss has not improved on {s.best_val:.4f} for "
                f"{s.evals_since_best} evals (trainer.early_stop_patience)"
            )
        self.meter.restart()  # eval time is not training time
        return early_stop

    def save(self) -> None:
        s = self.state
        val = self.final.get("val/loss") if self.val_at == s.step else None
        if self.dist.main:
            self.tracker.flush(wait=True)  # the metrics up to this step survive whatever the checkpoint survives
        rngs = gather(checkpoint.rng_state(self.device), self.dist)  # each rank draws its own dropout masks
        tensors = {
            "model": checkpoint.model_state(self.raw),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rngs[0],
            **({"rng_ranks": rngs} if self.dist.ddp else {}),
        }
        began = time.perf_counter()
        self.checkpointer.save(s, tensors, val, self.tracker.run_id)
        self.budget.timed(save_seconds=time.perf_counter() - began)
        self.nan.saved()

    # -- start and end ------------------------------------------------------------

    def record_start(self) -> None:
        """What the run will train on: printed, and recorded in MLflow (tracking/record.py)."""
        if self.resumed and self.dist.main:
            self._say_resumed()
        if not self.dist.main:
            return
        job, data, ctx = self.job, self.job.data, self.cfg.model.context_length
        v = self.evaluator.val
        form = corpus_verse_form(v.tokens, v.docs, v.genres, self.tokenizer)  # what val/samples/form is read against
        # Counted over non-overlapping context-length windows.
        dup = data.duplicate_windows(ctx, shingle=min(32, ctx))
        record_start(self.tracker, self.cfg, self._facts(form, dup))
        print(
            f"corpus: {dup['windows']} blocks of {ctx} tokens, {dup['exact']} of them exact and {dup['near']} near "
            f"duplicates of earlier ones"
            + (f"; {form:.0%} of its 诗 lines have 5 or 7 characters (val/samples/form's reference)" if form else "")
        )
        total = job.schedule.total_steps
        print(
            f"model {self.raw.num_params() / 1e6:.2f}M params | vocab {data.vocab_size} | "
            f"{len(job.train_windows)} train windows | {total or '∞'} steps"
        )

    def _facts(self, form: float | None, dup: dict) -> dict:
        """What tracking/record.py records of the run's start."""
        job, data = self.job, self.job.data
        model = {"params": self.raw.num_params(), "active_params": self.raw.active_params()}
        counts = {"train_windows": len(job.train_windows), "steps_per_epoch": job.steps_per_epoch}
        return {
            "params": {
                "config": cfg_dict(self.cfg),
                "plan": self.plan.as_dict(),
                "model": {**model, "vocab_size": data.vocab_size},
                "data": {"stride": job.stride, **counts, "verse_form": form},
            },
            "step": self.state.step,
            "corpus": {"dir": str(data.dir), "meta": data.meta},
            "duplicates": dup,
            "genres": self.evaluator.genre_names,
            "resumed_from": self.checkpointer.last_good if self.resumed else None,
        }

    def _say_resumed(self) -> None:
        path, s = self.checkpointer.last_good, self.state
        print(f"resuming from {path} at step {s.step} (epoch {s.epoch}, {s.epoch_windows} windows into it)")
        saved = self.job.found[1]["schedule"]
        changed = [f"{k} {saved.get(k)} -> {v}" for k, v in asdict(self.job.schedule).items() if saved.get(k) != v]
        if changed:  # e.g. a higher trainer.max_steps to train on
            print(
                f"note: the LR schedule differs from the checkpoint's ({', '.join(changed)}); "
                f"the new one applies from step {s.step} on"
            )

    def close(self, wall: float) -> dict:
        self.progress.close()
        final, s = self.final, self.state
        final.update(self.meter.summary())
        final.update(
            {"step": s.step, "wall_seconds": wall, "tracking_seconds": self.tracker.seconds, "status": self.status}
        )
        if self.dist.main:
            if not self.linked and self.tracker.run_id and (link := self.tracker.run_link()):
                self.say(f"MLflow run: {link}")  # the run opened only now (a short run)
            self.tracker.log_artifact(self.job.run_dir / "samples.jsonl")
            self.tracker.log_metrics({"mean_samples_per_sec": final.get("samples_per_sec", 0.0)}, s.step)
            val = (
                f"val/loss {final['val/loss']:.3f} ppl {final['val/perplexity']:.1f}"
                if self.val_at == s.step
                else "no final eval"
            )
            print(
                f"{'stopped' if self.status == 'KILLED' else 'done'}: step {s.step} in {wall:.1f}s | {val} | "
                f"{final.get('samples_per_sec', 0):.1f} samples/s | "
                f"checkpoint {self.job.folder.path / 'last.pt' if self.checkpointer.last_good else None}"
            )
        return final

    # -- parts ----------------------------------------------------------------------

    def _checkpointer(self) -> Checkpointer:
        """What every checkpoint of this run stores beside its tensors and progress."""
        job, tok = self.job, self.tokenizer
        meta = {
            "schedule": asdict(job.schedule),
            "config": cfg_dict(self.cfg),
            "plan": self.plan.as_dict(),
            "tokenizer_hash": tokenizer_hash(tok),
            "tokenizer": tok.to_str(),
        }
        c = self.cfg.checkpoint
        return Checkpointer(job.folder, c.every_steps, c.every_minutes, meta, self.dist.main)

    def _evaluator(self) -> Evaluator:
        samples = self.job.run_dir / "samples.jsonl"
        args = (self.cfg, self.tokenizer, samples, self.tracker, self.say)
        return Evaluator(self.raw, self.plan, self.device, self.dist, self._val_data(), *args)

    def _stream(self) -> BatchStream | Replay:
        p, s = self.plan, self.state
        stream = BatchStream(
            self.job.train_windows,
            p.micro_batch,
            self.cfg.seed,
            self.dist.rank,
            self.dist.world_size,
            loader_args(p),
            s.epoch,
            s.epoch_windows,
        )
        n = self.cfg.trainer.overfit_batches
        return Replay(stream, n) if n else stream

    def _val_data(self) -> ValData:
        job, data = self.job, self.job.data
        loader = make_loader(
            job.val_windows,
            self.plan.micro_batch,
            shuffle=False,
            seed=self.cfg.seed,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            drop_last=False,
        )
        return ValData(
            loader,
            len(job.val_windows),
            data.tokens("val"),
            np.load(data.dir / "val_docs.npy"),
            data.meta["genres"],
            data.meta.get("val_tokens_per_char", 1.0),
        )


def eval_guess(plan: Plan, t) -> float:
    """Seconds an eval takes by the plan: its micro-batches forward only, a
    third of a training micro-batch's forward and backward."""
    if not plan.est_step_seconds:
        return 0.0
    return t.eval_batches * plan.est_step_seconds / plan.accumulation / 3
