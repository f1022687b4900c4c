"""The project's borderline prompt set (data/borderline.json) and its two eval benchmarks."""

from __future__ import annotations

import itertools
import json
import re
from collections import Counter

import pytest

from openrlhf_safesteer import data
from openrlhf_safesteer.eval.benchmarks import DATA_DIR as EVAL_DATA_DIR
from openrlhf_safesteer.eval.benchmarks import benchmark_kind, load_benchmark

SIZES = {"train": 40, "dev": 48, "test": 64, "contrast_dev": 24, "contrast_test": 32}
CATEGORIES = {"homonyms", "figurative", "safe_targets", "safe_contexts"}


def normalise(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower().replace("'", "")))


def jaccard(a: str, b: str) -> float:
    x, y = set(normalise(a).split()), set(normalise(b).split())
    return len(x & y) / len(x | y)


def near_duplicates(left: list[str], right: list[str], same: bool = False) -> list[tuple[str, str]]:
    pairs = itertools.combinations(left, 2) if same else itertools.product(left, right)
    return [(a, b) for a, b in pairs if normalise(a) == normalise(b) or jaccard(a, b) > 0.8]


def all_prompts(file_rows: dict) -> list[str]:
    return [row["prompt"] for key, rows in file_rows.items() if isinstance(rows, list) for row in rows]


def test_split_names_and_bad_split():
    assert data.BORDERLINE_SPLITS == tuple(SIZES)
    with pytest.raises(ValueError, match=r"'nope'.*train.*dev.*test.*contrast_dev.*contrast_test"):
        data.borderline("nope")


@pytest.mark.parametrize("split", SIZES)
def test_sizes_categories_and_shape(split):
    prompts, rows = data.borderline(split), data.borderline(split, with_categories=True)
    assert len(prompts) == SIZES[split] and prompts == [r["prompt"] for r in rows]
    counts = Counter(r["category"] for r in rows)
    assert set(counts) == CATEGORIES
    assert set(counts.values()) == {SIZES[split] // 4}, counts  # balanced
    for p in prompts:
        assert 6 <= len(p.split()) <= 25, p
        assert p == p.strip() and p[-1] in ".?!", p
    rows[0]["prompt"] = "changed"  # copies: the cached file stays intact
    assert data.borderline(split)[0] != "changed"


def test_no_duplicates_within_or_across_splits():
    splits = {s: data.borderline(s) for s in SIZES}
    for s, prompts in splits.items():
        assert not near_duplicates(prompts, prompts, same=True), s
    for a, b in itertools.combinations(splits, 2):
        assert not near_duplicates(splits[a], splits[b]), (a, b)


def test_no_overlap_with_the_other_prompt_sets():
    ours = [p for s in SIZES for p in data.borderline(s)]
    with open(EVAL_DATA_DIR / "xstest_slice.json", encoding="utf-8") as f:
        xstest = [it["prompt"] for it in json.load(f)["items"]]
    others = {"xstest_slice": xstest, "harmful": all_prompts(data._load("harmful.json")),
              "harmless": all_prompts(data._load("harmless.json"))}
    assert len(others["harmful"]) > 100 and len(others["harmless"]) > 100
    for name, prompts in others.items():
        assert not near_duplicates(ours, prompts), name


def test_near_duplicate_check_flags_rewordings():
    assert near_duplicates(["How do I kill a stuck process?"], ["how do i KILL a stuck process"])
    assert near_duplicates(["How do I kill a stuck background process in Linux?"],
                           ["How do I kill the stuck background process in Linux?"])  # 9/11 words shared
    assert not near_duplicates(["How do I kill a stuck process?"], ["How do I kill weeds in my lawn?"])


def test_eval_benchmarks_read_the_package_set():
    borderline = load_benchmark("safesteer_borderline")
    assert benchmark_kind("safesteer_borderline") == "overrefusal"
    assert [it.prompt for it in borderline] == data.borderline("test")
    assert {it.label for it in borderline} == {"safe"}
    assert Counter(it.category for it in borderline) == Counter({c: 16 for c in CATEGORIES})
    assert len({it.id for it in borderline}) == 64

    contrast = load_benchmark("safesteer_borderline_contrast")
    assert benchmark_kind("safesteer_borderline_contrast") == "harmful"
    assert [it.prompt for it in contrast] == data.borderline("contrast_test")
    assert {it.label for it in contrast} == {"harmful"}
    assert Counter(it.category for it in contrast) == Counter({c: 8 for c in CATEGORIES})
    assert len(load_benchmark("safesteer_borderline", limit=5)) == 5
    # The file builtins still load as before.
    assert len(load_benchmark("safesteer_harmful")) == 12
