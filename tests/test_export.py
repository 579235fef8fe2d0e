"""The trained model outside lingmao: `lingmao export` writes a Hugging Face
folder that transformers loads with no custom code and that computes
lingmao's logits and greedy tokens; the run's MLflow model serves over
HTTP with `mlflow models serve`, and `lingmao export mlflow=true` logs one
for an old run."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from trained_run import REGISTERED, trained_run, val_folder

from lingmao import export
from lingmao.data import load_prepared
from lingmao.data.tokenizer import EOS_ID, build_char_tokenizer
from lingmao.model import hf
from lingmao.model.gpt import GPT, GPTConfig
from lingmao.train.checkpoint import load_model

CJK = re.compile(r"[\u4e00-\u9fff]")
STRIDE = 8  # val windows every 8 tokens: the fixture corpus' val split holds only 5 disjoint ones


@pytest.fixture(scope="module")
def trained(tmp_path_factory, _mlflow_template) -> Path:
    return trained_run(tmp_path_factory.getbasetemp() / "trained-run", _mlflow_template)


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory) -> Path:
    """`lingmao export` of the run folder, its card filled from the run's MLflow store."""
    out = tmp_path_factory.mktemp("hf") / "poet"
    argv = [f"checkpoint={trained / 'run'}", f"out={out}", f"tracking_uri={trained / 'mlflow.db'}"]
    assert export.main(argv) == 0
    return out


def test_transformers_computes_lingmaos_logits_and_greedy_tokens(trained, exported):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok, state = load_model(trained / "run" / "checkpoints" / "last.pt", torch.device("cpu"))
    hf_model = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(exported)
    assert type(hf_model).__name__ == "GPTNeoXForCausalLM"
    assert not any("trust_remote_code" in p.read_text() for p in exported.glob("*.json"))
    c = model.config
    assert c.padded_vocab > c.vocab_size == len(hf_tok)  # the padding stays; the tokenizer has no token for it
    assert hf_model.config.vocab_size == c.padded_vocab

    ctx = c.context_length
    val = torch.from_numpy(load_prepared(str(val_folder(trained))).tokens("val").astype("int64"))
    windows = val.unfold(0, ctx, STRIDE)
    assert len(windows) >= 16
    text = tok.decode(windows[0].tolist(), skip_special_tokens=False)
    assert hf_tok(text).input_ids == windows[0].tolist()  # the HF tokenizer reads the val text as lingmao does
    with torch.no_grad():
        ours, theirs = model(windows), hf_model(windows).logits
    diff = (ours - theirs[..., : c.vocab_size]).abs().max().item()
    print(f"max |logit diff| over {len(windows)} val windows of {ctx} tokens: {diff:.2e}")
    assert diff < 1e-4

    for prompt in windows[:3, :8]:
        mine = model.generate(prompt[None], 40, temperature=0, eos_id=EOS_ID)[0].tolist()
        kwargs = {"do_sample": False, "max_new_tokens": 40, "repetition_penalty": 1.0}
        theirs = hf_model.generate(prompt[None], attention_mask=torch.ones(1, 8, dtype=torch.long), **kwargs)
        assert theirs[0].tolist() == mine


def test_the_pipeline_continues_a_poem_in_chinese(exported):
    from transformers import pipeline

    generate = pipeline("text-generation", model=str(exported), device="cpu")
    out = generate("床前明月光，", max_new_tokens=24)[0]["generated_text"]
    assert out.startswith("床前明月光，") and CJK.search(out[6:]), out


