"""The README.md model card of an exported model: what it is, what it was
trained on and how, how well it predicts the val split, where it came from,
and a few of its continuations. Written from what the checkpoint holds and,
where the run is still in its MLflow store, what the run recorded."""

from __future__ import annotations

import math

from lingmao.model.gpt import GPT

# Genre-typical openings: a line of 诗, of 词, of 曲 (and 文). The model card's
# samples and the serve page's example buttons.
PROMPTS = {"诗": "床前明月光，", "词": "明月几时有？", "曲": "枯藤老树昏鸦，", "文": "子曰："}

_SOURCES = {
    "poetry": "the npm package chinese-poetry@2.0.1 (诗 词 曲 文 赋 of the classical canon)",
    "jsonl": "JSONL files",
    "hf": "a Hugging Face dataset",
    "prepared": "a prepared lingmao corpus",
}
_SCRIPTS = {
    "simplified": (
        "The corpus was converted to simplified script (OpenCC t2s; 全唐诗 is traditional in its source), "
        "so the vocabulary is simplified characters: give prompts in simplified script. `lingmao generate` "
        "converts a prompt itself; the tokenizer here does not (convert first, e.g. "
        "`opencc.OpenCC('t2s').convert(text)`): a traditional character it lacks reads as `<unk>`."
    ),
    "keep": "The corpus keeps the script of its sources (全唐诗 in traditional script, most of the rest simplified).",
}


def _front_matter(arch: str) -> str:
    family = "gpt_neox" if arch.startswith("GPTNeoX") else "gpt2"
    return (
        "---\nlanguage:\n- lzh\n- zh\nlibrary_name: transformers\npipeline_tag: text-generation\n"
        f"tags:\n- lingmao\n- classical-chinese\n- poetry\n- {family}\n---\n"
    )


def _model_section(model: GPT, arch: str) -> str:
    c = model.config
    positions = "rotary (full head, base 10000)" if c.rotary else "learned"
    padding = c.padded_vocab - c.vocab_size
    pad = f" + {padding} padding rows (model.vocab_multiple={c.vocab_multiple}; never generated)" if padding else ""
    return (
        f"## Model\n\n`{arch}` (standard transformers code, no `trust_remote_code`), exported from a lingmao GPT: "
        f"{model.num_params() / 1e6:.2f}M parameters, {c.n_layers} layers, width {c.d_model}, {c.n_heads} heads, "
        f"MLP {c.mlp_ratio}x with tanh GELU, {positions} positions, context {c.context_length} tokens, "
        f"tied embeddings. One token per character: vocabulary {c.vocab_size}{pad}.\n"
    )


def _data_section(config: dict) -> str:
    data = config.get("data", {})
    source = _SOURCES.get(data.get("source", "poetry"), data.get("source"))
    where = data.get("paths") or data.get("hf_name") or data.get("prepared_dir") or ""
    caps = data.get("genre_caps") or {}
    lines = [
        f"Source: {source}{f' ({where})' if where else ''}; exact duplicate documents removed; "
        f"train/val split by document ({data.get('val_fraction', 0.02):.0%} val, split seed {data.get('split_seed')}).",
        _SCRIPTS.get(data.get("script", "simplified"), f"Script: {data.get('script')}."),
    ]
    if caps:
        lines.append("Genre caps: " + ", ".join(f"{g} {n}" for g, n in caps.items()) + ".")
    return "## Training data\n\n" + "\n\n".join(lines) + "\n"


def _training_section(state: dict, run: dict | None) -> str:
    plan, progress = state.get("plan", {}), state.get("progress", {})
    step, batch = progress.get("step", 0), plan.get("effective_batch")
    context = plan.get("context_length") or state["config"]["model"]["context_length"]
    tokens = f", {step * batch * context:,} tokens" if batch else ""
    device = plan.get("device_name") or plan.get("device", "?")
    hardware = (run or {}).get("tags", {}).get("hardware") or plan.get("preset", "?")
    optim = state["config"].get("optim", {}).get("name", "")
    seconds = progress.get("seconds")
    took = f" in {seconds / 60:.1f} min of training" if seconds else ""
    return (
        f"## Training\n\n{step} optimizer steps{tokens}{took}: effective batch {batch} windows of {context} tokens, "
        f"{optim or 'the default'} optimizer; hardware preset `{hardware}` ({device} x {plan.get('devices', 1)}, "
        f"{plan.get('precision', '?')}).\n"
    )


