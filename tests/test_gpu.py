"""On a CUDA GPU: `pytest -m gpu tests/test_gpu.py` (scripts/gpu_check.sh runs it).

Every run is `python -m lingmao.run` in its own process, as a user starts it,
with tracking off and the carried prepared corpus (data=prepared). A small
wrapper around the CLI writes each metrics record the engine logs to a JSONL
file at full precision (MLflow is not on the GPU machine), and can SIGKILL
the process right after a checkpoint. Each test appends its numbers to
$GPU_CHECK_RESULTS (JSONL) before it asserts, so the table shows them
whether it passed or not.

Environment: GPU_CHECK_CORPUS (default .gpu_carry/corpus), GPU_CHECK_RESULTS
(default: none kept), GPU_CHECK_HARDWARE (default auto: the preset the plan
picks for this GPU). GPU_CHECK_REHEARSAL=1 runs every test without a GPU, as
scripts/gpu_check.sh's rehearsal does in CI: the CPU preset, fp16 as CPU
autocast with a GradScaler, DDP over gloo, smaller sizes (REHEARSAL below),
and the same metrics, rows and assertions.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CORPUS = Path(os.environ.get("GPU_CHECK_CORPUS") or REPO / ".gpu_carry" / "corpus").resolve()
RESULTS = os.environ.get("GPU_CHECK_RESULTS")
CUDA = torch.cuda.is_available()
_spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
CHECK = importlib.util.module_from_spec(_spec)  # scripts/gpu_check.py: the table's row format
_spec.loader.exec_module(CHECK)
REHEARSAL = not CUDA and os.environ.get("GPU_CHECK_REHEARSAL") == "1"
HARDWARE = os.environ.get("GPU_CHECK_HARDWARE") or ("cpu" if REHEARSAL else "auto")
RUN_TIMEOUT = 100  # seconds one CLI run may take: a hung one must not eat the check's 5 minutes

pytestmark = pytest.mark.skipif(not CUDA and not REHEARSAL, reason="needs a CUDA device (or GPU_CHECK_REHEARSAL=1)")

BASE = [
    f"hardware={HARDWARE}",
    "hardware.devices=1",
    "data=prepared",
    f"data.prepared_dir={CORPUS}",
    "tracking.enabled=false",
    "trainer.progress=false",
    "trainer.eval_batches=2",
    "trainer.sample_tokens=8",
    "checkpoint.every_minutes=null",
    "trainer.log_every=1",
]
TINY = ["model=tiny", "optim.lr=1e-3", *(["model.context_length=64"] if REHEARSAL else [])]  # 2 CPU cores: short

# `python -m lingmao.run ARGS` with two hooks: every metrics record to
# $LINGMAO_METRICS, and SIGKILL right after the checkpoint of step $LINGMAO_KILL_AFTER.
CLI = """
import json, os, signal, sys
from lingmao import run
from lingmao.tracking import tracker as tracking
from lingmao.train import recovery as checkpointer
log = tracking.Tracker.log_metrics
def recorded(self, metrics, step):
    with open(os.environ["LINGMAO_METRICS"], "a") as f:
        f.write(json.dumps({"step": step, **{k: float(v) for k, v in metrics.items()}}) + "\\n")
    return log(self, metrics, step)
tracking.Tracker.log_metrics = recorded
kill = int(os.environ.get("LINGMAO_KILL_AFTER") or 0)
save = checkpointer.Checkpointer.save
def save_then_die(self, s, *args, **kwargs):
    path = save(self, s, *args, **kwargs)
    if s.step == kill:
        os.kill(os.getpid(), signal.SIGKILL)
    return path
