"""Truncate-and-answer signals for budget credit, the anytime evaluation, and HBPO's budget-prefixed rollout.

    cuts = budget_cuts(batch, [64, 128, 256], policy.stop_ids)            # BRPO: cut each response at budgets
    cuts = step_cuts(batch, ctx, mode="markers")                           # VSRM: cut before every step
    out = truncate_and_answer(batch, cuts, ctx, answers=4, answer_tokens=16, cue="\\nAnswer:")
    batch = batch.replace(cut_lens=out.cut_lens, cut_scores=out.cut_scores)

Truncate-and-answer (BRPO's "summaries", VSRM's "sub-rollouts"): the response is cut after c tokens, the task's
answer cue is appended (`answer_cue`: "\\nAnswer:" for arith_chain, "\\nThe answer is" for the others), A short
answers are sampled from prompt + response[:c] + cue with `creditlab.rollout.hf.continue_from` (one prefill per
distinct prefix: rows of a group share the prompt-only cut), and each text response[:c] + cue + answer is scored by
the task. `cut_scores` is the mean score. A response that stopped (EOS) before a budget is scored by its own
outcome at that budget and costs no samples: in our tasks the thinking and the answer are one text (BRPO's
reference samples summaries after "</think>" even then). Every sampled answer is charged as
`samples/extra` (and its tokens as `tokens/extra`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from creditlab.batch import RolloutBatch

DEFAULT_CUES = {"arith_chain": "\nAnswer:"}  # others end with "The answer is N." (creditlab.tasks.base)
DEFAULT_PREFIX = "I will answer the question with {budget} tokens.\n"  # HBPO's prefill (rollout code wording)


def answer_cue(task: Any, override: str = "") -> str:
    """The text appended after a cut: `override`, else the task's `answer_cue` attribute, else its default."""
    if override:
        return override
    return getattr(task, "answer_cue", None) or DEFAULT_CUES.get(getattr(task, "name", ""), "\nThe answer is")


def parse_budgets(text: str) -> list[int]:
    """'64,128,256' -> [64, 128, 256]; one-line ValueError naming --budgets on anything else."""
    try:
        values = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise ValueError(f"--budgets must be comma-separated positive integers, got {text!r}") from None
    if any(v < 1 for v in values) or values != sorted(set(values)):
        raise ValueError(f"--budgets must be strictly increasing positive integers, got {text!r}")
    return values


