"""The fp16 path (t4, t4x2, or hardware.precision=fp16 on Ampere): fp16
autocast with a GradScaler, run on CPU, where both exist. A non-finite loss
must leave the scaler ready for the next step, so that trainer.on_nan=skip
and rollback get past it; gradients that overflow at every scale must end at
the loss-scale floor in on_nan, not skip forever."""

import math

import pytest
import torch
from test_resume import _keep_torch_threads, train_here  # noqa: F401

from lingmao.model.gpt import GPT
from lingmao.plan import make as plan_module
from lingmao.train import checkpoint
from lingmao.train.nan_policy import NonFiniteError
from lingmao.train.step import MIN_LOSS_SCALE


@pytest.fixture
def fp16(monkeypatch):
    """Plans on this CPU as on a T4: fp16 autocast and a GradScaler."""
    real = plan_module.make_plan

    def fp16_plan(*a, **k):
        p = real(*a, **k)
        p.precision, p.grad_scaler = "fp16", True
        return p

    monkeypatch.setattr(plan_module, "make_plan", fp16_plan)


def poison_loss(monkeypatch, micro_batch: int) -> None:
    """Make the loss of the `micro_batch`-th training forward non-finite
    (NaN through the graph, so its gradients are NaN too), once."""
    real, calls = GPT.forward, [0]

    def forward(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        if self.training:
            calls[0] += 1
            if calls[0] == micro_batch:
                return out * math.nan
        return out

    monkeypatch.setattr(GPT, "forward", forward)


def test_fp16_skip_drops_a_non_finite_loss_and_goes_on(tmp_path, shared_cache, monkeypatch, capsys, fp16):
    poison_loss(monkeypatch, 5)  # accumulation 2: the first micro-batch of step 3
    final = train_here(
        tmp_path, tmp_path / "run", "trainer.max_steps=6", "trainer.on_nan=skip", "tracking.enabled=false"
    )
    assert final["status"] == "FINISHED" and final["step"] == 6
    assert final["train/skipped_steps"] == 1 and math.isfinite(final["train/loss"])
    assert "step 3: non-finite loss" in capsys.readouterr().err
    # The dropped step left the scale as it was: a forward overflow says nothing of the gradients' range.
    assert final["loss_scale"] == 2.0**16


def test_fp16_rollback_reloads_the_checkpoint_and_goes_on(tmp_path, shared_cache, monkeypatch, capsys, fp16):
    poison_loss(monkeypatch, 9)  # the first micro-batch of step 5
    args = ["trainer.max_steps=6", "checkpoint.every_steps=2", "trainer.on_nan=rollback", "tracking.enabled=false"]
    final = train_here(tmp_path, tmp_path / "run", *args)
    assert final["status"] == "FINISHED" and final["step"] == 6
    assert "on_nan=rollback: back to step 4" in capsys.readouterr().err
    state = checkpoint.load(tmp_path / "run" / "checkpoints" / "last.pt")
    assert state["progress"]["lr_scale"] < 1 and state["scaler"]["scale"] == 2.0**16


def test_fp16_gradients_that_overflow_at_every_scale_stop_at_the_floor(tmp_path, shared_cache, monkeypatch, fp16):
    real = torch.amp.GradScaler.unscale_

    def overflowing(self, optimizer):  # every step's gradients overflow, as in a diverged fp16 run
        next(p for g in optimizer.param_groups for p in g["params"]).grad.fill_(math.inf)
        return real(self, optimizer)

    monkeypatch.setattr(torch.amp.GradScaler, "unscale_", overflowing)
    # The scaler skips each step and halves 2**16: steps 1-16 count (as in any AMP run),
    # the 17th takes the scale to 0.5, below the floor, and reaches on_nan=stop.
    with pytest.raises(NonFiniteError, match=r"step 17: non-finite gradient norm .*loss scale 0.5"):
        train_here(tmp_path, tmp_path / "run", "trainer.max_steps=40", "tracking.enabled=false")
    assert 0.5 < MIN_LOSS_SCALE


def test_an_fp16_step_applied_below_the_floor_counts_as_applied(tmp_path, shared_cache, monkeypatch, fp16):
    """Once the scale is under the floor, a step whose gradients are finite
    is applied by the scaler and must count as a step, not as non-finite."""
    real = torch.amp.GradScaler.__init__

    def low_scale(self, *a, **k):  # a run whose scale already fell to 0.25 (a checkpoint of one)
        real(self, *a, **{**k, "init_scale": 0.25})

    monkeypatch.setattr(torch.amp.GradScaler, "__init__", low_scale)
    final = train_here(tmp_path, tmp_path / "run", "trainer.max_steps=3", "tracking.enabled=false")
    assert final["step"] == 3 and final["loss_scale"] == 0.25 and "train/skipped_steps" not in final
