"""Data pipeline: sources -> records -> prepared corpus -> windows -> loader."""

from __future__ import annotations

import gzip
import json
import pickle
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opencc import OpenCC

from lingmao.data import corpus
from lingmao.data.corpus import CorpusError, fetch_poetry, jsonl_records, poetry_records
from lingmao.data.prepare import Prepared, prepare
from lingmao.data.tokenizer import SPECIALS, build_char_tokenizer, load_tokenizer, tokenizer_hash
from lingmao.data.windows import TokenWindows, make_loader

EXPECTED_GENRES = {  # source -> genre
    "全唐诗": "诗",
    "全宋诗": "诗",
    "诗经": "诗",
    "曹操诗集": "诗",
    "纳兰性德诗集": "诗",
    "水墨唐诗": "诗",
    "唐诗三百首": "诗",
    "千家诗": "诗",
    "宋词": "词",
    "花间集": "词",
    "南唐二主词": "词",
    "楚辞": "赋",
    "元曲": "曲",
    "论语": "文",
    "大学": "文",
    "中庸": "文",
    "孟子": "文",
    "古文观止": "文",
    "三字经": "文",
    "千字文": "文",
    "百家姓": "文",
    "弟子规": "文",
    "朱子家训": "文",
    "增广贤文": "文",
    "幼学琼林": "文",
    "声律启蒙": "文",
    "文字蒙求": "文",
    "幽梦影": "文",
}
KEY = {"source": "test"}


def docs_of(prep, split: str) -> list[str]:
    """Decode a split back into its documents (split at <eos>)."""
    tok, ids = prep.tokenizer(), np.asarray(prep.tokens(split))
    eos = tok.token_to_id("<eos>")
    assert ids[-1] == eos
    ends = np.flatnonzero(ids == eos)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tok.decode(ids[s:e].tolist()) for s, e in zip(starts, ends)]


# --- chinese-poetry --------------------------------------------------------------


def test_poetry_records_genres_sources_and_shapes(poetry_dist):
    recs = list(poetry_records(poetry_dist))
    assert {r["source"]: r["genre"] for r in recs} == EXPECTED_GENRES
    assert all(r["text"].strip() and set(r) == {"text", "genre", "title", "author", "source"} for r in recs)
    assert not any("SKIPPED" in r["text"] for r in recs)  # error/, authors, anthologies, rank/ ... not read
    by_title = {r["title"]: r for r in recs}
    assert by_title["靜夜思"]["text"] == "牀前明月光，疑是地上霜。\n舉頭望明月，低頭思故鄉。"
    assert by_title["水调歌头"]["genre"] == "词"  # ci are titled by their tune
    assert by_title["鄭伯克段於鄢"]["author"] == "左丘明"  # nested 古文观止, author stripped
    assert by_title["其二"]["text"] == "江碧鳥逾白。" and by_title["其二"]["author"] == "杜甫"  # sub-poems
    assert by_title["雜詩三首·其二"]["source"] == "唐诗三百首"
    assert by_title["總敘"]["author"] == "李毓秀"  # chapters inherit the book's author
    assert by_title["学而篇"]["text"].count("\n") == 1
    assert sum(r["source"] == "元曲" for r in recs) == 1  # the empty one is skipped


def test_poetry_unexpected_structure_names_the_file(poetry_dist):
    (poetry_dist / "lunyu/lunyu.json").write_text(json.dumps([{"chapter": "x", "lines": ["a"]}]), encoding="utf-8")
    with pytest.raises(CorpusError, match=r"lunyu/lunyu\.json.*no text key"):
        list(poetry_records(poetry_dist))


def test_poetry_missing_collection(poetry_dist):
    (poetry_dist / "chuci/chuci.json").unlink()
    with pytest.raises(CorpusError, match="chuci"):
        list(poetry_records(poetry_dist))


def test_fetch_poetry_without_npm(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus.shutil, "which", lambda name: None)
    with pytest.raises(CorpusError, match="npm"):
        fetch_poetry(tmp_path / "cache")
    dist = tmp_path / "cache" / "chinese-poetry-2.0.1" / "package" / "dist"
    dist.mkdir(parents=True)
    assert fetch_poetry(tmp_path / "cache") == dist  # already fetched: npm never needed


# --- prepare ----------------------------------------------------------------------


