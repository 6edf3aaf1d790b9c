"""Multi-turn rollouts: prompt -> action -> observation -> action ... up to a turn limit, one row per episode.

    rollout = MultiTurn(max_turns=6, invalid_penalty=0.1)           # the trainer builds it from AgentConfig
    batch, scores = rollout.collect(policy, task, problems, rollout_cfg, seed=step_seed)

Layout of a row (what the trainer and every estimator see):
    prompt_ids = the formatted first observation (instructions + board / question), left-padded, shared by the
                 G rows of a group (G episodes from the same reset seed: ``group_ids`` = problem index);
    response_ids = action_0 | obs_1 | action_1 | obs_2 | ... | action_{K-1}   (no observation after the last action)
    response_mask = True on action tokens only (each action through its stop token); observation tokens are in the
                 row, attended by the trainer's ``sequence_logprobs``, but carry no loss and no advantage;
    turn_ids  [B,T] = k on the tokens of action k, -1 on observations and padding;
    turn_rewards [B,N], anchor_states [B,N] = the environment's reward for turn k and the hash of the canonical state
                 turn k started from (GiGPO's anchor); rewards [B] = the sum of the turn rewards (the return);
    logprobs / entropies / certainty / token_logits of the sampling policy on action tokens (0 elsewhere).

Observations are written in the policy's own chat format: with a chat template, each observation is a user turn
(``<|im_end|>`` ends the action, then ``\\n<|im_start|>user\\n{obs}<|im_end|>\\n<|im_start|>assistant\\n``, taken
from the template itself); without one it is ``\\n{obs}\\n`` after the action's stop token.

KV cache reuse (``kv_reuse=True``, default): the prompt is prefilled once per problem and indexed out to its G rows;
each turn's sampled tokens and the next observation's tokens are appended to the same cache (finished episodes are
dropped from it), so no context is ever re-encoded. ``kv_reuse=False`` re-prefills every row's whole context at
every turn: same tokens and log-probs up to float reassociation, kept as the reference for tests and for
``benchmarks/agents_kv.py`` (the measured speed-up is in docs/agents.md). Both consume the sampling generator in the
same order, so under one seed they sample the same episodes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from creditlab.batch import RolloutBatch
from creditlab.envs.base import state_hash
from creditlab.rollout.hf import SamplingConfig, _left_pad, _sample_step, cache_kwarg, output_cache
from creditlab.tasks.base import Score

_SENTINEL_A, _SENTINEL_O = "\x01ACTION\x01", "\x01OBS\x01"


@dataclass(frozen=True)
class EpisodeScore(Score):
    """A `Score` with the episode's structure: turns taken, tool calls by kind, invalid actions."""

    turns: int = 0
    tool_calls: tuple[tuple[str, int], ...] = ()  # (tool, count) pairs, sorted by tool
    invalid: int = 0

    def calls(self, tool: str) -> int:
        return dict(self.tool_calls).get(tool, 0)


@dataclass
class _Episode:
    env: Any
    tokens: list[int] = field(default_factory=list)  # response tokens: actions and observations
    is_action: list[bool] = field(default_factory=list)
    turn: list[int] = field(default_factory=list)
    stats: list[list[float]] = field(default_factory=list)  # per token: logprob, entropy, certainty, logit
    rewards: list[float] = field(default_factory=list)
    anchors: list[int] = field(default_factory=list)
    tools: dict[str, int] = field(default_factory=dict)
    invalid: int = 0
    success: bool = False
    done: bool = False


