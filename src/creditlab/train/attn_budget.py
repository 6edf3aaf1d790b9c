"""Trainer plug-ins for attention credit (attn_*) and budget credit (brpo, hbpo, vsrm).

- `AttentionComponent`: before the estimator, one extra no-grad forward fills attn_waad, attn_fai and punct_mask
  (`creditlab.signals.attention`) with the current policy, i.e. the policy that sampled the batch (the paper's
  actor_attn synced after every update).
- `BudgetComponent`: before the estimator, truncate-and-answer fills cut_lens / cut_scores (BRPO: budget cuts;
  VSRM: step cuts); for brpo with `--budget-summary-loss` it also trains the sampled answer ("summary") tokens with
  BRPO's summary advantages, as an extra PPO term in the policy's backward (`loss` hook).
- `budget_rollout`: HBPO's budget-prefixed sampling when the estimator needs think_budget.
- `anytime_eval_metrics`: eval/acc@<budget>, eval/anytime_auc, eval/length whenever budgets are known.
None of these keeps state across steps: their checkpoint state is empty and a resume repeats a run exactly.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor

from creditlab.batch import Credit, RolloutBatch
from creditlab.signals.produce import SignalContext
from creditlab.train.components import Component

ATTN_FIELDS = ("attn_waad", "attn_fai", "punct_mask")
CUT_FIELDS = ("cut_lens", "cut_scores")
STEP_CUT_ESTIMATORS = ("vsrm",)  # estimators whose cuts sit at step boundaries; others cut at budgets


def resolved_budgets(cfg: Any) -> list[int]:
    """--budgets, or (for an estimator that needs budgets) four equal splits of --max-new-tokens."""
    from creditlab.registry import get_spec
    from creditlab.signals.budget import even_budgets

    given = cfg.budget.budget_list()
    if given:
        return given
    needs = get_spec(cfg.run.estimator).needs
    if "think_budget" in needs or ("cut_lens" in needs and cfg.run.estimator not in STEP_CUT_ESTIMATORS):
        return even_budgets(cfg.rollout.max_new_tokens)
    return []


def _sampler_bf16(cfg: Any, policy: Any) -> bool:
    """The sampler's precision: --bf16, with auto (None) decided for the model as the rollout decides it."""
    from creditlab.rollout.hf import SamplingConfig

    return bool(SamplingConfig.from_rollout(cfg.rollout, policy.model).bf16)


# ------------------------------------------------------------------------------------------------ attention
class AttentionComponent(Component):
    name = "attention"

    def __init__(self, cfg: Any, policy: Any) -> None:
        from creditlab.signals.attention import AttnSignalConfig

        a = cfg.attn
        self.policy = policy
        self.signal_cfg = AttnSignalConfig(window=a.attn_window, h_lo=a.attn_horizon_lo, h_hi=a.attn_horizon_hi,
                                           head_frac=a.attn_head_frac, layers=a.layers(), sink=a.attn_sink,
                                           chunk=a.attn_chunk, rows_per_pass=a.attn_rows_per_pass,
                                           bf16=_sampler_bf16(cfg, policy))  # the sampler's precision
        self.signal_cfg.validate()
        self._metrics: dict[str, float] = {}

    def produce(self, batch: RolloutBatch, ctx: SignalContext) -> RolloutBatch:
        from creditlab.signals.attention import produce_attention_fields

        batch, self._metrics = produce_attention_fields(batch, self.policy, self.signal_cfg)
        return batch

    def metrics(self) -> dict[str, float]:
        out, self._metrics = self._metrics, {}
        return out


def attention_component(cfg: Any, spec: Any, policy: Any, task: Any) -> Component | None:
    return AttentionComponent(cfg, policy) if set(spec.needs) & set(ATTN_FIELDS) else None