def test_prepare_script_and_duplicates(poetry_dist, tmp_path):
    recs = list(poetry_records(poetry_dist))
    simp = prepare(iter(recs), tmp_path / "c", KEY, val_fraction=0.2)
    keep = prepare(iter(recs), tmp_path / "c", KEY, script="keep", val_fraction=0.2)
    assert simp.dir != keep.dir
    simp_docs = docs_of(simp, "train") + docs_of(simp, "val")
    keep_docs = docs_of(keep, "train") + docs_of(keep, "val")
    assert "床前明月光，疑是地上霜。\n举头望明月，低头思故乡。" in simp_docs
    assert "牀前明月光，疑是地上霜。\n舉頭望明月，低頭思故鄉。" in keep_docs
    assert not any("舉" in d for d in simp_docs)
    for p, docs in ((simp, simp_docs), (keep, keep_docs)):
        assert p.meta["duplicates_removed"] == 1  # 靜夜思 is in 全唐诗 and in 唐诗三百首
        assert len(docs) == len(set(docs)) == len(recs) - 1
        assert p.meta["docs"]["train"] + p.meta["docs"]["val"] == len(docs)
        assert sum(g["docs"] for g in p.meta["per_genre"].values()) == len(docs)
    assert simp.meta["per_genre"]["诗"]["duplicates"] == 1


def test_prepare_split_disjoint_stable_and_val_index(poetry_dist, tmp_path):
    recs = list(poetry_records(poetry_dist))
    a = prepare(iter(recs), tmp_path / "a", KEY, val_fraction=0.3)
    random.Random(0).shuffle(recs)
    b = prepare(iter(recs), tmp_path / "b", KEY, val_fraction=0.3)
    train, val = docs_of(a, "train"), docs_of(a, "val")
    assert train and val and not set(train) & set(val)
    assert (train, val) == (docs_of(b, "train"), docs_of(b, "val"))  # independent of record order
    assert np.array_equal(a.tokens("train"), b.tokens("train"))
    assert a.tokens("train").dtype == np.uint16 and a.dtype == "uint16"
    # val_docs.npy: each row is a document start and its genre
    vd = np.load(a.dir / "val_docs.npy")
    assert vd.shape == (len(val), 2) and vd.dtype == np.int64
    cc = OpenCC("t2s")
    genre_of = {cc.convert(r["text"]): r["genre"] for r in recs}
    ids, tok = np.asarray(a.tokens("val")), a.tokenizer()
    for (start, g), doc in zip(vd, val):
        assert tok.decode(ids[start : start + len(doc)].tolist()) == doc
        assert a.meta["genres"][g] == genre_of[doc]
    assert a.meta["val_tokens_per_char"] > 1


def test_prepare_genre_caps(poetry_dist, tmp_path):
    recs = list(poetry_records(poetry_dist))
    n_wen = sum(r["genre"] == "文" for r in recs)
    p = prepare(iter(recs), tmp_path / "c", KEY, genre_caps={"诗": 3, "文": 100})
    stats = p.meta["per_genre"]
    assert stats["诗"]["docs"] == 3 and stats["诗"]["records"] > 3
    assert stats["文"]["docs"] == n_wen and stats["词"]["docs"] == 4  # under cap / uncapped: whole
    random.Random(1).shuffle(recs)
    q = prepare(iter(recs), tmp_path / "d", KEY, genre_caps={"诗": 3, "文": 100})
    assert set(docs_of(p, "train") + docs_of(p, "val")) == set(docs_of(q, "train") + docs_of(q, "val"))
    with pytest.raises(CorpusError, match="诗歌.*genres present"):
        prepare(iter(recs), tmp_path / "e", KEY, genre_caps={"诗歌": 3})


def test_prepare_user_errors(tmp_path):
    with pytest.raises(CorpusError, match="simplified, keep"):
        prepare(iter([]), tmp_path, KEY, script="traditional")
    with pytest.raises(CorpusError, match="no non-empty text"):
        prepare(iter([{"text": "  "}]), tmp_path, {"source": "empty-thing"})
    with pytest.raises(CorpusError, match="val_fraction"):
        prepare(iter([]), tmp_path, KEY, val_fraction=0)


