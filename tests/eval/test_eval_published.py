"""Published verdicts beside ours, from registry material only (no hub, no API).

No published *rate* can be recomputed here: the data behind JailbreakBench's judge comparison (its
`judge_comparison` hub config, with human and string-match labels) and XSTest's string-match label
files are not on any package registry, and the jailbreakbench sdist ships no data. What the sdist
does ship is its own classifier test, tests/test_classifier.py: three prompts, three responses and the
verdicts its tests assert for JailbreakBench's three API judges (Llama Guard 1, Llama-3-70B jailbreak
judge, Llama-3-8B refusal judge). data/jbb_test_classifier_verdicts.json holds them verbatim (MIT), with
the sdist's sha256. Here the string judges are run on those responses and set beside the published
verdicts, and jailbreakbench's own StringClassifier (installed from PyPI) is run on them too.
"""

from __future__ import annotations

import json
from pathlib import Path

from openrlhf_safesteer.eval.benchmarks import EvalItem
from openrlhf_safesteer.eval.judges import make_judge

DATA = json.loads((Path(__file__).parent / "data" / "jbb_test_classifier_verdicts.json").read_text())
STRING_JUDGES = ("refusal", "jbb_string", "arditi", "xstest_strmatch")


def jailbroken(judge: str) -> list[bool]:
    items = [EvalItem(str(i), p) for i, p in enumerate(DATA["prompts"])]
    return [bool(v.unsafe) for v in make_judge(judge).judge(items, DATA["responses"])]


def agreement(ours: list[bool], published: list[bool]) -> str:
    return f"{sum(a == b for a, b in zip(ours, published))}/{len(published)}"


def test_string_judges_beside_jailbreakbenchs_published_verdicts(jbb_string_classifier):
    published = DATA["published"]
    assert len(DATA["responses"]) == 3 and DATA["source"].startswith("jailbreakbench 1.0.0 sdist from PyPI")
    refusal_published = published["Llama3RefusalJudge"]["verdicts"]
    jailbreak_published = published["Llama3JailbreakJudge"]["verdicts"]
    rows = []
    for judge in STRING_JUDGES:
        ours = jailbroken(judge)
        refuses = [make_judge(judge).refuses(r) for r in DATA["responses"]]
        rows.append((judge, agreement(refuses, refusal_published), agreement(ours, jailbreak_published),
                     agreement(ours, published["LlamaGuard1JailbreakJudge"]["verdicts"])))
        # The refusal verdicts of JailbreakBench's Llama-3 refusal judge, and its Llama-3 jailbreak judge's
        # verdicts, are reproduced by every string judge on these three responses.
        assert refuses == refusal_published, judge
        assert ours == jailbreak_published, judge
    # jailbreakbench's own StringClassifier gives the same jailbreak verdicts as our copy of it.
    upstream = jbb_string_classifier().classify_responses(DATA["prompts"], DATA["responses"])
    assert upstream == jailbroken("jbb_string") == jailbreak_published
    print("\njudge            vs Llama3RefusalJudge  vs Llama3JailbreakJudge  vs LlamaGuard1JailbreakJudge")
    for row in rows:
        print(f"{row[0]:<16} {row[1]:>21}  {row[2]:>22}  {row[3]:>26}")
