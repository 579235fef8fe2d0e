"""The batch x LR table of one or more `-m experiment=batch_lr` sweeps: final
val/loss per (effective batch, LR), the mean over seeds where several ran
(their count in brackets), the best LR per batch, and val_loss_vs_lr.png.

    python scripts/batch_lr_table.py multirun/DATE/TIME [more sweep dirs] [--uri URI] [--out DIR]
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path
from statistics import mean


def runs_of(sweep_dir: Path, uri: str):
    from mlflow.tracking import MlflowClient

    from lingmao.tracking.provenance import sweep_id

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("lingmao")
    return client.search_runs([exp.experiment_id], f"tags.`sweep.id` = '{sweep_id(sweep_dir)}'")


def table(runs) -> dict[int, dict[float, list[float]]]:
    """{effective batch: {lr: [final val/loss of each seed]}}."""
    out: dict[int, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in runs:
        if "val/loss" in r.data.metrics:
            batch, lr = int(r.data.params["plan.effective_batch"]), float(r.data.params["config.optim.lr"])
            out[batch][lr].append(r.data.metrics["val/loss"])
    return {b: dict(row) for b, row in sorted(out.items())}


def cell(losses: list[float]) -> str:
    return f"{mean(losses):.3f}" + (f" ({len(losses)})" if len(losses) > 1 else "")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweeps", nargs="+", type=Path)
    ap.add_argument("--uri", default=f"sqlite:///{Path.cwd() / 'mlflow.db'}")
    ap.add_argument("--out", type=Path, default=None, help="where the plot goes (default: the first sweep)")
    args = ap.parse_args(argv)
    t = table([r for s in args.sweeps for r in runs_of(s.resolve(), args.uri)])
    lrs = sorted({lr for row in t.values() for lr in row})
    print("eff. batch | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | best")
    for batch, row in t.items():
        best = min(row, key=lambda lr: mean(row[lr]))
        print(f"{batch:10d} | " + " | ".join(cell(row[lr]) if lr in row else "-" for lr in lrs) + f" | {best:g}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for batch, row in t.items():
        xs = sorted(row)
        ax.plot(xs, [mean(row[x]) for x in xs], marker="o", label=f"batch {batch}")
    ax.set(
        xscale="log", xlabel="learning rate", ylabel="final val loss (nats/token), mean over seeds", title="batch x LR"
    )
    ax.legend()
    fig.tight_layout()
    out = args.out or args.sweeps[0]
    fig.savefig(out / "val_loss_vs_lr.png", dpi=120)
    print(f"plot: {out / 'val_loss_vs_lr.png'}")


if __name__ == "__main__":
    main()
