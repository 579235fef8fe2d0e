"""The `lingmao` console script and the key=value options of its commands."""

import dataclasses
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import tomllib

from lingmao import cli, compare, generate
from lingmao import eval as evaluation
from lingmao.config.options import OptionError, parse, usage

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Demo:
    name: str = field(default="", metadata={"help": "a name"})
    count: int = field(default=2, metadata={"help": "how many"})
    rate: float = 0.5
    flag: bool = True
    items: list[str] = field(default_factory=list)


def test_values_are_typed_as_hydra_reads_them():
    o = parse(Demo, ["count=7", "rate=1e-3", "flag=false", "items=[a,b]"])
    assert (o.count, o.rate, o.flag, o.items) == (7, 1e-3, False, ["a", "b"])
    assert parse(Demo, []) == Demo()


def test_a_string_key_keeps_its_text_verbatim():
    # YAML would read these as a float, an int and a date; a run id or a folder name is text.
    for text in ("1234e5678", "0123", "2026-01-01", "a: b", "null"):
        assert parse(Demo, [f"name={text}"]).name == text
    assert parse(Demo, ["name='床前 明月'"]).name == "床前 明月"


def test_a_list_key_may_be_repeated_or_positional():
    assert parse(Demo, ["items=床前", "items=子曰"]).items == ["床前", "子曰"]
    assert parse(Demo, ["items=[a]", "items=b"]).items == ["a", "b"]
    assert parse(Demo, ["x", "count=3", "y"], positional="items").items == ["x", "y"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["cuont=3"], "cuont='3': unknown key 'cuont'; valid keys: name, count, rate, flag, items"),
        (["count=three"], "count='three': expected int"),
        (["count="], "count='': expected int"),
        (["rate=fast"], "rate='fast': expected float"),
        (["flag=maybe"], "flag='maybe': expected true or false"),
        (
            ["--count=3"],
            "'--count=3': options are key=value with key one of name, count, rate, flag, items; write count=...",
        ),
        (["lonely"], "'lonely': options are key=value"),
    ],
)
def test_bad_arguments_are_one_line_naming_the_key(argv, message):
    with pytest.raises(OptionError) as err:
        parse(Demo, argv)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


@pytest.mark.parametrize("module", [generate, evaluation, compare])
def test_each_commands_help_lists_every_key_with_its_description(module, capsys):
    assert module.main(["--help"]) == 0
    out = capsys.readouterr().out
    for f in dataclasses.fields(module.Options):
        line = next(line for line in out.splitlines() if line.strip().startswith(f.name + " "))
        assert f.metadata["help"] in line
    assert out.count("  lingmao ") >= 3  # the examples
    assert usage(module.Options, "x", "s", []).startswith("usage: lingmao x [key=value ...]")


def test_lingmao_help_names_every_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name, (_, text) in cli.COMMANDS.items():
        assert f"  {name}" in out and text in out
    assert cli.main([]) == 2  # no command: the same page, as an error
    assert "commands:" in capsys.readouterr().out


def test_an_unknown_command_names_the_valid_ones(capsys):
    assert cli.main(["train", "model=tiny"]) == 2
    assert capsys.readouterr().err == (
        "error: unknown command 'train'; commands: run, compare, generate, eval, export, serve, bench "
        "(lingmao --help)\n"
    )


def test_a_command_gets_the_rest_of_the_line(capsys):
    assert cli.main(["generate", "n=four"]) == 2
    assert "n='four': expected int" in capsys.readouterr().err
    assert cli.main(["compare", "--out", "x"]) == 2
    assert "write out=..." in capsys.readouterr().err
    assert cli.main(["bench", "--help"]) == 0
    assert "bench" in capsys.readouterr().out


def test_the_console_script_is_the_dispatcher():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, name = scripts["lingmao"].partition(":")
    assert getattr(__import__(module, fromlist=[name]), name) is cli.main
    for target, _ in cli.COMMANDS.values():  # every command module exists and has a main
        assert callable(__import__(target, fromlist=["main"]).main)


def _lingmao(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_run_hands_hydra_its_arguments_unchanged(tmp_path):
    """A two-job sweep of plans, through `lingmao run` and `python -m lingmao.run`."""
    sweep = ["-m", "plan=true", "hardware=cpu", "model=tiny,small"]
    via_cli = _lingmao(["lingmao", "run", *sweep, "hydra.sweep.dir=a"], tmp_path)
    direct = _lingmao(["lingmao.run", *sweep, "hydra.sweep.dir=b"], tmp_path)
    assert via_cli.returncode == direct.returncode == 0, via_cli.stderr + direct.stderr
    for proc in (via_cli, direct):
        assert "#0 : plan=True hardware=cpu model=tiny" in proc.stdout
        assert "#1 : plan=True hardware=cpu model=small" in proc.stdout

    def plans(out):
        return [line for line in out.splitlines() if "HYDRA" not in line]

    assert plans(via_cli.stdout) == plans(direct.stdout)
    assert (tmp_path / "a").is_dir() and (tmp_path / "b").is_dir()


@pytest.mark.slow
def test_run_help_describes_the_groups_keys_and_examples(tmp_path):
    proc = _lingmao(["lingmao", "run", "--help"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    for text in (
        "usage: lingmao run",
        "hardware: auto, cpu",
        "model: large, medium, small, tiny",
        "trainer.max_steps=1000",
        "optim.lr=1e-3",
        "lingmao run -m hardware=cpu model=tiny",
    ):
        assert text in proc.stdout
    assert "Powered by Hydra" not in proc.stdout  # not Hydra's default page
    # the same page from the module, asked for by name
    direct = _lingmao(["lingmao.run", "--help", "hydra/help=lingmao"], tmp_path)
    assert direct.stdout == proc.stdout