class ObservationFormatter:
    """Text of an observation turn in the policy's chat format (see the module docstring)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.pre, self.post = "\n", "\n"
        if getattr(tokenizer, "chat_template", None):
            msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": _SENTINEL_A},
                    {"role": "user", "content": _SENTINEL_O}]
            text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            eos = tokenizer.eos_token or ""
            start = text.index(_SENTINEL_A) + len(_SENTINEL_A)
            if eos and text.startswith(eos, start):  # the action's stop token is sampled, not part of the obs
                start += len(eos)
            self.pre, self.post = text[start:].split(_SENTINEL_O)

    def ids(self, observation: str) -> list[int]:
        return self.tokenizer(self.pre + observation + self.post, add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------ model steps on a growing KV cache
def _forward(model: Any, ids: Tensor, attn: Tensor, pos: Tensor, cache: Any, keep_all: bool = False) -> Any:
    return model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True,
                 logits_to_keep=0 if keep_all else 1, **{cache_kwarg(model): cache})


def _prefill(model: Any, seqs: list[list[int]], pad_id: int, expand: Tensor | None = None
             ) -> tuple[Any, Tensor, Tensor, Tensor]:
    """Left-padded prefill of ``seqs`` -> (cache, attn [b, L] long, next position [b], next-token logits [b, V])."""
    ids, mask = _left_pad(seqs, pad_id, model.device)
    attn = mask.long()
    out = _forward(model, ids, attn, (attn.cumsum(-1) - 1).clamp(min=0), None)
    cache, logits = output_cache(out), out.logits[:, -1]
    if expand is not None:  # one prefill per distinct prompt, one cache row per episode
        cache.batch_select_indices(expand)
        attn, logits = attn[expand], logits[expand]
    return cache, attn, attn.sum(-1), logits


def _decode_turn(model: Any, state: list[Any], cfg: SamplingConfig, gen: torch.Generator, stop: Tensor,
                 pad_id: int) -> list[tuple[list[int], list[list[float]]]]:
    """Sample one action per cache row, appending every sampled token to the cache; state = [cache, attn, pos, logits].

    A row that has stopped feeds pad tokens with attention 0 (its context is untouched). Returns per row the action
    tokens (through the stop token) and their [logprob, entropy, certainty, logit] rows.
    """
    cache, attn, pos, logits = state
    b = attn.shape[0]
    alive = torch.ones(b, dtype=torch.bool, device=attn.device)
    out: list[tuple[list[int], list[list[float]]]] = [([], []) for _ in range(b)]
    for _ in range(cfg.max_new_tokens):
        token, stats = _sample_step(logits.float(), cfg, gen)  # [b], 4 x [b]
        stats_rows = torch.stack(stats, 1).tolist()
        for i in torch.nonzero(alive).flatten().tolist():
            out[i][0].append(int(token[i]))
            out[i][1].append(stats_rows[i])
        token = torch.where(alive, token, torch.full_like(token, pad_id))
        attn = torch.cat([attn, alive.long()[:, None]], 1)  # [b, L + 1]
        res = _forward(model, token[:, None], attn, pos[:, None], cache)
        cache, logits = output_cache(res), res.logits[:, -1]
        pos = pos + alive.long()
        alive &= ~torch.isin(token, stop)
        if not bool(alive.any()):
            break
    state[:] = [cache, attn, pos, logits]
    return out


def _append(model: Any, state: list[Any], obs: list[list[int]], pad_id: int) -> None:
    """Append right-padded observation tokens (one list per cache row) and take each row's next-token logits."""
    cache, attn, pos, _ = state
    width = max(len(o) for o in obs)
    ids = torch.full((len(obs), width), pad_id, dtype=torch.long, device=attn.device)
    m = torch.zeros((len(obs), width), dtype=torch.long, device=attn.device)
    for i, o in enumerate(obs):
        ids[i, : len(o)] = torch.tensor(o, dtype=torch.long)
        m[i, : len(o)] = 1
    positions = pos[:, None] + (m.cumsum(-1) - 1).clamp(min=0)  # [b, W]
    attn = torch.cat([attn, m], 1)
    res = _forward(model, ids, attn, positions, cache, keep_all=True)
    last = m.sum(-1) - 1  # [b] index of each row's last observation token
    logits = res.logits[torch.arange(len(obs), device=attn.device), last]  # [b, V]
    state[:] = [output_cache(res), attn, pos + m.sum(-1), logits]


# ------------------------------------------------------------------ the episode loop
@torch.no_grad()
def run_episodes(policy: Any, envs: list[Any], seeds: list[int], prompts: list[str], expand: list[int],
                 cfg: SamplingConfig, *, max_turns: int, seed: int, kv_reuse: bool = True) -> list[_Episode]:
    """Roll out ``len(envs)`` episodes; episode i resets ``envs[i]`` with ``seeds[i]`` and starts from prompt
    ``prompts[expand[i]]`` (already formatted). Deterministic given ``seed`` on CPU."""
    model, tok = policy.model, policy.tokenizer
    was_training = model.training
    model.eval()
    fmt = ObservationFormatter(tok)
    gen = torch.Generator(device=model.device).manual_seed(seed)
    stop = torch.tensor(policy.stop_ids, device=model.device)
    eps = [_Episode(env) for env in envs]
    for ep, s in zip(eps, seeds):
        ep.env.reset(s)
    prompt_ids = [tok(p, add_special_tokens=not getattr(tok, "chat_template", None))["input_ids"] for p in prompts]
    rows = list(range(len(eps)))  # cache row -> episode index
    try:
        with torch.autocast(model.device.type, torch.bfloat16, enabled=cfg.bf16):
            state = list(_prefill(model, prompt_ids, tok.pad_token_id, torch.tensor(expand, device=model.device))) \
                if kv_reuse else []
            for turn in range(max_turns):
                if not kv_reuse:
                    state = list(_prefill(model, [prompt_ids[expand[i]] + eps[i].tokens for i in rows],
                                          tok.pad_token_id))
                actions = _decode_turn(model, state, cfg, gen, stop, tok.pad_token_id)
                obs = [_take_turn(eps[i], toks, stats, turn, tok) for i, (toks, stats) in zip(rows, actions)]
                keep = [k for k, i in enumerate(rows) if not eps[i].done and turn + 1 < max_turns]
                if not keep:
                    break
                for k in keep:
                    ids = fmt.ids(obs[k])
                    ep = eps[rows[k]]
                    ep.tokens += ids
                    ep.is_action += [False] * len(ids)
                    ep.turn += [-1] * len(ids)
                    ep.stats += [[0.0] * 4] * len(ids)
                if kv_reuse:
                    idx = torch.tensor(keep, device=model.device)
                    state[0].batch_select_indices(idx)
                    state[1:] = [t[idx] for t in state[1:]]
                    _append(model, state, [fmt.ids(obs[k]) for k in keep], tok.pad_token_id)
                rows = [rows[k] for k in keep]
    finally:
        model.train(was_training)
    return eps


