"""What a run prints: a copy of it in the run folder (run.log), and a
progress bar only where a person watches a terminal; piped to a file the
output is plain lines."""

from __future__ import annotations

import sys
from pathlib import Path

from lingmao.plan.summary import duration, lr_rule


def interactive() -> bool:
    return sys.stderr.isatty()


class _Tee:
    """A stream that also appends what it is given to a file, leaving out
    progress-bar frames (text with a carriage return)."""

    def __init__(self, stream, log):
        self.stream, self.log = stream, log

    def write(self, text: str) -> int:
        if "\r" not in text:
            self.log.write(text)
            self.log.flush()
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name):
        return getattr(self.stream, name)


class RunLog:
    """`with RunLog(run_dir):` copies stdout and stderr into run_dir/run.log
    (appended: a resumed run adds to it)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / "run.log"

    def __enter__(self) -> RunLog:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.path, "a", encoding="utf-8")
        self._old = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Tee(sys.stdout, self._log), _Tee(sys.stderr, self._log)
        return self

    def __exit__(self, *exc) -> None:
        sys.stdout, sys.stderr = self._old
        self._log.close()


class Progress:
    """Where a run is, shown as it trains: a tqdm bar where a person watches
    a terminal, else a plain line per log interval; silent off rank 0 or with
    trainer.progress=false. `say` prints a line that does not break the bar."""

    def __init__(self, show: bool, total_steps: int | None, step: int, max_time: float | None):
        self.show, self.total, self.max_time = show, total_steps, max_time
        self.bar = None
        if show and interactive():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=step, desc="train", dynamic_ncols=True, mininterval=1.0)

    def position(self, step: int, seconds: float) -> str:
        """How far along each of its bounds the run is: `step 40/1000 | 131/1800 s`.
        A run bounded by time usually ends well before its step bound."""
        where = f"step {step}" + (f"/{self.total}" if self.total else "")
        return where + (f" | {seconds:.0f}/{self.max_time:.0f} s" if self.max_time else "")

    def step(self) -> None:
        if self.bar:
            self.bar.update(1)

    def metrics(self, m: dict, step: int, seconds: float) -> None:
        if self.bar:
            self.bar.set_postfix(
                loss=f"{m['train/loss']:.3f}", lr=f"{m['lr']:.2e}", sps=f"{m['samples_per_sec']:.1f}", refresh=False
            )
        elif self.show:  # not a terminal: a plain line instead of bar frames
            print(
                f"{self.position(step, seconds)} | train/loss {m['train/loss']:.3f} | "
                f"lr {m['lr']:.2e} | {m['samples_per_sec']:.1f} samples/s",
                flush=True,
            )

    def say(self, line: str) -> None:
        (self.bar.write if self.bar else print)(line)

    def close(self) -> None:
        if self.bar:
            self.bar.close()


def banner(cfg, plan, job, run_dir: Path, look: str) -> str:
    """What the run will do, in a few lines, before it does it."""
    o, t = cfg.optim, cfg.trainer
    limits = [
        f"{job.schedule.total_steps} steps" if job.schedule.total_steps else "",
        f"{t.max_time:g} s" if t.max_time else "",
    ]
    start = f", resuming at step {job.found[1]['progress']['step']}" if job.found else ""
    # A step that takes minutes shows nothing for minutes: say so before it starts.
    how = "measured by the CPU calibration" if plan.assumed_mfu is None else f"assumed {plan.assumed_mfu:.0%} MFU"
    step = f", ~{duration(plan.est_step_seconds)} per step (plan estimate, {how})" if plan.est_step_seconds else ""
    return "\n".join(
        [
            f"lingmao | {plan.preset_reason} | {plan.device} x {plan.world_size}, {plan.precision} "
            f"({plan.precision_reason}){', compiled' if plan.compile else ''}",
            f"  batch {plan.micro_batch} x accumulation {plan.accumulation} x {plan.world_size} process(es) = "
            f"{plan.effective_batch} windows of {plan.context_length} tokens per step{step}",
            f"  lr {lr_rule(plan)}, warmup + cosine to {o.min_lr_ratio:g}x | "
            f"{' and '.join(x for x in limits if x) or 'until stopped'}{start}",
            f"  run folder {run_dir} | MLflow: {look}",
        ]
    )
