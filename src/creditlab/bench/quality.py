"""`creditlab credit-quality`: do an estimator's per-token advantages point at the steps that mattered?

Two ground truths (``--reference``):

- ``oracle`` (default, arith_chain): the task verifier's step labels; the scores below (first-wrong-step AUROC).
- ``mc`` (any task): the true advantage of every step, A_k = V(s_{k+1}) - V(s_k), estimated with ``--mc-samples``
  continuations per state; scores are the within-response Spearman correlation with A_k and the AUROC of the step
  with the most negative A_k (`creditlab.bench.mc_reference`, where the definitions are).

Monte-Carlo estimators (spo_chain, vineppo) get their own values, sampled at their own cut points with
``--estimator-mc-samples`` continuations (independent of the reference's); budget estimators (brpo, vsrm) get their
own truncate-and-answer cuts (`budget_estimator_batches`). Estimators that need a segment-tree rollout (spo_tree)
or budget-prefixed prompts (hbpo) are listed as skipped: the benchmark's responses are independent samples.

Oracle reference. One fixed policy (a warm-started `tiny`, or `--policy DIR`) samples G responses to each of N
`arith_chain` prompts; the task's verifier labels every step. Every signal an estimator may need is produced once
for the whole batch, and every registered estimator (whatever is registered at run time) turns the same batch into
advantages [B,T]. Then, for every response with a wrong step (``Score.first_error`` is not None):

    before   the response's tokens *positioned before* the first token of its first wrong step (correct steps,
             the separators between them, any text before the first step);
    wrong    the tokens of the first wrong step (``step_ids == first_error``, the task's own segmentation).

within-response AUROC (the headline number), per response b with both sets non-empty:

    P_b = P(A[b, i] > A[b, j]) + 1/2 P(A[b, i] = A[b, j]),   i uniform in before_b, j uniform in wrong_b

computed rank-based (Mann–Whitney U with midranks, vectorized over responses), then averaged over responses.
1 = every earlier token gets more credit than every token of the mistake; 0.5 = no localisation. An estimator
whose advantage is constant within a response (grpo, rloo, dr_grpo, ...) scores exactly 0.5 by construction.

pooled AUROC: the same probability with i drawn from the before-tokens of *all* erroneous responses and j from
the wrong-step tokens of all of them (pairs across responses included, every token weighted equally). It mixes
in how advantages compare between responses (a response-level estimator is no longer 0.5: e.g. wrong responses
whose first error comes late contribute many before-tokens with their own response-level advantage).

95% intervals: percentile bootstrap over responses (seeded; the same resampled responses for every estimator and
both numbers). Responses whose first wrong step is their first token (nothing before it) or has no token are
left out of both and counted in the report.

Signals, produced once (see `fill_signals`): rollout (logprobs, entropies, certainty, token_logits), oracle
step_ids / step_labels (task verifier), step_rewards from the oracle scorer, planning_mask, strata; the implicit
PRM *at initialisation* for prm_logprobs / ref_logprobs (π_φ = π_ref, so q ≡ 0 and prime / oprl reduce to their
outcome part); for gae, token_rewards = the outcome on the last token and values ≡ 0 (no critic: with the defaults
γ = λ = 1 gae is then constant per response; q_values ≡ 0 too, so archer gives 0); the attention signals
(attn_waad, attn_fai, punct_mask) from one extra forward of the fixed policy with the default --attn-* options.
An estimator needing anything else is listed as skipped.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from creditlab.batch import RolloutBatch

# What the signals behind some fields mean in this benchmark (printed next to the estimators that read them).
FIELD_NOTES = {
    "prm_logprobs": "implicit PRM at init (q≡0): outcome part only",
    "values": "values≡0 (no critic; gae is then constant per response)",
    "q_values": "q_values≡0 (no critic): advantage 0",
    "mc_values": "own MC values at its cut points",
    "cut_scores": "own truncate-and-answer cuts (4 answers per cut)",
}
# Why a field has no producer here (the benchmark's responses are independent samples of plain prompts).
SKIP_REASONS = {
    "tree_node": "needs a segment-tree rollout (--rollout tree)",
    "think_budget": "needs budget-prefixed prompts (HBPO's rollout); its advantage is per response anyway",
}


def skip_note(missing: Sequence[str]) -> str:
    if "think_budget" in missing:  # `correct` comes with it from HBPO's rollout
        missing = [f for f in missing if f != "correct"]
    return "skipped: " + "; ".join(SKIP_REASONS.get(f, f"no producer here for {f}") for f in missing)


@dataclass
class QualityConfig:
    policy: str = ""  # warm-started policy dir ("" = warm-start tiny like `bench --preset quick`, cached in --out)
    out: str = "runs/credit-quality"  # output directory (report.md, auroc.png, quality.json)
    prompts: int = 64  # arith_chain prompts sampled
    group_size: int = 8  # responses per prompt (G)
    max_new_tokens: int = 48  # response length limit
    temperature: float = 1.0  # sampling temperature
    seed: int = 0  # seeds problems, sampling and the bootstrap
    resamples: int = 1000  # bootstrap resamples over responses (95 percent intervals)
    estimators: str = ""  # comma-separated estimator names (default: every registered estimator)
    sft_steps: int = 0  # warm-start steps when no --policy is given (0 = BENCH_SFT_STEPS)
    reference: Literal["oracle", "mc"] = "oracle"  # ground truth: oracle step labels (arith_chain) or MC step values
    task: str = ""  # task ("" = the benchmark's arith_chain); --reference mc works on any task
    task_kwargs: str = ""  # JSON task options ("" = the benchmark's options for its task, {} otherwise)
    mc_samples: int = 32  # --reference mc: continuations per state for the true step values (K)
    mc_responses: int = 64  # --reference mc: responses given a reference, drawn at random (0 = every one)
    mc_steps: Literal["newline", "task", "double_newline"] = "newline"  # --reference mc: what a step is
    estimator_mc_samples: int = 4  # continuations per cut point for the MC estimators (spo_chain, vineppo)

    def validate(self) -> None:
        for flag, v in (("--mc-samples", self.mc_samples), ("--estimator-mc-samples", self.estimator_mc_samples),
                        ("--prompts", self.prompts), ("--group-size", self.group_size),
                        ("--resamples", self.resamples)):
            if v < 1:
                raise ValueError(f"{flag} must be >= 1, got {v}")
        if self.mc_responses < 0:
            raise ValueError(f"--mc-responses must be >= 0, got {self.mc_responses}")

    def task_spec(self) -> tuple[str, str]:
        """(task name, JSON options) this run uses."""
        from creditlab.bench.learning import BENCH_TASK, BENCH_TASK_KWARGS

        name = self.task or BENCH_TASK
        return name, self.task_kwargs or (BENCH_TASK_KWARGS if name == BENCH_TASK else "{}")


# ------------------------------------------------------------------------------------------------ AUROC
def within_response_auroc(adv: Tensor, before: Tensor, wrong: Tensor) -> Tensor:
    """Per row: P(adv of a `before` token > adv of a `wrong` token), ties 1/2. [B,T] x3 -> [B] float64.

    Rank-based Mann–Whitney: midranks of the row's before ∪ wrong tokens (other tokens are pushed past the end
    and never counted), U = Σ ranks(before) − n1(n1+1)/2, AUROC = U / (n1 n2). NaN where a set is empty.
    """
    keep = before | wrong
    x = torch.where(keep, adv.double(), torch.full_like(adv, math.inf, dtype=torch.float64))  # [B, T]
    srt = x.sort(dim=1).values  # [B, T]
    lo = torch.searchsorted(srt, x, side="left")  # [B, T] tokens strictly below
    hi = torch.searchsorted(srt, x, side="right")  # [B, T] tokens at or below
    midrank = (lo + hi + 1).double() / 2  # 1-based; ties share the mean of their ranks
    n1, n2 = before.sum(1).double(), wrong.sum(1).double()  # [B]
    u = torch.where(before, midrank, 0.0).sum(1) - n1 * (n1 + 1) / 2
    return u / (n1 * n2)  # 0/0 = NaN for rows without both sets


def weighted_auroc(values: Tensor, is_pos: Tensor, weights: Tensor) -> Tensor:
    """Weighted Mann–Whitney over one pool: for each weight row, Σ w_i w_j (1[x_i > x_j] + ½ 1[x_i = x_j]) over
    positive i, negative j, divided by (Σ_pos w)(Σ_neg w).  values, is_pos [N]; weights [R, N] -> [R] float64."""
    x = values.double()
    order = x.argsort()
    srt = x[order]
    lo = torch.searchsorted(srt, x, side="left")  # [N]
    hi = torch.searchsorted(srt, x, side="right")  # [N]
    w = weights.double()
    neg_w = (w * (~is_pos))[:, order]  # [R, N] negative weights in sorted order
    cum = torch.nn.functional.pad(neg_w.cumsum(dim=1), (1, 0))  # [R, N+1] negative weight strictly before k
    below, upto = cum[:, lo], cum[:, hi]  # [R, N] negative weight < x_i and <= x_i
    pos_w = w * is_pos  # [R, N]
    num = (pos_w * (below + upto) / 2).sum(1)
    return num / (pos_w.sum(1) * neg_w.sum(1))


def pooled_auroc(adv: Tensor, before: Tensor, wrong: Tensor, row_weights: Tensor | None = None,
                 chunk: int = 100) -> Tensor:
    """Pooled AUROC of before vs wrong tokens over all rows; `row_weights` [R, B] (bootstrap counts) -> [R].

    Without weights: one value (every row weight 1), shape [1].
    """
    keep = before | wrong  # [B, T]
    rows = keep.nonzero()[:, 0]  # [N] row of each pooled token
    values, is_pos = adv[keep], before[keep]  # [N]
    if row_weights is None:
        row_weights = torch.ones(1, adv.shape[0])
    return torch.cat([weighted_auroc(values, is_pos, rw[:, rows]) for rw in row_weights.split(chunk)])


def auroc_brute_force(adv: Sequence[float], before: Sequence[bool], wrong: Sequence[bool]) -> float:
    """The obviously-correct pairwise loop (tests)."""
    pos = [a for a, p in zip(adv, before) if p]
    neg = [a for a, n in zip(adv, wrong) if n]
    total = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in pos for b in neg)
    return total / (len(pos) * len(neg))


def bootstrap_counts(n: int, resamples: int, seed: int) -> Tensor:
    """[R, n] float: how often each of n responses appears in each bootstrap resample (seeded)."""
    if n == 0:
        return torch.zeros(resamples, 0)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(n, (resamples, n), generator=g)  # [R, n]
    return torch.zeros(resamples, n).scatter_add_(1, idx, torch.ones(resamples, n))


def percentile_ci(samples: Tensor) -> tuple[float, float]:
    q = torch.quantile(samples.double(), torch.tensor([0.025, 0.975], dtype=torch.float64))
    return float(q[0]), float(q[1])


# ------------------------------------------------------------------------------------------------ data
def error_masks(batch: RolloutBatch, first_errors: Sequence[int | None]) -> tuple[Tensor, Tensor]:
    """(before [B,T], wrong [B,T]) bool: see the module docstring. Rows without an error are all False."""
    fe = torch.tensor([-2 if f is None else f for f in first_errors])  # [B]; -2 never matches a step id
    wrong = (batch.step_ids == fe[:, None]) & batch.response_mask  # [B, T]
    T = batch.T
    pos = torch.arange(T)[None, :].expand_as(wrong)
    start = torch.where(wrong, pos, T).min(dim=1).values  # [B] first token of the first wrong step (T if none)
    before = batch.response_mask & (pos < start[:, None]) & wrong.any(dim=1, keepdim=True)
    return before, wrong


def outcome_token_rewards(batch: RolloutBatch) -> Tensor:
    """token_rewards [B,T]: the outcome reward on each response's last valid token, 0 elsewhere."""
    last = (batch.response_mask.long().cumsum(1).argmax(1))[:, None]  # [B, 1]
    return torch.zeros(batch.B, batch.T).scatter(1, last, batch.rewards.float()[:, None]) * batch.response_mask