def _eval_section(state: dict, run: dict | None) -> str:
    metrics = (run or {}).get("metrics", {})
    loss = metrics.get("val/loss", state.get("val_loss"))
    if loss is None:
        return "## Evaluation\n\nNo val evaluation was recorded for this checkpoint (`lingmao eval` measures one).\n"
    rows = [("all", loss, metrics.get("val/perplexity", math.exp(min(loss, 50))), metrics.get("val/bpc"))]
    names = {k.removeprefix("genre."): v for k, v in (run or {}).get("tags", {}).items() if k.startswith("genre.")}
    for key, value in sorted(metrics.items()):
        if key.startswith("val/loss_"):
            genre = key.removeprefix("val/loss_")
            rows.append((names.get(genre, genre), value, math.exp(min(value, 50)), None))
    table = "\n".join(f"| {g} | {v:.4f} | {p:.2f} | {'' if b is None else f'{b:.4f}'} |" for g, v, p, b in rows)
    return (
        f"## Evaluation\n\nOn the held-out val split, at step {state.get('progress', {}).get('step')} "
        f"(loss in nats per token; bpc: bits per character):\n\n| genre | val loss | perplexity | bpc |\n"
        f"|---|---|---|---|\n{table}\n"
    )


def _provenance_section(state: dict, run: dict | None) -> str:
    if run:
        commit = run["tags"].get("git.commit", "")
        git = f", code at git commit `{commit}`" if commit else ""
        return (
            f"## Provenance\n\nMLflow run `{run['run_id']}` ({run['run_name']}) in `{run['uri']}`, "
            f"experiment {run['experiment_id']}{git}.\n"
        )
    run_id = state.get("mlflow_run_id")
    return f"## Provenance\n\nMLflow run `{run_id}` (its store was not read).\n" if run_id else ""


def _samples_section(samples: list[dict]) -> str:
    if not samples:
        return ""
    shown = "\n".join(f"- **{s['prompt']}**{s['text'].replace(chr(10), ' / ')}" for s in samples)
    return f"## Samples\n\nWith the generation config's decoding (sampled; the prompt in bold):\n\n{shown}\n"


def _usage_section(arch: str) -> str:
    return (
        "## Use\n\n```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer, pipeline\n\n"
        'tok = AutoTokenizer.from_pretrained("THIS_FOLDER")\n'
        'model = AutoModelForCausalLM.from_pretrained("THIS_FOLDER")\n'
        'print(pipeline("text-generation", model=model, tokenizer=tok)("床前明月光，", max_new_tokens=48)[0]'
        '["generated_text"])\n```\n\nThe generation config holds lingmao generate\'s decoding (top-k 50, top-p 0.95, '
        "repetition penalty 1.2) and suppresses the padding ids. A prompt plus continuation longer than the "
        "context is outside what the model was trained on.\n"
    )


def model_card(model: GPT, arch: str, state: dict, run: dict | None, samples: list[dict]) -> str:
    """The card's markdown. `run`: lineage.run_record's dict, or None where
    the store was not read; `samples`: {prompt, text} continuations."""
    name = (run or {}).get("run_name") or state["config"].get("model", {}).get("name", "lingmao")
    parts = [
        _front_matter(arch),
        f"# lingmao {name}\n\nA small GPT trained from scratch on classical Chinese with "
        "lingmao (灵猫墨韵), exported to Hugging Face format by `lingmao export`.\n",
        _model_section(model, arch),
        _data_section(state["config"]),
        _training_section(state, run),
        _eval_section(state, run),
        _provenance_section(state, run),
        _samples_section(samples),
        _usage_section(arch),
    ]
    return "\n".join(p for p in parts if p)
