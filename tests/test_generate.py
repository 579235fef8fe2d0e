import json

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from lingmao import generate
from lingmao.config.compose import CONF_DIR, register
from lingmao.data.textmetrics import repeated_ngram_rate
from lingmao.data.tokenizer import build_char_tokenizer, tokenizer_hash
from lingmao.model.decoding import complete
from lingmao.model.gpt import GPT, GPTConfig
from lingmao.model.sampling import nucleus, penalize_repetition
from lingmao.train import checkpoint

register()


def tiny(ctx=16, vocab=50):
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=vocab, d_model=32, n_heads=4, n_layers=2, context_length=ctx, dropout=0.0)).eval()


def test_cached_greedy_equals_uncached_token_for_token_past_the_context():
    model = tiny(ctx=16)
    prompt = torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(3))
    # 5 + 30 tokens: the window slides past context_length=16
    cached = model.generate(prompt, 30, temperature=0, use_cache=True)
    uncached = model.generate(prompt, 30, temperature=0, use_cache=False)
    assert cached.shape == (2, 35)
    assert torch.equal(cached, uncached)


def test_cached_logits_match_a_full_forward():
    from lingmao.model.attention import KVCache

    model = tiny()
    x = torch.randint(0, 50, (2, 12))
    cache = KVCache(model.config, 2, x.device, torch.float32)
    first = model(x[:, :7], cache)
    steps = [model(x[:, t : t + 1], cache) for t in range(7, 12)]
    torch.testing.assert_close(torch.cat([first, *steps], 1), model(x), atol=1e-5, rtol=1e-5)


def test_top_k_1_is_greedy():
    model = tiny()
    prompt = torch.zeros(1, 3, dtype=torch.long)
    sampled = model.generate(prompt, 20, temperature=1.0, top_k=1, generator=torch.Generator().manual_seed(5))
    assert torch.equal(sampled, model.generate(prompt, 20, temperature=0))


@pytest.mark.parametrize("top_p, kept", [(0.4, 1), (0.75, 2), (0.85, 3), (0.99, 4), (1.0, 4)])
def test_top_p_keeps_the_minimal_nucleus(top_p, kept):
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])  # sorted: 0.5 0.3 0.15 0.05
    out = nucleus(probs.log(), top_p)
    assert torch.isfinite(out).sum().item() == kept
    order = probs[0].argsort(descending=True)[:kept]
    assert torch.isfinite(out[0, order]).all()  # the most likely ones are the kept ones


def test_repetition_penalty_lowers_the_probability_of_a_seen_token():
    logits = torch.tensor([[2.0, -1.0, 0.5, 1.0]])
    seen = torch.tensor([[0, 1, 1]])  # token 0 (positive logit) and 1 (negative), 1 twice
    out = penalize_repetition(logits, seen, 1.2)
    assert out[0].tolist() == pytest.approx([2.0 / 1.2, -1.2, 0.5, 1.0])
    before, after = logits.softmax(-1)[0], out.softmax(-1)[0]
    assert after[0] < before[0] and after[1] < before[1]
    assert after[2] > before[2] and after[3] > before[3]


def test_repetition_penalty_breaks_a_greedy_loop():
    model = tiny()
    prompt = torch.zeros(1, 3, dtype=torch.long)
    plain = model.generate(prompt, 40, temperature=0)[0, 3:].tolist()
    penalized = model.generate(prompt, 40, temperature=0, repetition_penalty=1.5)[0, 3:].tolist()

    def as_text(ids):
        return "".join(chr(0x4E00 + i) for i in ids)

    assert repeated_ngram_rate(as_text(plain)) > 0.5  # a random model loops
    assert repeated_ngram_rate(as_text(penalized)) < repeated_ngram_rate(as_text(plain))


def test_seeded_sampling_is_reproducible():
    model = tiny()
    prompt = torch.zeros(3, 2, dtype=torch.long)

    def run(seed):
        return model.generate(
            prompt,
            20,
            temperature=1.0,
            top_k=0,
            top_p=0.9,
            repetition_penalty=1.1,
            generator=torch.Generator().manual_seed(seed),
        )

    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))


def test_generation_stops_once_every_row_reached_eos():
    model = tiny()
    prompt = torch.zeros(1, 3, dtype=torch.long)
    greedy = model.generate(prompt, 30, temperature=0)[0, 3:].tolist()
    eos = greedy[4]
    stopped = model.generate(prompt, 30, temperature=0, eos_id=eos)[0, 3:].tolist()
    assert stopped == greedy[: greedy.index(eos) + 1]


# --- the CLI ---

LINES = ["床前明月光，疑是地上霜。", "举头望明月，低头思故乡。", "明月几时有，把酒问青天。", "子曰：学而时习之。"]