def fill_signals(batch: RolloutBatch, ctx: Any) -> RolloutBatch:
    """Every signal this benchmark can produce (module docstring), on top of what the rollout filled.

    A task without verifier step labels gets one step per line and no step labels / step rewards (estimators that
    read them are then listed as skipped)."""
    from creditlab.signals.prm import get_scorer, produce_step_signals
    from creditlab.signals.produce import PRODUCERS, produce_signals
    from creditlab.signals.steps import Segmenter

    names = list(PRODUCERS)
    if not all(getattr(s, "step_labels", None) is not None and getattr(s, "step_spans", None) is not None
               for s in ctx.scores):
        batch = batch.replace(step_ids=Segmenter("newline").segment(batch, ctx).step_ids)
        names = [n for n in names if n not in ("step_ids", "step_labels", "step_rewards")]
    batch = produce_signals(batch, names, ctx)  # oracle steps/labels/step_rewards, planning, strata
    batch = produce_step_signals(batch, get_scorer("implicit"), ctx)  # adds prm_logprobs, ref_logprobs (q ≡ 0)
    # logprobs recomputed by a full forward, as the implicit PRM does for oprl (verl's old_log_prob): the sampler's
    # KV-cached values differ in their last bits, which oprl's max-normalisation would turn into step credit
    batch = batch.replace(logprobs=get_scorer("implicit", mode="oprl").old_policy_logprobs(batch, ctx))
    from creditlab.signals.attention import AttnSignalConfig, produce_attention_fields

    batch, _ = produce_attention_fields(batch, ctx.policy, AttnSignalConfig())  # attn_waad, attn_fai, punct_mask
    return batch.replace(token_rewards=outcome_token_rewards(batch), values=torch.zeros(batch.B, batch.T),
                         q_values=torch.zeros(batch.B, batch.T)).validate()


