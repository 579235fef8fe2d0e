"""Peak memory per phase: an eval's peak is logged as val/peak_memory_gb,
and the training peak logged after it is training's own, not the eval's."""

import sys

import torch
from test_resume import _keep_torch_threads, train_here  # noqa: F401

from lingmao.train import validation
from lingmao.train.backend import peak_memory_bytes, reset_peak_memory

EVAL_BYTES = 256 * 2**20  # far above what the tiny model's training steps hold


def clear_refs_works() -> bool:
    """Linux resets the peak RSS (VmHWM) when "5" is written to /proc/self/clear_refs."""
    try:
        reset_peak_memory(torch.device("cpu"))
    except OSError:
        return False
    return True


def test_the_eval_peak_is_its_own_and_training_is_not_charged_with_it(tmp_path, shared_cache, monkeypatch):
    assert sys.platform.startswith("linux") and clear_refs_works()  # what this test's CPU logic needs
    real, logged = validation.evaluate, []

    def evaluate(*a, **k):  # an eval that holds far more than a training step
        big = torch.ones(EVAL_BYTES // 4)
        loss = real(*a, **k)
        del big
        return loss

    monkeypatch.setattr(validation, "evaluate", evaluate)
    from lingmao.tracking.tracker import Tracker

    real_log = Tracker.log_metrics

    def log_metrics(self, m, step):
        logged.append((step, dict(m)))
        return real_log(self, m, step)

    monkeypatch.setattr(Tracker, "log_metrics", log_metrics)
    train_here(tmp_path, tmp_path / "run", "trainer.max_steps=8", "trainer.eval_every=4", "tracking.enabled=false")
    evals = [m["val/peak_memory_gb"] for _, m in logged if "val/loss" in m]
    trains = [(s, m["peak_memory_gb"]) for s, m in logged if "train/loss" in m]
    assert len(evals) == 2 and all(e * 2**30 >= EVAL_BYTES for e in evals)
    after_eval = [gb for s, gb in trains if s > 4]
    assert after_eval and all(gb < evals[0] - EVAL_BYTES / 2**30 / 2 for gb in after_eval)


def test_the_cuda_peak_is_reset_between_phases(monkeypatch):
    """On CUDA the allocator's peak is reset; mocks of the two torch.cuda calls alone."""
    calls = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda d: calls.append(("reset", d)))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d: 123)
    gpu = torch.device("cuda", 0)
    reset_peak_memory(gpu)
    assert peak_memory_bytes(gpu) == 123 and calls == [("reset", gpu)]