checkpointer.Checkpointer.save = save_then_die
sys.argv = ["lingmao", *sys.argv[1:]]
run.main()
"""


def record(check: str, **numbers) -> None:
    """One row of gpu_check.sh's table: this check's numbers, under the
    test's name (as pytest's JUnit XML names it, which gives the outcome)."""
    if RESULTS:
        test = os.environ.get("PYTEST_CURRENT_TEST", "").split("::")[-1].rsplit(" (", 1)[0]
        with open(RESULTS, "a") as f:
            f.write(json.dumps({"check": check, "test": test, "numbers": numbers}, default=str) + "\n")


class Run:
    """One CLI run in its own process and folder; `wait()` for its outcome."""

    def __init__(
        self,
        tmp: Path,
        name: str,
        args: list[str],
        kill_after: int | None = None,
        env: dict | None = None,
        timeout: float = RUN_TIMEOUT,
    ):
        self.dir, self.name, self.timeout = tmp / name, name, timeout
        self.dir.mkdir(parents=True, exist_ok=True)
        self.metrics_file = self.dir / "metrics.jsonl"
        full_env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
            "LINGMAO_METRICS": str(self.metrics_file),
            "LINGMAO_KILL_AFTER": str(kill_after or 0),
            **(env or {}),
        }
        self.out = open(self.dir / "output.txt", "w")  # noqa: SIM115 (the process writes to it until wait())
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CLI, *BASE, *args, f"hydra.run.dir={self.dir / 'run'}"],
            cwd=self.dir,
            env=full_env,
            stdout=self.out,
            stderr=subprocess.STDOUT,
        )

    def wait(self) -> Run:
        self.timed_out = False
        try:
            self.rc = self.proc.wait(timeout=self.timeout)
        except subprocess.TimeoutExpired:  # killed here: not the SIGKILL a test asked for
            self.proc.kill()
            self.rc, self.timed_out = self.proc.wait(), True
        self.out.close()
        self.output = (self.dir / "output.txt").read_text(errors="replace")
        return self

    def ok(self) -> Run:
        assert not self.timed_out, f"{self.name}: still running after {self.timeout} s\n{self.output[-3000:]}"
        assert self.rc == 0, f"{self.name}: exit {self.rc}\n{self.output[-3000:]}"
        return self

    def metrics(self) -> list[dict]:
        if not self.metrics_file.exists():
            return []
        return [json.loads(line) for line in self.metrics_file.read_text().splitlines() if line.strip()]

    def series(self, key: str) -> list[tuple[int, float]]:
        return [(m["step"], m[key]) for m in self.metrics() if key in m]

    def checkpoint(self) -> dict:
        from lingmao.train import checkpoint

        return checkpoint.load(self.dir / "run" / "checkpoints" / "last.pt")

    def plan(self) -> str | None:
        """The plan the run ran, in a few words, for the table's row."""
        return CHECK.checkpoint_plan(self.dir / "run")


def wait_all(runs: list[Run]) -> list[Run]:
    return [r.wait() for r in runs]


def tensors(node, path: str = "") -> dict[str, torch.Tensor]:
    """Every tensor in a nested state dict by its path: the weights and
    whatever state the optimizer keeps (AdamW's moments, Muon's momentum)."""
    if isinstance(node, torch.Tensor):
        return {path: node} if node.is_floating_point() else {}
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list | tuple) else ()
    return {k: v for key, child in items for k, v in tensors(child, f"{path}/{key}").items()}


def max_difference(a: dict, b: dict) -> float:
    """Largest |a - b| over the weights and the optimizer state of two checkpoints."""
    # The optimizer's whole state dict: AdamW keeps {"state", "param_groups"}, Muon {"adamw", "muon"}.
    ta, tb = (tensors({"model": x["model"], "optimizer": x["optimizer"]}) for x in (a, b))
    assert ta.keys() == tb.keys() and any(k.startswith("/optimizer") for k in ta)
    return max(float((ta[k].double() - tb[k].double()).abs().max()) for k in ta)


def relative_gap(xs: list[float], ys: list[float]) -> float:
    return max(abs(x - y) / abs(y) for x, y in zip(xs, ys))


# --- 10 steps: bf16, fp16 + GradScaler, compile on and off -----------------------

VARIANTS = {
    "bf16-eager": ("bf16", False),
    "bf16-compile": ("bf16", True),
    "fp16-eager": ("fp16", False),
    "fp16-compile": ("fp16", True),
}
if REHEARSAL:  # compiling fp16 autocast on 2 CPU cores adds a minute and nothing bf16-compile does not run
    del VARIANTS["fp16-compile"]


@pytest.fixture(scope="module")
def ten_steps(tmp_path_factory) -> dict[str, Run]:
    """The four variants at once (one GPU has room for all): 10 steps each."""
    tmp = tmp_path_factory.mktemp("ten_steps")
    runs = {
        label: Run(
            tmp,
            label,
            [
                *TINY,
                f"hardware.precision={p}",
                f"hardware.compile={str(c).lower()}",
                "trainer.max_steps=10",
                "trainer.eval_every=10",
            ],
        )
        for label, (p, c) in VARIANTS.items()
    }
    wait_all(list(runs.values()))
    return runs


