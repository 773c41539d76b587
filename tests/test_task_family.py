"""The task family (scripts/make_task_family.py): shipped files equal a fresh run, splits are honest."""
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import make_task_family as family  # noqa: E402


def _users(records):
    return [r["messages"][1]["content"] for r in records]


def test_shipped_files_equal_a_fresh_run(tmp_path):
    assert family.main(["--check"]) == 0
    (tmp_path / "person.train.jsonl").write_text("{}\n")
    assert family.main(["--check", "--out", str(tmp_path)]) == 1


def test_splits_sizes_and_disjoint_entities():
    splits = family.build()
    assert {k.split(".")[0] for k in splits} == set(family.SYSTEMS)
    for task in family.SYSTEMS:
        sizes = family.BOOKING_SIZES if task == "booking" else family.SIZES
        for split, n in sizes.items():
            records = splits[f"{task}.{split}"]
            assert len(records) == n
            assert all([m["role"] for m in r["messages"]] == ["system", "user", "assistant"] for r in records)
    # no held-out or validation name is ever in a training sentence (names are whole words)
    train_words = {w for k, v in splits.items() if k.endswith((".train", ".fewshot")) for u in _users(v)
                   for w in re.findall(r"[A-Za-z]+", u)}
    test_names = {json.loads(r["messages"][2]["content"])["name"] for r in splits["person.test"]}
    assert test_names and not test_names & train_words


def test_event_answers_are_iso_dates_and_24h_times():
    for r in family.build()["event.validation"]:
        answer = json.loads(r["messages"][2]["content"])
        year, month, day = answer["date"].split("-")
        hour, minute = answer["time"].split(":")
        assert len(year) == 4 and 1 <= int(month) <= 12 and 1 <= int(day) <= 28
        assert 0 <= int(hour) <= 23 and int(minute) in (0, 10, 15, 20, 30, 45, 50)
        assert family.MONTHS[int(month) - 1] in r["messages"][1]["content"]
