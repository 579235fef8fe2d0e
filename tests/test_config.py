import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from lingmao.config import CONF_DIR, ConfigError, register, validate
from lingmao.plan import PRESETS

register()
MODELS = ("tiny", "small", "medium", "large")


def make(*overrides):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_presets_are_the_product_set():
    assert set(PRESETS) == {"rtx4090", "rtx3060", "t4x2", "m1", "cpu"}


@pytest.mark.parametrize("hardware", ("auto",) + PRESETS)
@pytest.mark.parametrize("model", MODELS)
def test_every_hardware_and_model_composes(hardware, model):
    cfg = make(f"hardware={hardware}", f"model={model}")
    validate(cfg)
    assert cfg.hardware.name == hardware
    assert cfg.model.name == model


def test_named_presets_set_every_key():
    for name in PRESETS:
        hw = make(f"hardware={name}").hardware
        unset = [k for k, v in hw.items() if v is None and k != "prefetch_factor"]
        assert not unset, f"{name} leaves {unset} unset"


def test_model_sizes_follow_seed_000():
    assert [(make(f"model={m}").model.d_model, make(f"model={m}").model.n_layers) for m in ("small", "medium", "large")] \
        == [(512, 8), (768, 12), (1024, 16)]


def test_unknown_key_is_rejected_by_name():
    with pytest.raises(ConfigCompositionException) as e:
        make("trainer.max_stpes=3")
    assert "max_stpes" in str(e.value.__cause__ or e.value)


def test_appended_unknown_key_is_rejected_by_validate():
    with pytest.raises(ConfigError, match=r"trainer\.max_stpes"):
        validate(make("+trainer.max_stpes=3"))


def test_unknown_key_in_group_is_rejected():
    with pytest.raises(ConfigCompositionException, match="batchsize"):
        make("hardware.batchsize=4")


def test_wrong_type_is_rejected():
    with pytest.raises(ConfigCompositionException) as e:
        make("trainer.max_steps=many")
    assert isinstance(e.value.__cause__, ValidationError)
    assert "max_steps" in str(e.value.__cause__)


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ConfigCompositionException) as e:
        make("hardware=rtx5090")
    msg = str(e.value)
    assert "rtx5090" in msg and "rtx4090" in msg and "t4x2" in msg


@pytest.mark.parametrize("override, key", [
    ("optim.lr=0", "optim.lr"),
    ("optim.lr=-1e-3", "optim.lr"),
    ("trainer.max_steps=0", "trainer.max_steps"),
    ("hardware=cpu hardware.batch=-2", "hardware.batch"),
    ("hardware=cpu hardware.batch=lots", "hardware.batch"),
    ("hardware.precision=fp8", "hardware.precision"),
    ("optim.lr_scaling=cubic", "optim.lr_scaling"),
    ("data.script=hanzi", "data.script"),
    ("data.stride=0", "data.stride"),
    ("data.stride=4096", "data.stride"),
    ("data=jsonl", "data.paths"),
    ("model.moe.experts=4 model.moe.top_k=5", "model.moe"),
    ("trainer.sample.top_p=0", "trainer.sample"),
])
def test_validate_names_the_key(override, key):
    cfg = make(*override.split())
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(cfg)


def test_clip_presets_set_grad_clip():
    assert [make(f"optim/clip={c}").optim.grad_clip for c in ("conservative", "standard", "aggressive")] \
        == [0.5, 1.0, 2.0]


def test_balanced_data_preset_has_seed_caps():
    caps = make("data=poetry_balanced").data.genre_caps
    assert dict(caps) == {"诗": 50000, "词": 30000, "文": 20000, "赋": 10000}
