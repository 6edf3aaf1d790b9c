"""Environments (creditlab.envs): determinism, invalid actions, anchor states, BM25 search, the env task."""

import math
import re

import pytest

from creditlab.envs import get_env, list_envs, state_hash
from creditlab.envs.search import BM25Index, build_world, normalize_answer, question
from creditlab.tasks import get_task

GRID = ["sokoban", "frozenlake"]
WEIRD = ["", "   ", "\x00\x01", "ü" * 50, "x" * 10_000, "search:", "answer", "[q]", None, 42]


def test_registry_lists_every_env_and_rejects_unknown():
    assert set(list_envs()) >= {"sokoban", "frozenlake", "search"}
    with pytest.raises(KeyError, match="unknown environment 'nope'"):
        get_env("nope")


@pytest.mark.parametrize("name", list_envs())
def test_reset_is_deterministic_and_trajectories_replay(name):
    actions = ["up", "left", "search: born", "down", "answer: x", "right"]
    runs = []
    for _ in range(2):
        env = get_env(name)
        obs = [env.reset(11)]
        for a in actions:
            o, r, d, info = env.step(a)
            obs.append((o, r, d, info["valid"], env.state_key()))
        runs.append(obs)
    assert runs[0] == runs[1]
    assert get_env(name).reset(11) != get_env(name).reset(12) or name == "search"  # levels differ by seed


@pytest.mark.parametrize("name", list_envs())
@pytest.mark.parametrize("action", WEIRD)
def test_invalid_action_gives_penalty_and_clear_observation_never_raises(name, action):
    env = get_env(name, invalid_penalty=0.25)
    env.reset(3)
    before = env.state_key()
    obs, reward, done, info = env.step(action)
    if not info["valid"]:
        assert reward == -0.25 and not done and env.state_key() == before
        assert "invalid" in obs.lower() and re.search(r"up|search", obs)
    assert isinstance(obs, str) and math.isfinite(reward)


@pytest.mark.parametrize("name", list_envs())
def test_stepping_after_done_is_an_invalid_action(name):
    env = get_env(name)
    env.reset(5)
    for a in ["answer: nothing"] + ["up", "left", "down", "right"] * 10:
        *_, done, _ = env.step(a)
        if done:
            break
    if done:
        obs, r, d, info = env.step("up")
        assert d and not info["valid"] and "over" in obs and r < 0


def test_negative_penalty_is_rejected():
    with pytest.raises(ValueError, match="invalid_penalty"):
        get_env("sokoban", invalid_penalty=-1)


def test_sokoban_levels_are_solved_by_their_bfs_solution():
    env = get_env("sokoban", walls=3, max_moves=10)
    for seed in range(50):
        env.reset(seed)
        assert 1 <= len(env.solution) <= 10
        for move in env.solution:
            *_, done, info = env.step(move)
        assert done and info["success"]


def test_sokoban_rewards_push_on_target_and_solve():
    env = get_env("sokoban", step_reward=-0.01)
    env.reset(0)
    rewards = [env.step(m)[1] for m in env.solution]
    # every move costs 0.01; the last push puts the box on the target (+0.1) and solves (+1)
    assert rewards[-1] == pytest.approx(-0.01 + 0.1 + 1.0)
    assert all(r == pytest.approx(-0.01) or r > 0 for r in rewards[:-1])


@pytest.mark.parametrize("name", GRID)
def test_anchor_states_repeat_across_rollouts_of_one_seed(name):
    """Rollouts of one seed that reach one board by different paths share one state key (GiGPO's anchor state):
    the key holds no history and no turn counter."""
    import itertools

    for seed in range(5):
        keys = {}
        for path in itertools.product(["up", "down", "left", "right"], repeat=2):
            env = get_env(name)
            env.reset(seed)
            for move in path:
                env.step(move)
            keys.setdefault(env.state_key(), []).append(path)
        assert max(len(p) for p in keys.values()) >= 2  # some board is reached by two different paths
        env = get_env(name)
        start = env.reset(seed)
        env.step("not a move")
        assert env.state_key() == start  # an invalid turn later is the same anchor as the reset state


def test_state_hash_is_stable_signed_int64():
    h = state_hash("######\n#P_O_#")
    assert -(2**63) <= h < 2**63 and h == state_hash("######\n#P_O_#") and h != state_hash("######\n#_PO_#")


# ------------------------------------------------------------------ BM25 search
def _lucene_bm25(docs, query, k1=1.5, b=0.75):
    """Lucene BM25 written out: idf = ln(1 + (N - df + .5) / (df + .5)), tf / (tf + k1 (1 - b + b dl / avgdl))."""
    import bm25s

    stop = set(bm25s.stopwords.STOPWORDS_EN)
    tok = lambda s: [w for w in re.findall(r"(?u)\b\w\w+\b", s.lower()) if w not in stop]  # noqa: E731
    corpus = [tok(d) for d in docs]
    avgdl = sum(map(len, corpus)) / len(corpus)
    scores = []
    for words in corpus:
        s = 0.0
        for q in tok(query):
            df = sum(q in d for d in corpus)
            if df == 0:
                continue
            tf = words.count(q)
            idf = math.log(1 + (len(corpus) - df + 0.5) / (df + 0.5))
            s += idf * tf / (tf + k1 * (1 - b + b * len(words) / avgdl))
        scores.append(s)
    return scores