def sample_scored_batch(policy: Any, cfg: QualityConfig) -> tuple[RolloutBatch, list[Any], Any]:
    """(batch with rewards and every signal, scores per row, signal context) for cfg.prompts × cfg.group_size."""
    from creditlab.rollout.hf import SamplingConfig, generate
    from creditlab.signals.produce import SignalContext
    from creditlab.tasks import get_task

    name, options = cfg.task_spec()
    task = get_task(name, **json.loads(options))
    problems = task.problems("test", cfg.prompts, cfg.seed)
    sampling = SamplingConfig(temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens)
    policy.model.eval()
    batch = generate(policy, [policy.format_prompt(p.prompt) for p in problems], cfg.group_size, sampling,
                     seed=cfg.seed)
    scores = [task.score(problems[g], text) for g, text in zip(batch.group_ids.tolist(), batch.texts)]
    batch = batch.replace(rewards=torch.tensor([s.reward for s in scores], dtype=torch.float32))
    ctx = SignalContext(policy=policy, problems=problems, scores=scores, task=task, seed=cfg.seed)
    return fill_signals(batch, ctx), scores, ctx


def mc_estimator_batches(batch: RolloutBatch, ctx: Any, names: Sequence[str], cfg: QualityConfig
                         ) -> dict[str, RolloutBatch]:
    """For each estimator reading mc_values: the batch with its own mc_cuts / mc_values (its cut rule, its default
    hyper-parameters, `estimator_mc_samples` continuations, seeds independent of the MC reference's)."""
    from creditlab.registry import get_spec
    from creditlab.rollout.hf import SamplingConfig
    from creditlab.signals.mc import produce_mc

    sampling = SamplingConfig(temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens)
    out = {}
    for i, name in enumerate(names):
        spec = get_spec(name)
        if "mc_values" in spec.needs:
            out[name], _ = produce_mc(batch, ctx, name, spec.defaults, samples=cfg.estimator_mc_samples,
                                      sampling=sampling, seed=cfg.seed + 1_000 + i)
    return out


