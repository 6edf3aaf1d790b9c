"""Implicit PRM: step rewards β·log(π_φ/π_ref) from a second model trained online (PRIME, OPRL/iStar).

    scorer = get_scorer("implicit", mode="prime")          # π_φ and π_ref start as copies of ctx.policy.model
    batch = produce_step_signals(batch, scorer, ctx)       # step_ids, step_rewards, prm_logprobs, ref_logprobs
    logs = scorer.update(batch, ctx)                       # one optimizer step of π_φ on this batch

Token reward (methods.md §8.4, §6.4): q_t = log π_φ(y_t|·) − log π_ref(y_t|·) on valid tokens, 0 elsewhere.
Step reward ρ_k = β Σ_{t ∈ step k} q_t ([B,S]; tokens in no step, e.g. separators, are left out of every step).

The denominator π_ref (``reference=``) follows each paper's reference code:

- ``"frozen"`` (default for ``mode="prime"``): a frozen copy of the initial π_φ (PRIME's ``ref_type: freeze``).
  At initialisation π_φ = π_ref, so q ≡ 0 and there is no process signal until the PRM has trained.
- ``"old_policy"`` (default for ``mode="oprl"``): the rollout (old) policy's log-probs, ``batch.logprobs``. iStar's
  script sets ``ref_path=null``, and its ``dp_rm.py`` then divides by the batch's ``old_log_probs`` in both the
  step reward and the PRM loss. No reference model is kept and ``ref_logprobs`` is not produced. As verl's actor
  does before the reward model runs, the scorer recomputes ``batch.logprobs`` with a full forward of the policy
  (`old_policy_logprobs`, at the sampling temperature) and replaces the sampler's, so π_φ = π_old gives q ≡ 0
  exactly at initialisation; π_φ is scored at this scorer's ``temperature`` (1.0 by default, as iStar's reward
  model, which applies no temperature).

Online update of π_φ (``update``), one optimizer step per call:

- ``mode="prime"`` (PRIME): binary cross-entropy of σ(β Σ_t q_t) against the outcome label (``Score.correct``,
  or the reward in [0,1] as a soft label when the context has no scores). Defaults grad-clip 1.0.
- ``mode="oprl"`` (OPRL/iStar "eto" loss): Q_traj = mean over the response's steps of the step rewards (a row with
  no step counts as one step: β Σ_t q_t); every (successful, failed) pair of one group contributes
  −log σ(Q_succ − Q_fail), averaged over **all** pairs (the code's choice, not the docstring's one-to-one
  pairing). A batch with no such pair makes no step. Defaults grad-clip 10.

Both default to β = 0.05 and lr 1e-6 (AdamW, no weight decay). The PRM runs in eval mode throughout (no dropout
in the reward). The PRM shares the policy's tokenizer (it is initialised from the policy). When the trainer
already filled ``ref_logprobs`` (its own reference model), `produce_step_signals` keeps the trainer's field; the
step rewards always use this scorer's own reference.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as nnf
from torch import Tensor

from creditlab.batch import RolloutBatch
from creditlab.signals.prm import Scorer, register_scorer
from creditlab.signals.steps import n_steps_of, step_sum

MODES = ("prime", "oprl")
REFERENCES = ("frozen", "old_policy")


def implicit_q(prm_logp: Tensor, ref_logp: Tensor, mask: Tensor) -> Tensor:
    """q_t = log π_φ − log π_ref on valid tokens, exactly 0 elsewhere: [B,T]."""
    return torch.where(mask, prm_logp - ref_logp, torch.zeros_like(prm_logp))


def implicit_step_rewards(q: Tensor, step_ids: Tensor, beta: float, S: int) -> Tensor:
    """ρ_k = β Σ_{t ∈ step k} q_t: [B,T] -> [B,S] (0 in padded step columns)."""
    return beta * step_sum(q, step_ids, S)


def prime_loss(q: Tensor, labels: Tensor, beta: float) -> Tensor:
    """PRIME PRM loss: mean_b BCE(σ(β Σ_t q_{b,t}), label_b); labels in [0,1] ([B] float)."""
    return nnf.binary_cross_entropy_with_logits(beta * q.sum(dim=1), labels.to(q.dtype))


def trajectory_q(step_rewards: Tensor, n_steps: Tensor, whole: Tensor) -> Tensor:
    """Q_traj [B] = mean of the row's real step rewards; ``whole`` [B] (β Σ_t q_t) for a row with no steps."""
    total = step_rewards.sum(dim=1)
    return torch.where(n_steps > 0, total / n_steps.clamp_min(1).to(total.dtype), whole)