def test_bm25_scores_match_the_formula_written_out():
    world = build_world(0, people=10, cities=4, countries=2, companies=3)
    index = BM25Index(world.docs)
    for query in [world.docs[0].split(".")[0], "founded by", "city country", next(iter(world.founder))]:
        want = _lucene_bm25(world.docs, query)
        got = index.search(query, k=len(world.docs))
        assert [i for i, _ in got] == sorted((i for i, s in enumerate(want) if s > 0), key=lambda i: (-want[i], i))
        for i, s in got:
            assert s == pytest.approx(want[i], rel=1e-5)
    assert index.search("zzzz qqqq", 3) == [] and index.search("", 3) == []


def test_search_env_gold_chain_is_retrievable_and_answer_checked():
    env = get_env("search")
    solved = 0
    for seed in range(30):
        env.reset(seed)
        q, answer, chain, hops = question(env.world, seed)
        assert len(chain) == hops and 1 <= hops <= 3
        # follow the chain: search the entity named in each gold document, then answer
        query = re.search(r"(?:was|of) (.+?) born\?", q).group(1)
        for _ in range(hops):
            obs, r, done, info = env.step(f"search: {query}")
            assert info["tool"] == "search" and not done
            next_entity = re.findall(r"(?:founded by|born in|city in) ([A-Z]\w+(?: [A-Z]\w+)?)\.", obs)
            if next_entity:
                query = next_entity[0]
        obs, r, done, info = env.step(f"answer: The {answer.upper()}!")
        assert done and info["tool"] == "answer" and r == float(info["success"])
        solved += info["success"]
    assert solved >= 25  # BM25 finds the gold documents for nearly every question
    assert normalize_answer("The Foo, bar.") == "foo bar"


def test_search_expert_solves_every_question_in_hops_plus_one_turns_from_visible_names():
    env = get_env("search")
    for seed in range(300):
        first = env.reset(seed)
        seen_text, hops, actions = first, env.hops, 0
        for _ in range(hops + 1):
            action = env.expert_action()
            actions += 1
            if action.startswith("search: "):
                assert action[len("search: "):] in seen_text  # imitable: the name is in the question or a result
            obs, _, done, info = env.step(action)
            seen_text += obs
            if done:
                break
        assert done and info["success"] and actions == hops + 1  # hops searches, then the answer


def test_env_task_expert_turns_end_without_an_observation_and_refuse_a_failed_episode():
    task = get_task("search")
    assert task.has_expert and not get_task("sokoban").has_expert
    p = next(p for p in task.problems("train", 40, seed=0) if question(task.make_env().world,
                                                                       p.meta["env_seed"])[3] == 3)
    turns = task.expert_turns(p, max_turns=6)
    assert [a.split(":")[0] for a, _ in turns] == ["search"] * 3 + ["answer"]
    assert all(o.startswith("Results:") for _, o in turns[:-1]) and turns[-1] == (f"answer: {p.answer}", "")
    with pytest.raises(ValueError, match=r"does not solve env seed \d+ in 3 turns"):
        task.expert_turns(p, max_turns=3)


def test_search_env_counts_retrieval_reward_once_per_gold_doc():
    env = get_env("search", retrieval_reward=0.5)
    env.reset(2)
    _, _, chain, _ = question(env.world, 2)
    first = env.world.docs[chain[0]].split(" is ")[0]
    r1 = env.step(f"search: {first}")[1]
    r2 = env.step(f"search: {first}")[1]
    assert (r1, r2) == (0.5, 0.0)


# ------------------------------------------------------------------ the env task
def test_env_task_splits_are_disjoint_by_level_and_deterministic():
    task = get_task("frozenlake", size=3, holes=1)
    train = task.problems("train", 40, seed=0)
    test = task.problems("test", 10, seed=0)
    assert {p.prompt for p in train}.isdisjoint({p.prompt for p in test})
    assert [p.meta for p in train] == [p.meta for p in task.problems("train", 40, seed=0)]


def test_env_task_scores_an_open_loop_plan_and_demonstrates_sokoban():
    task = get_task("sokoban")
    p = task.problems("train", 1, seed=3)[0]
    demo = task.demonstration(p)
    assert task.score(p, demo).correct and not task.score(p, "").correct
    assert task.score(p, None).reward == 0.0
    with pytest.raises(NotImplementedError):
        get_task("search").demonstration(get_task("search").problems("train", 1, 0)[0])