@pytest.fixture
def checkpoint_file(tmp_path):
    """A checkpoint as the engine writes it, plus the tokenizer embedded."""
    tok = build_char_tokenizer(LINES)
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "config", overrides=["model=tiny", "model.context_length=32", "model.d_model=32", "model.n_heads=2"]
        )
    config = OmegaConf.to_container(cfg, resolve=True)
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_model_config(cfg.model, tok.get_vocab_size()))

    def write(embed=True, name="last.pt", step=7, script="simplified"):
        state = {
            "format": checkpoint.FORMAT,
            "model": model.state_dict(),
            "progress": {"step": step},
            "config": {**config, "data": {**config["data"], "script": script}},
            "tokenizer_hash": tokenizer_hash(tok),
        }
        if embed:
            state["tokenizer"] = tok.to_str()
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, tmp_path / name)
        return tmp_path / name

    write.tokenizer = tok
    return write


def test_cli_prints_n_samples_per_prompt(checkpoint_file, capsys):
    path = checkpoint_file()
    rc = generate.main(
        [
            f"checkpoint={path}",
            "prompt=床前",
            "prompt=子曰",
            "n=3",
            "max_new_tokens=12",
            "device=cpu",
            "stop_at_eos=false",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    lines = [line for line in out.splitlines() if line.startswith("[")]
    assert len(lines) == 6 and sum(line.startswith("[1] 床前") for line in lines) == 1
    assert "step 7" in out and "repetition_penalty 1.2" in out and "tokens/s" in out


def test_cli_jsonl_is_seeded_and_carries_metrics(checkpoint_file, capsys):
    path = checkpoint_file()
    args = [
        f"checkpoint={path}",
        "prompt=明月",
        "n=2",
        "max_new_tokens=10",
        "format=jsonl",
        "seed=3",
        "stop_at_eos=false",
    ]
    assert generate.main(args) == 0
    first = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert generate.main(args + ["cache=false"]) == 0  # same seed, no cache: the same samples
    second = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert first == second
    assert [r["sample"] for r in first] == [0, 1]
    assert {"prompt", "text", "new_tokens", "rep4", "distinct1", "distinct2", "top_p", "seed"} <= set(first[0])
    assert first[0]["new_tokens"] == 10 and first[0]["prompt"] == "明月"


def test_cli_errors_name_what_is_valid(checkpoint_file, tmp_path, capsys):
    assert generate.main(["prompt=x"]) == 2
    assert "checkpoint=PATH is required" in capsys.readouterr().err
    assert generate.main([f"checkpoint={tmp_path / 'nope.pt'}"]) == 2
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert generate.main([f"checkpoint={tmp_path / 'junk.pt'}"]) == 2
    assert "not a readable checkpoint" in capsys.readouterr().err
    assert generate.main(["checkpoint=a", "temprature=1"]) == 2
    assert "temperature" in capsys.readouterr().err  # the valid keys are listed
    assert generate.main(["checkpoint=a", "n=four"]) == 2
    assert "n='four': expected int" in capsys.readouterr().err
    assert generate.main(["checkpoint=a", "device=tpu"]) == 2
    assert "cpu, cuda, mps" in capsys.readouterr().err


def test_cli_finds_the_tokenizer_outside_an_old_checkpoint(checkpoint_file, tmp_path, capsys):
    path = checkpoint_file(embed=False, name="old.pt")
    assert generate.main([f"checkpoint={path}", "n=1", "max_new_tokens=4"]) == 2
    assert "tokenizer=PATH" in capsys.readouterr().err
    good = tmp_path / "tokenizer.json"
    checkpoint_file.tokenizer.save(str(good))
    assert generate.main([f"checkpoint={path}", f"tokenizer={good}", "n=1", "max_new_tokens=4"]) == 0
    capsys.readouterr()
    other = tmp_path / "other.json"
    build_char_tokenizer(["别的字"]).save(str(other))
    assert generate.main([f"checkpoint={path}", f"tokenizer={other}"]) == 2
    assert "not the vocabulary" in capsys.readouterr().err


def test_complete_samples_without_dropout_and_restores_the_mode():
    tok = build_char_tokenizer(LINES)
    torch.manual_seed(0)
    model = GPT(
        GPTConfig(vocab_size=tok.get_vocab_size(), d_model=32, n_heads=2, n_layers=1, context_length=16, dropout=0.5)
    ).train()

    def run():
        return complete(
            model,
            tok,
            "明月",
            2,
            12,
            temperature=0,
            top_k=0,
            top_p=1.0,
            repetition_penalty=1.0,
            generator=None,
            stop_at_eos=False,
        )

    first = run()
    assert model.training
    assert all(run() == first for _ in range(3))  # dropout would change the greedy choices from run to run
    assert [s["new_tokens"] for s in first] == [12, 12] and all(s["prompt"] == "明月" for s in first)


def test_cli_reads_a_checkpoint_the_engine_wrote(shared_cache, tmp_path, capsys):
    from lingmao.run import execute

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                "hardware=cpu",
                "model=tiny",
                "model.context_length=32",
                "model.d_model=32",
                "model.n_heads=2",
                "trainer.max_steps=2",
                "trainer.eval_every=2",
                "trainer.progress=false",
                "tracking.enabled=false",
                "hardware.batch=2",
                "hardware.accumulation=1",
            ],
        )
    execute(cfg, tmp_path, tmp_path / "run")
    capsys.readouterr()
    path = tmp_path / "run" / "checkpoints" / "last.pt"
    assert generate.main([f"checkpoint={path}", "n=2", "max_new_tokens=5", "format=jsonl"]) == 0  # tokenizer embedded
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 2 and rows[0]["prompt"] == "床前明月光"