def test_prepare_warm_start_does_not_consume_records(tmp_path):
    recs = [{"text": f"第{i}首\n春风又绿江南岸", "genre": "诗"} for i in range(20)]
    first = prepare(iter(recs), tmp_path, KEY)

    def explode():
        raise AssertionError("warm start consumed the records")
        yield

    again = prepare(explode(), tmp_path, KEY)
    assert again.dir == first.dir and again.meta == first.meta
    # ... and in a fresh interpreter, without importing `datasets`
    code = (
        "import sys; from pathlib import Path; from lingmao.data.prepare import prepare\n"
        "def explode():\n    raise AssertionError('consumed'); yield\n"
        f"prepare(explode(), Path({str(tmp_path)!r}), {KEY!r})\n"
        "assert 'datasets' not in sys.modules and 'opencc' not in sys.modules\n"
    )
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)


def test_prepare_counts_jsonl_skips(tmp_path, write_jsonl):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "甲乙"}, "{bad", {"text": "丙丁", "genre": "诗"}, {"text": ""}])
    p = prepare(jsonl_records([path], on_bad_record="skip"), tmp_path / "c", KEY)
    assert p.meta["skipped_records"] == 2  # the malformed line and the empty text
    assert set(p.meta["genres"]) == {"其他", "诗"}


# --- tokenizer --------------------------------------------------------------------


def test_tokenizer_round_trip_specials_and_order(tmp_path):
    texts = ["床前明月光，\n疑是地上霜。", "月 月\t光"]
    tok = build_char_tokenizer(texts)
    for i, s in enumerate(SPECIALS):
        assert tok.token_to_id(s) == i
    for s in texts + ["霜月\n\n光"]:
        assert tok.decode(tok.encode(s).ids) == s
    assert tok.encode("月").ids == [4]  # most frequent char first
    assert tok.encode("\n").ids == [tok.token_to_id("\n")] and tok.token_to_id("\n") is not None
    assert tok.encode("鹅").ids == [tok.token_to_id("<unk>")]
    # 月 x3, 光 x2, then the characters seen once by codepoint: \t, \n, space, ...
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])[4:]
    assert [c for c, _ in vocab][:5] == ["月", "光", "\t", "\n", " "]
    tok.save(str(tmp_path / "t.json"))
    assert tokenizer_hash(load_tokenizer(tmp_path / "t.json")) == tokenizer_hash(tok)
    assert tokenizer_hash(build_char_tokenizer(list(reversed(texts)))) == tokenizer_hash(tok)


# --- windows & loader -------------------------------------------------------------


def test_windows_shift_count_and_errors():
    tokens = np.arange(100, dtype=np.uint16)
    w = TokenWindows(tokens, context_length=8, stride=4)
    assert len(w) == (100 - 9) // 4 + 1
    x, y = w[3]
    assert x.dtype == torch.int64 and x.tolist() == list(range(12, 20)) and y.tolist() == list(range(13, 21))
    xb, yb = w[[0, len(w) - 1]]
    assert xb.shape == (2, 8) and yb[1, -1] == 4 * (len(w) - 1) + 8
    for stride in (0, 9):
        with pytest.raises(CorpusError, match=f"data.stride={stride}"):
            TokenWindows(tokens, 8, stride)
    with pytest.raises(CorpusError, match="has 8 tokens.*at least 9"):
        TokenWindows(tokens[:8], 8, 1)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(2, 300), ctx=st.integers(1, 40), data=st.data())
def test_windows_property(n, ctx, data):
    stride = data.draw(st.integers(1, ctx))
    tokens = np.arange(n, dtype=np.int64) * 7 % 65521
    if n < ctx + 1:
        with pytest.raises(CorpusError):
            TokenWindows(tokens, ctx, stride)
        return
    w = TokenWindows(tokens, ctx, stride)
    starts = list(range(0, n - ctx, stride))  # every start with start + ctx + 1 <= n
    assert len(w) == len(starts)
    for i, s in enumerate(starts):
        x, y = w[i]
        assert x.tolist() == tokens[s : s + ctx].tolist() and y.tolist() == tokens[s + 1 : s + ctx + 1].tolist()


