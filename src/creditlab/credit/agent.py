"""Agent and structure-aware group estimators: stratified, gigpo, igpo, mt_grpo, oprl_turn (methods.md §6).

Multi-turn rows (creditlab.rollout.multiturn): one row is one episode, its action tokens carry ``turn_ids`` 0..K_b-1
(observation tokens are outside ``response_mask``), and per-turn fields are ``[B,N]`` with columns beyond a row's
last turn ignored. K_b = max(turn_ids[b]) + 1; every turn of a row has at least one token. Per-turn values are
written on the turn's tokens (`segment_broadcast`); a token in no turn gets only the estimator's episode term.
"""

from __future__ import annotations

import inspect
from typing import Literal

import torch
from torch import Tensor

from creditlab.batch import Credit, RolloutBatch
from creditlab.credit.metrics import advantage_metrics
from creditlab.credit.ops import (
    Singleton,
    broadcast,
    discounted_reverse_cumsum,
    group_index,
    group_stats,
    group_sum,
    segment_broadcast,
)
from creditlab.credit.outcome import _check_singleton, group_advantage
from creditlab.credit.process import oprl
from creditlab.registry import estimator, get_spec

F64 = torch.float64


@estimator("stratified", needs=("strata",), ranges={"alpha": "[0, 1]", "eps": "[0, inf)"})
def stratified(batch: RolloutBatch, *, alpha: float = 1.0, eps: float = 1e-6, within_group: bool = True,
               singleton: Singleton = "zero") -> Credit:
    """Stratified GRPO: Stratified Advantage Normalization (SAN), blended with ordinary GRPO.

    Paper: "Stratified GRPO: Handling Structural Heterogeneity in Reinforcement Learning of LLM Search Agents"
    (arXiv 2510.06214). No official code; third-party: Wodlfvllf/grpo-composer
    `grpo_composer/core/advantages/stratified.py`, `configs/papers/stratified_grpo.yaml`.
    Shapes: rewards [B], group_ids [B], strata [B] long -> advantages [B,T].
    Formula: cell k = (prompt group, stratum) (or the stratum alone when `within_group=False`);
      A^SAN_b = (R_b - mu_k) / (sigma_k + eps), sigma unbiased;  A^GN_b = GRPO advantage over the prompt group;
      a_b = alpha A^SAN_b + (1 - alpha) A^GN_b;  A[b,t] = a_b m[b,t].
    Defaults: alpha = 1.0 (pure SAN, the third-party config's value). The paper blends SAN with the global
    estimator "for finite-sample stability" but its tuned alpha was not verifiable here (re-checked for issue 11):
    reconstructed, keep it configurable. eps = 1e-6 (as creditlab's GRPO; the third party uses 1e-8).
    Deviations: a single-member cell gets A^SAN = 0 (the unbiased std is undefined; the third party
    produces NaN) and a zero-variance cell gets exactly 0; `singleton` applies to the GRPO (A^GN) part only.
    Metric credit/singleton_stratum_frac: fraction of rows alone in their cell.
    """
    strata = batch.strata
    if within_group:
        cells = torch.unique(torch.stack([batch.group_ids, strata], 1), dim=0, return_inverse=True)[1]  # [B]
    else:
        cells = strata
    a_san = group_advantage(batch.rewards, cells, eps=eps, singleton="zero")  # [B]
    a_gn = group_advantage(batch.rewards, batch.group_ids, eps=eps, singleton=singleton)  # [B]
    a = alpha * a_san + (1.0 - alpha) * a_gn
    adv = broadcast(a, batch.response_mask)
    _, _, count, _ = group_stats(batch.rewards, cells)
    return Credit(advantages=adv, metrics=advantage_metrics(
        adv, batch.response_mask, singleton_stratum_frac=float((count == 1).double().mean())))


# ---------------------------------------------------------------- shared turn helpers
def turn_layout(turn_ids: Tensor, n_cols: int) -> tuple[Tensor, Tensor]:
    """(turns per row K [B] long, present [B,N] bool: column n < K_b)."""
    k = (turn_ids.max(dim=1).values + 1).clamp_min(0) if turn_ids.shape[1] else \
        torch.zeros(turn_ids.shape[0], dtype=torch.long, device=turn_ids.device)
    return k, torch.arange(n_cols, device=turn_ids.device)[None, :] < k[:, None]


