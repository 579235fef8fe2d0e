"""lingmao.compare against a real sqlite MLflow store built the way the
tracker writes runs (tags, flattened params, metrics by step)."""

import csv
import json
import math
import os
import re
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from lingmao.compare import main
from lingmao.report.build import compare
from lingmao.report.collect import SelectorError, _same_dir
from lingmao.report.plots import PLOTS
from lingmao.tracking.store import StoreError
from lingmao.tracking.store import store_uri as resolve_uri

REPO = Path(__file__).resolve().parents[1]
SWEEP_A = "multirun/2024-05-01/12-00-00"
SWEEP_B = "multirun/2024-05-02/09-30-00"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass
class FakeRun:
    name: str
    hardware: str
    loss_scale: float  # sets where the val-loss curve ends, so the runs sort differently from creation order
    sweep: str | None = None
    mfu: bool = True
    rep4: bool = True
    finished: bool = True
    new_names: bool = False  # logged under the current metric names; the others under the names before them
    lr_scale: float = 1.0  # plan.lr / config.optim.lr: the batch-size rule's factor
    run_id: str = ""
    experiment_id: str = ""
    logged: dict[str, list[float]] = field(default_factory=dict)  # what was logged, by key


RUNS = {
    "cpu": FakeRun("cpu-tiny-lr0.001", "cpu", 1.3, sweep=SWEEP_A),
    "gpu": FakeRun("rtx4090-tiny-lr0.003", "rtx4090", 0.9, sweep=SWEEP_A, mfu=False, rep4=False),
    "t4": FakeRun("t4x2-small-lr0.001", "t4x2", 1.1, sweep=SWEEP_B, new_names=True, lr_scale=2.0),
    "zh": FakeRun("诗人-tiny-lr0.002", "cpu", 1.2, new_names=True),  # a Chinese run name in every plot legend
}
RENAMED = {
    "throughput/samples_per_sec": "samples_per_sec",
    "throughput/tokens_per_sec": "tokens_per_sec",
    "memory/peak_gb": "peak_memory_gb",
    "samples/rep4": "val/samples/rep4",
    "samples/greedy_rep4": "val/samples/greedy_rep4",
    "samples/form": "val/samples/form",
}
GENRES = {"shi": "诗", "ci": "词"}
VERSE_FORM = 0.93  # the corpus's own share of 5/7-character lines (param data.verse_form)
PROMPTS = ["床前明月光，", "子曰"]
SAMPLES = [
    {"step": 50, "decoding": "sampled", "prompt": "床前", "text": "旧的"},
    # trainer.sample.per_prompt (4) continuations of each prompt, as an eval writes them
    *(
        {"step": 100, "decoding": "sampled", "prompt": p, "text": f"第{k}首：疑是地上霜。"}
        for p in PROMPTS
        for k in range(4)
    ),
    {"step": 100, "decoding": "greedy", "prompt": "床前明月光，", "text": "床前床前"},
]
GENRE_TOKENS = {"shi": 5000, "ci": 355}  # tags genre_tokens.<genre>: 词's loss from too few tokens
OTHER = FakeRun("m1-tiny-lr0.001", "m1", 1.0, mfu=False, rep4=False, finished=False)  # experiment "ablation"


