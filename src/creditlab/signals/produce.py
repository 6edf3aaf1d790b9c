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
from creditlab.signals.turns import single_turn_answer_probs, single_turn_producer


@dataclass
class SignalContext:
    """What producers may read besides the batch: the policy (tokenizer), the problems and their scores.

    ``task`` scores continuations (Monte-Carlo producers), ``seed`` seeds any sampling a producer does, ``cfg`` is
    the run's `TrainConfig` (None outside the trainer). ``counters`` collects work done beyond the policy's own
    samples (``count("samples/extra", n)``): the trainer logs them and adds ``samples/extra`` to its sample count.
    """

    policy: Any
    problems: Sequence[Any] = ()
    scores: Sequence[Any] = ()
    extra: dict[str, float] = field(default_factory=dict)
    task: Any = None
    seed: int = 0
    cfg: Any = None
    counters: dict[str, float] = field(default_factory=dict)

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
    "step_ids": oracle_steps,
    "step_labels": oracle_steps,
    "strata": default_strata,
    "planning_mask": planning_tokens,
    "step_rewards": oracle_step_rewards,  # task verifier labels; other scorers: signals.prm.produce_step_signals
    **dict.fromkeys(("turn_ids", "turn_rewards", "anchor_states"), single_turn_producer),  # one-turn episodes
    "answer_probs": single_turn_answer_probs,  # IGPO on single-turn rows (env tasks: the agent component)
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