@pytest.mark.gpu
@pytest.mark.parametrize("label", list(VARIANTS))
def test_ten_steps_train(ten_steps, label):
    run = ten_steps[label]
    losses = [v for _, v in run.series("train/loss")]
    scales = [v for _, v in run.series("loss_scale")]
    record(
        f"10 steps {label}",
        exit=run.rc,
        first_loss=losses[0] if losses else None,
        last_loss=losses[-1] if losses else None,
        loss_scale=scales[-1] if scales else None,
        peak_gb=max((v for _, v in run.series("peak_memory_gb")), default=None),
        plan=run.plan(),
    )
    run.ok()
    assert [s for s, _ in run.series("train/loss")] == list(range(1, 11))
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    assert run.series("val/loss") and math.isfinite(run.series("val/loss")[-1][1])
    if label.startswith("fp16"):
        # The GradScaler ran (it logs its scale) and did not collapse.
        assert len(scales) == 10 and scales[-1] >= 1.0
    else:
        assert not scales


@pytest.mark.gpu
@pytest.mark.parametrize("precision", [p for p in ("bf16", "fp16") if f"{p}-compile" in VARIANTS])
def test_compile_matches_eager(ten_steps, precision):
    """torch.compile changes the kernels, not the arithmetic's meaning:
    the 10 losses agree to 1% (16-bit autocast rounds differently when fused)."""
    eager = [v for _, v in ten_steps[f"{precision}-eager"].ok().series("train/loss")]
    compiled = [v for _, v in ten_steps[f"{precision}-compile"].ok().series("train/loss")]
    gap = relative_gap(compiled, eager) if len(eager) == len(compiled) == 10 else None
    record(f"compile = eager, {precision}", max_relative_gap=gap)
    assert gap is not None and gap < 1e-2


@pytest.mark.gpu
def test_fp16_matches_bf16_at_the_first_step(ten_steps):
    """Same weights, same batch: the first loss differs by autocast's
    rounding only (under 1%). Later steps may part more: the GradScaler skips
    the steps whose scaled gradients overflow while it finds its scale."""
    bf16 = [v for _, v in ten_steps["bf16-eager"].ok().series("train/loss")]
    fp16 = [v for _, v in ten_steps["fp16-eager"].ok().series("train/loss")]
    gap = relative_gap(fp16, bf16) if len(bf16) == len(fp16) == 10 else None
    record(
        "fp16 = bf16 at step 1",
        first_step_gap=abs(fp16[0] - bf16[0]) / bf16[0] if gap is not None else None,
        max_relative_gap=gap,
    )
    assert gap is not None and abs(fp16[0] - bf16[0]) < 1e-2 * bf16[0]


# --- peak memory against the plan's estimate -------------------------------------------

# On the GPU: each size at the micro-batch the plan gives on the 4090's and
# the T4's own card; rehearsed: small on the CPU preset at micro-batch 2.
SIZES = ("small",) if REHEARSAL else ("small", "medium", "large")
PRESETS = ("cpu",) if REHEARSAL else ("rtx4090", "t4x2")


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from lingmao.config.compose import CONF_DIR, register

    register()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return hydra_compose("config", overrides=overrides)


def measured_plan(preset: str, size: str) -> tuple[list[str], object]:
    """The overrides of a run on this device at the micro-batch the plan
    gives on the preset's own card (T4: 16 GB, fp16; 4090: 24 GB, bf16; the
    CPU rehearsal: 2, to stay short), and the plan of that very run, sized by
    the memory of the device it runs on. Eager (the estimate models eager
    autograd); two micro-batches per step, so gradients live through
    accumulation as the estimate assumes."""
    from lingmao.plan.machine import detect
    from lingmao.plan.make import make_plan

    machine = detect()
    on_its_card = make_plan(compose([f"hardware={preset}", f"model={size}", "hardware.devices=1"]), machine)
    args = [
        f"hardware={preset}",
        f"model={size}",
        f"hardware.batch={2 if REHEARSAL else on_its_card.micro_batch}",
        "hardware.accumulation=2",
        "hardware.compile=false",
        "trainer.max_steps=2",
        "trainer.eval_every=2",
    ]
    if getattr(on_its_card, "activation_checkpointing", False):  # what the plan chose for that card
        args.append("hardware.activation_checkpointing=true")
    run_plan = make_plan(compose([*BASE, *args]), machine)
    return args, run_plan