def budget_estimator_batches(batch: RolloutBatch, ctx: Any, names: Sequence[str], cfg: QualityConfig
                             ) -> dict[str, RolloutBatch]:
    """For each estimator reading cut_lens / cut_scores: the batch with its own truncate-and-answer cuts, made by
    the trainer's `BudgetComponent` with the default --budget-* options: brpo at four even budgets up to
    `max_new_tokens`, vsrm before every step (the task's oracle steps when it has them, else one per line);
    4 answers of at most 16 tokens per cut, scored by the task, sampled in fp32 like this benchmark's rollout."""
    from creditlab.registry import get_spec
    from creditlab.train.attn_budget import BudgetComponent
    from creditlab.train.config import TrainConfig

    oracle_steps = all(getattr(s, "step_spans", None) is not None for s in ctx.scores)
    out = {}
    for name in names:
        if "cut_lens" not in get_spec(name).needs:
            continue
        tc = TrainConfig()
        tc.run.estimator = name
        tc.rollout.max_new_tokens, tc.rollout.temperature, tc.rollout.bf16 = cfg.max_new_tokens, cfg.temperature, False
        tc.budget.budget_step_split = "task" if oracle_steps else "newline"
        tc.budget.budget_summary_loss = False  # no training here: no summary rows
        out[name] = BudgetComponent(tc, name, ctx.policy, ctx.task).produce(batch, ctx).validate()
    return out


