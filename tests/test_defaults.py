"""One source of defaults: the schema. Python's RunConfig()/ModelConfig() and
the CLI's bare `python -m lingmao.run` build the same model, and a checkpoint
written before a key existed reads that key as it was then."""

from dataclasses import asdict

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from test_resume import COMMON, cli

from lingmao.config.compose import CONF_DIR, register
from lingmao.config.keys import fill_absent, schema_keys, value_when_absent
from lingmao.config.schema import ModelConfig, RunConfig
from lingmao.model.gpt import GPT, GPTConfig
from lingmao.train import checkpoint

register()
V = 100
ADDED_LATER = [key for key, _, f in schema_keys() if "absent" in f.metadata]


def make(*overrides):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_the_cli_default_run_is_the_schemas_defaults():
    python = asdict(OmegaConf.to_object(OmegaConf.structured(RunConfig())))  # optim.lr resolved from its table
    assert asdict(OmegaConf.to_object(make())) == python


def test_python_and_the_small_preset_build_the_same_model():
    python = GPTConfig.from_model_config(ModelConfig(), V)
    assert python == GPTConfig.from_model_config(make("model=small").model, V)
    assert python.rotary  # as in every preset
    torch.manual_seed(0)
    a = GPT(python).state_dict()
    torch.manual_seed(0)
    b = GPT(GPTConfig.from_model_config(make().model, V)).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_model_presets_leave_the_switches_to_the_schema():
    for preset in (CONF_DIR / "model").glob("*.yaml"):
        stated = set(OmegaConf.load(preset))
        assert not stated & {key.split(".")[1] for key in ADDED_LATER}, preset.name


def test_a_key_added_later_reads_as_it_was_before_in_an_old_config():
    assert "model.rotary" in ADDED_LATER and value_when_absent("model.rotary") is False
    assert ModelConfig().rotary is True  # the default today differs from the value before
    old = {k: v for k, v in asdict(ModelConfig()).items() if f"model.{k}" not in ADDED_LATER}
    assert fill_absent(old, "model")["rotary"] is False
    assert not GPTConfig.from_model_config(old, V).rotary
    # A field left out of GPTConfig means the same as a key left out of a checkpoint.
    assert GPTConfig(vocab_size=V) == GPTConfig.from_model_config(old, V)
    filled = fill_absent({"seed": 1, "model": old, "data": {"source": "poetry"}})
    assert filled["model"]["rotary"] is False and filled["data"] == {"source": "poetry"}


def test_an_old_checkpoints_config_is_compared_as_rotary_false(tmp_path):
    now = {"seed": 1, "model": asdict(ModelConfig(rotary=False, vocab_multiple=1)), "data": {"source": "poetry"}}
    old_model = {k: v for k, v in now["model"].items() if k not in ("rotary", "qk_norm", "vocab_multiple")}
    state = {"config": {**now, "model": old_model}, "tokenizer_hash": "h"}
    checkpoint.check_compatible(state, now, "h", tmp_path / "old.pt")  # no error
    default = {**now, "model": asdict(ModelConfig())}  # today's default: rotary on, the vocabulary padded to 64
    with pytest.raises(checkpoint.ResumeError, match="model.rotary: checkpoint False vs config True") as e:
        checkpoint.check_compatible(state, default, "h", tmp_path / "old.pt")
    assert "model.vocab_multiple: checkpoint 1 vs config 64" in str(e.value)


def test_a_checkpoint_without_rotary_in_its_config_resumes_as_rotary_false(tmp_path, shared_cache, monkeypatch, capsys):
    args = [*COMMON, "tracking.enabled=false", f"hydra.run.dir={tmp_path / 'run'}"]
    assert cli(args + ["model.rotary=false", "trainer.max_steps=2"], tmp_path, monkeypatch) == 0
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    state = checkpoint.load(last)
    assert "pos_emb.weight" in state["model"]
    del state["config"]["model"]["rotary"]  # as a checkpoint written before the switch existed
    checkpoint.save(state, last)
    capsys.readouterr()

    assert cli(args + ["trainer.max_steps=4"], tmp_path, monkeypatch) == 2  # today's default, rotary on
    assert "model.rotary: checkpoint False vs config True" in capsys.readouterr().err
    assert cli(args + ["model.rotary=false", "trainer.max_steps=4"], tmp_path, monkeypatch) == 0
    assert "at step 2" in capsys.readouterr().out  # resumed, not started afresh
    assert checkpoint.load(tmp_path / "run" / "checkpoints" / "last.pt")["progress"]["step"] == 4