@pytest.fixture(scope="module")
def memory_runs(tmp_path_factory) -> dict[tuple[str, str], tuple[Run, object]]:
    """Each preset's three sizes at once (one preset after the other: all six
    at once could crowd the GPU if the estimates were far off)."""
    tmp = tmp_path_factory.mktemp("memory")
    out = {}
    for preset in PRESETS:
        wave = {}
        for size in SIZES:
            args, plan = measured_plan(preset, size)
            wave[(preset, size)] = (Run(tmp, f"{preset}-{size}", args), plan)
        for run, _ in wave.values():
            run.wait()
        out.update(wave)
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("size", SIZES)
def test_peak_memory_within_the_plans_margin(memory_runs, preset, size):
    """The engine's peak memory over two steps (torch.cuda.max_memory_allocated;
    rehearsed: the process' peak RSS) against the plan's estimate, which
    claims ±estimate_margin. On CUDA the estimate also counts the context
    (outside the allocator), so a measured peak a little below it is
    expected; the row shows both."""
    run, plan = memory_runs[(preset, size)]
    peaks = [v for _, v in run.series("peak_memory_gb")]
    measured = max(peaks) if peaks else None
    record(
        f"memory {preset} {size}",
        micro_batch=plan.micro_batch,
        precision=plan.precision,
        estimate_gb=plan.estimate_gb,
        measured_gb=measured,
        ratio=measured / plan.estimate_gb if measured else None,
        margin=plan.estimate_margin,
        plan=run.plan(),
    )
    run.ok()
    assert measured is not None
    assert abs(measured - plan.estimate_gb) <= plan.estimate_margin * plan.estimate_gb


# --- MFU: medium, context 768, bf16, compiled -------------------------------------------


def device_peak_tflops() -> tuple[float | None, str]:
    """This GPU's dense bf16 peak: the datasheet's, else a bf16 matmul
    measured here; rehearsed: None, the CPU plan's own rough peak."""
    from lingmao.plan.peaks import dense_bf16_tflops
    from lingmao.train.backend import matmul_tflops

    if REHEARSAL:
        return None, "the CPU plan's rough peak"
    name = torch.cuda.get_device_name()
    peak = dense_bf16_tflops(name)
    if peak:
        return peak, f"{name} datasheet"
    return matmul_tflops(torch.device("cuda"), torch.bfloat16), f"{name} bf16 matmul measured"


# Rehearsed: tiny at context 128, eager (compiling on 2 CPU cores takes longer than the steps), 15 steps.
MFU_EVERY = 5 if REHEARSAL else 10
MFU_MODEL = ["model=medium", "model.context_length=768", "hardware.compile=true"]
if REHEARSAL:
    MFU_MODEL = ["model=tiny", "model.context_length=128", "hardware.compile=false"]


@pytest.mark.gpu
def test_mfu_medium_context_768_bf16_compiled(tmp_path):
    """The engine's own `mfu` metric, against this GPU's peak (passed as
    hardware.peak_tflops, so the number is this device's): over the second
    and third log intervals, after compilation. MFU above 1 is an accounting error."""
    peak, source = device_peak_tflops()
    run = Run(
        tmp_path,
        "mfu",
        [
            *MFU_MODEL,
            "hardware.precision=bf16",
            *([f"hardware.peak_tflops={peak}"] if peak else []),
            f"trainer.max_steps={3 * MFU_EVERY}",
            f"trainer.log_every={MFU_EVERY}",
            f"trainer.eval_every={3 * MFU_EVERY}",
        ],
        timeout=120,
    ).wait()
    logs = [m for m in run.metrics() if "mfu" in m]
    steady = logs[1:]  # the first interval holds compilation
    mfu = sum(m["mfu"] for m in steady) / len(steady) if steady else None
    record(
        "MFU medium ctx 768 bf16 compile",
        mfu=mfu,
        peak_tflops=peak,
        peak_from=source,
        tokens_per_sec=steady[-1]["tokens_per_sec"] if steady else None,
        peak_gb=max((m["peak_memory_gb"] for m in logs), default=None),
        plan=run.plan(),
    )
    run.ok()
    assert len(steady) == 2
    assert 0.0 < mfu <= 1.0


# --- resume after SIGKILL -------------------------------------------------------------

RESUME = [
    *TINY,
    "model.dropout=0.1",
    "hardware.compile=false",
    "trainer.max_steps=8",
    "trainer.eval_every=4",
    "checkpoint.every_steps=2",
]


