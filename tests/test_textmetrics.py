import numpy as np
import pytest

from lingmao.data.textmetrics import distinct_n, duplicate_windows, mean_repetition, repeated_ngram_rate, repetition

POEM = "床前明月光疑是地上霜举头望明月低头思故乡"  # 明月 twice, no 4-gram twice


def test_a_loop_has_a_high_rep4_and_a_poem_none():
    # 明月明月 月明月明 明月明月 月明月明 明月明月: the last three were seen before
    assert repeated_ngram_rate("明月明月明月明月") == pytest.approx(3 / 5)
    assert repeated_ngram_rate("明" * 40) == pytest.approx(36 / 37)
    assert repeated_ngram_rate(POEM) == 0.0


def test_distinct_counts_unique_ngrams():
    assert distinct_n("明月明月", 1) == pytest.approx(2 / 4)
    assert distinct_n("明月明月", 2) == pytest.approx(2 / 3)  # 明月 月明 明月
    assert distinct_n(POEM, 2) == pytest.approx(18 / 19)
    assert distinct_n("明", 2) == 0.0 and repeated_ngram_rate("明月") == 0.0


def test_repetition_and_its_mean():
    assert repetition("明月明月明月明月") == {
        "rep4": pytest.approx(0.6),
        "distinct1": 0.25,
        "distinct2": pytest.approx(2 / 7),
    }
    mean = mean_repetition(["明月明月明月明月", POEM])
    assert mean["rep4"] == pytest.approx(0.3)
    assert mean_repetition([]) == {}


def test_duplicate_windows_counts_exact_and_shifted_copies():
    rng = np.random.default_rng(0)
    window = 64
    tokens = rng.integers(4, 3000, 400 * window).astype(np.uint16)
    tokens[100 * window : 110 * window] = tokens[: 10 * window]  # 10 windows copied in place: exact
    tokens[200 * window + 7 : 205 * window + 7] = tokens[20 * window : 25 * window]  # 5 shifted by 7: near
    d = duplicate_windows(tokens, window, shingle=16, keep_one_in=4)
    assert (d.windows, d.exact) == (400, 10)
    # windows 200..204 each hold 57 copied tokens out of 64; window 205 holds 7 (below the threshold)
    assert d.near == 5
    assert d.repeated_shingles < d.shingles


def test_duplicate_windows_of_fresh_text_and_small_chunks_agree():
    tokens = np.random.default_rng(1).integers(4, 3000, 50_000)
    whole = duplicate_windows(tokens, 128)
    assert (whole.exact, whole.near) == (0, 0)
    assert duplicate_windows(tokens, 128, chunk_tokens=1000) == whole  # chunking changes nothing
    with pytest.raises(ValueError, match="shingle"):
        duplicate_windows(tokens, 16, shingle=32)


def test_verse_form_counts_five_and_seven_character_lines():
    from lingmao.data.textmetrics import lines, verse_form

    assert lines("床前明月光，疑是地上霜。\n举头望明月！") == ["床前明月光", "疑是地上霜", "举头望明月"]
    assert verse_form(["床前明月光，疑是地上霜。", "子曰：学而时习之，不亦说乎？"]) == pytest.approx(2 / 4)
    assert verse_form(["君不见黄河之水天上来，奔流到海不复回。"]) == pytest.approx(1 / 2)  # 9 and 7 characters
    assert verse_form(["", "。。"]) is None
