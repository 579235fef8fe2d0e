"""System metrics for a run, measured by MLflow's own monitors and sent
through the tracker's sender."""

from __future__ import annotations

import sys
import threading
import time

SYSTEM_INTERVAL = 10.0  # seconds between samples (MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides)


class SystemMetrics:
    """CPU, RAM, disk, network and, where nvidia-ml-py finds a GPU, GPU use,
    measured by MLflow's own system-metrics monitors (psutil, pynvml) every
    SYSTEM_INTERVAL seconds and sent through the tracker's sender, so they reach the
    spool too. MLflow's SystemMetricsMonitor thread would send them itself:
    it asks the store for the run before every sample and stops for good at
    the first failed call, and what it measured is not kept."""

    @classmethod
    def make(cls, sender) -> SystemMetrics | None:
        try:
            return cls(sender)
        except Exception as e:  # psutil missing, say: the run goes on without them
            print(f"warning: no system metrics: {type(e).__name__}: {e}", file=sys.stderr)
            return None

    def __init__(self, sender):
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        from lingmao.tracking.store import quiet_mlflow

        quiet_mlflow()  # its import may be MLflow's first (no store reached): "Skip logging GPU metrics" is INFO
        self.sender = sender
        self.monitor = SystemMetricsMonitor(
            sender.run_id or "spooled", sampling_interval=SYSTEM_INTERVAL, tracking_uri=sender.uri
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="lingmao-system-metrics", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _sample(self) -> dict:
        self.monitor.collect_metrics()
        metrics = self.monitor.aggregate_metrics()
        for m in self.monitor.monitors:
            m.clear_metrics()
        return metrics

    def _loop(self) -> None:
        try:
            self._sample()  # psutil's first CPU reading covers no interval: discard it
            step = 0
            while not self._stop.wait(float(self.monitor.sampling_interval)):
                ms = int(time.time() * 1000)
                rec = [(f"system/{k}", float(v), ms, step) for k, v in self._sample().items()]
                self.sender.put({"op": "metrics", "metrics": rec})
                step += 1
        except Exception as e:  # a monitor failing (a GPU gone) ends system metrics, never training
            print(f"warning: system metrics stopped: {type(e).__name__}: {e}", file=sys.stderr)

    def stop(self, timeout: float) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
