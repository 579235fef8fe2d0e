"""The MLflow UI's runs table as a printed link opens it: the columns a
comparison needs (what the runs vary, hardware, model, final val/loss,
samples/s), sorted by val/loss.

MLflow 3 keeps the runs table's visible columns in the browser's local
storage; no URL parameter sets them. What a client can set is a shared view
(the UI's "Save & share view"): an experiment tag
`mlflow.sharedViewState.<id>` whose value holds the table's state, opened
by a link with `viewStateShareKey=<id>` and listed among the experiment's
saved views. The UI ignores a shared view when the link also carries a
filter or a sort, so the view holds the filter and the sort too
(ExperimentPageUIState and ExperimentPageSearchFacetsState in MLflow's
mlflow/server/js, read by useSharedExperimentViewState; checked against
the installed UI by tests/test_ui.py)."""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable

SHARE_TAG = "mlflow.sharedViewState."  # MLflow's EXPERIMENT_PAGE_VIEW_STATE_SHARE_TAG_PREFIX
SORT = "metrics.`val/loss`"  # the UI's canonical column keys: <type>.`<name>`
LEADING = ("tags.`hardware`", "tags.`model`")
TRAILING = (SORT, "metrics.`mean_samples_per_sec`")
GROUP_TAGS = ("hardware", "model", "data", "experiment")  # config groups every run also has as a tag
MAX_VARIED = 8  # columns for varied keys, beyond which the table would scroll sideways anyway


def view_id(search: str) -> str:
    """The view's id for a run filter: one view per filter, stable across calls."""
    return "lingmao-" + hashlib.sha1(search.encode()).hexdigest()[:12]


def varied_keys(runs: list) -> list[str]:
    """The config keys the runs vary: those their sweeps recorded (tag
    sweep.values) and the LR where the runs set different ones."""
    keys = dict.fromkeys(
        kv.split("=", 1)[0] for r in runs for kv in r.data.tags.get("sweep.values", "").split() if "=" in kv
    )
    if len({r.data.params.get("config.optim.lr") for r in runs} - {None}) > 1:
        keys["optim.lr"] = None
    return list(keys)


def column(key: str, runs: list) -> str | None:
    """A varied config key as a runs-table column: a config group by its tag
    (hardware, model) or its param's name (optim -> config.optim.name), a
    key by its param (optim.lr -> config.optim.lr); None if no run has it."""
    if key in GROUP_TAGS:
        return f"tags.`{key}`"
    for name in (f"config.{key}", f"config.{key}.name"):
        if any(name in r.data.params for r in runs):
            return f"params.`{name}`"
    return None


def view_state(runs: list, search: str) -> dict:
    """The UI state of the view: the filter, sort by val/loss (lowest first)
    and the visible columns, the varied keys after hardware and model."""
    varied = [c for c in (column(k, runs) for k in varied_keys(runs)) if c][:MAX_VARIED]
    columns = list(dict.fromkeys([*LEADING, *varied, *TRAILING]))
    # columnOrder: else the UI puts metrics before params and tags, whatever the selection's order.
    return {
        "searchFilter": search,
        "orderByKey": SORT,
        "orderByAsc": True,
        "selectedColumns": columns,
        "columnOrder": columns,
    }


def view_name(search: str) -> str:
    """The view's name in the table's saved-views menu."""
    sweep = re.fullmatch(r"tags\.`sweep\.id` = '(.+)'", search)
    if sweep:
        return f"lingmao: sweep {sweep.group(1)}"
    if search.startswith("attributes.run_id IN ("):
        return f"lingmao: {search.count(',') + 1} runs compared"
    return f"lingmao: {search}" if search else "lingmao: all runs"


def publish(uri: str, experiment_id: str, search: str, retry: Callable) -> str | None:
    """Write (or refresh) the view of the runs `search` selects in the
    experiment; its id, or None when the store would not take it (a server
    without write access, say): the link then opens the runs unshaped."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        client = MlflowClient(uri)
        runs = client.search_runs([experiment_id], search, max_results=500)
        state = view_state(runs, search)
        key = SHARE_TAG + view_id(search)
        if _state_of(client.get_experiment(experiment_id).tags.get(key)) != state:
            now = int(time.time() * 1000)
            # The envelope of MLflow's saved views: the table's view dropdown lists it by name.
            value = {"name": view_name(search), "createdAt": now, "updatedAt": now, "state": json.dumps(state)}
            retry(client.set_experiment_tag, experiment_id, key, json.dumps(value))
    except (MlflowException, OSError):
        return None
    return view_id(search)


def _state_of(value: str | None) -> dict | None:
    """The state a view tag holds, or None (no tag, or one this module did not write)."""
    try:
        state = json.loads(json.loads(value)["state"])
    except (TypeError, ValueError, KeyError):
        return None
    return state if isinstance(state, dict) else None
