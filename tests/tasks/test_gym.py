"""The reasoning-gym adapter: four families through one class, answer extraction, strict correctness, splits."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

pytest.importorskip("reasoning_gym")

from creditlab.tasks import GymTask, Task, get_task
from creditlab.tasks.gym import expand_shorthands

# Small, fast configurations (countdown generation costs ~15 ms per item with the defaults).
FAMILIES = {
    "chain_sum": {"digits": 1, "terms": 2},
    "basic_arithmetic": {"digits": 1, "terms": 2},
    "countdown": {"numbers": 3, "max_value": 20, "min_target": 10, "max_target": 100},
    "gsm_symbolic": {},
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    task = get_task(request.param, **FAMILIES[request.param])
    return task, task.problems("train", 4, seed=0)


def test_family_produces_problems_with_the_answer_instruction(family):
    task, problems = family
    assert isinstance(task, Task) and len(problems) == 4
    for p in problems:
        assert p.prompt.rstrip().endswith("'The answer is N.'") or p.prompt.endswith("'The answer is EXPRESSION.'")
        assert p.answer and p.meta["entry"]["answer"] == p.answer


def test_demonstration_and_gold_answer_score_correct(family):
    task, problems = family
    for p in problems:
        for response in (task.demonstration(p), f"Reasoning...\nThe answer is {p.answer}."):
            score = task.score(p, response)
            assert score.correct and score.reward == 1.0, (p.prompt, response)
            assert score.step_labels is None and score.first_error is None and score.step_spans is None


@pytest.mark.parametrize("response", ["", "garbage", "The answer is", "The answer is banana.", "💥\n\x00",
                                      "The answer is 123456789123.", "The answer is 9**9**9**9."])
def test_garbage_scores_zero(family, response):
    task, problems = family
    score = task.score(problems[0], response)
    assert score.reward == 0.0 and not score.correct


@given(st.text(max_size=200))
def test_random_text_never_crashes(text):
    task = get_task("chain_sum", digits=1, terms=2)
    problem = task.problems("test", 1, seed=0)[0]
    assert 0.0 <= task.score(problem, text).reward <= 1.0


def test_numeric_extraction_tolerates_markup_and_falls_back_to_last_number():
    task = get_task("chain_sum", digits=1, terms=2)
    p = task.problems("train", 1, seed=1)[0]
    assert task.score(p, f"The answer is **{p.answer}**.").correct
    assert task.score(p, f"The answer is: {p.answer} apples").correct
    assert task.score(p, f"I think 1000 + 1 ... so {p.answer}").correct  # no answer line: last number
    assert not task.score(p, f"{p.answer} is wrong, the answer is 1000.").correct  # the answer line wins


def test_countdown_partial_credit_is_not_correct():
    task = get_task("countdown", **FAMILIES["countdown"])
    p = task.problems("train", 1, seed=0)[0]
    numbers = p.meta["entry"]["metadata"]["numbers"]
    wrong = "The answer is " + " + ".join(map(str, numbers)) + " + 0 * 1."  # well formed, wrong numbers
    wrong_value = "The answer is " + " - ".join(map(str, numbers)) + "."  # right numbers, (very likely) wrong value
    raw = task._scorer.score_answer(wrong_value.removeprefix("The answer is ").rstrip("."), p.meta["entry"])
    assert raw < 1.0, "test premise: this expression misses the target"
    assert raw > 0.0, "test premise: reasoning-gym gives partial credit"
    for response in (wrong, wrong_value):
        assert task.score(p, response) == task.score(p, "")  # reward 0, not correct
    graded = GymTask("countdown", partial_credit=True, **FAMILIES["countdown"])
    score = graded.score(p, wrong_value)
    assert score.reward == pytest.approx(raw) and not score.correct


def test_problems_are_deterministic_and_splits_disjoint_in_a_tiny_space():
    task = get_task("chain_sum", digits=1, terms=2)  # 200 distinct questions
    train = task.problems("train", 300, seed=0)
    assert train == task.problems("train", 300, seed=0)
    test = task.problems("test", 100, seed=0)
    train_q = {p.meta["entry"]["metadata"]["expression"] for p in train}
    test_q = {p.meta["entry"]["metadata"]["expression"] for p in test}
    assert test_q and not train_q & test_q
    assert [p.prompt for p in task.problems("train", 10, seed=1)] != [p.prompt for p in train[:10]]


def test_shorthands_and_config_pass_through():
    assert expand_shorthands({"digits": 1, "terms": 2, "allow_negation": True}) == {
        "min_digits": 1, "max_digits": 1, "min_terms": 2, "max_terms": 2, "allow_negation": True}
    task = get_task("chain_sum", min_digits=2, max_digits=2, terms=3)
    for p in task.problems("train", 5, seed=0):
        assert p.meta["entry"]["metadata"]["num_terms"] == 3 and p.meta["entry"]["metadata"]["num_digits"] == 2


def test_generic_gym_name_and_unknown_names():
    task = get_task("gym:leg_counting")
    p = task.problems("test", 1, seed=0)[0]
    assert task.name == "gym:leg_counting" and task.score(p, task.demonstration(p)).correct
    with pytest.raises(KeyError, match="chain_sum"):
        get_task("gym:no_such_dataset")
    with pytest.raises(KeyError, match="arith_chain"):
        get_task("no_such_task")
