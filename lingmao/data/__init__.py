"""Data: a config's source -> a prepared, cached corpus of token ids."""

from __future__ import annotations

import os
from pathlib import Path

from lingmao.data.corpus import POETRY_PACKAGE, CorpusError, fetch_poetry, hf_records, jsonl_records, poetry_records
from lingmao.data.prepare import OUTPUTS, Prepared, prepare

__all__ = ["CorpusError", "Prepared", "cache_root", "load_corpus", "load_prepared"]

PREPARED_FILES = OUTPUTS  # what prepare() writes into a corpus folder, meta.json last


def cache_root(cache_dir: str | None) -> Path:
    return Path(cache_dir or os.environ.get("LINGMAO_CACHE") or Path.home() / ".cache" / "lingmao").expanduser()


def _source(d, root: Path):
    """(lazy records, cache key) for the configured source. The key changes
    when the input does, so a prepared cache is never stale."""
    if d.source == "poetry":

        def records():
            yield from poetry_records(fetch_poetry(root / "npm"))

        return records(), {"source": "poetry", "package": POETRY_PACKAGE}
    if d.source == "jsonl":
        paths = [Path(p) for p in d.paths]
        for p in paths:
            if not p.is_file():
                raise CorpusError(f"data.paths: {p} does not exist")
        key = {
            "source": "jsonl",
            "text_field": d.text_field,
            "on_bad_record": d.on_bad_record,
            "files": [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in paths],
        }
        return jsonl_records(paths, text_field=d.text_field, on_bad_record=d.on_bad_record), key
    key = {"source": "hf", "name": d.hf_name, "split": d.hf_split, "config": d.hf_config, "text_field": d.text_field}
    return hf_records(d.hf_name, split=d.hf_split, config=d.hf_config, text_field=d.text_field), key


def load_prepared(path: str | None) -> Prepared:
    """data=prepared: a folder prepare() wrote (here or on another machine),
    loaded as it is; no source is read, `datasets` and opencc stay unimported."""
    if not path:
        raise CorpusError("data=prepared needs data.prepared_dir=PATH, a folder holding " + ", ".join(PREPARED_FILES))
    folder = Path(path).expanduser()
    missing = [f for f in PREPARED_FILES if not (folder / f).is_file()]
    if missing:
        raise CorpusError(
            f"data.prepared_dir={folder}: no {', '.join(missing)} there; a prepared corpus folder holds "
            f"{', '.join(PREPARED_FILES)} (meta.json written last, when it is complete)"
        )
    return Prepared.load(folder)


def load_corpus(d, progress: bool = False) -> Prepared:
    """The prepared corpus of data config `d`; the split by `d.split_seed`,
    not the run's seed, so runs that differ in their seed share a val set."""
    if d.source == "prepared":
        return load_prepared(d.prepared_dir)
    root = cache_root(d.cache_dir)
    records, key = _source(d, root)
    return prepare(
        records,
        root / "prepared",
        key,
        script=d.script,
        genre_caps=dict(d.genre_caps),
        val_fraction=d.val_fraction,
        seed=d.split_seed,
        progress=progress,
    )