def cell_standardize(values: Tensor, cells: Tensor, *, scale_by_std: bool, eps: float,
                     singleton: Singleton) -> Tensor:
    """(v - mean_cell) [/ (std_cell + eps)] over the entries of each cell ([M] -> [M] float64): 0 for a
    zero-variance cell; a one-entry cell gives 0 ("zero") or its raw value ("raw")."""
    if values.numel() == 0:
        return values.to(F64)
    mean, std, count, constant = group_stats(values, cells)
    v = values.to(F64)
    z = v - mean
    if scale_by_std:
        z = z / (std + eps)
    z = torch.where(constant, torch.zeros_like(z), z)
    return torch.where(count == 1, v if singleton == "raw" else torch.zeros_like(z), z)


def _cells(group_ids: Tensor, key: Tensor, present: Tensor) -> Tensor:
    """Dense cell index of every present (row, turn) entry: same prompt group and same ``key`` [B,N]."""
    rows = group_ids[:, None].expand_as(key)[present]
    return torch.unique(torch.stack([rows, key[present]], 1), dim=0, return_inverse=True)[1]


def _on_tokens(per_turn: Tensor, batch: RolloutBatch, episode: Tensor | None = None) -> Tensor:
    """[B,N] per-turn values (+ an optional [B] episode term) -> [B,T] float32, 0 outside the mask."""
    adv = segment_broadcast(per_turn, batch.turn_ids)
    if episode is not None:
        adv = adv + episode[:, None]
    return torch.where(batch.response_mask, adv, torch.zeros_like(adv)).float()


