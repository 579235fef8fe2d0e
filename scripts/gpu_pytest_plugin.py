"""pytest plugin of scripts/gpu_check.sh (`-p gpu_pytest_plugin`): each
test's outcome to $GPU_CHECK_RESULTS the moment it is known, so the table
has it even when the step is stopped at its time limit."""

from __future__ import annotations

import json
import os


def pytest_runtest_logreport(report) -> None:
    results = os.environ.get("GPU_CHECK_RESULTS")
    if not results or (report.when != "call" and report.passed):
        return
    message = ""
    if report.failed:
        lines = str(report.longrepr).strip().splitlines()
        errors = [line for line in lines if line.startswith("E ")]
        message = (errors[0][1:].strip() if errors else lines[-1] if lines else "")[:120]
    elif report.skipped:
        reason = str(report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr)
        message = reason.removeprefix("Skipped: ")[:120]
    outcome = {"passed": "passed", "failed": "FAILED" if report.when == "call" else "ERROR", "skipped": "skipped"}
    with open(results, "a") as f:
        f.write(
            json.dumps(
                {
                    "test": report.location[2],
                    "outcome": outcome[report.outcome],
                    "when": report.when,
                    "message": message,
                }
            )
            + "\n"
        )