def test_the_folder_holds_config_weights_tokenizer_generation_config_and_card(trained, exported):
    names = {p.name for p in exported.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert {"generation_config.json", "README.md"} <= names
    config = json.loads((exported / "config.json").read_text())
    assert config["use_parallel_residual"] is False and config["rotary_pct"] == 1.0  # llama.cpp reads rotary_pct
    assert config["hidden_act"] == "gelu_pytorch_tanh" and config["tie_word_embeddings"] is True
    assert json.loads((exported / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    generation = json.loads((exported / "generation_config.json").read_text())
    from tokenizers import Tokenizer

    tokens = Tokenizer.from_file(str(exported / "tokenizer.json")).get_vocab_size()
    assert generation["suppress_tokens"] == list(range(tokens, config["vocab_size"]))  # the padding, never sampled
    card = (exported / "README.md").read_text()
    state = torch.load(trained / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert state["mlflow_run_id"] in card and "hf-export" in card  # the run it came from
    assert f"| all | {state['val_loss']:.4f} |" in card and "| 诗 |" in card  # val loss, per genre
    assert "30 optimizer steps" in card and "simplified script" in card and "**床前明月光，**" in card


def test_learned_positions_export_as_gpt2(tmp_path):
    """A model with model.rotary=false is a GPT-2: same logits, same greedy tokens."""
    from transformers import AutoModelForCausalLM

    tok = build_char_tokenizer(["床前明月光，疑是地上霜。举头望明月，低头思故乡。"])
    torch.manual_seed(0)
    c = GPTConfig(vocab_size=tok.get_vocab_size(), d_model=32, n_heads=4, n_layers=2, context_length=24, rotary=False)
    model = GPT(c).eval()
    with torch.no_grad():  # away from the initialisation: biases and LayerNorm gains nonzero
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    hf.write_folder(model, tok, tmp_path / "gpt2", "# card\n")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "gpt2").eval()
    assert type(loaded).__name__ == "GPT2LMHeadModel"
    x = torch.randint(4, c.vocab_size, (3, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model(x) - loaded(x).logits[..., : c.vocab_size]).abs().max().item() < 1e-4
    greedy = loaded.generate(x[:1, :5], do_sample=False, max_new_tokens=15, repetition_penalty=1.0)
    assert greedy[0].tolist() == model.generate(x[:1, :5], 15, temperature=0, eos_id=EOS_ID)[0].tolist()


@pytest.mark.parametrize(
    "switch, named",
    [
        ({"moe_experts": 4}, "model.moe.experts=4"),
        ({"qk_norm": True}, "model.qk_norm=true"),
        ({"mlp": "relu2"}, "model.mlp=relu2"),
    ],
)
def test_a_switch_no_standard_architecture_holds_is_refused_naming_it(switch, named):
    with pytest.raises(hf.ExportError) as err:
        hf.architecture(GPTConfig(vocab_size=50, d_model=32, n_heads=4, n_layers=1, **switch))
    assert str(err.value).startswith(named) and "\n" not in str(err.value)
    hf.architecture(GPTConfig(vocab_size=50, d_model=32, n_heads=4, n_layers=1, zero_init_proj=True))  # an init


def test_the_command_refuses_in_one_line(trained, tmp_path, capsys):
    assert export.main([f"checkpoint={trained / 'run'}", "hf=false"]) == 2
    assert capsys.readouterr().err == "error: hf=false and mlflow=false export nothing: set one of them true\n"
    assert export.main([f"checkpoint={trained / 'run'}", "register=poet"]) == 2
    assert "register=poet: registers the MLflow model; add mlflow=true" in capsys.readouterr().err
    assert export.main([f"checkpoint={tmp_path / 'nothing'}"]) == 2
    assert "no such file or folder" in capsys.readouterr().err


# -- the MLflow model ------------------------------------------------------------


def _client(trained: Path):
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{trained / 'mlflow.db'}")


def _models_of(trained: Path, run_id: str) -> list:
    client = _client(trained)
    experiment = client.get_run(run_id).info.experiment_id
    return [m for m in client.search_logged_models(experiment_ids=[experiment]) if m.source_run_id == run_id]


def test_the_run_logged_its_model_linked_to_its_val_metrics_and_registered_it(trained):
    run_id = torch.load(trained / "run" / "model.pt", weights_only=True)["mlflow_run_id"]
    (model, *_) = _models_of(trained, run_id)  # what the UI's model view lists
    assert model.name == "pyfunc" and str(model.status) in ("READY", "LoggedModelStatus.READY")
    metrics = {m.key: m for m in model.metrics}
    assert metrics["val/loss"].step == 30 and metrics["val/loss"].model_id == model.model_id
    version = _client(trained).get_model_version(REGISTERED, "1")
    assert version.source == f"models:/{model.model_id}" and version.run_id == run_id
    # the run's weights artifact is where it was
    assert [a.path for a in _client(trained).list_artifacts(run_id, "model")] == ["model/model.pt"]


def test_defining_the_pyfunc_model_prints_no_advice_of_mlflows():
    # MLflow warns, once per class, about a predict without type hints: it showed after every run's "done"
    code = "import warnings; warnings.simplefilter('always'); import lingmao.tracking.pyfunc"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "type hint" not in out.stderr.lower(), out.stderr[-2000:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _wait_up(url: str, proc: subprocess.Popen, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"mlflow models serve exited with {proc.returncode}: {proc.stdout.read()[-3000:]}")
        try:
            urllib.request.urlopen(url + "/ping", timeout=2).close()
            return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"mlflow models serve did not answer {url}/ping within {seconds:.0f}s")


@pytest.mark.slow
def test_mlflow_models_serve_answers_a_prompt_with_its_continuation(trained):
    run_id = torch.load(trained / "run" / "model.pt", weights_only=True)["mlflow_run_id"]
    port = _free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{trained / 'mlflow.db'}"}
    cmd = ["mlflow", "models", "serve", "-m", f"runs:/{run_id}/pyfunc", "--env-manager", "local"]
    server = subprocess.Popen(
        [sys.executable, "-m", *cmd, "-h", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # uvicorn runs in its own process: stopped with its group
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_up(url, server, 120)
        status, answer = _post(url + "/invocations", {"inputs": ["床前明月光"]})
        assert status == 200 and len(answer["predictions"]) == 1 and CJK.search(answer["predictions"][0]), answer
        greedy = {"inputs": ["床前明月光", "举头"], "params": {"temperature": 0, "max_new_tokens": 12}}
        status, first = _post(url + "/invocations", greedy)
        assert status == 200 and len(first["predictions"]) == 2 and _post(url + "/invocations", greedy)[1] == first
        status, refused = _post(url + "/invocations", {"inputs": [""]})
        assert status == 400 and "non-empty" in refused["message"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=20)


def test_the_registered_model_loads_and_predicts(trained, monkeypatch):
    import mlflow.pyfunc

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{trained / 'mlflow.db'}")
    model = mlflow.pyfunc.load_model(f"models:/{REGISTERED}/1")
    (poem,) = model.predict(["牀前明月光，"], params={"temperature": 0.0, "max_new_tokens": 8})  # traditional 牀
    assert CJK.search(poem) and model.metadata.signature.params is not None


def test_export_mlflow_true_logs_the_model_of_an_old_run(trained, capsys):
    run_id = torch.load(trained / "run" / "model.pt", weights_only=True)["mlflow_run_id"]
    before = len(_models_of(trained, run_id))
    argv = [f"checkpoint={run_id}", "which=best", "mlflow=true", "hf=false", f"register={REGISTERED}"]
    assert export.main([*argv, f"tracking_uri={trained / 'mlflow.db'}"]) == 0
    out = capsys.readouterr().out
    assert f"runs:/{run_id}/pyfunc" in out and f"models:/{REGISTERED}/" in out
    assert len(_models_of(trained, run_id)) == before + 1
