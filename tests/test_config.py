import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from lingmao.config import ConfigError
from lingmao.config.compose import CONF_DIR, register
from lingmao.config.keys import schema_keys
from lingmao.config.presets import HARDWARE as PRESETS
from lingmao.config.rules import NEEDS, RULES, tracking_uri_ok, validate

register()
MODELS = ("tiny", "small", "medium", "large")


def make(*overrides):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_presets_are_the_product_set():
    assert set(PRESETS) == {"datacenter", "rtx4090", "rtx3060", "t4x2", "t4", "m1", "cpu"}


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
    assert [
        (make(f"model={m}").model.d_model, make(f"model={m}").model.n_layers) for m in ("small", "medium", "large")
    ] == [(512, 8), (768, 12), (1024, 16)]


def test_unknown_key_is_rejected_by_name():
    with pytest.raises(ConfigCompositionException) as e:
        make("trainer.max_stpes=3")
    assert "max_stpes" in str(e.value.__cause__ or e.value)


def test_appended_unknown_key_is_rejected_by_validate():
    with pytest.raises(ConfigError, match=r"trainer\.max_stpes"):
        validate(make("+trainer.max_stpes=3"))
    with pytest.raises(
        ConfigError,
        match=r"unknown key\(s\): model\.n_head \(did you mean model\.n_heads\? "
        r"valid keys of model: name, d_model, n_heads",
    ):
        validate(make("+model.n_head=3"))


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


@pytest.mark.parametrize(
    "override, key",
    [
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
    ],
)
def test_validate_names_the_key(override, key):
    cfg = make(*override.split())
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(cfg)


def test_clip_presets_set_grad_clip():
    assert [make(f"optim/clip={c}").optim.grad_clip for c in ("conservative", "standard", "aggressive")] == [
        0.5,
        1.0,
        2.0,
    ]


def test_balanced_data_preset_has_seed_caps():
    caps = make("data=poetry_balanced").data.genre_caps
    assert dict(caps) == {"诗": 50000, "词": 30000, "文": 20000, "赋": 10000}


# -- every key has a rule -----------------------------------------------------


def _needs_a_rule(tp) -> bool:
    """Numbers, text, lists and maps of them, and Any: every type but bool."""
    import types
    import typing

    args = [a for a in typing.get_args(tp) if a is not type(None)]
    base = args[0] if typing.get_origin(tp) in (typing.Union, types.UnionType) else tp
    return base is not bool


def test_every_numeric_and_text_key_of_the_schema_has_a_rule():
    keys = {key for key, tp, _ in schema_keys() if _needs_a_rule(tp)}
    assert keys - set(RULES) == set(), "keys with no rule in config.RULES"
    assert set(RULES) - {key for key, _, _ in schema_keys()} == set(), "rules for keys the schema lacks"


def test_every_rule_refuses_something():
    """No rule that lets everything through: each refuses one of these values."""
    cfg = make()
    bad = [-1, -0.5, "", "x y\nz", [-1], [""], {"x": -1}]
    typed = {key: tp for key, tp, _ in schema_keys()}
    for key, rule in RULES.items():
        if not _needs_a_rule(typed[key]):  # a switch whose rule is about other keys (model.rotary)
            continue
        assert not all(rule.ok(v, cfg) for v in bad), f"{key}: its rule accepts every value tried"


def test_the_default_config_passes_every_rule():
    validate(make())
    from dataclasses import asdict

    from lingmao.config.rules import problems
    from lingmao.config.schema import RunConfig

    assert problems(RunConfig()) == []
    assert problems(asdict(RunConfig())) == []