def _window_ids(loader, stride) -> list[int]:
    return [int(v) // stride for x, _ in loader for v in x[:, 0]]


def test_make_loader_ranks_partition_the_single_rank_order():
    w = TokenWindows(np.arange(4 * 40 + 1, dtype=np.uint16), context_length=4, stride=4)  # 40 windows
    one = _window_ids(make_loader(w, 5, shuffle=True, seed=3, epoch=2), 4)
    r0 = _window_ids(make_loader(w, 5, shuffle=True, seed=3, epoch=2, rank=0, world_size=2), 4)
    r1 = _window_ids(make_loader(w, 5, shuffle=True, seed=3, epoch=2, rank=1, world_size=2), 4)
    assert sorted(one) == list(range(40)) and one != list(range(40))
    assert not set(r0) & set(r1) and sorted(r0 + r1) == sorted(one)
    assert one != _window_ids(make_loader(w, 5, shuffle=True, seed=3, epoch=3), 4)  # epochs reshuffle
    x, y = next(iter(make_loader(w, 5, shuffle=False, seed=0)))
    assert x.shape == y.shape == (5, 4) and x.dtype == torch.int64


def test_make_loader_workers_with_memmap(tmp_path):
    np.arange(200, dtype=np.uint16).tofile(tmp_path / "t.bin")
    w = TokenWindows(np.memmap(tmp_path / "t.bin", dtype=np.uint16, mode="r"), 9, 9)
    batches = list(make_loader(w, 4, shuffle=False, seed=0, num_workers=1, drop_last=False))
    assert sum(len(x) for x, _ in batches) == len(w)
    clone = pickle.loads(pickle.dumps(w))  # what spawn/forkserver workers receive
    assert isinstance(clone.tokens, np.memmap) and clone[len(w) - 1][1].tolist() == w[len(w) - 1][1].tolist()


# --- JSONL ------------------------------------------------------------------------


def test_jsonl_reads_plain_and_gz(tmp_path, write_jsonl):
    a = write_jsonl(tmp_path / "a.jsonl", [{"body": "甲", "genre": "诗", "title": "t"}, ""])
    b = write_jsonl(tmp_path / "b.jsonl.gz", [{"body": "乙"}], gz=True)
    recs = list(jsonl_records([a, b], text_field="body"))
    assert [(r["text"], r["genre"], r["source"]) for r in recs] == [
        ("甲", "诗", "a.jsonl"),
        ("乙", "其他", "b.jsonl.gz"),
    ]


@pytest.mark.parametrize(
    "line, match",
    [
        ("{not json", "malformed JSON"),
        ('{"txt": "甲"}', "'text' is missing; keys are \\['txt'\\]"),
        ('{"text": 3}', "a int, not a string"),
        ('["text"]', "expected a JSON object"),
        ('{"text": "\\ud800"}', "surrogate"),
    ],
)
def test_jsonl_bad_line_names_file_and_line(tmp_path, write_jsonl, line, match):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "甲"}, line, {"text": "乙"}])
    with pytest.raises(CorpusError, match=f"a.jsonl:2: .*{match}"):
        list(jsonl_records([path]))
    reader = jsonl_records([path], on_bad_record="skip")
    assert [r["text"] for r in reader] == ["甲", "乙"] and reader.skipped == 1


def test_jsonl_non_utf8(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "\xff\xfe"}\n')
    with pytest.raises(CorpusError, match="a.jsonl:2: not UTF-8"):
        list(jsonl_records([path]))


def test_jsonl_file_errors(tmp_path, write_jsonl):
    (tmp_path / "empty.jsonl").write_bytes(b"\n")
    with pytest.raises(CorpusError, match="empty.jsonl: file is empty"):
        list(jsonl_records([tmp_path / "empty.jsonl"]))
    with pytest.raises(CorpusError, match="nope.jsonl: file not found"):
        list(jsonl_records([tmp_path / "nope.jsonl"]))
    good = write_jsonl(tmp_path / "t.jsonl.gz", [{"text": "甲" * 50}] * 200, gz=True)
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(good.read_bytes()[:-30])
    with pytest.raises(CorpusError, match="cut.jsonl.gz: truncated"):
        list(jsonl_records([cut], on_bad_record="skip"))
    with pytest.raises(CorpusError, match="data.on_bad_record='ignore'"):
        jsonl_records([good], on_bad_record="ignore")