def oprl_loss(traj_q: Tensor, success: Tensor, group_ids: Tensor) -> tuple[Tensor, int]:
    """Trajectory DPO: mean over all (success i, failure j) pairs of one group of −log σ(Q_i − Q_j).

    Returns (loss, number of pairs); with no pair the loss is a graph-connected 0.
    """
    pair = (group_ids[:, None] == group_ids[None, :]) & success[:, None] & ~success[None, :]  # [B, B] i wins
    n = int(pair.sum())
    if n == 0:
        return traj_q.sum() * 0.0, 0
    margin = traj_q[:, None] - traj_q[None, :]  # [B, B]
    return nnf.softplus(-margin)[pair].mean(), n


def _unwrap(model: Any) -> torch.nn.Module:
    """A `Policy` -> its model (a bare HF model has a `.model` too, its backbone: only unwrap a policy)."""
    return model.model if hasattr(model, "tokenizer") and hasattr(model, "format_prompt") else model


@register_scorer("implicit")
class ImplicitPRMScorer(Scorer):
    """Implicit PRM scorer, trained online (see the module docstring).

    Args:
        model: π_φ's initial weights: a `Policy`, a model, or a name for `load_policy`; None copies
            ``ctx.policy.model`` at the first call. The scorer trains its own deep copy.
        ref_model: the frozen reference (default: a frozen copy of the initial π_φ); only with reference="frozen".
        mode: "prime" | "oprl" (the ``update`` loss); beta: β; lr: AdamW learning rate; grad_clip: max grad norm
            (default 1.0 for prime, 10.0 for oprl); temperature: scoring temperature of the models.
        reference: the denominator π_ref: "frozen" (a frozen model) or "old_policy" (``batch.logprobs``);
            None picks the mode's reference-code choice: "frozen" for prime, "old_policy" for oprl.
        steps, pattern: step split rule used when the batch has no ``step_ids``.
    """

    name = "implicit"
    scale = (-math.inf, math.inf)  # unbounded; neutral (no signal) is 0

    def __init__(self, model: Any = None, *, ref_model: Any = None, mode: str = "prime", beta: float = 0.05,
                 lr: float = 1e-6, grad_clip: float | None = None, temperature: float = 1.0,
                 reference: str | None = None, steps: str = "newline", pattern: str | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown implicit PRM mode {mode!r}; valid: {list(MODES)}")
        reference = reference if reference is not None else ("frozen" if mode == "prime" else "old_policy")
        if reference not in REFERENCES:
            raise ValueError(f"unknown implicit PRM reference {reference!r}; valid: {list(REFERENCES)}")
        if reference == "old_policy" and ref_model is not None:
            raise ValueError("ref_model= needs reference='frozen' (reference='old_policy' divides by batch.logprobs)")
        super().__init__(steps, pattern)
        self.mode, self.beta, self.lr, self.temperature, self.reference = mode, beta, lr, temperature, reference
        self.grad_clip = grad_clip if grad_clip is not None else (1.0 if mode == "prime" else 10.0)
        self.prm: torch.nn.Module | None = None
        self.ref: torch.nn.Module | None = None
        self.optim: torch.optim.Optimizer | None = None
        if model is not None:
            self._init_models(model, ref_model)
        elif ref_model is not None:
            raise ValueError("ref_model= needs model= as well")

    @property
    def neutral(self) -> float:
        return 0.0

    def _init_models(self, model: Any, ref_model: Any = None) -> None:
        if isinstance(model, str):
            from creditlab.policy import load_policy

            model = load_policy(model)
        model = _unwrap(model)
        self.prm = copy.deepcopy(model).eval().requires_grad_(True)
        if self.reference == "frozen":
            ref = _unwrap(ref_model) if ref_model is not None else model
            self.ref = copy.deepcopy(ref).eval().requires_grad_(False)
        self.optim = torch.optim.AdamW(self.prm.parameters(), lr=self.lr, weight_decay=0.0)

    def _ensure(self, ctx: Any) -> None:
        if self.prm is None:
            self._init_models(ctx.policy.model)
            self._apply_pending()  # a resumed scorer: the copied architecture gets the checkpointed weights

    def logprobs(self, batch: RolloutBatch, *, grad: bool = False) -> tuple[Tensor, Tensor]:
        """(prm_logp, ref_logp), each [B,T] and 0 outside the mask; ``grad`` keeps π_φ's graph.

        ref_logp is the frozen reference's, or ``batch.logprobs`` (the old policy) with reference="old_policy".
        """
        from creditlab.rollout.hf import sequence_logprobs

        if batch.prompt_ids is None or batch.prompt_mask is None:
            raise ValueError("the implicit PRM needs RolloutBatch.prompt_ids/prompt_mask (from the rollout engine)")
        if self.reference == "old_policy" and batch.logprobs is None:
            raise ValueError("the implicit PRM with reference='old_policy' (OPRL/iStar) needs RolloutBatch.logprobs, "
                             "the rollout policy's log-probs (the rollout engine, return_logprobs=True)")
        args = (batch.prompt_ids, batch.prompt_mask, batch.response_ids, batch.response_mask)
        # One forward per row (no prompt sharing): the shared-prompt path's last bits depend on the module's
        # requires_grad state (we measured 5e-7 between a trainable and a frozen copy of one model), and
        # π_φ = π_ref at initialisation must give q ≡ 0 exactly.
        if self.reference == "old_policy":
            ref_logp = torch.where(batch.response_mask, batch.logprobs.float(), torch.zeros(()))
        else:
            with torch.no_grad():
                ref_logp, _ = sequence_logprobs(self.ref, *args, temperature=self.temperature, share_prompts=False)
        with torch.set_grad_enabled(grad):
            prm_logp, _ = sequence_logprobs(self.prm, *args, temperature=self.temperature, share_prompts=False)
        return prm_logp, ref_logp

    def _step_ids(self, batch: RolloutBatch, ctx: Any) -> Tensor:
        return batch.step_ids if batch.step_ids is not None else self.segment(batch, ctx).step_ids

    def old_policy_logprobs(self, batch: RolloutBatch, ctx: Any) -> Tensor | None:
        """reference="old_policy": the rollout policy's log-probs recomputed by the same forward as π_φ's (no grad,
        one forward per row, fp32), at the sampling temperature (`ctx.cfg.rollout.temperature`, else the scorer's),
        as verl's actor recomputes `old_log_probs` before iStar's reward model reads them. The sampler's own
        log-probs come from KV-cached decoding (and bf16 sampling on some machines), whose last bits differ from a
        full forward: iStar's batch max-normalisation would blow that noise up into O(0.1-1) step credit at
        initialisation. With a recomputed π_old and π_φ = π_old at initialisation, q ≡ 0 exactly there.
        None without a policy model in the context (then `batch.logprobs` is used as given: in TRL and verl they
        are the trainer's own recomputed old log-probs already)."""
        from creditlab.rollout.hf import sequence_logprobs

        policy = getattr(ctx, "policy", None)
        if self.reference != "old_policy" or policy is None or batch.prompt_ids is None:
            return None
        model = getattr(policy, "model", policy)
        if not isinstance(model, torch.nn.Module):  # e.g. the TRL adapter's context carries only a tokenizer
            return None
        rollout = getattr(getattr(ctx, "cfg", None), "rollout", None)
        temperature = float(getattr(rollout, "temperature", self.temperature))
        model = _unwrap(model)
        with torch.no_grad():
            logp, _ = sequence_logprobs(model, batch.prompt_ids, batch.prompt_mask, batch.response_ids,
                                        batch.response_mask, temperature=temperature, share_prompts=False)
        return torch.where(batch.response_mask, logp.float(), torch.zeros(()))

    def _fields(self, batch: RolloutBatch, ctx: Any, step_ids: Tensor) -> dict[str, Tensor]:
        self._ensure(ctx)
        old = self.old_policy_logprobs(batch, ctx)
        if old is not None:
            batch = batch.replace(logprobs=old)
        prm_logp, ref_logp = self.logprobs(batch)
        q = implicit_q(prm_logp, ref_logp, batch.response_mask)
        S = max(int(step_ids.max()) + 1 if step_ids.numel() else 0, 1)
        rewards = implicit_step_rewards(q, step_ids, self.beta, S).float()
        bad = ~torch.isfinite(rewards)
        if bool(bad.any()):
            self.count("nan_count", int(bad.sum()))
            rewards = rewards.masked_fill(bad, 0.0)
        fields = {"step_ids": step_ids, "step_rewards": rewards, "prm_logprobs": prm_logp.detach()}
        if self.reference == "frozen":  # the old policy's log-probs are batch.logprobs already
            fields["ref_logprobs"] = ref_logp
        if old is not None:  # replaces the sampler's (see `overwrites`)
            fields["logprobs"] = old
        return fields

    @property
    def overwrites(self) -> tuple[str, ...]:
        """Fields `produce_step_signals` replaces even when the batch has them: the recomputed old-policy
        log-probs (reference="old_policy"), so that the estimator's q and the PRM's loss use the same π_old."""
        return ("logprobs",) if self.reference == "old_policy" else ()

    def score_steps(self, batch: RolloutBatch, ctx: Any) -> Tensor:
        """``step_rewards [B,S]`` on ``batch.step_ids`` (or this scorer's own split when the batch has none)."""
        return self._fields(batch, ctx, self._step_ids(batch, ctx))["step_rewards"]

    def produce(self, batch: RolloutBatch, ctx: Any) -> dict[str, Tensor]:
        """step_ids, step_rewards, prm_logprobs (and ref_logprobs with a frozen reference), one forward per model."""
        return self._fields(batch, ctx, self._step_ids(batch, ctx))

    def _labels(self, batch: RolloutBatch, ctx: Any) -> Tensor:
        scores = list(getattr(ctx, "scores", ()) or ())
        if len(scores) == batch.B:
            return torch.tensor([float(s.correct) for s in scores], device=batch.response_ids.device)
        return batch.rewards.float().clamp(0.0, 1.0)

    def update(self, batch: RolloutBatch, ctx: Any) -> dict[str, float]:
        """One AdamW step of π_φ on ``batch`` with the mode's loss; returns ``implicit/*`` metrics."""
        self._ensure(ctx)
        labels = self._labels(batch, ctx)  # [B] in [0,1]
        prm_logp, ref_logp = self.logprobs(batch, grad=True)
        q = implicit_q(prm_logp, ref_logp, batch.response_mask)  # [B, T]
        whole = self.beta * q.sum(dim=1)  # [B] sequence-level implicit reward
        metrics: dict[str, float] = {}
        if self.mode == "prime":
            loss = prime_loss(q, labels, self.beta)
        else:
            step_ids = self._step_ids(batch, ctx)
            S = max(int(step_ids.max()) + 1 if step_ids.numel() else 0, 1)
            traj = trajectory_q(implicit_step_rewards(q, step_ids, self.beta, S), n_steps_of(step_ids), whole)
            loss, pairs = oprl_loss(traj, labels > 0.5, batch.group_ids)
            metrics["implicit/pairs"] = float(pairs)
            if pairs == 0:
                return {**metrics, "implicit/loss": 0.0, "implicit/grad_norm": 0.0}
        self.optim.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.prm.parameters(), self.grad_clip)
        self.optim.step()
        right, wrong = labels > 0.5, labels <= 0.5
        whole = whole.detach()
        gap = whole[right].mean() - whole[wrong].mean() if bool(right.any() and wrong.any()) else whole.sum() * 0
        return {**metrics, "implicit/loss": loss.item(), "implicit/grad_norm": float(grad_norm),
                "implicit/reward_gap_before": gap.item()}

    # ------------------------------------------------------------------ checkpointing (exact resume)
    def state_dict(self) -> dict[str, Any]:
        """π_φ, π_ref (None with reference="old_policy") and π_φ's optimizer, tensors and plain values;
        ``initialized`` is False before the first call has copied the policy."""
        pending = getattr(self, "_pending", None)
        if pending is not None:
            return pending
        if self.prm is None:
            return {"initialized": False}
        return {"initialized": True, "prm": self.prm.state_dict(),
                "ref": self.ref.state_dict() if self.ref is not None else None, "optim": self.optim.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`. A scorer that copies the policy lazily keeps the state until its first call
        (the copy gives the architecture; the checkpoint gives the weights)."""
        if "initialized" not in state:
            raise ValueError("the checkpoint holds no implicit PRM state (written before creditlab saved it?): "
                             "the online PRM cannot be resumed exactly")
        self._pending = dict(state) if state["initialized"] else None
        if self.prm is not None:
            self._apply_pending()

    def _apply_pending(self) -> None:
        state = getattr(self, "_pending", None)
        if state is None:
            return
        if (state.get("ref") is None) != (self.ref is None):
            raise ValueError(f"the checkpoint's implicit PRM {'has no' if state.get('ref') is None else 'has a'} "
                             f"frozen reference, this one uses reference={self.reference!r}")
        self.prm.load_state_dict(state["prm"])
        if self.ref is not None:
            self.ref.load_state_dict(state["ref"])
        self.optim.load_state_dict(state["optim"])
        self._pending = None
