"""Fixture builders for the data tests: a tiny chinese-poetry tree and JSONL files."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

# 靜夜思 in the traditional script of 全唐诗; mengxue/tangshisanbaishou.json repeats it
# verbatim: the one exact duplicate of the tree.
JINGYESI = ["牀前明月光，疑是地上霜。", "舉頭望明月，低頭思故鄉。"]


def _p(title: str, lines: list[str], author: str = "佚名", **extra) -> dict:
    return {"title": title, "author": author, "paragraphs": lines, **extra}


# path under dist -> JSON content, one entry per shape the converter parses
POETRY_TREE: dict[str, object] = {
    "quantangshi/poet.tang.0.json": [
        _p("靜夜思", JINGYESI, "李白", id="a"),
        _p("登鸛雀樓", ["白日依山盡，黃河入海流。", "欲窮千里目，更上一層樓。"], "王之渙", id="b"),
        _p("存目", [], "無名", id="c"),  # empty: skipped
    ],
    "quantangshi/poet.tang.1000.json": [_p("春曉", ["春眠不覺曉，處處聞啼鳥。", "夜來風雨聲，花落知多少。"], "孟浩然")],
    "quantangshi/poet.song.0.json": [
        _p("題西林壁", ["橫看成嶺側成峰，遠近高低各不同。", "不識廬山真面目，只緣身在此山中。"], "蘇軾")
    ],
    "songci/ci.song.0.json": [{"author": "苏轼", "paragraphs": ["明月几时有？把酒问青天。"], "rhythmic": "水调歌头"}],
    "songci/ci.song.1000.json": [{"author": "李清照", "paragraphs": ["寻寻觅觅，冷冷清清。"], "rhythmic": "声声慢"}],
    "wudaishici/huajianji/huajianji-1-juan.json": [
        {
            "title": "菩萨蛮 其一",
            "paragraphs": ["小山重叠金明灭。"],
            "author": "温庭筠",
            "rhythmic": "菩萨蛮",
            "notes": [],
        }
    ],
    "wudaishici/nantang/poetrys.json": [
        {"rhythmic": "虞美人", "notes": [], "paragraphs": ["春花秋月何时了。"], "author": "李煜", "title": "虞美人"}
    ],
    "shijing/shijing.json": [
        {"title": "关雎", "chapter": "国风", "section": "周南", "content": ["关关雎鸠，在河之洲。"]}
    ],
    "caocaoshiji/caocao.json": [{"title": "短歌行", "paragraphs": ["对酒当歌，人生几何！"]}],
    "nalanxingde/纳兰性德诗集.json": [{"title": "长相思", "para": ["山一程，水一程。"], "author": "纳兰性德"}],
    "shuimotangshi/shuimotangshi.json": [_p("新嫁娘", ["三日入厨下，洗手作羹汤。"], "王建", prologue="注")],
    "mengxue/tangshisanbaishou.json": {
        "title": "唐詩三百首",
        "content": [
            {
                "type": "五言絕句",
                "content": [
                    {"chapter": "靜夜思", "subchapter": None, "author": "李白", "paragraphs": JINGYESI},
                    {
                        "chapter": "雜詩",
                        "subchapter": "雜詩三首·其二",
                        "author": "王維",
                        "paragraphs": ["君自故鄉來，應知故鄉事。"],
                    },
                ],
            }
        ],
    },
    "mengxue/qianjiashi.json": {
        "title": "千家詩",
        "author": "謝枋得",
        "content": [
            {
                "type": "七言絕句",
                "content": [
                    {"chapter": "春日", "author": "朱熹", "paragraphs": ["勝日尋芳泗水濱。"]},
                    {
                        "chapter": "絕句二首",
                        "author": "杜甫",
                        "paragraphs": [
                            {"subchapter": "其一", "paragraphs": ["遲日江山麗。"]},
                            {"subchapter": "其二", "paragraphs": ["江碧鳥逾白。"]},
                        ],
                    },
                ],
            }
        ],
    },
    "chuci/chuci.json": [
        {"title": "离骚", "section": "离骚", "author": "屈原", "content": ["帝高阳之苗裔兮，朕皇考曰伯庸。"]}
    ],
    "yuanqu/yuanqu.json": [
        {
            "dynasty": "yuan",
            "author": "马致远",
            "paragraphs": ["枯藤老树昏鸦，小桥流水人家。"],
            "title": "天净沙・秋思",
        },
        {"dynasty": "yuan", "author": "佚名", "paragraphs": [], "title": "空"},
    ],
    "lunyu/lunyu.json": [{"chapter": "学而篇", "paragraphs": ["子曰：学而时习之。", "有子曰：其为人也孝弟。"]}],
    "sishuwujing/daxue.json": {"chapter": "大學", "paragraphs": ["大學之道，在明明德。"]},
    "sishuwujing/zhongyong.json": {"chapter": "中庸", "paragraphs": ["天命之謂性。"]},
    "sishuwujing/mengzi.json": [{"chapter": "梁惠王上", "paragraphs": ["孟子見梁惠王。"]}],
    "mengxue/guwenguanzhi.json": {
        "title": "古文觀止",
        "abstract": ["選本。"],
        "content": [
            {
                "title": "卷一・周文",
                "content": [
                    {
                        "chapter": "鄭伯克段於鄢",
                        "source": "《左傳》",
                        "author": "左丘明 ",
                        "paragraphs": ["初，鄭武公娶於申。", "遂惡之。"],
                    },
                    {
                        "chapter": "曹劌論戰",
                        "source": "《左傳》",
                        "author": "左丘明",
                        "paragraphs": ["十年春，齊師伐我。"],
                    },
                ],
            }
        ],
    },
    "mengxue/sanzijing-traditional.json": {
        "title": "三字經",
        "author": "王應麟",
        "tags": "傳統版",
        "paragraphs": ["人之初，性本善。"],
    },
    "mengxue/qianziwen.json": {
        "title": "千字文",
        "author": "周興嗣",
        "paragraphs": ["天地玄黃", "宇宙洪荒"],
        "spells": [],
    },
    "mengxue/baijiaxing.json": {
        "title": "百家姓",
        "author": "佚名",
        "paragraphs": ["趙錢孫李，周吳鄭王。"],
        "origin": [],
    },
    "mengxue/dizigui.json": {
        "title": "弟子規",
        "author": "李毓秀",
        "content": [{"chapter": "總敘", "paragraphs": ["弟子規 聖人訓"]}],
    },
    "mengxue/zhuzijiaxun.json": {"title": "朱子家訓", "author": "朱柏廬", "paragraphs": ["黎明即起，灑掃庭除。"]},
    "mengxue/zengguangxianwen.json": {
        "title": "增廣賢文",
        "author": "佚名",
        "content": [{"chapter": "上集", "paragraphs": ["昔時賢文，誨汝諄諄。"]}],
    },
    "mengxue/youxueqionglin.json": {
        "title": "幼學瓊林",
        "author": "程登吉",
        "content": [{"title": "卷一", "content": [{"chapter": "天文", "paragraphs": ["混沌初開，乾坤始奠。"]}]}],
    },
    "mengxue/shenglvqimeng.json": {
        "title": "聲律啓蒙",
        "author": "車萬育",
        "content": [{"title": "上卷", "content": [{"chapter": "一 東", "paragraphs": ["雲對雨，雪對風。"]}]}],
    },
    "mengxue/wenzimengqiu.json": {
        "title": "文字蒙求",
        "author": "王筠",
        "preface": ["序"],
        "content": [{"title": "卷一", "paragraphs": ["日月"]}],
    },
    "youmengying/youmengying.json": [{"content": "读经宜冬，其神专也。", "comment": ["评"]}],
    # Never read: a converter that did would yield this marker text.
    "quantangshi/authors.tang.json": [{"name": "李白", "desc": "SKIPPED"}],
    "quantangshi/error/poet.tang.0.json": [_p("SKIPPED", ["SKIPPED"])],
    "quantangshi/唐诗三百首.json": [_p("SKIPPED", ["SKIPPED"])],
    "songci/author.song.json": [{"name": "苏轼", "description": "SKIPPED"}],
    "wudaishici/huajianji/huajianji-0-preface.json": [{"rhythmic": "花间集", "paragraphs": ["SKIPPED"]}],
    "mengxue/sanzijing-new.json": {"title": "三字經", "paragraphs": ["SKIPPED"]},
    "yudingquantangshi/json/001.json": [_p("SKIPPED", ["SKIPPED"])],
    "rank/poet/poet.song.0.json": [{"author": "x", "title": "SKIPPED"}],
    "strains/json/poet.song.0.json": [{"id": "x", "strains": ["SKIPPED"]}],
}


def build_poetry_dist(root: Path) -> Path:
    for rel, content in POETRY_TREE.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(content, ensure_ascii=False), encoding="utf-8")
    return root


def _write_jsonl(path: Path, rows: list, gz: bool = False) -> Path:
    """Rows that are str are written verbatim (for malformed lines), others as JSON."""
    lines = [r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in rows]
    data = "".join(line + "\n" for line in lines).encode("utf-8")
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


@pytest.fixture
def poetry_dist(tmp_path: Path) -> Path:
    return build_poetry_dist(tmp_path / "dist")


@pytest.fixture
def write_jsonl():
    return _write_jsonl


# Lines of real poems, recombined by a seeded RNG into a corpus big enough to
# train on for a few steps: structured enough that a tiny model's loss falls.
LINES = [
    "床前明月光",
    "疑是地上霜",
    "举头望明月",
    "低头思故乡",
    "白日依山尽",
    "黄河入海流",
    "欲穷千里目",
    "更上一层楼",
    "春眠不觉晓",
    "处处闻啼鸟",
    "夜来风雨声",
    "花落知多少",
    "红豆生南国",
    "春来发几枝",
    "愿君多采撷",
    "此物最相思",
    "空山不见人",
    "但闻人语响",
    "返景入深林",
    "复照青苔上",
]


def build_training_cache(cache: Path, n_poems: int = 400, seed: int = 0) -> Path:
    """A LINGMAO_CACHE whose npm folder already holds a chinese-poetry tree
    (so data=poetry runs without npm): the fixture tree plus generated poems."""
    import random

    rng = random.Random(seed)
    dist = build_poetry_dist(cache / "npm" / "chinese-poetry-2.0.1" / "package" / "dist")
    poems = [
        _p(f"无题{i}", [f"{rng.choice(LINES)}，{rng.choice(LINES)}。" for _ in range(2)], "佚名")
        for i in range(n_poems)
    ]
    (dist / "quantangshi" / "poet.tang.2000.json").write_text(json.dumps(poems, ensure_ascii=False), encoding="utf-8")
    return cache


@pytest.fixture
def training_cache(tmp_path: Path, monkeypatch) -> Path:
    cache = build_training_cache(tmp_path / "cache")
    monkeypatch.setenv("LINGMAO_CACHE", str(cache))
    return cache


@pytest.fixture(scope="session")
def _mlflow_template(tmp_path_factory) -> Path:
    """An MLflow sqlite store migrated once per session: creating one costs
    seconds, copying one costs nothing."""
    from lingmao.tracking.store import ensure_store

    db = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    ensure_store(f"sqlite:///{db}")
    return db


@pytest.fixture
def mlflow_db(tmp_path: Path, _mlflow_template: Path) -> Path:
    """tmp_path/mlflow.db, ready: the default store of a run launched in tmp_path."""
    import shutil

    return Path(shutil.copyfile(_mlflow_template, tmp_path / "mlflow.db"))


@pytest.fixture(scope="session")
def _shared_cache(tmp_path_factory) -> Path:
    return build_training_cache(tmp_path_factory.mktemp("shared") / "cache")


@pytest.fixture
def shared_cache(_shared_cache: Path, monkeypatch) -> Path:
    """Like training_cache, but prepared once per session: for tests that only
    read the corpus."""
    monkeypatch.setenv("LINGMAO_CACHE", str(_shared_cache))
    return _shared_cache
