"""The batch x LR table of a `-m experiment=batch_lr` sweep: final val/loss
per (effective batch, LR), the best LR per batch, and val_loss_vs_lr.png.

    python scripts/batch_lr_table.py multirun/DATE/TIME [tracking_uri] [out_dir]
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path


def runs_of(sweep_dir: Path, uri: str):
    from mlflow.tracking import MlflowClient

    from lingmao.tracking import sweep_id

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("lingmao")
    return client.search_runs([exp.experiment_id], f"tags.`sweep.id` = '{sweep_id(sweep_dir)}'")


def table(runs) -> dict[int, dict[float, float]]:
    """{effective batch: {lr: final val/loss}}."""
    out: dict[int, dict[float, float]] = defaultdict(dict)
    for r in runs:
        if "val/loss" in r.data.metrics:
            out[int(r.data.params["plan.effective_batch"])][float(r.data.params["config.optim.lr"])] = \
                r.data.metrics["val/loss"]
    return dict(sorted(out.items()))


def main(argv: list[str]) -> None:
    sweep = Path(argv[0]).resolve()
    uri = argv[1] if len(argv) > 1 else f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    out = Path(argv[2]) if len(argv) > 2 else sweep
    t = table(runs_of(sweep, uri))
    lrs = sorted({lr for row in t.values() for lr in row})
    print("eff. batch | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | best")
    for batch, row in t.items():
        best = min(row, key=row.get)
        print(f"{batch:10d} | " + " | ".join(f"{row[lr]:.3f}" if lr in row else "-" for lr in lrs) + f" | {best:g}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for batch, row in t.items():
        xs = sorted(row)
        ax.plot(xs, [row[x] for x in xs], marker="o", label=f"batch {batch}")
    ax.set(xscale="log", xlabel="learning rate", ylabel="final val loss (nats/token)", title="batch x LR")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "val_loss_vs_lr.png", dpi=120)
    print(f"plot: {out / 'val_loss_vs_lr.png'}")


if __name__ == "__main__":
    main(sys.argv[1:])