# --- checkpoint=, prompts ---


def jsonl_rows(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines()]


def test_a_run_folder_means_its_last_or_best_checkpoint(checkpoint_file, tmp_path, capsys):
    checkpoint_file(name="run/checkpoints/last.pt", step=9)
    checkpoint_file(name="run/checkpoints/best.pt", step=4)
    assert generate.main([f"checkpoint={tmp_path / 'run'}", "n=1", "max_new_tokens=3"]) == 0
    assert "last.pt (step 9" in capsys.readouterr().out
    assert generate.main([f"checkpoint={tmp_path / 'run'}", "which=best", "n=1", "max_new_tokens=3"]) == 0
    assert "best.pt (step 4" in capsys.readouterr().out
    # the checkpoint folder itself works too
    assert generate.main([f"checkpoint={tmp_path / 'run' / 'checkpoints'}", "n=1", "max_new_tokens=3"]) == 0
    assert "last.pt (step 9" in capsys.readouterr().out


def test_a_run_folder_without_the_checkpoint_says_what_it_has(checkpoint_file, tmp_path, capsys):
    checkpoint_file(name="run/checkpoints/last.pt")
    assert generate.main([f"checkpoint={tmp_path / 'run'}", "which=best"]) == 2
    err = capsys.readouterr().err
    assert "no best.pt" in err and "use which=last" in err
    (tmp_path / "empty").mkdir()
    assert generate.main([f"checkpoint={tmp_path / 'empty'}"]) == 2
    assert "has written no checkpoint" in capsys.readouterr().err
    assert generate.main([f"checkpoint={tmp_path / 'run'}", "which=newest"]) == 2
    assert "which='newest': choose one of last, best" in capsys.readouterr().err


def _mlflow_run(db, tags: dict) -> str:
    from lingmao.tracking.tracker import Tracker

    tracker = Tracker(f"sqlite:///{db}", "lingmao", "generate-test", system_metrics=False)
    tracker.set_tags(tags)
    tracker.end()
    return tracker.run_id


def test_an_mlflow_run_id_finds_the_runs_folder(checkpoint_file, tmp_path, mlflow_db, capsys):
    checkpoint_file(name="run/checkpoints/last.pt", step=5)
    store = f"tracking_uri=sqlite:///{mlflow_db}"
    tagged = _mlflow_run(mlflow_db, {"run_dir": str(tmp_path / "run")})
    assert generate.main([f"checkpoint={tagged}", store, "n=1", "max_new_tokens=3"]) == 0
    assert "last.pt (step 5" in capsys.readouterr().out
    assert generate.main([f"checkpoint={tagged}", f"tracking_uri={mlflow_db}", "n=1", "max_new_tokens=3"]) == 0
    assert "last.pt (step 5" in capsys.readouterr().out  # the path of the .db file is enough
    # A run from before the run_dir tag that was resumed names its checkpoint folder through resumed_from.
    resumed = _mlflow_run(mlflow_db, {"resumed_from": str(tmp_path / "run" / "checkpoints" / "step00000002.pt")})
    assert generate.main([f"checkpoint={resumed}", store, "n=1", "max_new_tokens=3"]) == 0
    assert "last.pt (step 5" in capsys.readouterr().out
    untagged = _mlflow_run(mlflow_db, {"model": "tiny"})
    assert generate.main([f"checkpoint={untagged}", store]) == 2
    assert "records no run folder (tag run_dir)" in capsys.readouterr().err
    assert generate.main(["checkpoint=" + "0" * 32, store]) == 2
    assert f"no MLflow run {'0' * 32} in sqlite:///{mlflow_db}" in capsys.readouterr().err


@pytest.mark.parametrize("prompt", ["prompt=", "prompt=  ", "prompt=[床前,'']"])
def test_an_empty_prompt_is_refused_in_one_line(checkpoint_file, prompt, capsys):
    path = checkpoint_file()
    assert generate.main([f"checkpoint={path}", prompt]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: prompt is empty") and err.count("\n") == 1


def test_a_traditional_prompt_is_converted_like_the_corpus(checkpoint_file, capsys):
    args = ["prompt=舉頭", "n=1", "max_new_tokens=3", "format=jsonl"]
    assert generate.main([f"checkpoint={checkpoint_file()}", *args]) == 0  # data.script=simplified
    out, err = capsys.readouterr()
    assert jsonl_rows(out)[0]["prompt"] == "举头" and "vocabulary" not in err
    # data.script=keep: the corpus kept its script, so does the prompt; the unknown characters are named
    assert generate.main([f"checkpoint={checkpoint_file(name='keep.pt', script='keep')}", *args]) == 0
    out, err = capsys.readouterr()
    assert jsonl_rows(out)[0]["prompt"] == "舉頭" and "舉頭 not in the vocabulary" in err
