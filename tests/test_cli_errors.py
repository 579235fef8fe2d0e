"""Hydra's own errors through the real CLI: one `error:` line saying what is
valid, exit 2, no traceback and no advice to append a key with `+key=`."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lingmao import run

ROOT = Path(__file__).parents[1]


def lingmao_run(tmp_path, *args, env=None):
    """`python -m lingmao.run ARGS` in tmp_path; HYDRA_FULL_ERROR only when `env` sets it."""
    env = {
        **{k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"},
        "PYTHONPATH": str(ROOT),
        "LINGMAO_CACHE": str(tmp_path / "cache"),
        **(env or {}),
    }
    return subprocess.run(
        [sys.executable, "-m", "lingmao.run", *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize(
    "override, says",
    [
        (
            "trainer.max_step=5",
            [
                "trainer.max_step: no such key; did you mean trainer.max_steps?",
                "valid keys of trainer: max_steps, max_epochs",
            ],
        ),
        ("trainer.max_steps=abc", ["trainer.max_steps:", "'abc'", "takes an integer or null"]),
        (
            "hardware=4090",
            ["hardware=4090: not a preset of hardware; choose one of: auto, cpu, datacenter, m1, rtx3060, rtx4090"],
        ),
        ("experiment=quickstartt", ["experiment=quickstartt:", "choose one of: batch_lr,", "quickstart"]),
        ("model=huge", ["model=huge:", "choose one of: large, medium, small, tiny"]),
        ("optim/clip=tight", ["optim/clip=tight:", "choose one of: aggressive, conservative, standard"]),
        ("model.moe.expert=2", ["did you mean model.moe.experts?", "valid keys of model.moe: experts, top_k"]),
        ("optim.betas=3", ["optim.betas:", "takes a list"]),
        ("trainer.max_steps=[1,", ["cannot parse the command line", "override_grammar"]),
    ],
)
def test_hydra_errors_are_one_line_with_what_is_valid(tmp_path, override, says):
    proc = lingmao_run(tmp_path, override, "plan=true")
    err = proc.stderr
    assert proc.returncode == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert all(s in err for s in says), err
    assert "Traceback" not in err and "+" + override.split("=")[0] not in err and "HYDRA_FULL_ERROR" not in err


def test_an_unknown_experiment_no_longer_trains_the_default(tmp_path):
    proc = lingmao_run(tmp_path, "experiment=quickstartt", "plan=true")
    assert proc.returncode == 2 and "est_step_seconds" not in proc.stdout


def test_sweeping_every_experiment_and_no_experiment_still_compose(tmp_path):
    proc = lingmao_run(tmp_path, "-m", "experiment=glob(*)", "plan=true")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout + proc.stderr
    assert "#0 : experiment=batch_lr plan=True" in out and "experiment=quickstart plan=True" in out
    plans = sum(line.startswith(("FITS", "DOES NOT FIT")) for line in proc.stdout.splitlines())
    assert plans == len(list((ROOT / "experiments").glob("*.yaml")))
    proc = lingmao_run(tmp_path, "plan=true")
    assert proc.returncode == 0 and proc.stdout.startswith("FITS"), proc.stderr


def test_a_users_hydra_full_error_keeps_hydras_report(tmp_path):
    proc = lingmao_run(tmp_path, "trainer.max_step=5", "plan=true", env={"HYDRA_FULL_ERROR": "1"})
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "ConfigCompositionException" in proc.stderr


def test_in_process_main_gives_hydras_switch_back(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lingmao", "hardware=4090", "plan=true"])
    with pytest.raises(SystemExit) as e:
        run.main()
    assert e.value.code == 2 and "HYDRA_FULL_ERROR" not in os.environ
    assert capsys.readouterr().err.startswith("error: hardware=4090")


def test_an_error_inside_the_task_is_not_taken_for_hydras():
    from omegaconf.errors import ConfigKeyError

    from lingmao.config.errors import explain

    def task():
        raise ConfigKeyError("Key 'x' not in 'Foo'")

    try:
        task()
    except ConfigKeyError as e:
        assert explain(e, [], task.__code__) is None
        assert explain(e, [], run.main.__code__) is not None  # the same error from Hydra's side is explained


def test_a_missing_sweeper_plugin_gets_an_install_hint():
    from hydra.errors import MissingConfigException

    from lingmao.config.errors import explain

    e = MissingConfigException(
        "Could not find 'hydra/sweeper/optuna'", missing_cfg_file="hydra/sweeper/optuna", options=["basic"]
    )
    assert explain(e, ["hydra/sweeper=optuna"], explain.__code__) == (
        "hydra/sweeper=optuna needs a Hydra plugin that is not installed: pip install 'lingmao[optuna]' "
        "(hydra-optuna-sweeper)"
    )