_json_ish = st.one_of(
    st.binary(max_size=40),
    st.text(max_size=40).map(lambda s: s.encode("utf-8", "surrogatepass")),
    st.recursive(
        st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=10)),
        lambda c: st.lists(c, max_size=3) | st.dictionaries(st.sampled_from(["text", "genre", "x"]), c, max_size=3),
        max_leaves=6,
    ).map(lambda v: json.dumps(v).encode()),
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(_json_ish, max_size=6), gz=st.booleans(), mode=st.sampled_from(["error", "skip"]))
def test_jsonl_random_lines_only_raise_corpus_error(tmp_path, lines, gz, mode):
    data = b"\n".join(line.replace(b"\n", b" ") for line in lines)
    path = tmp_path / ("r.jsonl.gz" if gz else "r.jsonl")
    path.write_bytes(gzip.compress(data) if gz else data)
    try:
        for rec in jsonl_records([path], on_bad_record=mode):
            assert isinstance(rec["text"], str)
            rec["text"].encode("utf-8")
    except CorpusError:
        pass


def test_duplicate_window_counts_are_scanned_once_per_corpus_and_window(poetry_dist, tmp_path, monkeypatch):
    import lingmao.data.textmetrics as textmetrics

    recs = list(poetry_records(poetry_dist))
    p = prepare(iter(recs), tmp_path / "c", KEY, val_fraction=0.2)
    expected = textmetrics.duplicate_windows(p.tokens("train"), 16, shingle=8).as_dict()
    assert p.duplicate_windows(16, 8) == expected
    scans = []

    def counting_scan(tokens, window, shingle):
        scans.append(window)
        return textmetrics.DuplicateWindows(1, 0, 0, 0, 0)

    monkeypatch.setattr(textmetrics, "duplicate_windows", counting_scan)
    again = Prepared.load(p.dir)
    assert again.duplicate_windows(16, 8) == expected and scans == []  # read back, not scanned
    assert again.duplicate_windows(32, 8)["windows"] == 1 and scans == [32]  # another window: a new scan


# --- issue 28: what an interrupted or refused preparation leaves behind -------------

FAKE_NPM = """#!{python}
import io, json, sys, tarfile
assert sys.argv[1:] == ["pack", "chinese-poetry@2.0.1"], sys.argv
with tarfile.open("chinese-poetry-2.0.1.tgz", "w:gz") as tar:
    data = json.dumps([{{"title": "t", "paragraphs": ["春眠不觉晓"]}}]).encode()
    info = tarfile.TarInfo("package/dist/x.json")
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))
"""


def test_a_fetch_killed_mid_way_is_swept_by_the_next_one(tmp_path, monkeypatch):
    npm = tmp_path / "npm"
    npm.write_text(FAKE_NPM.format(python=sys.executable))
    npm.chmod(0o755)
    monkeypatch.setattr(corpus.shutil, "which", lambda name: str(npm))
    cache = tmp_path / "cache"
    stale = cache / ".fetch-k1ll3d"  # what a SIGKILLed `npm pack` left: its temp dir
    (stale / "tree" / "package").mkdir(parents=True)
    (stale / "chinese-poetry-2.0.1.tgz").write_bytes(b"x" * 1000)
    dist = fetch_poetry(cache)
    assert (dist / "x.json").is_file()
    assert sorted(p.name for p in cache.iterdir()) == ["chinese-poetry-2.0.1"]  # no temp dir, no lock


def test_a_refused_preparation_leaves_neither_its_work_folder_nor_its_lock(tmp_path):
    with pytest.raises(CorpusError, match="1 document"):
        prepare(iter([{"text": "春眠不觉晓"}]), tmp_path, KEY)
    assert list(tmp_path.iterdir()) == []
    done = prepare(iter([{"text": "春眠不觉晓"}, {"text": "处处闻啼鸟"}]), tmp_path, KEY)
    assert [p.name for p in tmp_path.iterdir()] == [done.dir.name]  # the lock goes once the work is done


def test_a_resumed_preparation_leaves_no_stray_file_in_the_prepared_folder(tmp_path):
    recs = [{"text": f"第{i}首\n春风又绿江南岸"} for i in range(30)]
    first = prepare(iter(recs), tmp_path, KEY)
    work = first.dir.with_name(first.dir.name + ".partial")
    first.dir.rename(work)  # as a preparation interrupted before its final rename
    (work / "meta.json").unlink()
    (work / "tmpk1jx9x2e").write_bytes(b"\0" * 1000)  # what `datasets` leaves of a killed map
    again = prepare(iter(recs), tmp_path, KEY)
    assert sorted(p.name for p in again.dir.iterdir()) == sorted(
        ["meta.json", "tokenizer.json", "train.bin", "val.bin", "val_docs.npy"]
    )
