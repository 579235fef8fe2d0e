"""`python -m lingmao.generate checkpoint=PATH prompt=床前明月光 n=4`: sample from a trained model.

Arguments are key=value (no Hydra: a checkpoint carries its own config);
`prompt=` may be given more than once, `--jsonl` is short for format=jsonl.
The defaults are seed 004's remedy for a model that repeats itself: top_k 50,
top_p 0.95, repetition_penalty 1.2, temperature 1.0.

    checkpoint          a .pt file written by lingmao.run (checkpoints/last.pt)
    prompt              text to continue (repeatable)           床前明月光
    n                   samples per prompt                      4
    max_new_tokens      tokens to generate per sample           64
    temperature         <= 0: greedy                            1.0
    top_k               0: off                                  50
    top_p               1.0: off (nucleus sampling)             0.95
    repetition_penalty  1.0: off (CTRL)                         1.2
    seed                sampling seed                           1337
    device              cpu | cuda | mps | auto                 auto
    format              text | jsonl                            text
    stop_at_eos         end a sample at the end of a document   true
    cache               false: recompute the prefix every token true
    tokenizer           tokenizer.json, for a checkpoint that does not embed one
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .data.tokenizer import EOS_ID, tokenizer_hash
from .model import GPT, GPTConfig
from .textmetrics import repetition

FORMATS = ("text", "jsonl")
DEVICES = ("auto", "cpu", "cuda", "mps")


@dataclass
class Options:
    checkpoint: str = ""
    prompt: list[str] = field(default_factory=list)
    n: int = 4
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 0.95
    repetition_penalty: float = 1.2
    seed: int = 1337
    device: str = "auto"
    format: str = "text"
    stop_at_eos: bool = True
    cache: bool = True
    tokenizer: str = ""


class UsageError(ValueError):
    """A bad argument; printed as one line with what is valid."""


def parse_args(argv: list[str]) -> Options:
    opts = Options()
    types = {f.name: f.type for f in fields(Options)}
    for arg in argv:
        if arg == "--jsonl":
            arg = "format=jsonl"
        key, sep, value = arg.partition("=")
        if not sep or key not in types:
            raise UsageError(f"{arg!r}: expected key=value with key one of {', '.join(types)} (see --help)")
        if key == "prompt":
            opts.prompt.append(value)
        else:
            setattr(opts, key, _convert(key, value, types[key]))
    if not opts.checkpoint:
        raise UsageError("checkpoint=PATH is required, e.g. checkpoint=outputs/DATE/TIME/checkpoints/last.pt")
    if opts.format not in FORMATS:
        raise UsageError(f"format={opts.format!r}: choose one of {', '.join(FORMATS)}")
    if opts.device not in DEVICES:
        raise UsageError(f"device={opts.device!r}: choose one of {', '.join(DEVICES)}")
    if opts.n < 1 or opts.max_new_tokens < 1:
        raise UsageError("n and max_new_tokens must be >= 1")
    if not 0 < opts.top_p <= 1 or opts.repetition_penalty <= 0 or opts.top_k < 0:
        raise UsageError("top_p must be in (0, 1], repetition_penalty > 0, top_k >= 0")
    opts.prompt = opts.prompt or ["床前明月光"]
    return opts


def _convert(key: str, value: str, typ: str):
    try:
        if typ == "int":
            return int(value)
        if typ == "float":
            return float(value)
        if typ == "bool":
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return value.lower() in ("true", "1")
    except ValueError:
        raise UsageError(f"{key}={value!r}: expected {typ}") from None
    return value


def pick_device(asked: str) -> torch.device:
    if asked == "auto":
        asked = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available[asked]:
        raise UsageError(f"device={asked}: not available on this machine; use device=auto or device=cpu")
    return torch.device(asked)


def load(path: str, device: torch.device, tokenizer_path: str = ""):
    """(model in eval mode, tokenizer, checkpoint state) from a lingmao checkpoint."""
    from tokenizers import Tokenizer

    if not Path(path).is_file():
        raise UsageError(f"checkpoint={path}: no such file")
    try:
        state = ckpt.load(Path(path))
    except ckpt.ResumeError as e:  # unreadable, or not a lingmao checkpoint
        raise UsageError(str(e)) from None
    if tokenizer_path:
        tok = Tokenizer.from_file(tokenizer_path)
        if tokenizer_hash(tok) != state.get("tokenizer_hash"):
            raise UsageError(f"tokenizer={tokenizer_path} is not the vocabulary {path} was trained with "
                             f"(its hash differs from the checkpoint's tokenizer_hash)")
    elif "tokenizer" in state:
        tok = Tokenizer.from_str(state["tokenizer"])
    else:
        raise UsageError(f"{path} does not embed its tokenizer; pass tokenizer=PATH: the run's MLflow artifact "
                         f"tokenizer.json, or tokenizer.json in the prepared corpus folder")
    # The tokenizer's size, not the embedding's: model.vocab_multiple pads the rows.
    model = GPT(GPTConfig.from_model_config(state["config"]["model"], tok.get_vocab_size()))
    model.load_state_dict(state["model"])
    return model.to(device).eval(), tok, state


def complete(model: GPT, tokenizer, prompt: str, n: int, max_new_tokens: int, *, temperature: float, top_k: int,
             top_p: float, repetition_penalty: float, generator: torch.Generator, stop_at_eos: bool = True,
             use_cache: bool = True) -> list[dict]:
    """`n` continuations of `prompt`, sampled as one batch in eval mode (no
    dropout; the model's mode is restored). Each: prompt, text (the
    continuation alone), new_tokens, and its repetition metrics. Also what
    the engine's periodic samples use."""
    device = next(model.parameters()).device
    ids = tokenizer.encode(prompt).ids
    idx = torch.tensor([ids] * n, device=device)
    was_training = model.training
    out = model.eval().generate(idx, max_new_tokens, temperature, top_k, generator, top_p=top_p,
                                repetition_penalty=repetition_penalty, use_cache=use_cache,
                                eos_id=EOS_ID if stop_at_eos else None)
    model.train(was_training)
    results = []
    for row in out[:, len(ids):].tolist():
        if stop_at_eos and EOS_ID in row:
            row = row[:row.index(EOS_ID)]
        text = tokenizer.decode(row)
        results.append({"prompt": prompt, "text": text, "new_tokens": len(row), **repetition(text)})
    return results


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    try:
        o = parse_args(argv)
        device = pick_device(o.device)
        model, tok, state = load(o.checkpoint, device, o.tokenizer)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    settings = {"temperature": o.temperature, "top_k": o.top_k, "top_p": o.top_p,
                "repetition_penalty": o.repetition_penalty, "seed": o.seed}
    generator = torch.Generator(device=device).manual_seed(o.seed)
    tokens, start = 0, time.perf_counter()
    if o.format == "text":
        print(f"# {o.checkpoint} (step {state['progress']['step']}, {model.num_params() / 1e6:.1f}M params) | "
              + " ".join(f"{k} {v}" for k, v in settings.items()))
    for prompt in o.prompt:
        for i, s in enumerate(complete(model, tok, prompt, o.n, o.max_new_tokens, temperature=o.temperature,
                                       top_k=o.top_k, top_p=o.top_p, repetition_penalty=o.repetition_penalty,
                                       generator=generator, stop_at_eos=o.stop_at_eos, use_cache=o.cache)):
            tokens += s["new_tokens"]
            if o.format == "jsonl":
                print(json.dumps({**s, "sample": i, **settings}, ensure_ascii=False))
            else:
                print(f"[{i + 1}] {prompt}{s['text']}\n    rep4 {s['rep4']:.2f} | distinct-1 {s['distinct1']:.2f} "
                      f"| distinct-2 {s['distinct2']:.2f}")
    seconds = time.perf_counter() - start
    print(f"# {tokens} tokens in {seconds:.2f}s ({tokens / seconds:.1f} tokens/s on {device})",
          file=sys.stderr if o.format == "jsonl" else sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