# ------------------------------------------------------------------------------------------------ benchmark
@dataclass
class QualityRow:
    estimator: str
    needs: str
    within: float  # mean over responses of the within-response AUROC
    within_lo: float
    within_hi: float
    pooled: float
    pooled_lo: float
    pooled_hi: float
    note: str = ""


def score_estimators(batch: RolloutBatch, before: Tensor, wrong: Tensor, names: Sequence[str], *,
                     resamples: int, seed: int, batches: dict[str, RolloutBatch] | None = None
                     ) -> tuple[list[QualityRow], dict[str, Tensor]]:
    """One QualityRow per estimator (rows of `batch` outside before/wrong are ignored), plus the bootstrap
    samples of the within-response mean per estimator (for the bar chart). `batches` gives some estimators their
    own copy of the batch (the same responses with extra fields, e.g. their Monte-Carlo values)."""
    from creditlab.registry import get_estimator, get_spec

    usable = before.any(1) & wrong.any(1)  # [B] responses in the benchmark
    before, wrong = before & usable[:, None], wrong & usable[:, None]  # pool only tokens of usable responses
    used = usable.nonzero().flatten()  # [n]
    counts = bootstrap_counts(len(used), resamples, seed)  # [R, n]
    weights = torch.zeros(resamples, batch.B)
    weights[:, used] = counts  # [R, B]
    nan = math.nan
    rows, boots = [], {}
    for name in names:
        spec = get_spec(name)
        own = (batches or {}).get(name, batch)
        missing = [f for f in spec.needs if getattr(own, f) is None]
        notes = [FIELD_NOTES[f] for f in spec.needs if f in FIELD_NOTES]
        if missing:
            rows.append(QualityRow(name, ",".join(spec.needs), nan, nan, nan, nan, nan, nan,
                                   skip_note(missing)))
            continue
        adv = get_estimator(name)(own).advantages  # [B, T]
        if len(used) == 0:  # still run every estimator, but there is nothing to measure
            rows.append(QualityRow(name, ",".join(spec.needs) or "-", nan, nan, nan, nan, nan, nan,
                                   "; ".join([*notes, "no usable response"])))
            continue
        per_row = within_response_auroc(adv, before, wrong)[used]  # [n]
        boot = (counts.double() @ per_row) / len(used)  # [R] bootstrap means
        pooled = float(pooled_auroc(adv, before, wrong)[0])
        pooled_boot = pooled_auroc(adv, before, wrong, weights)
        rows.append(QualityRow(name, ",".join(spec.needs) or "-", float(per_row.mean()), *percentile_ci(boot),
                               pooled, *percentile_ci(pooled_boot), "; ".join(notes)))
        boots[name] = boot
    return rows, boots


def warm_start(out: Path, seed: int, steps: int = 0, task: tuple[str, str] | None = None) -> str:
    """A tiny policy warm-started like `bench --preset quick` (the benchmarks' fixed settings; `task` = (name, JSON
    options), default the benchmark's), cached in `out`."""
    from creditlab.bench.learning import BENCH_SFT_STEPS as SFT_STEPS
    from creditlab.bench.learning import BENCH_TASK as TASK
    from creditlab.bench.learning import BENCH_TASK_KWARGS as TASK_KWARGS
    from creditlab.bench.learning import cached_sft
    from creditlab.train.config import SFTConfig

    name, options = task or (TASK, TASK_KWARGS)
    cached_sft(SFTConfig(task=name, task_kwargs=options, policy="tiny", out_dir=str(out), seed=seed,
                         steps=steps or SFT_STEPS))
    return str(out)


