"""Character-level tokenizer: one Unicode character (newline included) = one token.

Built as a Hugging Face `tokenizers` WordLevel model so it saves to one
tokenizer.json that any HF tooling can load.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>"]  # ids 0..3
PAD_ID, UNK_ID, BOS_ID, EOS_ID = range(len(SPECIALS))

_CHUNK_CHARS = 1 << 22  # count in ~4M-char chunks: bounded memory, few numpy calls


def build_char_tokenizer(texts: Iterable[str]) -> Tokenizer:
    """Vocab = SPECIALS + every character seen, by frequency desc then codepoint (deterministic)."""
    counts = np.zeros(0x110000, dtype=np.int64)  # one bin per Unicode codepoint
    for chunk in _chunks(texts):
        # UTF-32 bytes are the codepoints themselves: counting becomes one bincount.
        counts += np.bincount(np.frombuffer(chunk.encode("utf-32-le"), dtype=np.uint32), minlength=0x110000)
    cps = np.flatnonzero(counts)
    order = np.lexsort((cps, -counts[cps]))  # last key is primary: count desc, then codepoint
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for cp in cps[order]:
        vocab[chr(cp)] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every char alone
    tok.decoder = decoders.Fuse()  # concatenate: no spaces between characters
    tok.add_special_tokens(SPECIALS)  # so decode() drops them and they keep ids 0..3
    return tok


def _chunks(texts: Iterable[str]) -> Iterator[str]:
    buf: list[str] = []
    size = 0
    for t in texts:
        buf.append(t)
        size += len(t)
        if size >= _CHUNK_CHARS:
            yield "".join(buf)
            buf, size = [], 0
    yield "".join(buf)


def load_tokenizer(path: Path | str) -> Tokenizer:
    return Tokenizer.from_file(str(path))


def tokenizer_hash(tok: Tokenizer) -> str:
    """Fingerprint for checking a checkpoint was trained with this exact vocabulary."""
    return hashlib.sha256(tok.to_str().encode("utf-8")).hexdigest()


def unknown_chars(tokenizer, text: str) -> list[str]:
    """Characters of `text` the vocabulary lacks (they would be <unk>)."""
    ids = tokenizer.encode(text).ids
    return sorted({ch for ch, i in zip(text, ids) if i == UNK_ID}) if len(ids) == len(text) else []
