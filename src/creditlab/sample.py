"""Synthetic rollout batches with every optional field filled: for tests, `creditlab demo` and `creditlab speed`.

The batches are deliberately awkward: ragged groups (sizes 1..max_group), group ids that are large,
non-contiguous and shuffled, responses of random length including all-padding rows, and optionally binary
rewards (so zero-variance groups occur).
"""

from __future__ import annotations

import torch

from creditlab.batch import RolloutBatch


def random_batch(n_groups: int = 4, max_group: int = 4, T: int = 12, *, vocab: int = 8, seed: int = 0,
                 binary_rewards: bool = True, min_group: int = 1, empty_row_prob: float = 0.1,
                 max_steps: int = 4, shuffle: bool = True) -> RolloutBatch:
    """A random valid `RolloutBatch` of `n_groups` groups with every optional field set.

    Response tokens are drawn from a small `vocab` so that responses of one group share prefixes (prefix-tree
    estimators need that). Steps: each response is cut into up to `max_steps` contiguous steps.
    """
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(min_group, max_group + 1, (n_groups,), generator=g)
    gid_values = torch.randperm(10 * n_groups + 7, generator=g)[:n_groups] * 3 + 11  # non-contiguous ids
    group_ids = torch.repeat_interleave(gid_values, sizes)
    B = int(sizes.sum())
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths = torch.where(torch.rand(B, generator=g) < empty_row_prob, torch.zeros_like(lengths), lengths)
    pos = torch.arange(T)[None, :]
    mask = pos < lengths[:, None]  # [B,T]
    ids = torch.randint(0, vocab, (B, T), generator=g)
    ids = torch.where(mask, ids, torch.zeros_like(ids))
    if binary_rewards:
        rewards = torch.randint(0, 2, (B,), generator=g).float()
    else:
        rewards = torch.randn(B, generator=g)
    logprobs = torch.where(mask, -torch.rand(B, T, generator=g) * 3, torch.zeros(B, T))
    ref_logprobs = torch.where(mask, logprobs + 0.1 * torch.randn(B, T, generator=g), torch.zeros(B, T))
    entropies = torch.where(mask, torch.rand(B, T, generator=g) * 2, torch.zeros(B, T))
    certainty = torch.where(mask, torch.rand(B, T, generator=g) * 5, torch.zeros(B, T))
    token_logits = torch.where(mask, torch.randn(B, T, generator=g) * 3 + 10, torch.zeros(B, T))
    values = torch.where(mask, torch.rand(B, T, generator=g), torch.zeros(B, T))
    last = (lengths - 1).clamp_min(0)
    token_rewards = torch.zeros(B, T).scatter(1, last[:, None], rewards[:, None]) * mask
    # steps: random cut points inside each response
    cuts = torch.rand(B, T, generator=g) < (max_steps - 1) / max(T, 1)
    step_ids = torch.cumsum(cuts.long(), dim=1) - cuts[:, :1].long()
    step_ids = torch.where(mask, step_ids.clamp_max(max_steps - 1), torch.full_like(step_ids, -1))
    S = max_steps
    step_rewards = torch.rand(B, S, generator=g) * 2 - 1
    step_labels = torch.randint(0, 2, (B, S), generator=g)
    n_steps = (step_ids.max(dim=1).values + 1)  # [B]
    step_labels = torch.where(torch.arange(S)[None, :] < n_steps[:, None], step_labels, -1)
    mc_values = torch.rand(B, S, generator=g)
    mc_cuts = step_starts(step_ids, S)  # [B, S]: the value of each step's starting state (VinePPO's cuts)
    mc_values = torch.where(mc_cuts >= 0, mc_values, torch.zeros_like(mc_values))
    tree_node = _step_tree(ids, step_ids, group_ids)  # [B, T]: steps as segment-tree nodes
    strata = torch.randint(0, 3, (B,), generator=g)
    planning_mask = mask & (torch.rand(B, T, generator=g) < 0.25)
    prm_logprobs = torch.where(mask, logprobs + 0.2 * torch.randn(B, T, generator=g), torch.zeros(B, T))
    # attention / budget fields draw from their own generator so that the fields above stay what they were
    ga = torch.Generator().manual_seed(seed * 7919 + 17)
    attn_waad = torch.where(mask, torch.rand(B, T, generator=ga) * 5, torch.zeros(B, T))
    attn_fai = torch.where(mask, torch.rand(B, T, generator=ga) * 0.2, torch.zeros(B, T))
    punct_mask = mask & (torch.rand(B, T, generator=ga) < 0.2)
    # cut points: ascending per row (ties allowed), some beyond the response, unused columns -1 at the end
    K = max_steps
    n_cuts = torch.randint(1, K + 1, (B,), generator=ga)
    cut_lens = torch.randint(0, T + 3, (B, K), generator=ga).sort(dim=1).values
    cut_lens = torch.where(torch.arange(K)[None, :] < n_cuts[:, None], cut_lens, -1)
    cut_scores = torch.where(cut_lens >= 0, torch.rand(B, K, generator=ga), torch.zeros(B, K))
    think_budget = torch.tensor([1, 2, 3])[torch.randint(0, 3, (B,), generator=ga)]  # small: any l_max >= 3 fits
    correct = (rewards > 0) & (torch.rand(B, generator=ga) < 0.8)
    batch = RolloutBatch(
        response_ids=ids, response_mask=mask, group_ids=group_ids, rewards=rewards,
        logprobs=logprobs, ref_logprobs=ref_logprobs, entropies=entropies, certainty=certainty,
        token_logits=token_logits, values=values, token_rewards=token_rewards, step_ids=step_ids,
        step_rewards=step_rewards, step_labels=step_labels, mc_values=mc_values, mc_cuts=mc_cuts,
        tree_node=tree_node, strata=strata,
        planning_mask=planning_mask, prm_logprobs=prm_logprobs, attn_waad=attn_waad, attn_fai=attn_fai,
        punct_mask=punct_mask, cut_lens=cut_lens, cut_scores=cut_scores, think_budget=think_budget, correct=correct,
        texts=[" ".join(str(int(t)) for t in ids[b, : int(lengths[b])]) for b in range(B)],
    )
    q_values = torch.where(mask, torch.rand(B, T, generator=torch.Generator().manual_seed(seed + 7_919)), 0.0)
    batch = batch.replace(**turn_fields(mask, seed, max_steps), q_values=q_values)  # own generators: fields above fixed
    if shuffle:
        batch = batch.select(torch.randperm(B, generator=g))
    return batch.validate()


