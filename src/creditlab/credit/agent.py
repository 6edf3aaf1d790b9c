"""Agent / structure-aware group estimators: stratified (and later gigpo, igpo)."""

from __future__ import annotations

import torch

from creditlab.batch import Credit, RolloutBatch
from creditlab.credit.metrics import advantage_metrics
from creditlab.credit.ops import Singleton, broadcast, group_stats
from creditlab.credit.outcome import group_advantage
from creditlab.registry import estimator


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