def run_quality(cfg: QualityConfig) -> dict[str, Any]:
    """Run the benchmark; writes report.md, auroc.png, auroc_pooled.png and quality.json to cfg.out."""
    from creditlab.policy import load_policy
    from creditlab.registry import list_estimators

    t0 = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    names = [n.strip() for n in cfg.estimators.split(",") if n.strip()] or list_estimators()
    unknown = sorted(set(names) - set(list_estimators()))
    if unknown:
        raise KeyError(f"unknown estimator(s) {unknown}; registered estimators: {list_estimators()}")
    cfg.validate()
    policy_dir = cfg.policy or warm_start(out / "policy", cfg.seed, cfg.sft_steps, cfg.task_spec())
    torch.manual_seed(cfg.seed)
    policy = load_policy(policy_dir)
    if cfg.reference == "mc":
        return run_mc_quality(cfg, policy, policy_dir, names, t0)
    batch, scores, ctx = sample_scored_batch(policy, cfg)
    if any(getattr(s, "step_labels", None) is None for s in scores):
        raise ValueError(f"--reference oracle needs a task with oracle step labels (arith_chain); task "
                         f"{cfg.task_spec()[0]!r} has none: use --reference mc")
    own = mc_estimator_batches(batch, ctx, names, cfg) | budget_estimator_batches(batch, ctx, names, cfg)
    before, wrong = error_masks(batch, [s.first_error for s in scores])
    rows, boots = score_estimators(batch, before, wrong, names, resamples=cfg.resamples, seed=cfg.seed, batches=own)
    stats = batch_stats(batch, scores, before, wrong)
    summary = {"config": asdict(cfg), "policy": policy_dir, "stats": stats, "rows": [asdict(r) for r in rows],
               "seconds": time.perf_counter() - t0}
    (out / "quality.json").write_text(json.dumps(summary, indent=2))
    write_charts(out, boots, rows)
    (out / "report.md").write_text(format_report(rows, stats, cfg, policy_dir))
    return summary


def run_mc_quality(cfg: QualityConfig, policy: Any, policy_dir: str, names: Sequence[str], t0: float
                   ) -> dict[str, Any]:
    """`--reference mc`: every estimator against Monte-Carlo step advantages (creditlab.bench.mc_reference)."""
    from creditlab.bench.mc_reference import estimate_reference, reference_stats, score_against_reference
    from creditlab.registry import get_estimator, get_spec
    from creditlab.rollout.hf import SamplingConfig
    from creditlab.signals.steps import Segmenter
    from creditlab.viz.plots import bar_chart

    out = Path(cfg.out)
    batch, scores, ctx = sample_scored_batch(policy, cfg)
    steps = Segmenter(cfg.mc_steps).segment(batch, ctx).step_ids  # the reference's steps
    sampling = SamplingConfig(temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens)
    ref = estimate_reference(batch, ctx, steps, responses=cfg.mc_responses, samples=cfg.mc_samples,
                             sampling=sampling, seed=cfg.seed)
    own = mc_estimator_batches(batch, ctx, names, cfg) | budget_estimator_batches(batch, ctx, names, cfg)
    advantages, needs, notes = {}, {}, {}
    for name in names:
        spec = get_spec(name)
        b = own.get(name, batch)
        needs[name] = ",".join(spec.needs) or "-"
        missing = [f for f in spec.needs if getattr(b, f) is None]
        if missing:
            notes[name] = skip_note(missing)
            continue
        notes[name] = "; ".join(FIELD_NOTES[f] for f in spec.needs if f in FIELD_NOTES)
        advantages[name] = get_estimator(name)(b).advantages
    rows, boots = score_against_reference(advantages, ref, resamples=cfg.resamples, seed=cfg.seed, needs=needs,
                                          notes=notes)
    rows += _skipped_rows(names, advantages, needs, notes)
    rows.sort(key=lambda r: list(names).index(r.estimator))
    stats = {**reference_stats(ref), "batch_responses": batch.B, "correct": sum(s.correct for s in scores),
             "estimator_continuations": int(ctx.counters.get("samples/extra", 0)) - ref.continuations}
    summary = {"config": asdict(cfg), "policy": policy_dir, "stats": stats, "rows": [asdict(r) for r in rows],
               "seconds": time.perf_counter() - t0}
    (out / "quality.json").write_text(json.dumps(summary, indent=2))
    if boots and any(v.numel() for v in boots.values()):
        bar_chart({k: v.tolist() for k, v in boots.items() if v.numel()}, out / "spearman.png",
                  title="within-response Spearman vs MC step advantages, bootstrap means", ylabel="Spearman (0 = none)")
    (out / "report.md").write_text(format_mc_report(rows, stats, cfg, policy_dir))
    return summary