def turn_fields(mask: torch.Tensor, seed: int, max_turns: int) -> dict[str, torch.Tensor]:
    """turn_ids (contiguous turns over the valid tokens), turn_rewards, anchor_states (few distinct values, so that
    anchor groups repeat) and answer_probs; drawn from their own generator so the other fields stay unchanged."""
    g = torch.Generator().manual_seed(seed + 7_777)
    B, T = mask.shape
    cuts = torch.rand(B, T, generator=g) < (max_turns - 1) / max(T, 1)
    turn_ids = torch.cumsum(cuts.long(), dim=1) - cuts[:, :1].long()
    turn_ids = torch.where(mask, turn_ids.clamp_max(max_turns - 1), torch.full_like(turn_ids, -1))
    N = max_turns
    return {"turn_ids": turn_ids, "turn_rewards": torch.randint(-2, 3, (B, N), generator=g).float() / 2,
            "anchor_states": torch.randint(0, 3, (B, N), generator=g),
            "answer_probs": torch.rand(B, N, generator=g) * 0.98 + 0.01}


def step_starts(step_ids: torch.Tensor, S: int) -> torch.Tensor:
    """[B, S] long: first token column of each step (-1 for steps a row does not have)."""
    B, T = step_ids.shape
    pos = torch.arange(T).expand(B, T)
    big = torch.full((B, S + 1), T, dtype=torch.long)  # column S collects the -1 tokens
    first = big.scatter_reduce(1, torch.where(step_ids >= 0, step_ids, S), pos, "amin")[:, :S]
    return torch.where(first < T, first, torch.full_like(first, -1))


def _step_tree(ids: torch.Tensor, step_ids: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] long tree_node: each step of a row is a tree node; rows of a group share a node when they share the
    tokens and step boundaries up to its end and both continue after it (a row's last step is its own leaf)."""
    B, T = ids.shape
    out = torch.full((B, T), -1, dtype=torch.long)
    keys: dict[tuple, int] = {}
    for b in range(B):
        n = int(step_ids[b].max()) + 1 if T else 0
        for k in range(n):
            cols = (step_ids[b] == k).nonzero().flatten()
            end = int(cols.max()) + 1
            prefix = tuple(zip(ids[b, :end].tolist(), step_ids[b, :end].tolist()))
            key = (int(group_ids[b]), prefix) if k < n - 1 else ("leaf", b)
            out[b, cols] = keys.setdefault(key, len(keys))
    return out
