"""debug=profile: torch.profiler over a few training steps, after two
warm-up ones; a Chrome trace in the run folder and the costliest ops."""

from __future__ import annotations

from pathlib import Path

import torch


class StepProfiler:
    """`step()` after every training step; `stop()` at the end."""

    def __init__(self, steps: int, run_dir: Path, device: torch.device, say=print):
        self.trace, self.say, self.prof = Path(run_dir) / "profile_trace.json", say, None
        if steps <= 0:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.prof = torch.profiler.profile(
            activities=activities,
            record_shapes=False,
            on_trace_ready=self._ready,
            schedule=torch.profiler.schedule(wait=1, warmup=1, active=steps, repeat=1),
        )
        self.prof.start()

    def _ready(self, prof) -> None:
        prof.export_chrome_trace(str(self.trace))
        key = (
            "self_cuda_time_total"
            if any(e.device_type.name == "CUDA" for e in prof.events())
            else "self_cpu_time_total"
        )
        self.say(prof.key_averages().table(sort_by=key, row_limit=12))
        self.say(f"profile: {self.trace} (open in chrome://tracing or ui.perfetto.dev)")

    def step(self) -> None:
        if self.prof:
            self.prof.step()

    def stop(self) -> None:
        if self.prof:
            self.prof.stop()
            self.prof = None
