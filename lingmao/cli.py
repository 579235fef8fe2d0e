"""`lingmao COMMAND key=value ...`: the one console script.

Each command is its module's `main`, given the rest of the command line
unchanged, so `lingmao run ...` is `python -m lingmao.run ...` (Hydra: groups,
overrides, `-m` sweeps) and `lingmao bench ...` is `python -m lingmao.bench ...`.
Modules are imported only for the command asked for: `lingmao --help` stays
free of torch.
"""

from __future__ import annotations

import importlib
import sys

# name -> (module, one line on what it does)
COMMANDS = {
    "run": ("lingmao.run", "train a model: compose the config (Hydra), plan for the hardware, train, track in MLflow"),
    "compare": ("lingmao.compare", "compare tracked runs: a table, runs.csv, plots and index.html"),
    "generate": ("lingmao.generate", "sample text from a checkpoint, a run folder or an MLflow run"),
    "eval": ("lingmao.eval", "val loss, perplexity, bpc and per-genre loss of a checkpoint"),
    "export": ("lingmao.export", "a checkpoint as a Hugging Face model folder, or as its run's MLflow model"),
    "serve": ("lingmao.serve", "a local web page to try a model, or two side by side"),
    "bench": ("lingmao.bench.__main__", "measure throughput and MFU, or run a benchmark suite"),
}

EXAMPLES = """\
  lingmao run hardware=cpu model=tiny trainer.max_steps=200
  lingmao run -m hardware=cpu model=tiny optim.lr=1e-4,3e-4,1e-3     # a sweep
  lingmao compare multirun/2026-01-01/12-00-00
  lingmao generate checkpoint=outputs/2026-01-01/12-00-00 prompt=床前明月光
  lingmao eval checkpoint=outputs/2026-01-01/12-00-00 log=true
  lingmao export checkpoint=outputs/2026-01-01/12-00-00 mlflow=true
  lingmao serve run=outputs/2026-01-01/12-00-00,outputs/2026-01-02/09-30-00
  lingmao bench suite=cpu"""


def usage() -> str:
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items())
    return (
        f"usage: lingmao COMMAND [key=value ...]   (python -m lingmao.COMMAND works too)\n\n"
        f"commands:\n{rows}\n\nEvery command takes key=value arguments; `lingmao COMMAND --help` lists its "
        f"keys.\n\nexamples:\n{EXAMPLES}\n"
    )


def _run(argv: list[str]) -> int:
    """Hydra reads sys.argv itself: hand it the arguments after `run`
    (its --help page is conf/hydra/help/lingmao.yaml, in the defaults list)."""
    from lingmao.run import main as hydra_main

    sys.argv = [sys.argv[0], *argv]
    hydra_main()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}; commands: {', '.join(COMMANDS)} (lingmao --help)", file=sys.stderr)
        return 2
    if command == "run":
        return _run(rest)
    return importlib.import_module(COMMANDS[command][0]).main(rest)


if __name__ == "__main__":
    sys.exit(main())
