"""arith_chain: the step verifier (labels, first error, spans), malformed input, determinism and splits."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from creditlab.tasks import ArithChain, Problem, Score, Task, get_task, list_tasks

# start 7, add 5, multiply by 3, subtract 4 -> 32
GOLD = ((7, "+", 5, 12), (12, "*", 3, 36), (36, "-", 4, 32))
PROBLEM = Problem(prompt="Compute step by step: start with 7, add 5, multiply by 3, subtract 4.", answer="32",
                  meta={"gold_steps": GOLD})
TASK = ArithChain()


def test_is_a_task_and_prompt_is_canonical():
    task = get_task("arith_chain", n_steps=2, max_operand=5)
    assert isinstance(task, Task) and task.name == "arith_chain"
    (p,) = task.problems("train", 1, seed=0)
    assert p.prompt.startswith("Compute step by step: start with ")
    assert p.prompt.endswith("Write one step per line as 'a op b = c', then 'Answer: N'.")
    assert len(p.meta["gold_steps"]) == 2


def test_correct_solution_gets_reward_one_and_all_labels_one():
    response = "7 + 5 = 12\n12 * 3 = 36\n36 - 4 = 32\nAnswer: 32"
    assert TASK.demonstration(PROBLEM) == response
    assert TASK.score(PROBLEM, response) == Score(1.0, True, (1, 1, 1), None, ((0, 10), (11, 22), (23, 34)))


def test_wrong_second_step_labels_and_spans():
    response = "7 + 5 = 12\n12 * 3 = 35\n35 - 4 = 31\nAnswer: 31"
    score = TASK.score(PROBLEM, response)
    assert score.reward == 0.0 and not score.correct
    assert score.step_labels == (1, 0, 0)  # step 3 is right arithmetic but continues from the wrong value
    assert score.first_error == 1
    assert [response[s:e] for s, e in score.step_spans] == ["7 + 5 = 12", "12 * 3 = 35", "35 - 4 = 31"]


def test_spans_skip_surrounding_text_and_indentation():
    response = "Let me think.\n  7 + 5 = 12  \nthen\n12 * 3 = 36.\r\n36 - 4 = 32\nAnswer: 32\n"
    score = TASK.score(PROBLEM, response)
    assert score.correct and score.step_labels == (1, 1, 1)
    assert [response[s:e] for s, e in score.step_spans] == ["7 + 5 = 12", "12 * 3 = 36.", "36 - 4 = 32"]


@pytest.mark.parametrize(("second_step", "why"), [
    ("12 * 3 = 37", "wrong arithmetic"),
    ("11 * 3 = 33", "does not carry the previous result"),
    ("12 + 3 = 15", "wrong operation"),
    ("12 * 4 = 48", "wrong operand"),
])
def test_wrong_arithmetic_and_wrong_chaining_are_both_caught(second_step, why):
    score = TASK.score(PROBLEM, f"7 + 5 = 12\n{second_step}\nAnswer: 32")
    assert score.step_labels == (1, 0), why
    assert score.first_error == 1
    assert score.correct  # the outcome reward looks only at the answer line


def test_unicode_operator_spellings_are_judged():
    score = TASK.score(PROBLEM, "7 + 5 = 12\n12 × 3 = 36\n36 - 4 = 32\nAnswer: 32")
    assert score.step_labels == (1, 1, 1)


def test_extra_steps_are_wrong_and_missing_steps_are_not_errors():
    extra = TASK.score(PROBLEM, "7 + 5 = 12\n12 * 3 = 36\n36 - 4 = 32\n32 + 0 = 32\nAnswer: 32")
    assert extra.step_labels == (1, 1, 1, 0) and extra.first_error == 3
    short = TASK.score(PROBLEM, "7 + 5 = 12\nAnswer: 32")
    assert short.step_labels == (1,) and short.first_error is None and short.reward == 1.0


def test_partial_credit_is_off_by_default_and_configurable():
    wrong = "7 + 5 = 12\n12 * 3 = 36\n36 - 4 = 30\nAnswer: 30"
    assert TASK.score(PROBLEM, wrong).reward == 0.0
    assert ArithChain(partial_credit=0.3).score(PROBLEM, wrong).reward == pytest.approx(0.2)


@pytest.mark.parametrize("response", ["", "   ", "\n\n", "Answer:", "Answer: abc", "= = =", "7 + = 12", "💥" * 50,
                                      "7 + 5 = 12" * 1000, "Answer: " + "9" * 5000, "1 + 1 = " + "9" * 5000,
                                      "٧ + ٥ = ١٢\nAnswer: ٣٢"])
def test_malformed_responses_score_zero_without_crashing(response):
    score = TASK.score(PROBLEM, response)
    assert isinstance(score, Score) and 0.0 <= score.reward <= 1.0
    if "Answer: ٣٢" not in response:  # unicode digits are digits: that one is a (strange) right answer
        assert score.reward == 0.0 and not score.correct


def test_no_steps_gives_empty_labels_not_none():
    score = TASK.score(PROBLEM, "")
    assert score.step_labels == () and score.step_spans == () and score.first_error is None


@given(st.text(max_size=300))
def test_random_text_never_crashes(text):
    score = TASK.score(PROBLEM, text)
    assert 0.0 <= score.reward <= 1.0
    assert len(score.step_labels) == len(score.step_spans)
    assert all(0 <= s < e <= len(text) for s, e in score.step_spans)


@given(seed=st.integers(0, 10_000), n_steps=st.integers(1, 5), max_operand=st.integers(1, 12),
       ops=st.sampled_from(["+-*", "+", "*", "+-", "+-*/", "-/"]), split=st.sampled_from(["train", "test"]))
def test_demonstration_always_scores_one(seed, n_steps, max_operand, ops, split):
    task = ArithChain(n_steps=n_steps, max_operand=max_operand, ops=ops, max_value=max(99, max_operand))
    try:
        problems = task.problems(split, 3, seed)
    except ValueError:  # e.g. ops="-/" with max_operand=1 has no chain of this length
        return
    for problem in problems:
        gold = problem.meta["gold_steps"]
        assert all(1 <= c <= task.max_value and 1 <= b <= max_operand for _, _, b, c in gold)
        score = task.score(problem, task.demonstration(problem))
        assert score.reward == 1.0 and score.correct
        assert score.step_labels == (1,) * n_steps and score.first_error is None


def test_problems_are_deterministic_and_seed_dependent():
    task = get_task("arith_chain")
    assert task.problems("train", 20, seed=3) == task.problems("train", 20, seed=3)
    assert task.problems("train", 20, seed=3) != task.problems("train", 20, seed=4)
    assert task.problems("train", 30, seed=3)[:20] == task.problems("train", 20, seed=3)


def test_splits_are_disjoint():
    task = ArithChain(n_steps=2, max_operand=5)
    train = {p.prompt for p in task.problems("train", 500, seed=0)}
    test = {p.prompt for p in task.problems("test", 200, seed=0)}
    assert train and test and not train & test


def test_bad_options_and_split_fail_loudly():
    with pytest.raises(ValueError, match="split"):
        TASK.problems("validation", 1, 0)
    with pytest.raises(ValueError, match="ops"):
        ArithChain(ops="+^")
    with pytest.raises(ValueError, match="too small"):
        ArithChain(n_steps=5, max_operand=2, ops="-").problems("train", 1, 0)


def test_registry_lists_tasks_and_rejects_unknown_names():
    assert {"arith_chain", "chain_sum", "basic_arithmetic", "countdown", "gsm_symbolic", "gsm8k"} <= set(list_tasks())
    with pytest.raises(KeyError, match="arith_chain"):
        get_task("arith_chian")


def test_sloppy_demos_slip_a_stable_share_of_answer_lines_and_leave_scoring_alone():
    clean = ArithChain(n_steps=2, ops="+-")
    sloppy = ArithChain(n_steps=2, ops="+-", sloppy_demos=0.6)
    problems = clean.problems("train", 400, 0)
    slipped = [p for p in problems if sloppy.demonstration(p) != clean.demonstration(p)]
    assert 0.5 < len(slipped) / len(problems) < 0.7
    for p in slipped:  # the steps are untouched; the answer line repeats the value before the last step
        steps = p.meta["gold_steps"]
        assert sloppy.demonstration(p).splitlines()[:-1] == clean.demonstration(p).splitlines()[:-1]
        assert sloppy.demonstration(p).splitlines()[-1] == f"Answer: {steps[-1][0]}"
        assert not sloppy.score(p, sloppy.demonstration(p)).correct
        assert sloppy.score(p, clean.demonstration(p)).reward == 1.0  # the verifier is the clean one
    assert [sloppy.demonstration(p) for p in problems] == [sloppy.demonstration(p) for p in problems]
    assert ArithChain(sloppy_demos=0.0).demonstration(problems[0]) == clean.demonstration(problems[0])
    with pytest.raises(ValueError, match="sloppy_demos"):
        ArithChain(sloppy_demos=1.5)