def demonstration_rows(policy: Any, turns: list[list[tuple[str, str]]]) -> tuple[Tensor, Tensor]:
    """Demonstrated episodes (`EnvTask.expert_turns`) as rollout rows: ``response_ids`` [B, T] = action_0 + stop |
    obs_1 | action_1 + stop | ... (observations in the same chat format as `run_episodes`), right-padded, and
    ``response_mask`` True on action tokens (each through its stop token): what a multi-turn warm start imitates."""
    tok = policy.tokenizer
    fmt = ObservationFormatter(tok)
    rows: list[tuple[list[int], list[bool]]] = []
    for episode in turns:
        ids: list[int] = []
        is_action: list[bool] = []
        for action, obs in episode:
            a = tok(action, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            o = fmt.ids(obs) if obs else []
            ids += a + o
            is_action += [True] * len(a) + [False] * len(o)
        rows.append((ids, is_action))
    T = max(len(ids) for ids, _ in rows)
    response_ids = torch.tensor([ids + [tok.pad_token_id] * (T - len(ids)) for ids, _ in rows])
    response_mask = torch.tensor([m + [False] * (T - len(m)) for _, m in rows])
    return response_ids, response_mask


def _take_turn(ep: _Episode, toks: list[int], stats: list[list[float]], turn: int, tok: Any) -> str:
    """Record action ``toks`` of episode ``ep`` as turn ``turn``, step its environment; returns the observation."""
    ep.anchors.append(state_hash(ep.env.state_key()))
    ep.tokens += toks
    ep.is_action += [True] * len(toks)
    ep.turn += [turn] * len(toks)
    ep.stats += stats
    obs, reward, done, info = ep.env.step(tok.decode(toks, skip_special_tokens=True))
    ep.rewards.append(float(reward))
    kind = str(info.get("tool", "action"))
    ep.tools[kind] = ep.tools.get(kind, 0) + 1
    ep.invalid += int(not info.get("valid", True))
    ep.success = bool(info.get("success", False))
    ep.done = bool(done)
    return obs


def assemble(eps: list[_Episode], prompt_ids: Tensor, prompt_mask: Tensor, group_ids: Tensor, pad_id: int,
             texts: list[str]) -> RolloutBatch:
    """Episodes -> a `RolloutBatch` (see the module docstring for the layout)."""
    B, device = len(eps), prompt_ids.device
    T = max(1, max(len(e.tokens) for e in eps))
    N = max(1, max(len(e.rewards) for e in eps))
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.bool)
    turn_ids = torch.full((B, T), -1, dtype=torch.long)
    stats = torch.zeros((B, T, 4))
    turn_rewards, anchors = torch.zeros((B, N)), torch.zeros((B, N), dtype=torch.long)
    for b, e in enumerate(eps):
        n, k = len(e.tokens), len(e.rewards)
        ids[b, :n] = torch.tensor(e.tokens, dtype=torch.long)
        mask[b, :n] = torch.tensor(e.is_action, dtype=torch.bool)
        turn_ids[b, :n] = torch.tensor(e.turn, dtype=torch.long)
        stats[b, :n] = torch.tensor(e.stats, dtype=torch.float32).reshape(n, 4)
        turn_rewards[b, :k] = torch.tensor(e.rewards)
        anchors[b, :k] = torch.tensor(e.anchors, dtype=torch.long)
    stats = stats.masked_fill(~mask[..., None], 0.0)
    return RolloutBatch(
        response_ids=ids.to(device), response_mask=mask.to(device), group_ids=group_ids,
        rewards=turn_rewards.sum(1).to(device), prompt_ids=prompt_ids, prompt_mask=prompt_mask,
        logprobs=stats[..., 0].to(device), entropies=stats[..., 1].to(device), certainty=stats[..., 2].to(device),
        token_logits=stats[..., 3].to(device), turn_ids=turn_ids.to(device), turn_rewards=turn_rewards.to(device),
        anchor_states=anchors.to(device), texts=texts)


