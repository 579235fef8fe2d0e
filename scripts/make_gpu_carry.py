"""Build the folder that travels to a GPU machine without network access.

    python scripts/make_gpu_carry.py [--out .gpu_carry] [--python-version 3.12] [--tokens 2000000]

The folder (git-ignored, named in the device call's `carry`) holds:

    wheels/   what `python -m lingmao.run ... data=prepared tracking.enabled=false`
              imports and that machine lacks: Hydra and its own needs, pinned to
              the versions installed here, so the rehearsal tests what travels
    corpus/   a prepared corpus (lingmao/data/prepare.py's layout) of a few MB of
              tokens with the default corpus' full vocabulary, so that memory
              measured there is what the plan estimates for the real one

scripts/gpu_check.sh installs the wheels with pip --no-index and trains on the
corpus with data=prepared.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# The GPU machine has torch, numpy, tokenizers, pyyaml, packaging, pytest, rich
# and tqdm; a training run with tracking off and a prepared corpus imports
# these on top (found by importing it in a venv holding only those).
CARRIED = ("hydra-core", "omegaconf", "antlr4-python3-runtime")
# The tree that travels to the GPU machine may hold 64 MiB in all; the repository takes a few.
MAX_CARRY_BYTES = 60 * 2**20
# The platform tags pip matches for a manylinux x86-64 machine.
PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)

# Lines of Tang poems (李白, 王之涣, 孟浩然, 王维, 杜甫): the corpus' documents are
# quatrains recombined from them, text with the shape a poem has.
LINES = (
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
    "国破山河在",
    "城春草木深",
    "感时花溅泪",
    "恨别鸟惊心",
    "两个黄鹂鸣翠柳",
    "一行白鹭上青天",
    "窗含西岭千秋雪",
    "门泊东吴万里船",
)
CJK_FIRST = 0x4E00  # CJK Unified Ideographs: the characters the real vocabulary is mostly made of


def wheel_versions() -> dict[str, str]:
    """The carried packages at the versions this environment runs."""
    return {name: importlib.metadata.version(name) for name in CARRIED}


def _pip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pip", *args], capture_output=True, text=True, timeout=600, check=False
    )


def download_wheels(dest: Path, python_version: str, versions: dict[str, str]) -> list[Path]:
    """One wheel per package for CPython `python_version` on manylinux x86-64.
    A package published only as a source archive (antlr4-python3-runtime 4.9.3)
    is built into a wheel here, and must come out pure Python to run there."""
    dest.mkdir(parents=True, exist_ok=True)
    platforms = [a for p in PLATFORMS for a in ("--platform", p)]
    for name, version in versions.items():
        spec = f"{name}=={version}"
        got = _pip(
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--python-version",
            python_version,
            "--implementation",
            "cp",
            *platforms,
            "-d",
            str(dest),
            spec,
        )
        if got.returncode:
            got = _pip("wheel", "--no-deps", "-w", str(dest), spec)
            if got.returncode:
                raise SystemExit(f"make_gpu_carry: no wheel of {spec}:\n{got.stderr[-2000:]}")
    wheels = sorted(dest.glob("*.whl"))
    names = {w.name.split("-")[0].lower().replace("_", "-") for w in wheels}
    if names != set(versions) or len(wheels) != len(versions):  # two versions of one stop the install there
        raise SystemExit(
            f"make_gpu_carry: {dest} holds {[w.name for w in wheels]}, expected one wheel each of {sorted(versions)}"
        )
    built = [
        w
        for w in wheels
        if not w.name.endswith("-none-any.whl") and f"cp{python_version.replace('.', '')}" not in w.name
    ]
    if built:
        raise SystemExit(f"make_gpu_carry: {[w.name for w in built]} would not install on Python {python_version}")
    return wheels


def charset(vocab_size: int) -> list[str]:
    """The characters of a corpus whose tokenizer has `vocab_size` entries:
    those of LINES and the punctuation, then CJK ideographs in code point order."""
    from lingmao.data.tokenizer import SPECIALS

    want = vocab_size - len(SPECIALS)
    chars = sorted(set("".join(LINES)) | set("，。"))
    seen = set(chars)
    cp = CJK_FIRST
    while len(chars) < want:
        if chr(cp) not in seen:
            chars.append(chr(cp))
        cp += 1
    return chars


def documents(tokens: int, vocab_size: int, seed: int) -> list[str]:
    """About `tokens` characters of documents: quatrains of LINES (nine tenths)
    and strings drawn from the whole character set, which first covers every
    character once so that the vocabulary has exactly `vocab_size` entries."""
    rng = random.Random(seed)
    chars = charset(vocab_size)
    docs = ["".join(chars[i : i + 64]) for i in range(0, len(chars), 64)]
    size = sum(map(len, docs))
    while size < tokens:
        if rng.random() < 0.9:
            doc = "".join(f"{rng.choice(LINES)}，{rng.choice(LINES)}。" for _ in range(2))
        else:
            doc = "".join(rng.choices(chars, k=64))
        docs.append(doc)
        size += len(doc) + 1  # <eos>
    return docs


def build_corpus(dest: Path, tokens: int, vocab_size: int, seed: int = 0) -> Path:
    """A prepared corpus folder at `dest` (replaced if there), through
    lingmao's own prepare(): the layout data=prepared loads."""
    from lingmao.data.prepare import prepare

    with tempfile.TemporaryDirectory() as tmp:
        records = ({"text": t, "genre": "诗"} for t in documents(tokens, vocab_size, seed))
        prepared = prepare(
            records,
            Path(tmp),
            {"source": "gpu_carry", "tokens": tokens, "vocab": vocab_size},
            script="keep",
            val_fraction=0.02,
            seed=seed,
        )
        if prepared.vocab_size != vocab_size:
            raise SystemExit(
                f"make_gpu_carry: the corpus' vocabulary has {prepared.vocab_size} entries, not {vocab_size}"
            )
        if dest.exists():
            shutil.rmtree(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(prepared.dir), dest)
    return dest


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main(argv: list[str] | None = None) -> int:
    from lingmao.plan.make import DEFAULT_VOCAB

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path(".gpu_carry"), help="the folder to build (default .gpu_carry)")
    ap.add_argument("--python-version", default="3.12", help="the GPU machine's Python (default 3.12)")
    ap.add_argument("--tokens", type=int, default=2_000_000, help="corpus size in tokens (default 2,000,000)")
    ap.add_argument(
        "--vocab",
        type=int,
        default=DEFAULT_VOCAB,
        help=f"vocabulary size (default {DEFAULT_VOCAB}, the default corpus', which the plan assumes)",
    )
    ap.add_argument("--no-wheels", action="store_true", help="build the corpus only")
    args = ap.parse_args(argv)
    out = args.out
    if not args.no_wheels:
        if (out / "wheels").exists():
            shutil.rmtree(out / "wheels")
        for w in download_wheels(out / "wheels", args.python_version, wheel_versions()):
            print(f"wheel   {w.name} ({w.stat().st_size / 1024:.0f} KiB)")
    corpus = build_corpus(out / "corpus", args.tokens, args.vocab)
    meta = json.loads((corpus / "meta.json").read_text(encoding="utf-8"))
    print(
        f"corpus  {corpus}: {meta['tokens']['train']:,} train + {meta['tokens']['val']:,} val tokens, "
        f"vocabulary {meta['vocab_size']:,}"
    )
    size = folder_bytes(out)
    print(f"size    {out}: {size / 2**20:.1f} MiB (limit {MAX_CARRY_BYTES / 2**20:.0f} MiB)")
    if size > MAX_CARRY_BYTES:
        print(f"make_gpu_carry: {out} is over {MAX_CARRY_BYTES / 2**20:.0f} MiB: use fewer --tokens", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # lingmao from this checkout
    sys.exit(main())
