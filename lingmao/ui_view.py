"""A shared MLflow UI view that shows lingmao's key columns in the runs table.

MLflow's experiment page keeps its table columns in the browser (local
storage), not in the URL; the one way a link can carry them is a "shared
view": an experiment tag `mlflow.sharedViewState.<key>` holding the page's
UI state as JSON, opened with `?viewStateShareKey=<key>` (MLflow's own Share
button writes the same tag). The page then says "You're viewing a shared
view" and leaves the user's own saved view alone. A link that also carries
`searchFilter` is not opened as the shared view: the filter goes into the
view state instead."""

from __future__ import annotations

import json

SHARE_TAG_PREFIX = "mlflow.sharedViewState."
SHARE_URL_PARAM = "viewStateShareKey"
VIEW_KEY = "lingmao-runs"

# The runs table's columns, as the UI names them: <type>.`<key>`.
COLUMNS = {
    "metrics": ("train/loss", "val/loss", "val/samples/form", "samples_per_sec", "mfu"),
    "params": ("config.optim.lr",),
    "tags": ("hardware", "model", "sweep.values"),
}


def view_state(search: str = "") -> dict:
    state: dict = {"selectedColumns": [f"{kind}.`{key}`" for kind, keys in COLUMNS.items() for key in keys]}
    if search:
        state["searchFilter"] = search
    return state


def share_view(client, experiment_id: str, search: str = "", key: str = VIEW_KEY) -> str:
    """Write (or refresh) the shared view `key` on the experiment, filtered by
    `search` (MLflow search syntax; e.g. one sweep's runs, under a key of its
    own); returns the URL parameter that opens it, `viewStateShareKey=<key>`."""
    client.set_experiment_tag(experiment_id, SHARE_TAG_PREFIX + key, json.dumps(view_state(search)))
    return f"{SHARE_URL_PARAM}={key}"