def episode_score(e: _Episode) -> EpisodeScore:
    return EpisodeScore(reward=float(sum(e.rewards)), correct=e.success, turns=len(e.rewards),
                        tool_calls=tuple(sorted(e.tools.items())), invalid=e.invalid)


class MultiTurn:
    """The `Rollout` for environment tasks (`train.components.build_rollout` picks it); see the module docstring.

    max_turns: turn limit (an episode still running after it is truncated: no success, its rewards so far);
    invalid_penalty: reward of an invalid action (None: the environment's default); kv_reuse: see the module
    docstring. ``cfg.max_new_tokens`` (the run's `RolloutConfig`) caps the tokens of *each* action.
    """

    def __init__(self, *, max_turns: int = 6, invalid_penalty: float | None = None, kv_reuse: bool = True) -> None:
        if max_turns < 1:
            raise ValueError(f"--agent-max-turns must be >= 1, got {max_turns}")
        self.max_turns, self.invalid_penalty, self.kv_reuse = max_turns, invalid_penalty, kv_reuse

    def _env(self, task: Any) -> Any:
        return task.make_env() if self.invalid_penalty is None else task.make_env(invalid_penalty=self.invalid_penalty)

    def run(self, policy: Any, task: Any, problems: list[Any], n: int, sampling: SamplingConfig, *,
            seed: int) -> tuple[RolloutBatch, list[EpisodeScore]]:
        """``n`` episodes of every problem (rows problem-major, ``group_ids`` = problem index)."""
        if n < 1 or not problems:
            raise ValueError(f"a multi-turn rollout needs problems and n >= 1, got {len(problems)} problems, n={n}")
        return self.run_rows(policy, task, problems, [g for g in range(len(problems)) for _ in range(n)], sampling,
                             seed=seed)

    def run_rows(self, policy: Any, task: Any, problems: list[Any], expand: list[int], sampling: SamplingConfig, *,
                 seed: int) -> tuple[RolloutBatch, list[EpisodeScore]]:
        """One episode per entry of ``expand`` (row i plays ``problems[expand[i]]``; ``group_ids`` = that index),
        for callers whose rows are not problem-major groups (e.g. a TRL process's share of a generation batch)."""
        if not expand or min(expand) < 0 or max(expand) >= len(problems):
            raise ValueError(f"expand must index the {len(problems)} problems, got {expand[:8]}")
        prompts = [policy.format_prompt(p.prompt) for p in problems]
        envs = [self._env(task) for _ in expand]
        seeds = [int(problems[g].meta["env_seed"]) for g in expand]
        eps = run_episodes(policy, envs, seeds, prompts, expand, sampling, max_turns=self.max_turns, seed=seed,
                           kv_reuse=self.kv_reuse)
        device = policy.model.device
        p_ids, p_mask = (t.to(device) for t in policy.encode_prompts(prompts))
        index = torch.tensor(expand, device=device)
        texts = [policy.tokenizer.decode(e.tokens, skip_special_tokens=True) for e in eps]
        batch = assemble(eps, p_ids[index], p_mask[index], index, policy.tokenizer.pad_token_id, texts)
        batch.meta.update({"sampling": asdict(sampling), "seed": seed, "policy": policy.name,
                           "max_turns": self.max_turns, "kv_reuse": self.kv_reuse})
        return batch, [episode_score(e) for e in eps]

    def collect(self, policy: Any, task: Any, problems: Any, cfg: Any, *, seed: int
                ) -> tuple[RolloutBatch, list[EpisodeScore]]:
        sampling = SamplingConfig.from_rollout(cfg, policy.model)
        return self.run(policy, task, list(problems), cfg.group_size, sampling, seed=seed)

    def evaluate(self, policy: Any, task: Any, problems: list[Any], cfg: Any, chunk: int = 64) -> float:
        """Greedy success rate: one episode per problem at temperature 0."""
        if not problems:
            return 0.0
        greedy = SamplingConfig(temperature=0.0, max_new_tokens=cfg.max_new_tokens)
        solved = 0
        for start in range(0, len(problems), chunk):
            _, scores = self.run(policy, task, problems[start:start + chunk], 1, greedy, seed=0)
            solved += sum(s.correct for s in scores)
        return solved / len(problems)