def _check_range(name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")


# ---------------------------------------------------------------- GiGPO
def _episode_advantage_steps(R: Tensor, group_ids: Tensor, weight: Tensor, *, scale_by_std: bool, eps: float,
                             singleton: Singleton) -> Tensor:
    """verl-agent's default episode baseline (compute_mean_std_cross_steps=True): every step row counts, so a
    trajectory weighs its number of turns in the group mean and (unbiased) std. [B] float64."""
    index, n = group_index(group_ids)
    w, r = weight.to(F64), R.to(F64)
    count = group_sum(w, index, n)
    mean = group_sum(w * r, index, n) / count.clamp_min(1)
    var = group_sum(w * (r - mean[index]) ** 2, index, n) / (count - 1).clamp_min(1)
    a = r - mean[index]
    if scale_by_std:
        a = a / (var.sqrt()[index] + eps)
    a = torch.where((var[index] == 0) & (count[index] > 1), torch.zeros_like(a), a)
    return torch.where(count[index] <= 1, r if singleton == "raw" else torch.zeros_like(a), a)


@estimator("gigpo", needs=("turn_ids", "turn_rewards", "anchor_states"),
           ranges={"gamma": "[0, 1]", "step_coef": "[0, inf)", "eps": "[0, inf)"})
def gigpo(batch: RolloutBatch, *, gamma: float = 0.95, step_coef: float = 1.0,
          mode: Literal["mean_norm", "mean_std_norm"] = "mean_norm",
          episode_baseline: Literal["trajectory", "steps"] = "trajectory", eps: float = 1e-6,
          singleton: Singleton = "zero") -> Credit:
    """GiGPO: episode-group advantage + step_coef x step advantage among turns that start from the same state.

    Paper: Group-in-Group Policy Optimization for LLM Agent Training (arXiv 2505.10978). Reference matched:
    langfengQ/verl-agent `gigpo/core_gigpo.py` (read in the fork vanzll/verl-agent): `episode_norm_reward`,
    `build_step_group`, `step_norm_reward`, `compute_step_discounted_returns`; defaults from its ALFWorld script.
    Shapes: rewards [B] (episode return), turn_rewards [B,N], anchor_states [B,N], turn_ids [B,T] -> [B,T].
    Formula: A^E_b = R_b - mean_g(R)  ("mean_norm"), or (R_b - mean_g) / (std_g + eps) ("mean_std_norm");
      G_{b,n} = sum_{k>=n} gamma^(k-n) r_{b,k} (per turn, not per token);
      step group = the (b, n) of one prompt group with equal anchor_states (repeats inside one episode included,
      as the reference groups every step row); A^S = G - mean_step_group (or / (std + eps)), 0 in a step group
      of one; A[b,t] = A^E_b + step_coef * A^S_{b, turn(t)}.
    Defaults: gamma = 0.95, step_coef (omega) = 1, mode = "mean_norm" (the scripts' setting; the Python default is
      mean_std_norm), eps = 1e-6, std unbiased.
    Deviations: the episode baseline counts each trajectory once (the paper's Eq. 3). The reference's default
      (compute_mean_std_cross_steps=True) counts every step row, so long trajectories weigh more in the mean and std;
      it is available as episode_baseline="steps" for parity. A singleton *episode* group gets 0 ("zero") where
      the reference keeps the raw score ("raw"). Invalid-action penalties are environment rewards here (they enter
      R and the discounted returns); the reference subtracts them from the invalid step's own row only.
      Exact anchor matching only (the reference's optional 0.95 text-similarity matching is not implemented).
    Metrics: credit/step_group_hit_rate (share of turns in a step group of >= 2), credit/step_group_size.
    """
    _check_singleton(singleton)
    _check_range("gamma", gamma, 0.0, 1.0)
    if mode not in ("mean_norm", "mean_std_norm") or episode_baseline not in ("trajectory", "steps"):
        raise ValueError(f"gigpo: mode must be mean_norm|mean_std_norm and episode_baseline trajectory|steps, "
                         f"got {mode!r}, {episode_baseline!r}")
    std = mode == "mean_std_norm"
    n_turns, present = turn_layout(batch.turn_ids, batch.turn_rewards.shape[1])
    r = torch.where(present, batch.turn_rewards.to(F64), torch.zeros((), dtype=F64))
    returns = discounted_reverse_cumsum(r, gamma)  # [B,N]; zero padding after a row's last turn adds nothing
    if episode_baseline == "trajectory":
        a_e = group_advantage(batch.rewards, batch.group_ids, scale_by_std=std, eps=eps, singleton=singleton)
    else:
        a_e = _episode_advantage_steps(batch.rewards, batch.group_ids, n_turns, scale_by_std=std, eps=eps,
                                       singleton=singleton)
    cells = _cells(batch.group_ids, batch.anchor_states, present)
    a_s = torch.zeros_like(returns)
    a_s[present] = cell_standardize(returns[present], cells, scale_by_std=std, eps=eps, singleton="zero")
    adv = _on_tokens(step_coef * a_s, batch, a_e)
    sizes = torch.bincount(cells).to(F64)[cells] if cells.numel() else torch.zeros(0, dtype=F64)
    return Credit(advantages=adv, metrics=advantage_metrics(
        adv, batch.response_mask, step_group_hit_rate=float((sizes >= 2).double().mean()) if sizes.numel() else 0.0,
        step_group_size=float(sizes.mean()) if sizes.numel() else 0.0))


# ---------------------------------------------------------------- IGPO
@estimator("igpo", needs=("turn_ids", "answer_probs"),
           ranges={"gamma": "[0, 1]", "outcome_coef": "[0, inf)", "eps": "[0, inf)"})
def igpo(batch: RolloutBatch, *, gamma: float = 1.0, outcome_coef: float = 1.0,
         norm: Literal["group", "turn_index", "none"] = "group", eps: float = 1e-6,
         singleton: Singleton = "zero") -> Credit:
    """IGPO: turn rewards = gain in the policy's probability of the ground-truth answer; final turn = outcome.

    Paper: Information Gain-based Policy Optimization (arXiv 2510.14967). Reference: GuoqingWang1/IGPO (commit
    bff163b) `scrl/llm_agent/generation.py` (P_t), `verl/utils/reward_score/info_gain.py` (reward placement),
    `verl/trainer/ppo/core_algos.py` (advantage). Signal: `creditlab.signals.info_gain` fills answer_probs.
    Shapes: answer_probs [B,N] (P before each turn), rewards [B], turn_ids [B,T] -> [B,T].
    Formula: r_{b,n} = P_{b,n+1} - P_{b,n} for n < K_b - 1; r_{b,K_b-1} = outcome_coef * R_b (the reference's
      alpha * F1);  r~ = (r - mean) / (std + eps) over all turns of all rows of the prompt group ("group"),
      or over the group's turns with the same index ("turn_index"), or r~ = r ("none");
      A_{b,n} = sum_{k>=n} gamma^(k-n) r~_{b,k}, written on turn n's tokens.
    Defaults: gamma = 1 (the code's hard-coded value), outcome_coef = 1 (alpha), std unbiased.
    Deviations: the advantage follows the paper (turn-aligned group normalisation, then discounted turn sums), not
      the code, whose baseline is the per-token-position mean of returns across the group (token index t falls in
      different turns in different rollouts: methods.md §6.3 pitfall). The code's -2 format penalty is the
      environment's business here (R already holds invalid-action penalties). A one-entry pool gives 0 ("zero")
      or its raw value ("raw"); a zero-variance pool gives 0.
    Metrics: credit/info_gain_mean (mean r over non-final turns).
    """
    _check_singleton(singleton)
    _check_range("gamma", gamma, 0.0, 1.0)
    if norm not in ("group", "turn_index", "none"):
        raise ValueError(f"igpo: norm must be group|turn_index|none, got {norm!r}")
    P = batch.answer_probs.to(F64)
    n_turns, present = turn_layout(batch.turn_ids, P.shape[1])
    col = torch.arange(P.shape[1], device=P.device)[None, :]
    last = col == (n_turns - 1)[:, None]  # [B,N]
    gain = torch.cat([P[:, 1:] - P[:, :-1], torch.zeros_like(P[:, :1])], 1)  # [B,N]: P_{n+1} - P_n
    r = torch.where(last, outcome_coef * batch.rewards.to(F64)[:, None], torch.where(present, gain, 0.0))
    z = r.clone()
    if norm != "none":
        key = col.expand_as(r) if norm == "turn_index" else torch.zeros_like(r, dtype=torch.long)
        z[present] = cell_standardize(r[present], _cells(batch.group_ids, key, present), scale_by_std=True,
                                      eps=eps, singleton=singleton)
    z = torch.where(present, z, torch.zeros((), dtype=F64))
    adv = _on_tokens(discounted_reverse_cumsum(z, gamma), batch)
    inner = present & ~last
    return Credit(advantages=adv, metrics=advantage_metrics(
        adv, batch.response_mask, info_gain_mean=float(gain[inner].mean()) if bool(inner.any()) else 0.0))


# ---------------------------------------------------------------- MT-GRPO
@estimator("mt_grpo", needs=("turn_ids", "turn_rewards"),
           ranges={"turn_coef": "[0, inf)", "gamma": "[0, 1]", "eps": "[0, inf)"})
def mt_grpo(batch: RolloutBatch, *, turn_coef: float = 1.0, gamma: float = 1.0, scale_by_std: bool = True,
            baseline: Literal["turn_index", "return_to_go"] = "turn_index", eps: float = 1e-6,
            singleton: Singleton = "zero") -> Credit:
    """MT-GRPO: each turn's reward normalised among the group's turns with the same index, summed to the end.

    Paper: Reinforcing Multi-Turn Reasoning in LLM Agents via Turn-Level Reward Design (Wei, Zeng et al., arXiv
    2505.11821). Reference: SiliangZeng/Multi-Turn-RL-Agent `verifiers/trainers/mt_grpo_env_trainer.py`
    (advantage_est="aae": turn-1 tokens get A^O + turn_advantage_coef * A^T, turn-2 tokens A^O, each
    group-normalised). Generalised to K turns the way verl#7244 ports it ("per-turn-index normalisation").
    Shapes: turn_rewards [B,N] (the last turn's reward holds the outcome), turn_ids [B,T] -> [B,T].
    Formula ("turn_index"): z_{b,n} = (r_{b,n} - mean_{g,n}) / (std_{g,n} + eps) over the rows of prompt group g
      that reached turn n; w_{b,n} = turn_coef for n < K_b - 1 and 1 for the last turn;
      A_{b,n} = sum_{k=n}^{K_b-1} gamma^(k-n) w_{b,k} z_{b,k}. On two-turn rows this is exactly the reference's
      "aae" with r = (turn reward, outcome reward).
    BIAS (verl#7244): the subtracted baseline sum_{k=n}^{K_b-1} mean_{g,k} has as many terms as the episode has
      turns, and the policy chooses when to stop: the baseline depends on the action, so the gradient is biased.
      Every extra turn k costs mean_{g,k} (an implicit length penalty when turn rewards are positive on average,
      a bonus when negative). tests/credit/test_agent.py shows it: two episodes with equal returns, one stopping
      early, get different advantages. baseline="return_to_go" is the unbiased fix: A_{b,n} = normalised
      G_{b,n} = sum_{k>=n} gamma^(k-n) r_{b,k} among the rows that reached turn n (a baseline per state/turn, with
      the stopping decision inside the return).
    Defaults: turn_coef = 1 (the reference scripts' turn_advantage_coef), gamma = 1, std unbiased.
    Deviations: a row that stopped after one turn gets its turn-0 z-score; the reference gives such rows the
      normalised combined reward. A (group, turn) cell of one row gives 0 ("zero") or its raw value ("raw").
    """
    _check_singleton(singleton)
    _check_range("gamma", gamma, 0.0, 1.0)
    if baseline not in ("turn_index", "return_to_go"):
        raise ValueError(f"mt_grpo: baseline must be turn_index|return_to_go, got {baseline!r}")
    r = batch.turn_rewards.to(F64)
    n_turns, present = turn_layout(batch.turn_ids, r.shape[1])
    col = torch.arange(r.shape[1], device=r.device)[None, :]
    cells = _cells(batch.group_ids, col.expand_as(r), present)
    r = torch.where(present, r, torch.zeros((), dtype=F64))
    z = torch.zeros_like(r)
    if baseline == "turn_index":
        z[present] = cell_standardize(r[present], cells, scale_by_std=scale_by_std, eps=eps, singleton=singleton)
        w = torch.where(col == (n_turns - 1)[:, None], 1.0, turn_coef)
        a = discounted_reverse_cumsum(torch.where(present, w * z, torch.zeros((), dtype=F64)), gamma)
    else:
        ret = discounted_reverse_cumsum(r, gamma)
        z[present] = cell_standardize(ret[present], cells, scale_by_std=scale_by_std, eps=eps, singleton=singleton)
        a = z
    adv = _on_tokens(a, batch)
    return Credit(advantages=adv, metrics=advantage_metrics(adv, batch.response_mask,
                                                            turns_mean=float(n_turns.double().mean())))


# ---------------------------------------------------------------- turn-level OPRL (thin adapter over `oprl`)
def _oprl_turn(batch: RolloutBatch, **hyperparams: object) -> Credit:
    return oprl.raw(batch.replace(step_ids=batch.turn_ids), **hyperparams)


_oprl_turn.__doc__ = (
    "OPRL / iStar at turn granularity: `oprl` with the turns as its steps (step_ids = turn_ids).\n\n"
    "Paper: Agentic RL with Implicit Step Rewards (iStar, arXiv 2509.19199), whose rows are agent steps; here one\n"
    "row is one episode and its turns are the steps, so s_{b,n} = beta * sum over turn n's tokens of the implicit\n"
    "PRM's log-ratio. Everything else (formula, defaults, ranges, deviations, needs) is `oprl`'s, forwarded: see\n"
    "creditlab.credit.process.oprl. Train with --scorer implicit --scorer-kwargs '{\"mode\": \"oprl\"}'; the agent\n"
    "component sets step_ids = turn_ids so the implicit PRM's trajectory loss also averages over turns.")
_oprl_turn.__signature__ = inspect.signature(oprl.raw)  # type: ignore[attr-defined]
_oprl_turn.__annotations__ = dict(oprl.raw.__annotations__)
_oprl_ranges = {n: str(p.interval) for n, p in get_spec("oprl").params.items() if p.interval is not None}
oprl_turn = estimator("oprl_turn", needs=tuple("turn_ids" if n == "step_ids" else n for n in oprl.needs),
                      ranges=_oprl_ranges)(_oprl_turn)