# -- rule families: each override below composed and ran before ----------------


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.grad_clip=-1", "optim.grad_clip=-1.0 must be > 0"),  # ascended the gradient
        ("optim.grad_clip=0", "optim.grad_clip=0.0 must be > 0"),  # froze training
        ("optim.weight_decay=-1", "optim.weight_decay=-1.0 must be >= 0"),
        ("optim.eps=0", "optim.eps=0.0 must be > 0"),
        ("optim.warmup=-5", "optim.warmup=-5.0 must be >= 0"),
        ("optim.min_lr_ratio=1.5", "optim.min_lr_ratio=1.5 must be in [0, 1]"),
        ("optim.base_batch=0", "optim.base_batch=0 must be > 0"),
        ("model.mlp_ratio=0", "model.mlp_ratio=0 must be > 0"),
        ("model.moe.aux_loss_weight=-0.1", "model.moe.aux_loss_weight=-0.1 must be >= 0"),
        ("trainer.sample_tokens=0", "trainer.sample_tokens=0 must be > 0"),
        ("trainer.eval_batches=0", "trainer.eval_batches=0 must be > 0"),
        ("trainer.max_epochs=0", "trainer.max_epochs=0 must be > 0 (or null)"),
        ("trainer.max_time=-1", "trainer.max_time=-1.0 must be > 0 (or null)"),
        ("trainer.sample.temperature=-1", "trainer.sample.temperature=-1.0 must be >= 0"),
        ("trainer.sample.repetition_penalty=0", "trainer.sample.repetition_penalty=0.0 must be > 0"),
        ("hardware=cpu hardware.num_workers=-1", "hardware.num_workers=-1 must be >= 0 (or null)"),
        ("hardware=cpu hardware.threads=-2", "hardware.threads=-2 must be >= 0 (or null)"),
        ("hardware=cpu hardware.memory_gb=-8", "hardware.memory_gb=-8.0 must be >= 0 (or null)"),
        ("hardware=rtx3060 hardware.prefetch_factor=0", "hardware.prefetch_factor=0 must be > 0 (or null)"),
        ("seed=-1", "seed=-1 must be in [0, 4294967295]"),
        ("data.val_fraction=1", "data.val_fraction=1.0 must be in (0, 1)"),
        ("+data.genre_caps.ci=-5", "data.genre_caps={'ci': -5} must be values, each >= 0"),
        # Checked by the engine only once training had started:
        ("trainer.nan_lr_factor=1", "trainer.nan_lr_factor=1.0 must be in (0, 1)"),
        ("trainer.early_stop_patience=0", "trainer.early_stop_patience=0 must be > 0 (or null)"),
        ("checkpoint.every_minutes=0", "checkpoint.every_minutes=0.0 must be > 0 (or null)"),
    ],
)
def test_numbers_out_of_range_name_the_key_and_the_range(override, message):
    with pytest.raises(ConfigError) as e:
        validate(make(*override.split()))
    assert message in str(e.value)


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.betas=[0.9,1.0]", "optim.betas=[0.9, 1.0] must be 2 values, each in [0, 1)"),
        ("optim.betas=[0.9]", "optim.betas=[0.9] must be 2 values"),
        ("trainer.sample.prompts=[]", "trainer.sample.prompts=[] must be at least one value"),
        ("data=jsonl data.paths=['']", "data.paths=[''] must be values, each non-empty text"),
    ],
)
def test_lists_name_the_key_and_what_each_item_may_be(override, message):
    with pytest.raises(ConfigError) as e:
        validate(make(*override.split()))
    assert message in str(e.value)


@pytest.mark.parametrize(
    "override, message",
    [
        ("trainer.on_nan=explode", "trainer.on_nan='explode' is not valid; choose one of: stop, skip, rollback"),
        (
            "hardware=cpu hardware.compile_mode=fast",
            "hardware.compile_mode='fast' is not valid; choose one of: default,",
        ),
        ("hardware=cpu hardware.ddp_backend=mpi", "hardware.ddp_backend='mpi' is not valid; choose one of: nccl, gloo"),
        ("hardware.name=rtx5090", "hardware.name='rtx5090' is not valid; choose one of: auto, cpu"),
        ("data.on_bad_record=ignore", "data.on_bad_record='ignore' is not valid; choose one of: error, skip"),
        ("experiment=quickstart experiment=quickstart", None),  # a real one passes
        ("night.start=25:00", "night.start='25:00' must be a time as HH:MM"),
        ("night.end=8h", "night.end='8h' must be a time as HH:MM"),
        ("hardware=rtx3060 hardware.alloc_conf=garbage", "hardware.alloc_conf='garbage' must be empty or key:value"),
        (("tracking.experiment_name=' '",), "tracking.experiment_name=' ' must be non-empty text"),
        ("checkpoint.dir=''", "checkpoint.dir='' must be non-empty text"),
        (("model.name='my model'",), "model.name='my model' must be a name of letters"),
    ],
)
def test_text_keys_name_the_key_and_the_choices(override, message):
    cfg = make(*(override if isinstance(override, tuple) else override.split()))
    if message is None:
        validate(cfg)
        return
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert message in str(e.value)


def test_an_unknown_experiment_value_lists_the_experiments():
    cfg = make()
    cfg.experiment = "quickstartt"
    with pytest.raises(ConfigError, match=r"experiment='quickstartt' is not valid; choose one of: .*quickstart"):
        validate(cfg)


def test_gradient_clipping_can_be_turned_off_with_inf():
    validate(make("optim.grad_clip=inf"))


def test_every_problem_is_reported_at_once_on_one_line():
    with pytest.raises(ConfigError) as e:
        validate(make("optim.grad_clip=0", "optim.weight_decay=-1"))
    assert "optim.grad_clip" in str(e.value) and "optim.weight_decay" in str(e.value) and "\n" not in str(e.value)