# ------------------------------------------------------------------------------------------------ budget
class BudgetComponent(Component):
    name = "budget"

    def __init__(self, cfg: Any, estimator: str, policy: Any, task: Any) -> None:
        from creditlab.signals.budget import answer_cue

        self.cfg, self.policy, self.task = cfg, policy, task
        scheme = cfg.budget.budget_cuts
        self.steps = scheme == "steps" or (scheme == "auto" and estimator in STEP_CUT_ESTIMATORS)
        self.budgets = resolved_budgets(cfg)
        if not self.steps and not self.budgets:
            raise ValueError("budget cuts need --budgets (e.g. 64,128,256)")
        self.cue = answer_cue(task, cfg.budget.budget_cue)
        self.summary_loss = cfg.budget.budget_summary_loss and estimator == "brpo" and not self.steps
        self._summ: dict[str, Tensor] | None = None
        self._metrics: dict[str, float] = {}

    def produce(self, batch: RolloutBatch, ctx: SignalContext) -> RolloutBatch:
        from creditlab.signals.budget import budget_cuts, step_cuts, truncate_and_answer

        if batch.cut_lens is not None and batch.cut_scores is not None:
            return batch
        t0 = time.perf_counter()
        b, r = self.cfg.budget, self.cfg.rollout
        cuts = step_cuts(batch, ctx, mode=b.budget_step_split) if self.steps \
            else budget_cuts(batch, self.budgets, self.policy.stop_ids)
        out = truncate_and_answer(batch, cuts, ctx, answers=b.budget_answers, answer_tokens=b.budget_answer_tokens,
                                  cue=self.cue, temperature=r.temperature, top_p=r.top_p,
                                  bf16=_sampler_bf16(self.cfg, self.policy))
        self._summ = self._summary_rows(batch, out) if self.summary_loss else None
        self._metrics = {"time/budget_signal": time.perf_counter() - t0,
                         "budget/cuts_per_row": float((out.cut_lens >= 0).sum()) / max(batch.B, 1),
                         "budget/prefixes_sampled": float(len(out.prefixes))}
        return batch.replace(cut_lens=out.cut_lens, cut_scores=out.cut_scores)

    def _summary_rows(self, batch: RolloutBatch, out: Any) -> dict[str, Tensor] | None:
        """Every sampled answer as a training row: prompt = prompt + response[:c] + cue, response = the answer,
        advantage = BRPO's summary advantage (credit.budget.summary_advantages)."""
        from creditlab.credit.budget import summary_advantages
        from creditlab.rollout.hf import _left_pad

        A = self.cfg.budget.budget_answers
        rows = [(i, ans, sc) for i in range(len(out.prefixes)) for ans, sc in zip(out.answers[i], out.scores[i])
                if ans]
        if not rows:
            return None
        device = batch.response_ids.device
        prefix_idx = torch.tensor([i for i, _, _ in rows], dtype=torch.long)
        owner_row = torch.tensor([out.owner[i][0] for i, _, _ in rows], dtype=torch.long)
        owner_k = torch.tensor([out.owner[i][1] for i, _, _ in rows], dtype=torch.long)
        gb = batch.group_ids.cpu()[owner_row] * (owner_k.max() + 1) + owner_k  # (group, budget) key
        adv = summary_advantages(torch.tensor([sc for _, _, sc in rows], dtype=torch.float32), prefix_idx, gb, A)
        p_ids, p_mask = _left_pad([out.prefixes[i] for i, _, _ in rows], self.policy.tokenizer.pad_token_id, device)
        width = max(len(a) for _, a, _ in rows)
        a_ids = torch.full((len(rows), width), self.policy.tokenizer.pad_token_id, dtype=torch.long)
        a_mask = torch.zeros((len(rows), width), dtype=torch.bool)
        for j, (_, a, _) in enumerate(rows):
            a_ids[j, : len(a)] = torch.tensor(a, dtype=torch.long)
            a_mask[j, : len(a)] = True
        out_rows = {"row": owner_row.to(device), "prompt_ids": p_ids, "prompt_mask": p_mask,
                    "ids": a_ids.to(device), "mask": a_mask.to(device), "adv": adv.float().to(device)}
        if self.cfg.optim.ppo_epochs > 1 or self.cfg.optim.minibatches > 1:  # PPO's old log-probs, as the main rows
            from creditlab.rollout.hf import sequence_logprobs

            with torch.no_grad(), self._autocast(device):  # in passes of 256 rows: KV of all rows never at once
                out_rows["old"] = torch.cat([
                    sequence_logprobs(self.policy.model, p_ids[part], p_mask[part], out_rows["ids"][part],
                                      out_rows["mask"][part], temperature=self.cfg.rollout.temperature)[0].float()
                    for part in torch.arange(len(rows), device=device).split(256)])
        return out_rows

    def _autocast(self, device: torch.device) -> Any:
        return torch.autocast(device.type, torch.bfloat16, enabled=self.cfg.optim.update_bf16)  # the update's

    def _passes(self, pick: Tensor, budget: int) -> list[Tensor]:
        """Consecutive runs of summary rows whose tokens (each distinct prefix counted once, as the shared-prompt
        forward runs it, plus every answer) stay within `budget` (the positions the micro-batch's own forward
        runs: `_positions`); a prefix group is never split, so each pass shares its prefixes."""
        s = self._summ
        assert s is not None
        plen, alen = s["prompt_mask"].sum(1).tolist(), s["mask"].sum(1).tolist()
        rows, out, cost, prev = pick.tolist(), [], 0, None
        start = 0
        for j, r in enumerate(rows):
            same = prev is not None and torch.equal(s["prompt_ids"][r], s["prompt_ids"][prev])
            add = int(alen[r]) + (0 if same else int(plen[r]))
            if j > start and not same and cost + add > budget:
                out.append(pick[start:j])
                start, cost = j, 0
                add = int(alen[r]) + int(plen[r])
            cost, prev = cost + add, r
        out.append(pick[start:])
        return out

    def loss(self, batch: RolloutBatch, idx: Tensor, outputs: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        """PPO-clip on the summary tokens of the minibatch's rows, weighted by their share of the minibatch's tokens
        (so main + summary terms equal one token-mean over both up to the main term's normaliser).

        There are A answers per cut, so the summary rows outnumber the rows `idx` by up to K x A (BRPO's 3 cuts x 4
        answers: 12x); one forward/backward over all of them held 17 GB for 32 SmolLM2 rows. When ppo_update passes
        `outputs["backward_weight"]`, the summary rows are run in passes of about as many tokens as the micro-batch
        (whole prefix groups, so each pass shares its prefixes' forward; `_passes`), each backwarded at once: peak
        memory about one micro-batch's.
        The returned term is then detached (its value, for the logged total). Same gradient up to float order."""
        from creditlab.rollout.hf import sequence_logprobs
        from creditlab.train.losses import ppo_clip_loss

        s = self._summ
        if s is None:
            return torch.zeros(()), {}
        pick = torch.isin(s["row"], idx.to(s["row"].device)).nonzero().squeeze(1)
        if pick.numel() == 0:
            return torch.zeros(()), {}
        o = self.cfg.optim
        total = float(s["mask"][pick].sum())
        weight = total / max(float(batch.response_mask[idx].sum()), 1.0)
        back = outputs.get("backward_weight")
        passes = self._passes(pick, _positions(batch, idx)) if back is not None else (pick,)
        term, value = torch.zeros(()), 0.0
        for part in passes:
            p_mask, mask = s["prompt_mask"][part], s["mask"][part]
            width, length = int(p_mask.sum(1).max()), int(mask.sum(1).max())  # this pass's own padding only
            p_ids, p_mask = s["prompt_ids"][part][:, p_mask.shape[1] - width:], p_mask[:, p_mask.shape[1] - width:]
            ids, mask = s["ids"][part][:, :length], mask[:, :length]
            with self._autocast(mask.device):
                logp, _ = sequence_logprobs(self.policy.model, p_ids, p_mask, ids, mask,
                                            temperature=self.cfg.rollout.temperature)
            adv = torch.where(mask, s["adv"][part][:, None].expand_as(logp), torch.zeros_like(logp))
            old = s["old"][part][:, :length] if "old" in s else logp.detach()  # one epoch, one minibatch: current
            loss, _ = ppo_clip_loss(logp, old, adv, mask, clip_low=o.clip_low, clip_high=o.clip_high,
                                    dual_clip=o.dual_clip, agg="token-mean")
            share = float(mask.sum()) / total  # token-mean over all picked rows = share-weighted pass means
            value += share * float(loss.detach())
            if back is not None:
                (weight * share * loss * back).backward()
            else:
                term = term + weight * share * loss
        if back is not None:
            term = torch.tensor(weight * value)
        return term, {"loss/summary": value, "budget/summary_tokens": total}

    def update(self, batch: RolloutBatch, ctx: SignalContext, credit: Credit) -> dict[str, float]:
        self._summ = None  # the summary rows belong to this step only
        return {}

    def metrics(self) -> dict[str, float]:
        out, self._metrics = self._metrics, {}
        return out


def _positions(batch: RolloutBatch, idx: Tensor) -> int:
    """Token positions the policy forward of rows `idx` runs: each distinct (padded) prompt once + each response
    up to its length bucket's width (rollout.hf.sequence_logprobs with shared prompts and its default buckets)."""
    from creditlab.rollout.hf import DEFAULT_LENGTH_BUCKETS, bucketed_positions, length_bucket_rows

    responses = bucketed_positions(length_bucket_rows(batch.response_mask[idx], DEFAULT_LENGTH_BUCKETS))
    if batch.prompt_ids is None or batch.prompt_mask is None:
        return responses
    keyed = torch.where(batch.prompt_mask[idx], batch.prompt_ids[idx], -1)
    distinct = int(torch.unique(keyed, dim=0).shape[0]) if keyed.numel() else 0
    return distinct * keyed.shape[1] + responses


def budget_component(cfg: Any, spec: Any, policy: Any, task: Any) -> Component | None:
    if not set(spec.needs) & set(CUT_FIELDS):
        return None
    return BudgetComponent(cfg, spec.name, policy, task)


def budget_rollout(cfg: Any, task: Any) -> Any | None:
    """HBPO's budget-prefixed rollout when the estimator needs think_budget (else None: the default rollout)."""
    from creditlab.registry import get_spec
    from creditlab.signals.budget import BudgetPrefixRollout

    if "think_budget" not in get_spec(cfg.run.estimator).needs:
        return None
    return BudgetPrefixRollout(resolved_budgets(cfg), cfg.budget.budget_prefix)


def anytime_eval_metrics(cfg: Any, policy: Any, task: Any, problems: list[Any]) -> dict[str, float]:
    """Anytime accuracy at each budget (signals.budget.anytime_accuracy) when budgets are known and --budget-eval."""
    from creditlab.signals.budget import answer_cue, anytime_accuracy

    budgets = resolved_budgets(cfg)
    if not cfg.budget.budget_eval or not budgets:
        return {}
    return anytime_accuracy(policy, task, problems, budgets, max_new_tokens=cfg.rollout.max_new_tokens,
                            answer_tokens=cfg.budget.budget_answer_tokens, cue=answer_cue(task, cfg.budget.budget_cue))