def even_budgets(max_tokens: int, n: int = 4) -> list[int]:
    """n equal splits of the generation limit (BRPO's training plan: max_len // S * i, i = 1..S)."""
    return sorted({max(1, max_tokens * i // n) for i in range(1, n + 1)})


# ------------------------------------------------------------------------------------------------ cut plans
@dataclass
class Cuts:
    """Where each row is cut: cut_lens [B,K] (-1 padding) and, per cell, the score when no sampling is needed."""

    cut_lens: Tensor  # [B,K] long
    keep: Tensor  # [B,K] long: tokens actually kept (min(cut, L)); -1 in padding
    own: Tensor  # [B,K] bool: the response stopped before this cut; its own reward is the score


def _stopped(batch: RolloutBatch, stop_ids: Sequence[int]) -> Tensor:
    """[B] bool: the last valid token is a stop token (the response ended on its own, not at the length limit)."""
    L = batch.response_mask.sum(1)
    last = batch.response_ids.gather(1, (L - 1).clamp_min(0)[:, None])[:, 0]
    return (L > 0) & torch.isin(last, torch.tensor(list(stop_ids), device=last.device))


def budget_cuts(batch: RolloutBatch, budgets: Sequence[int], stop_ids: Sequence[int]) -> Cuts:
    """BRPO: every row cut at every budget; a stopped row shorter than a budget keeps its own outcome there."""
    B, K = batch.B, len(budgets)
    L = batch.response_mask.sum(1, keepdim=True)  # [B,1]
    b = torch.tensor(list(budgets), dtype=torch.long, device=L.device).expand(B, K)
    own = _stopped(batch, stop_ids)[:, None] & (b >= L)
    return Cuts(cut_lens=b.clone(), keep=torch.minimum(b, L), own=own)


def step_cuts(batch: RolloutBatch, ctx: Any, *, mode: str = "markers", pattern: str | None = None) -> Cuts:
    """VSRM: cut 0 (prompt only) and a cut before every later step (step starts, in valid-token counts)."""
    from creditlab.signals.steps import Segmenter

    step_ids = Segmenter(mode, pattern).segment(batch, ctx).step_ids  # [B,T]
    rows: list[list[int]] = []
    for b in range(batch.B):
        ids = step_ids[b][batch.response_mask[b]].tolist()  # steps of the valid tokens, in order
        first: dict[int, int] = {}
        for i, s in enumerate(ids):
            if s >= 1 and s not in first:
                first[s] = i  # tokens kept before step s = index of its first token
        rows.append([0, *sorted(first.values())])
    K = max(len(r) for r in rows)
    cut = torch.full((batch.B, K), -1, dtype=torch.long)
    for b, r in enumerate(rows):
        cut[b, : len(r)] = torch.tensor(r, dtype=torch.long)
    cut = cut.to(batch.response_ids.device)
    return Cuts(cut_lens=cut, keep=cut.clone(), own=torch.zeros_like(cut, dtype=torch.bool))


# ------------------------------------------------------------------------------------------------ sampling
@dataclass
class Answers:
    """Output of `truncate_and_answer`: the fields, plus every sampled answer (for BRPO's summary tokens)."""

    cut_lens: Tensor  # [B,K] long
    cut_scores: Tensor  # [B,K] float32
    prefixes: list[list[int]] = field(default_factory=list)  # distinct prompt + response[:c] + cue ids
    owner: list[tuple[int, int]] = field(default_factory=list)  # (row, k) of the first cell using each prefix
    answers: list[list[list[int]]] = field(default_factory=list)  # [prefix][j] answer ids
    scores: list[list[float]] = field(default_factory=list)  # [prefix][j] task score of each answer


def truncate_and_answer(batch: RolloutBatch, cuts: Cuts, ctx: Any, *, answers: int, answer_tokens: int, cue: str,
                        temperature: float = 1.0, top_p: float = 1.0, bf16: bool = False,
                        max_rows: int | None = 512, correct_only: bool = False) -> Answers:
    """Sample `answers` answers after every cut that needs them and score them; see the module docstring.

    A cell whose response stopped before the cut takes `batch.rewards`; `correct_only` scores sampled answers 1/0
    by `Score.correct` instead of `Score.reward` (accuracy)."""
    from creditlab.rollout.hf import SamplingConfig, continue_from

    if answers < 1 or answer_tokens < 1:
        raise ValueError(f"--budget-answers and --budget-answer-tokens must be >= 1, got {answers}, {answer_tokens}")
    tok = ctx.policy.tokenizer
    cue_ids = tok(cue, add_special_tokens=False)["input_ids"] if cue else []
    B, K = cuts.cut_lens.shape
    key_of: dict[tuple[int, ...], int] = {}
    cell_prefix = torch.full((B, K), -1, dtype=torch.long)
    prefixes: list[list[int]] = []
    owner: list[tuple[int, int]] = []
    texts: list[str] = []
    for b in range(B):
        prompt = batch.prompt_ids[b][batch.prompt_mask[b]].tolist() if batch.prompt_ids is not None else []
        resp = batch.response_ids[b][batch.response_mask[b]].tolist()
        for k in range(K):
            c = int(cuts.keep[b, k])
            if c < 0 or bool(cuts.own[b, k]):
                continue
            key = (*prompt, *resp[:c], -1, *cue_ids)  # -1 separates prompt+response from the cue
            if key not in key_of:
                key_of[key] = len(prefixes)
                prefixes.append([*prompt, *resp[:c], *cue_ids])
                owner.append((b, k))
                texts.append(tok.decode(resp[:c], skip_special_tokens=True) + cue)
            cell_prefix[b, k] = key_of[key]
    sampled: list[list[list[int]]] = []
    if prefixes:
        cfg = SamplingConfig(temperature=temperature, top_p=top_p, max_new_tokens=answer_tokens, bf16=bf16)
        sampled = continue_from(ctx.policy, [p if p else [tok.eos_token_id] for p in prefixes], answers, cfg,
                                seed=int(getattr(ctx, "seed", 0)) + 7_777, max_rows=max_rows)
    scores = []
    for i, outs in enumerate(sampled):
        problem = ctx.problems[int(batch.group_ids[owner[i][0]])]
        verdicts = [ctx.task.score(problem, texts[i] + tok.decode(a, skip_special_tokens=True)) for a in outs]
        scores.append([float(v.correct) if correct_only else float(v.reward) for v in verdicts])
    if hasattr(ctx, "count"):
        ctx.count("samples/extra", len(prefixes) * answers)
        ctx.count("tokens/extra", sum(len(a) for outs in sampled for a in outs))
    mean = torch.tensor([sum(s) / len(s) for s in scores] or [0.0], dtype=torch.float32)
    cut_scores = torch.where(cell_prefix >= 0, mean[cell_prefix.clamp_min(0)], torch.zeros(B, K))
    cut_scores = torch.where(cuts.own.cpu(), batch.rewards.float().cpu()[:, None].expand(B, K), cut_scores)
    cut_scores = torch.where(cuts.cut_lens.cpu() >= 0, cut_scores, torch.zeros(B, K))
    return Answers(cuts.cut_lens, cut_scores.to(batch.response_ids.device), prefixes, owner, sampled, scores)


# ------------------------------------------------------------------------------------------------ anytime eval
def anytime_accuracy(policy: Any, task: Any, problems: Sequence[Any], budgets: Sequence[int], *,
                     max_new_tokens: int, answer_tokens: int, cue: str, chunk: int = 64) -> dict[str, float]:
    """Greedy accuracy when thinking is cut at each budget: {"eval/acc@b": ...} plus "eval/anytime_auc" (mean over
    budgets: the normalised area under the accuracy-vs-budget step curve, BRPO's anytime score under a uniform
    prior) and "eval/length" (mean greedy response length). A response shorter than a budget is scored as is;
    a longer one is cut, the cue appended and a greedy answer of <= answer_tokens tokens decoded."""
    from creditlab.rollout.hf import SamplingConfig, generate
    from creditlab.signals.produce import SignalContext

    if not problems or not budgets:
        return {}
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=max_new_tokens)
    correct = torch.zeros(len(budgets))
    lengths = 0.0
    for start in range(0, len(problems), chunk):
        part = list(problems[start:start + chunk])
        batch = generate(policy, [policy.format_prompt(p.prompt) for p in part], 1, greedy, seed=0)
        scores = [task.score(p, t) for p, t in zip(part, batch.texts)]
        batch = batch.replace(rewards=torch.tensor([float(s.correct) for s in scores], device=batch.rewards.device))
        lengths += float(batch.response_mask.sum())
        ctx = SignalContext(policy=policy, problems=part, scores=scores, task=task, seed=0)
        out = truncate_and_answer(batch, budget_cuts(batch, budgets, policy.stop_ids), ctx, answers=1,
                                  answer_tokens=answer_tokens, cue=cue, temperature=0.0, correct_only=True)
        correct += out.cut_scores.float().sum(0).cpu()
    acc = correct / len(problems)
    metrics = {f"eval/acc@{b}": float(a) for b, a in zip(budgets, acc)}
    metrics["eval/anytime_auc"] = float(acc.mean())
    metrics["eval/length"] = lengths / len(problems)
    return metrics


# ------------------------------------------------------------------------------------------------ HBPO rollout
class BudgetPrefixRollout:
    """HBPO's hierarchical sampling: the G responses to a problem are split into len(budgets) equal subgroups, each
    sampled from the formatted prompt + `prefix.format(budget=b)` (the reference prefills "<think> I will answer
    the question with b tokens" into the response; here the prefix ends the prompt, so it is neither trained
    nor counted in the length). Rows: problem-major, subgroups in budget order; group_ids = problem index;
    fills think_budget [B] and correct [B] besides the task reward."""

    def __init__(self, budgets: Sequence[int], prefix: str = DEFAULT_PREFIX) -> None:
        if not budgets:
            raise ValueError("hbpo needs budgets (--budgets, e.g. 64,128,256)")
        self.budgets = list(budgets)
        self.prefix = prefix

    def collect(self, policy: Any, task: Any, problems: Sequence[Any], cfg: Any, *, seed: int
                ) -> tuple[RolloutBatch, list[Any]]:
        from creditlab.rollout.hf import SamplingConfig, generate

        K = len(self.budgets)
        if cfg.group_size % K:
            raise ValueError(f"hbpo splits each group into {K} budget subgroups: --group-size ({cfg.group_size}) "
                             f"must be a multiple of the number of budgets ({K})")
        sampling = SamplingConfig.from_rollout(cfg, policy.model)  # --bf16 auto (None) decided for the model
        prompts = [policy.format_prompt(p.prompt) + self.prefix.format(budget=b) for p in problems
                   for b in self.budgets]
        batch = generate(policy, prompts, cfg.group_size // K, sampling, seed=seed)
        sub = batch.group_ids  # [B] index of (problem, budget)
        device = batch.response_ids.device
        scores = [task.score(problems[int(g) // K], text) for g, text in zip(sub.tolist(), batch.texts)]
        budgets = torch.tensor(self.budgets, dtype=torch.long, device=device)[sub % K]
        return batch.replace(
            group_ids=sub // K, think_budget=budgets,
            rewards=torch.tensor([s.reward for s in scores], dtype=torch.float32, device=device),
            correct=torch.tensor([bool(s.correct) for s in scores], dtype=torch.bool, device=device)), scores
