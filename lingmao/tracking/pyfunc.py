"""The trained model as an MLflow model (a LoggedModel, flavor pyfunc): what
`mlflow models serve -m runs:/RUN_ID/pyfunc` (or models:/NAME/VERSION)
answers, from a request such as {"inputs": ["床前明月光"]}, with one
continuation per prompt: {"predictions": ["，疑是地上霜。..."]}.

The model is logged into the run that trained it (mlflow.models.Model.log
with its run_id: the run is not reopened, so its status and end time stay),
with the run's val metrics at the checkpoint's step linked to it, so the
UI's model view lists it beside them. It carries its checkpoint (weights,
config, tokenizer; no optimizer state) and lingmao's own code (code_paths),
so it serves with the lingmao it was trained with.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import warnings
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import mlflow
import pandas as pd
import torch
from mlflow.models import Model, ModelSignature
from mlflow.pyfunc import PythonModel
from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema

import lingmao
from lingmao.config.compose import CONF_DIR, EXPERIMENTS_DIR
from lingmao.data.prepare import normalizer
from lingmao.model.decoding import complete
from lingmao.model.gpt import GPT, GPTConfig

# The LoggedModel's name, the path in runs:/RUN_ID/pyfunc. Not "model": the
# run's model/ artifact folder already holds model.pt, and MLflow 3 lists and
# downloads a same-named LoggedModel's files into that folder too.
NAME = "pyfunc"
# What serving needs of a checkpoint: not the optimizer's moments (2/3 of it).
KEEP = ("format", "model", "config", "tokenizer", "tokenizer_hash", "progress", "val_loss", "mlflow_run_id")
# Request params (`{"inputs": [...], "params": {"temperature": 0.8}}`) and their
# defaults: lingmao generate's, the remedy for a model that repeats itself.
PARAMS = {
    "max_new_tokens": (DataType.long, 64),
    "temperature": (DataType.double, 1.0),
    "top_k": (DataType.long, 50),
    "top_p": (DataType.double, 0.95),
    "repetition_penalty": (DataType.double, 1.2),
    "seed": (DataType.long, 1337),
}
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec(DataType.string)]),  # one prompt per row
    outputs=Schema([ColSpec(DataType.string)]),  # its continuation (the prompt not repeated)
    params=ParamSchema([ParamSpec(name, kind, default) for name, (kind, default) in PARAMS.items()]),
)
_PROGRESS_BAR = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
REQUIREMENTS = ("mlflow", "torch", "tokenizers", "numpy", "omegaconf", "opencc")  # what predict imports


def _prompts(model_input) -> list[str]:
    """The prompts of a request, whichever form MLflow hands them in: a
    DataFrame (one column, a schema's), a Series, an array, a list or one string."""
    if hasattr(model_input, "iloc") and getattr(model_input, "ndim", 1) == 2:
        model_input = model_input.iloc[:, 0]
    if isinstance(model_input, str):
        model_input = [model_input]
    return [str(p) for p in list(model_input)]


class Poet(PythonModel):
    """A lingmao checkpoint behind MLflow's pyfunc interface: prompts in,
    continuations out, normalised to the corpus' script as `lingmao generate` does."""

    def load_context(self, context) -> None:
        from tokenizers import Tokenizer

        state = torch.load(context.artifacts["checkpoint"], map_location="cpu", weights_only=True)
        self.tokenizer = Tokenizer.from_str(state["tokenizer"])
        config = GPTConfig.from_model_config(state["config"]["model"], self.tokenizer.get_vocab_size())
        self.model = GPT(config)
        self.model.load_state_dict(state["model"])
        self.model.eval()
        self.normalise = normalizer(state["config"].get("data", {}).get("script", "simplified"))

    # A DataFrame hint (what a signature makes MLflow hand over) adds no validation
    # of MLflow's and keeps its advice to add hints off the run's output.
    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> list[str]:
        p = {name: default for name, (_, default) in PARAMS.items()} | (params or {})
        prompts = [self.normalise(x) for x in _prompts(model_input)]
        if not prompts or any(not x.strip() for x in prompts):
            raise mlflow.exceptions.MlflowException.invalid_parameter_value("every prompt must be non-empty text")
        generator = torch.Generator().manual_seed(int(p["seed"]))
        with torch.no_grad():
            return [self._one(x, p, generator) for x in prompts]

    def _one(self, prompt: str, p: dict, generator: torch.Generator) -> str:
        (sample,) = complete(
            self.model,
            self.tokenizer,
            prompt,
            1,
            int(p["max_new_tokens"]),
            temperature=float(p["temperature"]),
            top_k=int(p["top_k"]),
            top_p=float(p["top_p"]),
            repetition_penalty=float(p["repetition_penalty"]),
            generator=generator,
        )
        return sample["text"]


def requirements() -> list[str]:
    """This environment's versions of what predict imports (torch without its
    local build tag: +cpu is no PyPI version)."""
    out = []
    for name in REQUIREMENTS:
        try:
            out.append(f"{name}=={version(name).split('+')[0]}")
        except PackageNotFoundError:
            out.append(name)
    return out


def code_paths() -> list[str]:
    """lingmao's package, and conf/ and experiments/ where they sit beside it
    (a checkout), which its config module looks for at import."""
    package = Path(lingmao.__file__).parent
    return [str(p) for p in (package, CONF_DIR, EXPERIMENTS_DIR) if package not in p.parents]


@contextlib.contextmanager
def _logging_to(uri: str):
    """MLflow's global tracking URI set to `uri` (Model.log and the registry
    read it), its progress bars and its advice off (type hints, an input
    example, cloudpickle: the signature is given and the class is lingmao's
    own), all as they were afterwards."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", _PROGRESS_BAR)}
    logger = logging.getLogger("mlflow")
    level = logger.level
    os.environ[_PROGRESS_BAR] = "false"
    logger.setLevel(logging.ERROR)
    mlflow.set_tracking_uri(uri)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        mlflow.set_tracking_uri(saved["MLFLOW_TRACKING_URI"])  # None: back to MLflow's default
        logger.setLevel(level)
        if saved[_PROGRESS_BAR] is None:
            os.environ.pop(_PROGRESS_BAR, None)
        else:
            os.environ[_PROGRESS_BAR] = saved[_PROGRESS_BAR]


def log_pyfunc(uri: str, run_id: str, checkpoint: Path, register: str | None = None) -> tuple[str, int | None]:
    """Log `checkpoint` as the MLflow model of run `run_id` in the store
    `uri`, linked to the run's metrics at the checkpoint's step; with
    `register`, also as a new version of that registered model.
    Returns (model_id, registered version or None)."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    step = int(state.get("progress", {}).get("step", 0))
    with tempfile.TemporaryDirectory() as tmp, _logging_to(uri):
        slim = Path(tmp) / "checkpoint.pt"
        torch.save({k: state[k] for k in KEEP if k in state}, slim)
        run = mlflow.MlflowClient(uri).get_run(run_id)
        # Created here, in the run's experiment: Model.log without an active
        # run would put it in the default experiment, away from its run.
        logged = mlflow.initialize_logged_model(
            name=NAME,
            source_run_id=run_id,
            experiment_id=run.info.experiment_id,
            params=run.data.params,
            tags={"lingmao.checkpoint": str(Path(checkpoint).resolve()), "lingmao.step": str(step)},
        )
        info = Model.log(
            artifact_path=None,
            name=NAME,
            flavor=mlflow.pyfunc,
            run_id=run_id,
            model_id=logged.model_id,
            python_model=Poet(),
            artifacts={"checkpoint": str(slim)},
            code_paths=code_paths(),
            signature=SIGNATURE,
            pip_requirements=requirements(),  # given: inferring them loads the model in a subprocess
            registered_model_name=register,
            step=step,
        )
    return logged.model_id, info.registered_model_version


def log_run_model(tracker, weights: Path, register: str | None = None) -> str | None:
    """At the end of a run: `weights` (the run's model.pt) as the run's MLflow
    model, registered as `register` if given. Never fails the finished run:
    a problem is one warning line saying how to log it later. Returns the
    model's runs:/ URI, or None."""
    if not tracker.enabled:
        return None
    later = f"lingmao export checkpoint={weights} mlflow=true hf=false" + (f" register={register}" if register else "")
    if tracker.offline or not tracker.run_id:
        print(f"warning: no MLflow model logged: the store was not reachable; later: {later}", file=sys.stderr)
        return None
    try:
        model_id, version = log_pyfunc(tracker.uri, tracker.run_id, weights, register)
    except Exception as e:  # the run is done and its weights are safe: say so, do not fail it
        first = str(e).splitlines()[0][:300] if str(e) else ""
        print(f"warning: no MLflow model logged ({type(e).__name__}: {first}); later: {later}", file=sys.stderr)
        return None
    uri = f"runs:/{tracker.run_id}/{NAME}"
    registered = f"; registered as models:/{register}/{version}" if version else ""
    serve = f"MLFLOW_TRACKING_URI={tracker.uri} mlflow models serve -m {uri} --env-manager local"
    print(f"mlflow model: {uri} (model {model_id}){registered}\n  serve: {serve}")
    return uri
