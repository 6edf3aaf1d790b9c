"""The Monte-Carlo family's trainer parts: a component that samples `mc_values` inside the step, and run checks.

`build_mc_component` (a `FACTORIES` entry through `components.mc_component`) returns an `MCComponent` when the
estimator reads `mc_values`. Its `produce` places the estimator's cuts (`creditlab.signals.mc.CUT_RULES`, with the
estimator's hyper-parameters), samples `--mc-samples` continuations per distinct cut state with the rollout's sampling
settings and the policy as it is before the update (on-policy values), and fills `mc_cuts` / `mc_values`. The
continuations are charged through the step's `SignalContext` (`samples/extra`, `tokens/extra`, `mc/prefixes`, ...),
so learning curves plotted against samples include them; `time/mc` is the time spent here (part of `time/signals`).

No state: the continuations are seeded by the step seed (`SignalContext.seed`), so a resumed run samples the same
continuations as an uninterrupted one and the checkpoint holds nothing for this component.
"""

from __future__ import annotations

import time
from typing import Any

from creditlab.batch import RolloutBatch
from creditlab.signals.produce import SignalContext
from creditlab.train.components import Component


class MCComponent(Component):
    """Fills `mc_cuts` / `mc_values` for one estimator (see the module docstring)."""

    name = "mc"

    def __init__(self, estimator: str, hyperparams: dict[str, Any], mc: Any) -> None:
        self.estimator, self.hyperparams, self.mc = estimator, hyperparams, mc
        self._metrics: dict[str, float] = {}

    def produce(self, batch: RolloutBatch, ctx: SignalContext) -> RolloutBatch:
        if batch.mc_values is not None:
            return batch
        from creditlab.rollout.hf import SamplingConfig
        from creditlab.signals.mc import produce_mc

        t0 = time.perf_counter()
        r = ctx.cfg.rollout
        sampling = SamplingConfig(temperature=r.temperature, top_p=r.top_p, max_new_tokens=r.max_new_tokens,
                                  bf16=r.bf16)
        out, est = produce_mc(batch, ctx, self.estimator, self.hyperparams, samples=self.mc.mc_samples,
                              sampling=sampling, unfinished_penalty=self.mc.mc_unfinished_penalty,
                              max_rows=self.mc.mc_max_rows)
        valid = est.cuts >= 0
        sampled = valid & (est.counts > 0)
        n = max(int(sampled.sum()), 1)
        self._metrics = {"time/mc": time.perf_counter() - t0,
                         "mc/cuts_per_response": float(valid.sum()) / max(batch.B, 1),
                         "mc/value_mean": float(est.values[sampled].sum()) / n,
                         "mc/stderr_mean": float(est.stderr[sampled].sum()) / n}
        return out

    def metrics(self) -> dict[str, float]:
        out, self._metrics = self._metrics, {}
        return out


def build_mc_component(cfg: Any, spec: Any, policy: Any, task: Any) -> Component | None:
    """An `MCComponent` when the estimator reads `mc_values`; checks the run's tree options against the estimator."""
    mc = cfg.mc
    mc.validate()
    if "tree_node" in spec.needs and mc.rollout != "tree":
        raise ValueError(f"--estimator {spec.name} trains on segment trees: pass --rollout tree "
                         "(with --tree-fanout and --tree-segment-len)")
    hyper = {**spec.defaults, **cfg.estimator_kwargs()}
    if mc.rollout == "tree" and "segment_len" in hyper and hyper["segment_len"] != mc.tree_segment_len:
        raise ValueError(f"--estimator {spec.name} reads the tree with segment_len={hyper['segment_len']} but the "
                         f"sampler uses --tree-segment-len {mc.tree_segment_len}: pass --estimator-kwargs "
                         f"'{{\"segment_len\": {mc.tree_segment_len}}}'")
    if "mc_values" not in spec.needs:
        return None
    return MCComponent(spec.name, hyper, mc)
