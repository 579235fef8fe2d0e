"""Where a run's config lives and what Hydra is told of it.

The schema is registered in Hydra's ConfigStore as `lingmao_schema`, the first
entry of conf/config.yaml's defaults list, so an unknown key or a wrong type
fails at compose time naming the key. `experiments/*.yaml` are registered as
the `experiment` group (package `_global_`), which works from the repository
and from an installed wheel alike.
"""

from __future__ import annotations

from pathlib import Path

from lingmao.config.schema import RunConfig

_PKG = Path(__file__).resolve().parent.parent  # the lingmao package


def _find(name: str) -> Path:
    """conf/ or experiments/: inside the package when installed from a wheel,
    at the repository top level when run from a checkout or an editable install."""
    for candidate in (_PKG / name, _PKG.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"lingmao: cannot find its {name}/ folder next to {_PKG}")


CONF_DIR = _find("conf")
EXPERIMENTS_DIR = _find("experiments")


def option_names(folder: Path) -> tuple[str, ...]:
    return tuple(sorted(p.stem for p in folder.glob("*.yaml")))


def register() -> None:
    """Register the schema and the experiment presets with Hydra (idempotent)."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    cs = ConfigStore.instance()
    cs.store(name="lingmao_schema", node=RunConfig)
    for path in sorted(EXPERIMENTS_DIR.glob("*.yaml")):
        cs.store(group="experiment", name=path.stem, node=OmegaConf.load(path), package="_global_")