def _skipped_rows(names: Sequence[str], advantages: dict, needs: dict, notes: dict) -> list[Any]:
    from creditlab.bench.mc_reference import MCQualityRow

    nan = math.nan
    return [MCQualityRow(n, needs[n], nan, nan, nan, nan, nan, nan, notes[n]) for n in names if n not in advantages]


def format_mc_report(rows: Sequence[Any], stats: dict[str, Any], cfg: QualityConfig, policy_dir: str) -> str:
    from creditlab.bench.learning import environment
    from creditlab.bench.mc_reference import format_mc_table

    task, options = cfg.task_spec()
    env = environment()
    return "\n".join([
        "# Credit quality against Monte-Carlo step advantages", "",
        f"Policy `{policy_dir}`, task {task} {options}, {cfg.prompts} test prompts × {cfg.group_size} samples "
        f"(temperature {cfg.temperature}, max {cfg.max_new_tokens} tokens), seed {cfg.seed}; steps: {cfg.mc_steps}.",
        f"Reference: {stats['responses']} responses ({stats['steps']} steps) of {stats['batch_responses']} "
        f"({stats['correct']} correct), K = {stats['samples_per_state']} continuations per state "
        f"({stats['continuations']} in all); mean standard error of a true step advantage "
        f"{stats['stderr_mean']:.3f} (mean |A_k| {stats['abs_advantage_mean']:.3f}). Spearman over "
        f"{stats['spearman_responses']} responses whose true advantages are not all equal; worst-step AUROC over "
        f"{stats['worst_step_responses']} responses with a negative step. MC estimators: "
        f"{cfg.estimator_mc_samples} continuations per cut ({stats['estimator_continuations']} in all).", "",
        format_mc_table(rows), "",
        "Spearman: within-response rank correlation of an estimator's mean advantage per step with the true step "
        "advantage A_k = V(s_{k+1}) - V(s_k) (0 when the estimator is constant within the response). Worst-step "
        "AUROC: P(another step gets more credit than the step with the most negative A_k), ties 1/2; 0.5 = none. "
        f"95% CI: percentile bootstrap over responses ({cfg.resamples} resamples, seed {cfg.seed}). "
        "Definitions: src/creditlab/bench/mc_reference.py.", "",
        f"git {env['git_commit'][:12]}{' (dirty)' if env['git_dirty'] else ''}, torch {env['torch']}, "
        f"transformers {env['transformers']}, creditlab {env['creditlab']}, python {env['python']}.", ""])


def batch_stats(batch: RolloutBatch, scores: Sequence[Any], before: Tensor, wrong: Tensor) -> dict[str, Any]:
    erroneous = sum(s.first_error is not None for s in scores)
    used = before.any(1) & wrong.any(1)
    return {"responses": batch.B, "correct": sum(s.correct for s in scores), "with_wrong_step": erroneous,
            "used": int(used.sum()), "dropped_nothing_before": int((wrong.any(1) & ~before.any(1)).sum()),
            "dropped_no_token": int(erroneous - int(wrong.any(1).sum())),
            "before_tokens": int(before[used].sum()), "wrong_tokens": int(wrong[used].sum())}


