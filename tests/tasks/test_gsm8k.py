"""gsm8k: local GSM8K-format files (JSONL and parquet) and math-verify answer checking."""

import json
import threading

import pytest

pytest.importorskip("datasets")
pytest.importorskip("math_verify")

from creditlab.tasks import GSM8K, Task, get_task
from creditlab.tasks.gsm8k import answers_match, gold_answer

ROWS = [
    {"question": f"Tom has {i} apples and buys {i + 2} more. How many apples does he have?",
     "answer": f"He has {i} + {i + 2} = <<{i}+{i + 2}={2 * i + 2}>>{2 * i + 2} apples.\n#### {2 * i + 2}"}
    for i in range(30)
] + [{"question": "Half of one pie is how much pie?", "answer": "One divided by two is 1/2.\n#### 0.5"},
     {"question": "A town has 1,200 people and 300 leave. How many stay?",
      "answer": "1,200 - 300 = <<1200-300=900>>900\n#### 900"}]


@pytest.fixture(scope="module", params=["jsonl", "parquet"])
def data_file(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("gsm8k") / f"data.{request.param}"
    if request.param == "jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    else:
        from datasets import Dataset

        Dataset.from_list(ROWS).to_parquet(str(path))
    return path


def test_loads_both_formats_and_splits_disjointly(data_file):
    task = get_task("gsm8k", path=str(data_file))
    assert isinstance(task, Task) and task.name == "gsm8k"
    train, test = task.problems("train", 200, seed=0), task.problems("test", 10, seed=0)
    assert len(train) == 200  # more than the split holds: further shuffled epochs
    assert {p.prompt for p in train} | {p.prompt for p in test} == {
        r["question"] + "\nEnd your reply with 'The answer is N.'" for r in ROWS}
    assert not {p.prompt for p in train} & {p.prompt for p in test}
    assert train == task.problems("train", 200, seed=0) and train != task.problems("train", 200, seed=1)


def test_demonstration_scores_correct_and_strips_calculator_annotations(data_file):
    task = GSM8K(path=data_file)
    for p in task.problems("train", 20, seed=0) + task.problems("test", 5, seed=0):
        demo = task.demonstration(p)
        assert "<<" not in demo and demo.endswith(f"The answer is {p.answer}.")
        assert task.score(p, demo).correct and task.score(p, demo).reward == 1.0


def test_separate_split_files(data_file):
    task = GSM8K(train_path=data_file, test_path=data_file)
    assert len(task.problems("test", len(ROWS), seed=0)) == len(ROWS)


def test_math_verify_equivalence_and_extraction():
    task = GSM8K.__new__(GSM8K)  # scoring needs no data
    half = GSM8K._problem({"question": "Half?", "answer": "#### 0.5"})
    for right in ["The answer is 1/2.", "The answer is 0.5.", "The answer is \\frac{1}{2}.", "The answer is $0.50$.",
                  "so it is 0.5"]:
        assert task.score(half, right).correct, right
    for wrong in ["The answer is 2.", "", "nothing here", "The answer is 1/3.", "The answer is x."]:
        assert task.score(half, wrong).reward == 0.0, wrong
    big = GSM8K._problem({"question": "?", "answer": "#### 1,200"})
    assert big.answer == "1200" and task.score(big, "The answer is 1,200.").correct


def test_scoring_works_outside_the_main_thread():
    results = []
    thread = threading.Thread(target=lambda: results.append((answers_match("0.5", "1/2"), answers_match("2", "3"))))
    thread.start()
    thread.join()
    assert results == [(True, False)]


def test_bad_input_fails_loudly(tmp_path):
    with pytest.raises(ValueError, match="path"):
        GSM8K()
    with pytest.raises(ValueError, match="####"):
        gold_answer("no final answer")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"problem": "x", "solution": "y"}) + "\n")
    with pytest.raises(ValueError, match="question"):
        GSM8K(path=bad)
