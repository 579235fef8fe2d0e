"""Records -> normalized, deduplicated, capped, split, tokenized corpus cached on disk.

The cache dir is named by a hash of everything that determines its content, so
a warm start is a directory lookup: it neither reads the source nor imports
`datasets`. Layout of a prepared dir:

    train.bin, val.bin   flat token ids (uint16, or uint32 for vocabularies >= 65536),
                         every document followed by <eos>
    val_docs.npy         int64 (n_val_docs, 2): start offset in val.bin, index into meta["genres"]
    tokenizer.json       the char-level tokenizer
    meta.json            settings and corpus statistics; written last, marks the dir complete
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from lingmao.data.corpus import DEFAULT_GENRE, CorpusError
from lingmao.data.locks import exclusive
from lingmao.data.tokenizer import EOS_ID, build_char_tokenizer, load_tokenizer, tokenizer_hash

PIPELINE_VERSION = 1  # bump whenever a change here or in corpus.py changes the prepared output
SCRIPTS = ("simplified", "keep")
SPLITS = ("train", "val")
# What a prepared folder holds; meta.json is written last, so it marks the folder complete.
OUTPUTS = ("train.bin", "val.bin", "val_docs.npy", "tokenizer.json", "meta.json")


@dataclass
class Prepared:
    dir: Path
    vocab_size: int
    dtype: str
    meta: dict

    @classmethod
    def load(cls, path: Path) -> Prepared:
        meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
        return cls(path, meta["vocab_size"], meta["dtype"], meta)

    def tokens(self, split: str) -> np.memmap:
        if split not in SPLITS:
            raise ValueError(f"split={split!r}: valid values are {SPLITS}")
        return np.memmap(self.dir / f"{split}.bin", dtype=self.dtype, mode="r")

    def tokenizer(self) -> Tokenizer:
        return load_tokenizer(self.dir / "tokenizer.json")

    def duplicate_windows(self, window: int, shingle: int) -> dict[str, int]:
        """Exact and near-duplicate windows of the train split (textmetrics),
        counted once per window size: a prepared corpus never changes, and the
        scan of 23M tokens costs seconds at every start otherwise."""
        from lingmao.data.textmetrics import duplicate_windows

        path = self.dir / f"duplicates_w{window}_s{shingle}.json"
        with contextlib.suppress(FileNotFoundError, ValueError):
            return json.loads(path.read_text(encoding="utf-8"))
        counts = duplicate_windows(self.tokens("train"), window, shingle=shingle).as_dict()
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # parallel jobs may count at once
        with contextlib.suppress(OSError):  # a read-only cache: count again next time
            tmp.write_text(json.dumps(counts), encoding="utf-8")
            os.replace(tmp, path)
        return counts


def prepare(
    records: Iterable[dict],
    cache_root: Path,
    key: dict,
    *,
    script: str = "simplified",
    genre_caps: dict[str, int] | None = None,
    val_fraction: float = 0.02,
    seed: int = 1337,
    progress: bool = False,
) -> Prepared:
    """Return the prepared corpus for these settings, building it on the first call only.

    `key` describes the source (name, version, file sizes/mtimes...): it goes
    into the cache dir's name, so it must change whenever the records would.
    """
    if script not in SCRIPTS:
        raise CorpusError(f"data.script={script!r}: valid values are {', '.join(SCRIPTS)}")
    if not 0 < val_fraction < 1:
        raise CorpusError(f"data.val_fraction={val_fraction}: must be between 0 and 1 (exclusive)")
    caps = dict(sorted((genre_caps or {}).items()))
    for genre, cap in caps.items():
        if isinstance(cap, bool) or not isinstance(cap, int) or cap < 0:
            raise CorpusError(f"data.genre_caps.{genre}={cap!r}: must be a whole number >= 0")
    settings = {
        "key": key,
        "script": script,
        "genre_caps": caps,
        "val_fraction": val_fraction,
        "seed": seed,
        "pipeline_version": PIPELINE_VERSION,
    }
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]
    cache_root = Path(cache_root)
    out = cache_root / digest
    if (out / "meta.json").is_file():
        return Prepared.load(out)
    cache_root.mkdir(parents=True, exist_ok=True)
    # Every DDP rank calls prepare(): one builds, the others wait here and then find it done.
    with exclusive(cache_root / f"{digest}.lock"):
        if (out / "meta.json").is_file():
            return Prepared.load(out)
        # A fixed work dir (not a random temp dir) so a rerun after an interruption
        # reuses the tokenization cache `datasets` left there.
        work = cache_root / f"{digest}.partial"
        work.mkdir(exist_ok=True)
        if progress:
            print(f"preparing corpus from {describe(key)} (first run only) -> {out}", flush=True)
        try:
            _build(records, work, settings, digest, progress)
        except CorpusError:  # the input is refused: nothing of this attempt helps the next one
            shutil.rmtree(work, ignore_errors=True)
            raise
        _complete(work, out)
    return Prepared.load(out)


def _complete(work: Path, out: Path) -> None:
    """The built work dir becomes `out`, holding OUTPUTS only: a run killed
    before leaves `datasets` temp files in it that the rerun would carry along."""
    for stray in set(work.iterdir()) - {work / name for name in OUTPUTS}:
        if stray.is_dir():
            shutil.rmtree(stray)
        else:
            stray.unlink()
    if out.exists():  # a dir without meta.json: never completed, safe to replace
        shutil.rmtree(out)
    os.rename(work, out)  # atomic: `out` either does not exist or is complete


def describe(key: dict) -> str:
    """A corpus source as the user named it: data.paths=..., the npm package, data.hf_name=..."""
    source = key.get("source")
    if source == "jsonl":
        return "data.paths=" + ",".join(f[0] for f in key["files"])
    if source == "poetry":
        return f"the npm package {key['package']}"
    if source == "hf":
        return f"data.hf_name={key['name']} (split {key['split']})"
    return f"data source {source or key}"


def _hash01(text: str, seed: int, purpose: bytes) -> int:
    """A seeded 64-bit hash of a document: decisions depend on the text only, never on record order."""
    h = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=str(seed).encode(), person=purpose)
    return int.from_bytes(h.digest(), "little")


def _build(records: Iterable[dict], work: Path, s: dict, digest: str, progress: bool) -> None:
    t0 = time.perf_counter()
    docs, read, dups, skipped = _normalise(records, s)
    by_genre = _cap(docs, s)
    _enough(sum(map(len, by_genre.values())), read, dups, s)
    genres = sorted(by_genre)
    genre_of = {t: genre for genre in genres for t in by_genre[genre]}
    ordered, n_val = _split(genre_of, s)
    val, train = ordered[:n_val], ordered[n_val:]
    tok = build_char_tokenizer(ordered)  # over every kept document
    tok.save(str(work / "tokenizer.json"))
    vocab_size = tok.get_vocab_size()
    dtype = "uint16" if vocab_size < 2**16 else "uint32"
    counts = _tokenize(
        tok, {"train": train, "val": val}, work, dtype, digest, progress, {g: i for i, g in enumerate(genres)}, genre_of
    )
    meta = {
        **s,
        "vocab_size": vocab_size,
        "dtype": dtype,
        "tokenizer_sha256": tokenizer_hash(tok),
        "genres": genres,  # val_docs.npy genre indices point into this list
        "per_genre": {
            g: {
                "records": read[g],
                "duplicates": dups[g],
                "docs": len(by_genre[g]),
                "chars": sum(map(len, by_genre[g])),
            }
            for g in genres
        },
        "records": sum(read.values()),
        "skipped_records": skipped,
        "duplicates_removed": sum(dups.values()),
        **counts,
        # bits per character = loss/ln2 * tokens/char (each doc's <eos> counts as a token, not a char)
        "val_tokens_per_char": counts["tokens"]["val"] / counts["chars"]["val"],
        "seconds": round(time.perf_counter() - t0, 2),
    }
    (work / "meta.json").write_text(json.dumps(meta, ensure_ascii=False, indent=1), encoding="utf-8")


def normalizer(script: str):
    """The corpus's script normalisation, for its documents and for prompts
    alike: `simplified` converts with OpenCC t2s, `keep` leaves text as it is."""
    if script != "simplified":
        return lambda text: text
    from opencc import OpenCC

    return OpenCC("t2s").convert


def _normalise(records: Iterable[dict], s: dict) -> tuple[dict[str, str], Counter, Counter, int]:
    """Normalise the script, drop empties and exact duplicates (the first one
    seen keeps its genre): ({text: genre} in first-seen order, records read
    per genre, duplicates per genre, records skipped)."""
    convert = normalizer(s["script"])  # one converter: building it loads the dictionaries
    docs: dict[str, str] = {}
    read: Counter[str] = Counter()
    dups: Counter[str] = Counter()
    skipped = 0
    for rec in records:
        text = rec["text"]
        if not text.strip():
            skipped += 1
            continue
        text = convert(text)
        genre = rec.get("genre") or DEFAULT_GENRE
        read[genre] += 1
        if text in docs:
            dups[genre] += 1
        else:
            docs[text] = genre
    skipped += getattr(records, "skipped", 0)  # bad lines a JsonlReader passed over
    if not docs:
        raise CorpusError(
            f"{describe(s['key'])} gave no non-empty text ({skipped} records empty or skipped): "
            "check the paths / dataset name and the text field"
        )
    return docs, read, dups, skipped


def _enough(n: int, read: Counter, dups: Counter, s: dict) -> None:
    """Two documents at least: one for train, one for val."""
    if n >= 2:
        return
    how = [f"{sum(read.values())} record(s) read"] + [f"{sum(dups.values())} duplicate(s) removed"] * bool(dups)
    how += ["after data.genre_caps"] * bool(s["genre_caps"])
    fix = (
        "split the text into several lines, one JSON object per document"
        if s["key"].get("source") == "jsonl"
        else "add documents"
    )
    raise CorpusError(
        f"{describe(s['key'])} has {n} document(s) ({', '.join(how)}); a train/val split needs at least 2: {fix}"
    )


def _cap(docs: dict[str, str], s: dict) -> dict[str, list[str]]:
    """Documents by genre, each capped genre keeping the `cap` documents with
    the smallest seeded hash (a random sample)."""
    by_genre: dict[str, list[str]] = defaultdict(list)
    for text, genre in docs.items():
        by_genre[genre].append(text)
    unknown = sorted(set(s["genre_caps"]) - set(by_genre))
    if unknown:
        raise CorpusError(f"data.genre_caps names {unknown}, not in this corpus; genres present: {sorted(by_genre)}")
    for genre, cap in s["genre_caps"].items():
        if len(by_genre[genre]) > cap:
            by_genre[genre] = sorted(by_genre[genre], key=lambda t: _hash01(t, s["seed"], b"cap"))[:cap]
    return by_genre


def _split(genre_of: dict[str, str], s: dict) -> tuple[list[str], int]:
    """(documents in hash order, how many of the first are val). A different
    hash than the cap's, else capped genres would put their sample mostly in
    val; ordering each split by hash shuffles genres together and makes the
    output independent of record order."""
    u = {t: _hash01(t, s["seed"], b"split") for t in genre_of}
    ordered = sorted(u, key=u.__getitem__)
    n_val = sum(1 for h in u.values() if h < s["val_fraction"] * 2**64)  # the prefix of `ordered`
    return ordered, min(max(n_val, 1), len(ordered) - 1)  # tiny corpora: still one document each side


def _tokenize(
    tok: Tokenizer,
    splits: dict[str, list[str]],
    work: Path,
    dtype: str,
    digest: str,
    progress: bool,
    genre_index: dict[str, int],
    genre_of: dict[str, str],
) -> dict[str, dict[str, int]]:
    """Token ids of each split into work/<split>.bin (with `datasets`:
    batched, cached in the work dir), the val documents' offsets and genres
    into val_docs.npy; returns docs, tokens and chars per split."""
    import datasets

    bars_were_on = datasets.is_progress_bar_enabled()
    # Bars only for a person at a terminal: piped to a file they are \r frames.
    (datasets.enable_progress_bars if progress and sys.stderr.isatty() else datasets.disable_progress_bars)()

    def encode(batch: dict) -> dict:
        return {"ids": [e.ids + [EOS_ID] for e in tok.encode_batch(batch["text"])]}

    counts: dict[str, dict[str, int]] = {"docs": {}, "tokens": {}, "chars": {}}
    try:
        for split, texts in splits.items():
            ds = datasets.Dataset.from_dict({"text": texts}).map(
                encode,
                batched=True,
                batch_size=4096,  # big batches: encode_batch parallelizes within a batch
                remove_columns=["text"],
                features=datasets.Features({"ids": datasets.Sequence(datasets.Value(dtype))}),
                cache_file_name=str(work / f"tokens-{split}.arrow"),
                new_fingerprint=f"{digest}{split}",  # skip hashing the closure; digest pins the content
                desc=f"tokenize {split}",
            )
            column = ds.data.column("ids")
            ids = np.concatenate([c.flatten().to_numpy() for c in column.chunks]).astype(dtype, copy=False)
            lengths = np.concatenate([c.value_lengths().to_numpy() for c in column.chunks]).astype(np.int64)
            ids.tofile(work / f"{split}.bin")
            if split == "val":
                starts = np.cumsum(lengths) - lengths
                genres = np.array([genre_index[genre_of[t]] for t in texts], dtype=np.int64)
                np.save(work / "val_docs.npy", np.stack([starts, genres], axis=1))
            counts["docs"][split] = len(texts)
            counts["tokens"][split] = int(ids.size)
            counts["chars"][split] = sum(map(len, texts))
            del ds, column
    finally:
        (datasets.enable_progress_bars if bars_were_on else datasets.disable_progress_bars)()
    for f in work.glob("tokens-*.arrow"):  # a duplicate of the .bin files once those exist
        f.unlink()
    return counts