@pytest.mark.gpu
def test_resume_after_sigkill_continues_the_run(tmp_path):
    """SIGKILL right after the checkpoint of step 4, then the same command:
    steps 5-8 continue as if never interrupted. Bit for bit where two
    uninterrupted runs are bit-identical. CUDA kernels that add with atomics
    (the embedding's backward) may not repeat exactly; then the stated
    tolerance: losses of steps 5-8 within 1e-4 relative, weights and AdamW
    moments within 10x the two uninterrupted runs' difference (at least 1e-5).
    A resume that lost the optimizer state, the data position or the CUDA RNG
    (dropout) misses both by ~1e-3."""
    cut = Run(tmp_path, "cut", RESUME, kill_after=4)
    full, again = Run(tmp_path, "full", RESUME), Run(tmp_path, "again", RESUME)
    cut.wait()
    assert cut.rc == -signal.SIGKILL and not cut.timed_out, cut.output[-3000:]
    resumed = Run(tmp_path, "cut", RESUME).wait()  # the same folder: resume=auto finds step 4
    wait_all([full, again])
    for r in (resumed, full, again):
        r.ok()
    assert "resuming from" in resumed.output and "at step 4" in resumed.output
    a, b, c = resumed.checkpoint(), full.checkpoint(), again.checkpoint()
    diff, noise = max_difference(a, b), max_difference(b, c)
    tail = [v for s, v in resumed.series("train/loss") if s > 4]
    reference = [v for s, v in full.series("train/loss") if s > 4]
    record(
        "resume after SIGKILL",
        bit_exact=diff == 0.0,
        max_weight_diff=diff,
        two_full_runs_diff=noise,
        loss_gap=relative_gap(tail, reference) if len(tail) == len(reference) == 4 else None,
    )
    assert a["progress"]["step"] == b["progress"]["step"] == 8
    assert len(tail) == 4 and [s for s, _ in resumed.series("train/loss") if s > 4] == [5, 6, 7, 8]
    if noise == 0.0:  # this GPU repeats itself: so must a resumed run
        assert diff == 0.0 and tail == reference
    else:
        assert tail == pytest.approx(reference, rel=1e-4) and diff <= max(10 * noise, 1e-5)


# --- DDP: 2 processes on one GPU (gloo) = 1 process -----------------------------------

DDP = [
    *TINY,
    "optim=adamw",  # what this test means: two processes' all-reduced gradient is one process' (Muon's bf16
    # Newton-Schulz would turn last-bit differences of that sum into ~1e-4 of the loss)
    "model.dropout=0.0",
    "hardware.precision=fp32",
    "hardware.tf32=false",
    "hardware.compile=false",
    "trainer.max_steps=6",
    "trainer.eval_every=3",
    "hardware.accumulation=2",
]


@pytest.mark.gpu
def test_two_gloo_processes_on_one_gpu_match_one_process(tmp_path):
    """Rank r of 2 as torchrun would start it, both on cuda:0 (LOCAL_RANK 0:
    one GPU), micro-batch 4, against one process with micro-batch 8: the same
    effective batch, data and seed, so the same losses and weights up to
    the order of the gradient sum. fp32 without TF32, so the tolerance is
    float32 rounding (the weights' largest difference is shown, not held to
    a bound: AdamW turns a rounding-sized gradient into a full-sized step)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ranks = [
        Run(
            tmp_path,
            f"rank{r}",
            [*DDP, "hardware.batch=4", "hardware.ddp_backend=gloo"],
            env={
                "RANK": str(r),
                "LOCAL_RANK": "0",
                "WORLD_SIZE": "2",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
            },
        )
        for r in range(2)
    ]
    one = Run(tmp_path, "one", [*DDP, "hardware.batch=8"])
    wait_all([*ranks, one])
    for r in (*ranks, one):
        r.ok()
    two_losses = [v for _, v in ranks[0].series("train/loss")]
    one_losses = [v for _, v in one.series("train/loss")]
    diff = max_difference(ranks[0].checkpoint(), one.checkpoint())
    record(
        "DDP 2 x gloo = 1 process",
        loss_gap=relative_gap(two_losses, one_losses) if two_losses else None,
        max_weight_diff=diff,
    )
    assert ranks[0].checkpoint()["plan"]["world_size"] == 2
    assert len(two_losses) == len(one_losses) == 6
    assert two_losses == pytest.approx(one_losses, rel=1e-5, abs=1e-5)
    two_val, one_val = ([v for _, v in r.series("val/loss")] for r in (ranks[0], one))
    assert len(two_val) == 2 and two_val == pytest.approx(one_val, rel=1e-5)
