"""`lingmao generate checkpoint=RUN_FOLDER prompt=床前明月光 n=4`: sample from a trained model.

Arguments are key=value (lingmao.config.options; no Hydra: a checkpoint carries its
own config). A prompt is normalised as the checkpoint's corpus was (data.script
simplified: OpenCC t2s), so a traditional-script prompt meets the characters
the model learned. The decoding defaults are the remedy for a model that
repeats itself: top_k 50, top_p 0.95, repetition_penalty 1.2.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field

import torch

from lingmao.config import ConfigError
from lingmao.config.options import OptionError, asked_for_help, choice, doc, parse
from lingmao.data.prepare import normalizer
from lingmao.data.tokenizer import unknown_chars
from lingmao.model.decoding import complete
from lingmao.tracking.locate import WHICH, checkpoint_path
from lingmao.train.backend import DEVICES, pick_device
from lingmao.train.checkpoint import load_model, script_of

FORMATS = ("text", "jsonl")


@dataclass
class Options:
    checkpoint: str = field(default="", metadata=doc("a run folder, a .pt file or an MLflow run id (required)"))
    which: str = field(default="last", metadata=doc("of a run folder or run id: last | best (lowest val loss)"))
    prompt: list[str] = field(
        default_factory=lambda: ["床前明月光"], metadata=doc("text to continue; [a,b] or repeated prompt= for several")
    )
    n: int = field(default=4, metadata=doc("samples per prompt"))
    max_new_tokens: int = field(default=64, metadata=doc("tokens to generate per sample"))
    temperature: float = field(default=1.0, metadata=doc("<= 0: greedy"))
    top_k: int = field(default=50, metadata=doc("0: off"))
    top_p: float = field(default=0.95, metadata=doc("1.0: off (nucleus sampling)"))
    repetition_penalty: float = field(default=1.2, metadata=doc("1.0: off (CTRL's penalty)"))
    seed: int = field(default=1337, metadata=doc("sampling seed"))
    device: str = field(default="auto", metadata=doc("auto | cpu | cuda | mps"))
    format: str = field(default="text", metadata=doc("text | jsonl (one JSON object per sample)"))
    stop_at_eos: bool = field(default=True, metadata=doc("end a sample at the end of a document"))
    cache: bool = field(default=True, metadata=doc("false: recompute the prefix at every token"))
    tokenizer: str = field(default="", metadata=doc("tokenizer.json, for a checkpoint that does not embed one"))
    tracking_uri: str = field(
        default="", metadata=doc("MLflow store of a run id; default $MLFLOW_TRACKING_URI, else ./mlflow.db")
    )


SUMMARY = (
    "Sample continuations of each prompt from a trained model; the prompt is normalised to the "
    "checkpoint corpus' script first."
)
EXAMPLES = [
    "lingmao generate checkpoint=outputs/2026-01-01/12-00-00 prompt=床前明月光 n=4",
    "lingmao generate checkpoint=outputs/myrun which=best prompt=[舉頭望明月,子曰] temperature=0.8",
    "lingmao generate checkpoint=0123456789abcdef0123456789abcdef format=jsonl   # an MLflow run id",
]


def parse_args(argv: list[str]) -> Options:
    opts = parse(Options, argv)
    choice("which", opts.which, WHICH)
    choice("format", opts.format, FORMATS)
    choice("device", opts.device, DEVICES)
    if opts.n < 1 or opts.max_new_tokens < 1:
        raise OptionError("n and max_new_tokens must be >= 1")
    if not 0 < opts.top_p <= 1 or opts.repetition_penalty <= 0 or opts.top_k < 0:
        raise OptionError("top_p must be in (0, 1], repetition_penalty > 0, top_k >= 0")
    if not opts.prompt or any(not p.strip() for p in opts.prompt):
        raise OptionError("prompt is empty: give the text to continue, e.g. prompt=床前明月光")
    return opts


def warn_unknown_chars(tok, prompts: list[str]) -> None:
    for prompt in prompts:
        if missing := unknown_chars(tok, prompt):
            print(
                f"warning: prompt {prompt!r}: {''.join(missing)} not in the vocabulary (read as <unk>)", file=sys.stderr
            )


def print_samples(model, tok, prompt: str, o: Options, settings: dict, generator: torch.Generator) -> int:
    """Sample `o.n` continuations of `prompt` and print each in `o.format`;
    returns the tokens they generated."""
    samples = complete(
        model,
        tok,
        prompt,
        o.n,
        o.max_new_tokens,
        temperature=o.temperature,
        top_k=o.top_k,
        top_p=o.top_p,
        repetition_penalty=o.repetition_penalty,
        generator=generator,
        stop_at_eos=o.stop_at_eos,
        use_cache=o.cache,
    )
    for i, s in enumerate(samples):
        if o.format == "jsonl":
            print(json.dumps({**s, "sample": i, **settings}, ensure_ascii=False))
        else:
            print(
                f"[{i + 1}] {prompt}{s['text']}\n    rep4 {s['rep4']:.2f} | distinct-1 {s['distinct1']:.2f} "
                f"| distinct-2 {s['distinct2']:.2f}"
            )
    return sum(s["new_tokens"] for s in samples)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if asked_for_help(argv, Options, "generate", SUMMARY, EXAMPLES):
        return 0
    try:
        o = parse_args(argv)
        path = checkpoint_path(o.checkpoint, o.which, o.tracking_uri)
        device = pick_device(o.device)
        model, tok, state = load_model(path, device, o.tokenizer)
    except (OptionError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    normalise = normalizer(script_of(state))
    prompts = [normalise(p) for p in o.prompt]
    warn_unknown_chars(tok, prompts)
    settings = {
        "temperature": o.temperature,
        "top_k": o.top_k,
        "top_p": o.top_p,
        "repetition_penalty": o.repetition_penalty,
        "seed": o.seed,
    }
    generator = torch.Generator(device=device).manual_seed(o.seed)
    start = time.perf_counter()
    if o.format == "text":
        print(
            f"# {path} (step {state['progress']['step']}, {model.num_params() / 1e6:.1f}M params) | "
            + " ".join(f"{k} {v}" for k, v in settings.items())
        )
    tokens = sum(print_samples(model, tok, prompt, o, settings, generator) for prompt in prompts)
    seconds = time.perf_counter() - start
    print(
        f"# {tokens} tokens in {seconds:.2f}s ({tokens / seconds:.1f} tokens/s on {device})",
        file=sys.stderr if o.format == "jsonl" else sys.stdout,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