def _log(client, exp_id: str, run: FakeRun, start_ms: int, index: int) -> None:
    from mlflow.entities import Metric, Param

    tags = {
        "hardware": run.hardware,
        "model": run.name.split("-")[1],
        "data": "poetry",
        "experiment": "",
        "host": "test",
        "git.commit": "0" * 40,
        "git.dirty": "false",
    }
    tags.update({f"genre.{k}": v for k, v in GENRES.items()})
    if run is not OTHER:  # a run from before the counts were recorded
        tags.update({f"genre_tokens.{k}": str(n) for k, n in GENRE_TOKENS.items()})
    if run.sweep:
        tags.update({"sweep.dir": run.sweep, "sweep.job": str(index), "sweep.values": f"trainer.seed={index}"})
    info = client.create_run(exp_id, start_time=start_ms, tags=tags, run_name=run.name).info
    run.run_id, run.experiment_id = info.run_id, exp_id
    lr = run.name.split("lr")[1]
    params = {
        "config.model.name": tags["model"],
        "config.optim.lr": lr,
        "plan.lr": str(float(lr) * run.lr_scale),
        "data.verse_form": str(VERSE_FORM),
        "plan.effective_batch": "32",
        "plan.precision": "bf16",
        "plan.preset": run.hardware,
        "model.params": str(3_200_000 + 1000 * index),
    }
    metrics = []

    def add(key: str, value: float, step: int) -> None:
        run.logged.setdefault(key, []).append(value)
        name = RENAMED.get(key, key) if run.new_names else key
        metrics.append(Metric(name, value, start_ms + 150 * step + 7 * index, step))

    for step in range(10, 101, 10):
        add("train/loss", run.loss_scale * (2 + 6 / math.sqrt(step)), step)
        add("throughput/samples_per_sec", 100.0 * (index + 1) + step % 30 - (50 if step == 10 else 0), step)
        add("throughput/tokens_per_sec", 25600.0 * (index + 1) + step, step)
        if run.mfu:
            add("mfu", 0.2 + step / 1000, step)
        if step % 20 == 0:
            val = run.loss_scale * (2.1 + 6 / math.sqrt(step))
            add("val/loss", val, step)
            add("val/perplexity", math.exp(val), step)
            add("memory/peak_gb", 1.0 + step / 100, step)
            for j, genre in enumerate(GENRES):
                add(f"val/loss_{genre}", val + 0.1 * (j + 1), step)
            add("samples/form", 0.1 * index + step / 1000, step)
            if run.rep4:
                add("samples/rep4", 0.5 - step / (300 + 100 * index), step)
                add("samples/greedy_rep4", 0.9 - step / (500 + 100 * index), step)
    client.log_batch(run.run_id, metrics=metrics, params=[Param(k, v) for k, v in params.items()])
    if run.finished:
        client.set_terminated(run.run_id, "FINISHED", end_time=start_ms + 20_000 + 1000 * index)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"
    client = MlflowClient(uri)
    kind = {"mlflow.experimentKind": "custom_model_development"}
    artifacts = tmp_path_factory.mktemp("artifacts").as_uri()  # not MLflow's default, ./mlruns in the cwd
    lingmao = client.create_experiment("lingmao", tags=kind, artifact_location=artifacts)
    ablation = client.create_experiment("ablation", tags=kind)  # newer: the default must still pick "lingmao"
    for i, run in enumerate(RUNS.values()):
        _log(client, lingmao, run, 1_700_000_000_000 + 60_000 * i, i)
    _log(client, ablation, OTHER, 1_700_000_900_000, 9)
    samples = tmp_path_factory.mktemp("samples") / "samples.jsonl"
    samples.write_text("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in SAMPLES), encoding="utf-8")
    client.log_artifact(RUNS["cpu"].run_id, str(samples))
    client.log_artifact(RUNS["gpu"].run_id, str(samples))
    return uri


@pytest.fixture(scope="module")
def report(store, tmp_path_factory):
    return compare([], store, tmp_path_factory.mktemp("report") / "out")


def _csv(report) -> list[dict[str, str]]:
    with (report.out / "runs.csv").open() as f:
        return list(csv.DictReader(f))


def test_csv_holds_every_run_of_the_default_experiment_sorted_by_final_val_loss(report):
    rows = _csv(report)
    expected = sorted(RUNS.values(), key=lambda r: r.logged["val/loss"][-1])
    assert [r["run"] for r in rows] == [r.name for r in expected]  # "ablation" is not in the default
    for row, run in zip(rows, expected):
        assert row["run_id"] == run.run_id
        assert float(row["val_loss"]) == pytest.approx(run.logged["val/loss"][-1])
        assert float(row["val_perplexity"]) == pytest.approx(run.logged["val/perplexity"][-1])
        # The first throughput value holds start-up and is left out of the median.
        assert float(row["samples_per_sec"]) == pytest.approx(
            statistics.median(run.logged["throughput/samples_per_sec"][1:])
        )
        assert row["hardware"] == run.hardware
        assert float(row["peak_memory_gb"]) == pytest.approx(max(run.logged["memory/peak_gb"]))
        assert int(row["effective_batch"]) == 32
        assert float(row["wall_s"]) > 0
        assert row["status"] == "FINISHED"
    by_name = {r["run"]: r for r in rows}
    assert by_name[RUNS["gpu"].name]["mfu"] == ""  # not logged: an empty cell, no crash
    assert by_name[RUNS["gpu"].name]["rep4"] == by_name[RUNS["gpu"].name]["greedy_rep4"] == ""
    cpu = RUNS["cpu"]
    assert float(by_name[cpu.name]["rep4"]) == pytest.approx(cpu.logged["samples/rep4"][-1])
    assert float(by_name[cpu.name]["greedy_rep4"]) == pytest.approx(cpu.logged["samples/greedy_rep4"][-1])
    assert float(by_name[RUNS["cpu"].name]["mfu"]) == pytest.approx(statistics.median(RUNS["cpu"].logged["mfu"][1:]))


def test_report_rows_are_sorted_and_files_written(report):
    losses = [row["val_loss"] for row in report.rows]
    assert losses == sorted(losses)
    assert len(set(losses)) == len(losses)  # distinct, so the sort order is meaningful
    names = {p.name for p in report.files}
    assert names == {"runs.csv", "index.html", *PLOTS}
    assert all(p.parent == report.out for p in report.files)


def test_every_plot_is_a_real_png(report):
    for name in PLOTS:
        data = (report.out / name).read_bytes()
        assert data[:8] == PNG_MAGIC, name
        assert len(data) > 10_000, name  # axes, lines and text, not an empty canvas


def test_index_html_shows_plots_runs_and_the_mlflow_hint(report, store):
    page = (report.out / "index.html").read_text()
    for name in PLOTS:
        assert f'<img src="{name}"' in page
    for run in RUNS.values():
        assert run.name in page
    assert 'href="runs.csv"' in page
    assert f"mlflow ui --backend-store-uri {store}" in page
    assert f"/#/experiments/{RUNS['cpu'].experiment_id}/runs?viewStateShareKey=lingmao-" in page


def test_unknown_selector_names_the_experiments(store, tmp_path, capsys):
    with pytest.raises(SelectorError) as err:
        compare(["no-such-thing"], store, tmp_path / "out")
    assert "no-such-thing" in str(err.value)
    assert "'lingmao'" in str(err.value) and "'ablation'" in str(err.value)
    assert not (tmp_path / "out").exists()  # nothing half-written

    assert main(["no-such-thing", f"tracking_uri={store}", f"out={tmp_path / 'out'}"]) == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith("error: ") and "'lingmao'" in stderr and "'ablation'" in stderr


def test_sweep_dir_selects_only_that_sweeps_runs(store, tmp_path):
    rows = compare([SWEEP_A + "/"], store, tmp_path / "out").rows
    assert {r["run"] for r in rows} == {RUNS["cpu"].name, RUNS["gpu"].name}


@pytest.mark.parametrize(
    "selector, matches",
    [
        (SWEEP_A, True),
        (SWEEP_A + "/", True),
        ("./" + SWEEP_A, True),
        ("/home/someone/project/" + SWEEP_A, True),  # absolute, launched elsewhere
        (SWEEP_B, False),
        ("12-00-00", False),  # the leaf alone is ambiguous across days
        ("multirun", False),
    ],
)
def test_sweep_dir_forms(selector, matches):
    assert _same_dir(selector, SWEEP_A) is matches


def test_run_id_and_experiment_id_select_across_experiments(store, tmp_path):
    picked = sorted([OTHER, RUNS["t4"]], key=lambda r: r.logged["val/loss"][-1])
    rows = compare([OTHER.run_id, RUNS["t4"].run_id], store, tmp_path / "by-run").rows
    assert [(r["run"], r["run_id"]) for r in rows] == [(r.name, r.run_id) for r in picked]

    report = compare([OTHER.experiment_id], store, tmp_path / "by-exp")
    (row,) = report.rows
    assert row["run"] == OTHER.name
    assert row["status"] == "RUNNING" and row["wall_s"] is None  # still running: no end time, no crash
    assert row["mfu"] is None
    for name in PLOTS:  # "no repetition metrics logged" is drawn, not skipped
        assert (report.out / name).read_bytes()[:8] == PNG_MAGIC


def test_missing_store_is_a_user_error(tmp_path):
    with pytest.raises(StoreError, match="no MLflow store"):
        compare([], f"sqlite:///{tmp_path / 'absent.db'}", tmp_path / "out")
    assert not (tmp_path / "absent.db").exists()  # not created as an empty store


def test_uri_precedence(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_uri(None) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///elsewhere.db")
    assert resolve_uri(None) == f"sqlite:///{tmp_path.resolve() / 'elsewhere.db'}"
    assert resolve_uri("http://tracking:5000") == "http://tracking:5000"


@pytest.mark.slow
def test_cli(store, tmp_path):
    out = tmp_path / "cli-report"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [sys.executable, "-m", "lingmao.compare", "lingmao", f"tracking_uri={store}", f"out={out}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert str(out.resolve() / "index.html") in proc.stdout
    for run in RUNS.values():
        assert run.name in proc.stdout
    assert "viewStateShareKey=" in proc.stdout and "compareRunsMode=TABLE" in proc.stdout
    assert (out / "runs.csv").exists() and (out / "index.html").exists()
    lines = proc.stdout.splitlines()
    table = lines[: [i for i, line in enumerate(lines) if line.startswith("* lowest final val loss")][0]]
    assert max(map(len, table)) <= 100  # the console table fits 100 columns; the rest is in runs.csv
    for run in RUNS.values():  # a run to a line
        assert len([line for line in table if run.name in line]) == 1, run.name
    best = min(RUNS.values(), key=lambda r: r.logged["val/loss"][-1])
    (line,) = [line for line in table if best.name in line]
    assert line.lstrip().startswith("*") and "trainer.seed=" in line  # marked, with what it varied


def test_lr_as_set_and_as_scaled_varied_keys_train_and_genre_loss_and_form(report):
    rows = {r["run"]: r for r in _csv(report)}
    t4, cpu = rows[RUNS["t4"].name], rows[RUNS["cpu"].name]
    assert float(t4["lr"]) == pytest.approx(0.001) and float(t4["lr_scaled"]) == pytest.approx(0.002)
    assert float(cpu["lr"]) == float(cpu["lr_scaled"]) == pytest.approx(0.001)
    # every varied key's value per run: the LR from its config where the sweep tag lacks it
    assert cpu["varied"] == "trainer.seed=0 optim.lr=0.001" and t4["varied"] == "trainer.seed=2 optim.lr=0.001"
    assert rows[RUNS["zh"].name]["varied"] == "optim.lr=0.002"  # no sweep: no seed recorded
    for run in RUNS.values():
        row = rows[run.name]
        assert float(row["train_loss"]) == pytest.approx(run.logged["train/loss"][-1])
        for genre in GENRES:
            assert float(row[f"val_loss_{genre}"]) == pytest.approx(run.logged[f"val/loss_{genre}"][-1])
        assert float(row["form"]) == pytest.approx(run.logged["samples/form"][-1])  # old and new names alike
        assert float(row["form_ref"]) == pytest.approx(VERSE_FORM)
    page = (report.out / "index.html").read_text(encoding="utf-8")
    assert "<th>val loss 诗</th>" in page and "<th>val loss 词</th>" in page
    assert "The runs vary: trainer.seed, optim.lr" in page  # optim.lr: the runs set different ones


def test_index_html_shows_every_prompts_samples_side_by_side(report):
    page = (report.out / "index.html").read_text(encoding="utf-8")
    samples = page[page.index("<h2>Last samples</h2>") :]
    head = samples[: samples.index("</thead>")]
    assert head.index(RUNS["gpu"].name) < head.index(RUNS["cpu"].name)  # a column per run, in the table's order
    rows = samples[samples.index("<tbody>") : samples.index("</tbody>")].split("<tr>")[1:]
    assert len(rows) == len(PROMPTS)  # a row per prompt, every prompt shown
    for prompt, row in zip(PROMPTS, rows):
        assert row.count("<td>") == 2  # the two runs with samples, side by side
        assert all(f"<b>{prompt}</b>第{k}首：疑是地上霜。" in row for k in range(4))
    assert "旧的" not in page  # an earlier eval's
    assert "床前床前" not in page  # the greedy baseline is a diagnostic, not a sample to read


def test_the_best_run_is_marked_in_the_csv_and_the_page(report):
    rows = _csv(report)
    assert [r["best"] for r in rows] == ["True"] + ["False"] * (len(rows) - 1)  # sorted: the first is the lowest
    page = (report.out / "index.html").read_text(encoding="utf-8")
    (best,) = [row for row in page.split("<tr") if row.startswith(" class=best")]
    assert rows[0]["run"] in best and "★ best" in best


def test_a_genre_loss_from_too_few_tokens_is_flagged(report):
    from lingmao.tracking.record import MIN_GENRE_TOKENS

    assert GENRE_TOKENS["ci"] < MIN_GENRE_TOKENS <= GENRE_TOKENS["shi"]
    rows = _csv(report)
    assert {r["val_tokens_ci"] for r in rows} == {"355"} and {r["val_tokens_shi"] for r in rows} == {"5000"}
    page = (report.out / "index.html").read_text(encoding="utf-8")
    ci = f"{float(rows[0]['val_loss_ci']):.4f}"
    shi = f"{float(rows[0]['val_loss_shi']):.4f}"
    assert f'title="355 tokens">{ci}†</td>' in page and f'title="5000 tokens">{shi}</td>' in page
    assert f"† per-genre val loss from fewer than {MIN_GENRE_TOKENS} tokens (词 (ci))" in page


def _fake_runs(n: int, hardware: str = "cpu") -> list:
    from lingmao.report.collect import Run

    runs = []
    for i in range(n):
        row = {"run": f"cpu-tiny-lr{i}", "hardware": hardware, "samples_per_sec": 40.0 + i}
        runs.append(Run(row, row["run"], "1", 0, genre_loss={g: 6.0 - 0.01 * i for g in GENRES}, genres=GENRES))
        runs[-1].genre_tokens = dict(GENRE_TOKENS)
    return runs


def test_the_genre_plots_legend_covers_no_bar_and_few_tokens_are_hatched():
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from lingmao.report.plots import _genre_figure, cjk_fonts, find_cjk_font

    with cjk_fonts(find_cjk_font()):
        fig = _genre_figure(_fake_runs(4), GENRES)  # bars as tall as the axes: no room inside for a legend
        FigureCanvasAgg(fig).draw()
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    legend = ax.get_legend().get_window_extent(renderer)
    bars = [p for p in ax.patches]
    assert len(bars) == 4 * len(GENRES)
    assert not [b for b in bars if legend.overlaps(b.get_window_extent(renderer))]
    hatched = {round(b.get_x() + b.get_width() / 2) for b in bars if b.get_hatch()}
    assert hatched == {list(GENRES).index("ci")}  # 词's bars: fewer than MIN_GENRE_TOKENS tokens


def test_the_throughput_plot_gives_each_run_its_own_colour():
    from lingmao.report.plots import _throughput_figure

    fig = _throughput_figure(_fake_runs(3), "note")  # three runs on one hardware
    colours = [tuple(p.get_facecolor()) for p in fig.axes[0].patches]
    assert len(colours) == 3 and len(set(colours)) == 3


def test_chinese_run_and_genre_names_render_with_a_cjk_font(store, tmp_path):
    import warnings

    from lingmao.report.plots import find_cjk_font

    font = find_cjk_font()
    assert font.family, f"no CJK font on this machine ({font.source})"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compare([], store, tmp_path / "out")
    # matplotlib warns once per glyph it has to draw as a box.
    assert not [w for w in caught if "missing from font" in str(w.message)]


def test_throughput_note_tells_noise_from_a_real_difference():
    from lingmao.report.plots import throughput_note

    same = {"a": [40.0, 43.0, 17.0, 41.0, 39.0], "b": [42.0, 18.0, 44.0, 40.0, 38.0]}
    assert "within the runs' own" in throughput_note(same)
    apart = {"a": [40.0, 41.0, 42.0, 40.5, 41.5], "b": [80.0, 81.0, 82.0, 80.5, 81.5]}
    assert "beyond their own spread" in throughput_note(apart)
    assert "too few" in throughput_note({"a": [1.0, 2.0], "b": [3.0, 4.0]})


def test_report_says_whether_throughput_differences_are_noise(report):
    page = (report.out / "index.html").read_text(encoding="utf-8")
    # The fake runs' throughputs are 100, 200, 300 and 400 samples/s apart with a spread of 30.
    assert "throughput differs between runs beyond their own spread" in page


def _view(store: str, experiment_id: str, line: str) -> dict:
    from mlflow.tracking import MlflowClient

    key = re.search(r"viewStateShareKey=([\w-]+)", line).group(1)
    tag = MlflowClient(store).get_experiment(experiment_id).tags[f"mlflow.sharedViewState.{key}"]
    return json.loads(json.loads(tag)["state"])


def test_the_printed_link_opens_the_runs_table_with_what_they_vary_sorted_by_val_loss(store):
    from lingmao.tracking.store import where

    exp = RUNS["cpu"].experiment_id
    line = where(store, exp, f"tags.`sweep.dir` = '{SWEEP_A}'")
    assert f"then open http://127.0.0.1:5000/#/experiments/{exp}/runs?viewStateShareKey=" in line
    state = _view(store, exp, line)
    assert (
        state["searchFilter"] == f"tags.`sweep.dir` = '{SWEEP_A}'"
    )  # in the view: beside it in the URL the UI drops it
    assert (state["orderByKey"], state["orderByAsc"]) == ("metrics.`val/loss`", True)
    # optim.lr differs between the runs; trainer.seed (tag sweep.values) is no param of these fake runs
    assert (
        state["selectedColumns"]
        == state["columnOrder"]
        == [
            "tags.`hardware`",
            "tags.`model`",
            "params.`config.optim.lr`",
            "metrics.`val/loss`",
            "metrics.`mean_samples_per_sec`",
        ]
    )
    assert where(store, exp, f"tags.`sweep.dir` = '{SWEEP_A}'") == line  # the same view, rewritten in place


def test_the_link_follows_the_ui_to_another_port(store, monkeypatch):
    from lingmao.tracking.store import where

    monkeypatch.setenv("LINGMAO_UI_URL", "http://127.0.0.1:8080")
    line = where(store, RUNS["cpu"].experiment_id)
    assert f"mlflow ui --backend-store-uri {store} --port 8080  then open http://127.0.0.1:8080/#/" in line
    monkeypatch.delenv("LINGMAO_UI_URL")
    line = where(store, RUNS["cpu"].experiment_id)
    assert "then open http://127.0.0.1:5000/#/" in line and "--port" not in line.split("then open")[0]
    assert "LINGMAO_UI_URL=http://127.0.0.1:PORT" in line  # says how
