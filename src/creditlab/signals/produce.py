"""Signal producers: fill the optional `RolloutBatch` fields an estimator `needs`, from what a run has.

The trainer calls `produce_signals(batch, needs, ctx)` after scoring; each needed field that the rollout did
not already fill is produced here, or a `ValueError` names the field and says that nothing can produce it
in this setting. Producers are plain functions keyed by field name: adding one is adding an entry to
`PRODUCERS`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from creditlab.batch import FIELDS, RolloutBatch
from creditlab.signals.prm import oracle_step_rewards
from creditlab.signals.rewards import token_rewards
from creditlab.signals.turns import single_turn_answer_probs, single_turn_producer


@dataclass
class SignalContext:
    """What producers may read besides the batch: the policy (tokenizer), the problems and their scores.

    ``task`` scores continuations (Monte-Carlo producers), ``seed`` seeds any sampling a producer does, ``cfg`` is
    the run's `TrainConfig` (None outside the trainer), ``step`` the step being run. ``counters`` collects work done
    beyond the policy's own samples (``count("samples/extra", n)``): the trainer logs them and adds
    ``samples/extra`` to its sample count.
    """

    policy: Any
    problems: Sequence[Any] = ()
    scores: Sequence[Any] = ()
    extra: dict[str, float] = field(default_factory=dict)
    task: Any = None
    seed: int = 0
    cfg: Any = None
    counters: dict[str, float] = field(default_factory=dict)
    step: int = 0  # the trainer's step being run (1-based; 0 outside the trainer)

    def count(self, name: str, n: float) -> None:
        """Add `n` to counter `name` (e.g. ``samples/extra``, ``tokens/extra``)."""
        self.counters[name] = self.counters.get(name, 0.0) + float(n)

    def metrics(self, batch: RolloutBatch) -> dict[str, float]:
        """Run-level signal diagnostics logged every step (semantic entropy for every run, as HICRA asks)."""
        out = {**self.extra, **self.counters}
        if batch.texts is not None:
            from creditlab.signals.strategic import semantic_entropy

            out["signals/semantic_entropy"] = float(semantic_entropy(batch.texts))
        return out


def oracle_steps(batch: RolloutBatch, ctx: SignalContext) -> dict[str, Tensor]:
    """step_ids [B,T] and step_labels [B,S] from the task's own verifier (Score.step_spans / step_labels),
    with tokens assigned to steps by `creditlab.signals.steps` (works with any tokenizer)."""
    from creditlab.signals.steps import Segmenter

    seg = Segmenter("task").segment(batch, ctx)
    labels = [tuple(getattr(s, "step_labels", None) or ()) for s in ctx.scores]
    S = max([len(x) for x in labels] + [seg.num_steps])
    step_labels = torch.full((batch.B, S), -1, dtype=torch.long)
    for b, lab in enumerate(labels):
        if lab:
            step_labels[b, : len(lab)] = torch.tensor(lab, dtype=torch.long)
    return {"step_ids": seg.step_ids, "step_labels": step_labels}


def step_split_mode(ctx: SignalContext) -> str:
    """The run's step rule (`RunConfig.step_split`); "auto": the task verifier's steps when every score has
    ``step_spans`` (arith_chain), else one step per non-empty line (what TRL's and verl's step splitters default to)."""
    mode = getattr(getattr(ctx.cfg, "run", None), "step_split", "auto")
    if mode != "auto":
        return mode
    has_spans = bool(ctx.scores) and all(getattr(s, "step_spans", None) is not None for s in ctx.scores)
    return "task" if has_spans else "newline"


def run_steps(batch: RolloutBatch, ctx: SignalContext) -> dict[str, Tensor]:
    """step_ids [B,T] under the run's step rule (`step_split_mode`); the oracle's labels come with them when that
    rule is the task's own (so step_ids and step_labels always describe the same steps)."""
    from creditlab.signals.steps import Segmenter

    mode = step_split_mode(ctx)
    if mode == "task":
        return oracle_steps(batch, ctx)
    return {"step_ids": Segmenter(mode).segment(batch, ctx).step_ids}


def _verifier_steps_only(field: str, producer: Callable[[RolloutBatch, SignalContext], dict[str, Tensor]]
                         ) -> Callable[[RolloutBatch, SignalContext], dict[str, Tensor]]:
    """`producer` (a field the task verifier gives per step of its own) under a check that the run's steps are the
    verifier's: step_ids from another rule would be paired with labels or rewards of other steps."""

    def produce(batch: RolloutBatch, ctx: SignalContext) -> dict[str, Tensor]:
        mode = step_split_mode(ctx)
        if mode != "task":
            raise ValueError(f"{field} from the task verifier belong to the verifier's own steps, but the run's steps "
                             f"are {mode!r} (--step-split, or a task without step spans); use --step-split task with a "
                             f"task that labels steps (e.g. arith_chain), or a step scorer (--scorer)")
        return producer(batch, ctx)

    produce.__doc__ = producer.__doc__
    return produce


def default_strata(batch: RolloutBatch, ctx: SignalContext) -> dict[str, Tensor]:
    """Stratum = number of reasoning steps (lines) in the response: a structural property, like the number
    of search calls in Stratified GRPO's setting. Uses the task's step spans when it has them."""
    counts = []
    for b in range(batch.B):
        spans = getattr(ctx.scores[b], "step_spans", None) if ctx.scores else None
        if spans is not None:
            counts.append(len(spans))
        else:
            text = batch.texts[b] if batch.texts is not None else ""
            counts.append(sum(1 for line in text.splitlines() if line.strip()))
    # cap so that rare long responses share one stratum instead of forming singleton strata
    return {"strata": torch.tensor(counts, dtype=torch.long).clamp_max(8)}


def planning_tokens(batch: RolloutBatch, ctx: SignalContext) -> dict[str, Tensor]:
    """planning_mask [B,T] from the default strategic-gram list, matched on decoded text (HICRA)."""
    from creditlab.signals.strategic import planning_mask_from_ids

    return {"planning_mask": planning_mask_from_ids(batch.response_ids, batch.response_mask, ctx.policy.tokenizer)}


PRODUCERS: dict[str, Callable[[RolloutBatch, SignalContext], dict[str, Tensor]]] = {
    "step_ids": run_steps,
    "step_labels": _verifier_steps_only("step_labels", oracle_steps),
    "strata": default_strata,
    "planning_mask": planning_tokens,
    # the task verifier's labels; other scorers fill step_rewards in signals.prm.produce_step_signals
    "step_rewards": _verifier_steps_only("step_rewards", oracle_step_rewards),
    **dict.fromkeys(("turn_ids", "turn_rewards", "anchor_states"), single_turn_producer),  # one-turn episodes
    "answer_probs": single_turn_answer_probs,  # IGPO on single-turn rows (env tasks: the agent component)
    "token_rewards": token_rewards,  # outcome on the last token (minus a KL reward with --critic-kl-in-reward)
}


def produce_signals(batch: RolloutBatch, needs: Sequence[str], ctx: SignalContext) -> RolloutBatch:
    """Fill every field in `needs` that the batch lacks; raise naming the field if nothing can produce it."""
    for name in needs:
        if getattr(batch, name) is not None:
            continue
        producer = PRODUCERS.get(name)
        if producer is None:
            raise ValueError(f"the estimator needs RolloutBatch.{name} ({FIELDS[name].doc}), produced by "
                             f"{FIELDS[name].producer}, which this trainer cannot run in this setting")
        batch = batch.replace(**{k: v for k, v in producer(batch, ctx).items() if getattr(batch, k) is None})
    return batch