# ------------------------------------------------------------------------------------------------ output
def write_charts(out: Path, boots: dict[str, Tensor], rows: Sequence[QualityRow]) -> None:
    """auroc.png: within-response AUROC per estimator, error bars = bootstrap standard error (the bar is the
    mean of the bootstrap means); auroc_pooled.png: the pooled AUROC (no error bars)."""
    from creditlab.viz.plots import bar_chart

    if boots:
        bar_chart({k: v.tolist() for k, v in boots.items()}, out / "auroc.png",
                  title="within-response AUROC, bootstrap means", ylabel="AUROC (0.5 = none)")
    pooled = {r.estimator: [r.pooled] for r in rows if math.isfinite(r.pooled)}
    if pooled:
        bar_chart(pooled, out / "auroc_pooled.png", title="first-error localisation, pooled",
                  ylabel="AUROC (0.5 = none)")


def _f(x: float) -> str:
    return f"{x:.3f}" if math.isfinite(x) else "—"


def format_table(rows: Sequence[QualityRow]) -> str:
    lines = ["| estimator | needs | within-response AUROC | 95% CI | pooled AUROC | 95% CI | note |",
             "|---|---|---:|---|---:|---|---|"]
    for r in rows:
        lines.append(f"| {r.estimator} | {r.needs} | {_f(r.within)} | [{_f(r.within_lo)}, {_f(r.within_hi)}] | "
                     f"{_f(r.pooled)} | [{_f(r.pooled_lo)}, {_f(r.pooled_hi)}] | {r.note} |")
    return "\n".join(lines)


def format_report(rows: Sequence[QualityRow], stats: dict[str, Any], cfg: QualityConfig, policy_dir: str) -> str:
    from creditlab.bench.learning import environment

    TASK, TASK_KWARGS = cfg.task_spec()
    env = environment()
    return "\n".join([
        "# Credit quality: does the advantage point at the first wrong step?", "",
        f"Policy `{policy_dir}`, task {TASK} {TASK_KWARGS}, {cfg.prompts} test prompts × {cfg.group_size} samples "
        f"(temperature {cfg.temperature}, max {cfg.max_new_tokens} tokens), seed {cfg.seed}.",
        f"{stats['responses']} responses, {stats['correct']} correct, {stats['with_wrong_step']} with a wrong step; "
        f"{stats['used']} used ({stats['before_tokens']} before-tokens, {stats['wrong_tokens']} first-wrong-step "
        f"tokens); left out: {stats['dropped_nothing_before']} whose first wrong step starts the response, "
        f"{stats['dropped_no_token']} whose first wrong step has no token.", "",
        format_table(rows), "",
        "within-response AUROC: per response, P(a token before the first wrong step gets a higher advantage than a "
        "token of the first wrong step), ties 1/2, averaged over responses; 0.5 = no localisation (exact for "
        "response-level estimators), 1 = perfect. pooled AUROC: the same probability over the pooled tokens of "
        "all used responses (pairs across responses included). 95% CI: percentile bootstrap over responses "
        f"({cfg.resamples} resamples, seed {cfg.seed}). Charts: auroc.png (error bars: bootstrap standard error), "
        "auroc_pooled.png. Definitions: docs/_fragments/bench.md.", "",
        f"git {env['git_commit'][:12]}{' (dirty)' if env['git_dirty'] else ''}, torch {env['torch']}, "
        f"transformers {env['transformers']}, creditlab {env['creditlab']}, python {env['python']}.", ""])


def add_quality_args(parser: argparse.ArgumentParser) -> None:
    from creditlab.train.config import add_dataclass_args

    add_dataclass_args(parser, QualityConfig)


def run_quality_cli(args: argparse.Namespace) -> int:
    """`creditlab credit-quality`: run and print the table."""
    from creditlab.train.config import dataclass_from_args

    cfg = dataclass_from_args(QualityConfig, args)
    summary = run_quality(cfg)
    print((Path(cfg.out) / "report.md").read_text())
    charts = "spearman.png" if cfg.reference == "mc" else "auroc.png, auroc_pooled.png"
    print(f"wrote {cfg.out}/report.md, {charts}, quality.json ({summary['seconds']:.0f} s)")
    return 0