GOOD_URIS = [
    "mlruns",
    "./runs/mlruns",
    "/abs/mlruns",
    "C:\\runs\\mlruns",
    "file:///tmp/mlruns",
    "file:/tmp/mlruns",
    "sqlite:///mlflow.db",
    "sqlite:////abs/mlflow.db",
    "http://localhost:5000",
    "https://mlflow.example.com",
    "databricks",
    "databricks://profile",
    "databricks-uc",
    "uc:http://localhost:8080",
    "postgresql://u:p@host/db",
    "postgresql+psycopg2://host/db",
    "mysql+pymysql://host/db",
    "mssql+pyodbc://host/db",
]
BAD_URIS = [
    "htp://localhost:5000",
    "sqlite:/mlflow.db",
    "sqlite://",
    "http://",
    "postgres://host/db",
    "postgresql+a+b://host/db",
    "s3://bucket/runs",
    "ftp://host/runs",
    " ",
    "mlflow:5000",
]


@pytest.mark.parametrize("uri", GOOD_URIS)
def test_tracking_uris_mlflow_opens_are_accepted(uri):
    cfg = make()
    cfg.tracking.uri = uri
    validate(cfg)


@pytest.mark.parametrize("uri", BAD_URIS)
def test_other_tracking_uris_are_refused_with_the_schemes(uri):
    cfg = make()
    cfg.tracking.uri = uri
    with pytest.raises(
        ConfigError,
        match=r"tracking\.uri=.* is not a store MLflow opens; use a folder path, "
        r"file:///path, sqlite:///path.db, http\(s\)://",
    ):
        validate(cfg)


def test_the_uri_schemes_are_mlflows():
    """Where a URI's scheme decides, MLflow's own lookup of its tracking
    stores agrees with the rule."""
    from mlflow.tracking._tracking_service.utils import _get_tracking_scheme

    scheme_level = [
        u
        for u in GOOD_URIS + BAD_URIS
        if u.strip()
        and u not in ("sqlite:/mlflow.db", "sqlite://", "http://", "postgresql+a+b://host/db", "mlflow:5000")
    ]
    for uri in scheme_level:
        assert (_get_tracking_scheme(uri) != "None") == tracking_uri_ok(uri), uri


def test_needs_cover_settings_of_several_keys():
    assert [m for m, wrong in NEEDS if wrong(make("data=jsonl"))] == [
        "data=jsonl needs data.paths, e.g. 'data.paths=[corpus.jsonl]'"
    ]
    with pytest.raises(ConfigError, match="set one of trainer.max_steps"):
        validate(make("trainer.max_steps=null"))


# -- issue 28: non-finite numbers, experiment names with path parts --------------


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lr=inf", "optim.lr=inf must be a finite number > 0"),
        ("optim.lr=nan", "optim.lr=nan must be a finite number > 0"),
        ("optim.weight_decay=-inf", "optim.weight_decay=-inf must be a finite number >= 0"),
        ("optim.min_lr_ratio=nan", "optim.min_lr_ratio=nan must be a finite number in [0, 1]"),
        ("trainer.max_time=inf", "trainer.max_time=inf must be a finite number > 0 (or null)"),
        ("checkpoint.every_minutes=inf", "checkpoint.every_minutes=inf must be a finite number > 0 (or null)"),
        ("optim.lr_by_size.tiny=inf", "must be values, each a finite number > 0"),
        ("optim.grad_clip=nan", "optim.grad_clip=nan must be a number > 0, or inf"),
    ],
)
def test_a_non_finite_number_is_told_it_must_be_finite(override, message):
    with pytest.raises(ConfigError) as e:
        validate(make(override))
    assert message in str(e.value)


@pytest.mark.parametrize("name", ["..", ".", "a/b", "../x", "a\\b", "/abs"])
def test_an_experiment_name_with_path_parts_is_refused(name):
    with pytest.raises(ConfigError) as e:
        validate(make(f"tracking.experiment_name='{name}'"))
    assert "must be non-empty text on one line without path parts ('/', '\\', '.' or '..')" in str(e.value)


def test_experiment_names_without_path_parts_pass_and_stay_inside_mlartifacts():
    from lingmao.tracking.store import artifact_root

    for name in ("lingmao", "poetry-small.v2", "诗 实验", "a..b"):
        validate(make(f"tracking.experiment_name='{name}'"))
    # Databricks names its experiments by workspace path
    validate(make("tracking.uri=databricks", "tracking.experiment_name=/Users/me@example.com/lingmao"))
    for name in ("..", ".", "a/../.."):
        assert artifact_root("sqlite:////x/mlflow.db", name).startswith("file:///x/mlartifacts/")
        assert not artifact_root("sqlite:////x/mlflow.db", name).endswith(("/.", "/.."))
