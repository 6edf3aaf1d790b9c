"""The rollout batch: every field, its shape and its meaning, written once.

Shape letters (used everywhere in creditlab):
    B  responses (rows) in the batch        T  padded response length (token columns)
    S  padded number of steps/segments      P  padded prompt length
    N  padded number of turns (multi-turn agent rows; independent of S so that steps inside turns can coexist)
    C  padded number of Monte-Carlo cut points (response prefixes whose value was estimated)
    K  padded number of cut points (truncate-and-answer budgets or step boundaries)

A `RolloutBatch` is what estimators read; a `Credit` is what they return. Optional fields are filled by
the signal producers named in `FIELDS`; an estimator declares the ones it reads in `@estimator(needs=...)`
and the registry checks them before the call.

Padding convention: positions outside `response_mask` (and step columns beyond a row's last step) may hold
any *finite* value (producers write 0); estimators never read them. `validate()` rejects NaN/inf anywhere in
float fields because a NaN in padding is almost always a bug upstream that would surface later.

Magnitudes: float fields must stay within |x| <= MAX_ABS (1e15). Estimators compute in float64 and return float32
(largest 3.4e38); they sum fields over up to T tokens and scale them by coefficients, so an input near the float32
limit (rewards of 3e38, float64 rewards of 1e200) would overflow the output. Token and step ids inside the
response are non-negative and below MAX_ID (2^31; vocabulary indices and step numbers never come near it).
A batch may have T = 0 token columns (every response empty): it validates, and every estimator returns
advantages of shape [B, 0].
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

Kind = Literal["long", "bool", "float", "list"]


@dataclass(frozen=True)
class FieldSpec:
    """Declared shape, dtype kind, meaning and producer of one batch field."""

    shape: tuple[str, ...]  # letters from the module docstring; "list" fields use ("B",)
    kind: Kind
    doc: str
    producer: str  # what fills the field (named in the error when an estimator needs it)


FIELDS: dict[str, FieldSpec] = {
    # ---- required ----
    "response_ids": FieldSpec(("B", "T"), "long", "sampled response token ids, prompt excluded, EOS included",
                              "the rollout engine (creditlab.rollout.hf.generate)"),
    "response_mask": FieldSpec(("B", "T"), "bool", "True on valid response tokens, False on padding "
                               "(and on observation tokens of multi-turn rows)", "the rollout engine"),
    "group_ids": FieldSpec(("B",), "long", "group key: responses to one prompt share an id; groups may be "
                           "ragged and rows of a group need not be contiguous", "the rollout engine"),
    "rewards": FieldSpec(("B",), "float", "scalar outcome reward R_b of each response",
                         "a task verifier (creditlab.tasks)"),
    # ---- optional ----
    "prompt_ids": FieldSpec(("B", "P"), "long", "prompt token ids, left-padded", "the rollout engine"),
    "prompt_mask": FieldSpec(("B", "P"), "bool", "True on valid prompt tokens", "the rollout engine"),
    "logprobs": FieldSpec(("B", "T"), "float", "log-prob of each sampled token under the behaviour policy, "
                          "recomputed by the trainer", "the rollout engine (return_logprobs=True)"),
    "ref_logprobs": FieldSpec(("B", "T"), "float", "log-prob of each sampled token under the reference model",
                              "the trainer's reference forward pass"),
    "entropies": FieldSpec(("B", "T"), "float", "entropy (nats) of the policy's next-token distribution",
                           "the rollout engine (return_entropies=True) / creditlab.signals.entropy"),
    "certainty": FieldSpec(("B", "T"), "float", "self-certainty logsumexp(logits) - mean(logits) per token",
                           "the rollout engine / creditlab.signals.entropy"),
    "token_logits": FieldSpec(("B", "T"), "float", "raw logit of the sampled token",
                              "the rollout engine / creditlab.signals.entropy"),
    "values": FieldSpec(("B", "T"), "float", "critic value V_t of the state before token t", "a critic"),
    "q_values": FieldSpec(("B", "T"), "float", "critic Q(s, a) of the action (turn) that token t belongs to, "
                          "written on each of its tokens", "an utterance-level critic (creditlab.train.turn_critic)"),
    "token_rewards": FieldSpec(("B", "T"), "float", "token-level rewards r_t (outcome on the last valid "
                               "token, optionally minus a per-token KL penalty)",
                               "creditlab.signals.rewards.outcome_to_token_rewards"),
    "step_ids": FieldSpec(("B", "T"), "long", "step/segment index of each token in 0..S-1; -1 on tokens "
                          "outside any step (always -1 outside response_mask)", "creditlab.signals.steps"),
    "step_rewards": FieldSpec(("B", "S"), "float", "one score per step from a PRM, judge or verifier",
                              "a step scorer (creditlab.signals.prm)"),
    "step_labels": FieldSpec(("B", "S"), "long", "oracle step correctness: 1 right, 0 wrong, -1 no label",
                             "a task with oracle step labels (arith_chain)"),
    "mc_values": FieldSpec(("B", "C"), "float", "Monte-Carlo value estimate (mean continuation reward) of the "
                           "state prompt + response[:mc_cuts] in the same column; 0 on padding columns",
                           "creditlab.signals.mc (continuations from prefixes)"),
    "mc_cuts": FieldSpec(("B", "C"), "long", "response prefix length (token columns; 0 = the prompt alone) of the "
                         "state whose value mc_values holds in the same column; -1 on padding columns, which come "
                         "last; strictly increasing; inside the row's response",
                         "creditlab.signals.mc (a cut rule per estimator)"),
    "tree_node": FieldSpec(("B", "T"), "long", "id of the segment-tree node each response token was sampled in: "
                           "rows that share an id share that segment and every segment before it",
                           "creditlab.rollout.tree (--rollout tree)"),
    "planning_mask": FieldSpec(("B", "T"), "bool", "True on planning tokens (inside a strategic gram)",
                               "creditlab.signals.strategic (strategic-gram detector)"),
    "prm_logprobs": FieldSpec(("B", "T"), "float", "log-prob of each sampled token under an implicit PRM",
                              "creditlab.signals.implicit (PRIME / OPRL implicit PRM)"),
    "attn_fai": FieldSpec(("B", "T"), "float", "future attention influence per response token",
                          "creditlab.signals.attention"),
    "attn_waad": FieldSpec(("B", "T"), "float", "windowed average attention distance per response token",
                           "creditlab.signals.attention"),
    "punct_mask": FieldSpec(("B", "T"), "bool", "True on response tokens whose decoded text is only punctuation "
                            "and/or whitespace (to log how much attention-selected credit lands on them)",
                            "creditlab.signals.attention (punctuation_mask)"),
    "cut_lens": FieldSpec(("B", "K"), "long", "truncate-and-answer cut points: number of response tokens kept "
                          "before the answer cue at cut k (ascending; a value >= the response length means the "
                          "whole response); -1 pads unused columns", "creditlab.signals.budget"),
    "cut_scores": FieldSpec(("B", "K"), "float", "mean task score of the answers sampled after cut k (0 in "
                            "padding columns)", "creditlab.signals.budget"),
    "think_budget": FieldSpec(("B",), "long", "token budget stated in the response's prompt (HBPO budget-"
                              "prefixed prompts)", "creditlab.signals.budget.BudgetPrefixRollout"),
    "correct": FieldSpec(("B",), "bool", "the task verifier's verdict (Score.correct) for each response",
                         "a task verifier (creditlab.tasks)"),
    "turn_ids": FieldSpec(("B", "T"), "long", "turn index of each token in multi-turn rows; -1 outside",
                          "a multi-turn environment"),
    "turn_rewards": FieldSpec(("B", "N"), "float", "environment reward of each turn of a multi-turn row, "
                              "invalid-action penalties included (rewards = their sum for creditlab's envs); "
                              "0 beyond the row's last turn", "the multi-turn rollout (creditlab.rollout.multiturn)"),
    "anchor_states": FieldSpec(("B", "N"), "long", "signed 64-bit hash of the canonical environment state "
                               "(no history) each turn starts from: GiGPO's anchor state; 0 beyond the last turn",
                               "the multi-turn rollout (creditlab.rollout.multiturn)"),
    "answer_probs": FieldSpec(("B", "N"), "float", "policy probability of the ground-truth answer (exp of the "
                              "mean token log-prob, teacher-forced) given the context before turn n (IGPO)",
                              "creditlab.signals.info_gain (one extra forward per turn)"),
    "traj_ids": FieldSpec(("B",), "long", "trajectory id of each row when one row is one agent step",
                          "an agent environment"),
    "anchor_obs": FieldSpec(("B",), "long", "hash of the canonical environment state a row starts from",
                            "an agent environment"),
    "strata": FieldSpec(("B",), "long", "stratum label of each response (e.g. number of tool calls)",
                        "a stratum function (creditlab.signals.strata)"),
    "texts": FieldSpec(("B",), "list", "decoded response text of each row", "the rollout engine"),
}

REQUIRED = ("response_ids", "response_mask", "group_ids", "rewards")
MAX_ABS = 1e15  # largest |value| accepted in a float field (see the module docstring)
MAX_ID = 2**31  # token ids and step ids inside the response lie in [0, MAX_ID)
_DTYPES: dict[str, tuple[torch.dtype, ...]] = {
    "long": (torch.int64,),
    "bool": (torch.bool,),
    "float": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
}


@dataclass
class RolloutBatch:
    """A batch of B responses. See `FIELDS` for every field's shape, meaning and producer."""

    response_ids: Tensor
    response_mask: Tensor
    group_ids: Tensor
    rewards: Tensor
    prompt_ids: Tensor | None = None
    prompt_mask: Tensor | None = None
    logprobs: Tensor | None = None
    ref_logprobs: Tensor | None = None
    entropies: Tensor | None = None
    certainty: Tensor | None = None
    token_logits: Tensor | None = None
    values: Tensor | None = None
    q_values: Tensor | None = None
    token_rewards: Tensor | None = None
    step_ids: Tensor | None = None
    step_rewards: Tensor | None = None
    step_labels: Tensor | None = None
    mc_values: Tensor | None = None
    mc_cuts: Tensor | None = None
    tree_node: Tensor | None = None
    planning_mask: Tensor | None = None
    prm_logprobs: Tensor | None = None
    attn_fai: Tensor | None = None
    attn_waad: Tensor | None = None
    punct_mask: Tensor | None = None
    cut_lens: Tensor | None = None
    cut_scores: Tensor | None = None
    think_budget: Tensor | None = None
    correct: Tensor | None = None
    turn_ids: Tensor | None = None
    turn_rewards: Tensor | None = None
    anchor_states: Tensor | None = None
    answer_probs: Tensor | None = None
    traj_ids: Tensor | None = None
    anchor_obs: Tensor | None = None
    strata: Tensor | None = None
    texts: list[str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # free-form, never read by estimators

    @property
    def B(self) -> int:  # noqa: N802 - the shape letter is the name
        return int(self.response_ids.shape[0])

    @property
    def T(self) -> int:  # noqa: N802
        return int(self.response_ids.shape[1])

    def replace(self, **changes: Any) -> RolloutBatch:
        """A copy with some fields replaced (tensors are shared, not cloned)."""
        return dataclasses.replace(self, **changes)

    def select(self, index: Tensor) -> RolloutBatch:
        """Rows `index` (a [b] long tensor) of every per-row field."""
        out: dict[str, Any] = {}
        for name in FIELDS:
            v = getattr(self, name)
            if v is None:
                out[name] = None
            elif isinstance(v, list):
                out[name] = [v[i] for i in index.tolist()]
            else:
                out[name] = v[index.to(v.device)]
        return RolloutBatch(**out, meta=dict(self.meta))

    def to(self, device: torch.device | str) -> RolloutBatch:
        return self.replace(**{n: getattr(self, n).to(device) for n in FIELDS
                               if isinstance(getattr(self, n), Tensor)})

    def present(self) -> list[str]:
        """Names of the fields that are set."""
        return [n for n in FIELDS if getattr(self, n) is not None]

    def validate(self) -> RolloutBatch:
        """Check every set field's type, dtype, shape and finiteness; raise `ValueError` naming the field.

        Returns the batch itself so that calls can be chained.
        """
        for name in REQUIRED:
            if getattr(self, name) is None:
                raise ValueError(f"RolloutBatch.{name} is required ({FIELDS[name].doc}) but is None")
        ids = self.response_ids
        if not isinstance(ids, Tensor) or ids.dim() != 2:
            raise ValueError(f"RolloutBatch.response_ids must be a 2-D [B,T] tensor, got {_describe(ids)}")
        sizes = {"B": ids.shape[0], "T": ids.shape[1]}
        sources = {"B": "response_ids", "T": "response_ids"}
        if sizes["B"] == 0:
            raise ValueError("RolloutBatch.response_ids has B=0 rows: an empty batch has no credit to assign")
        for name in FIELDS:
            value = getattr(self, name)
            if value is not None:
                _check_field(name, value, sizes, sources, ids.device)
        self._check_relations()
        return self

    def _check_relations(self) -> None:
        mask = self.response_mask
        ids = self.response_ids[mask]  # token ids are only read inside the response
        if ids.numel() and bool(((ids < 0) | (ids >= MAX_ID)).any()):
            bad = int(ids[(ids < 0) | (ids >= MAX_ID)][0])
            raise ValueError(f"RolloutBatch.response_ids must be vocabulary indices in [0, 2^31) inside "
                             f"response_mask, got {bad}")
        if self.step_ids is not None:
            self._check_step_ids(mask)
        if self.cut_lens is not None and bool((self.cut_lens < -1).any()):
            raise ValueError("RolloutBatch.cut_lens must be >= -1 (-1 pads unused cut columns)")
        if self.cut_lens is not None and self.cut_scores is not None \
                and self.cut_lens.shape != self.cut_scores.shape:
            raise ValueError(f"RolloutBatch.cut_scores shape {tuple(self.cut_scores.shape)} != cut_lens shape "
                             f"{tuple(self.cut_lens.shape)}")
        if self.mc_cuts is not None:
            _check_cuts(self.mc_cuts, self.T)
        if self.turn_ids is not None:
            if bool(((~mask) & (self.turn_ids != -1)).any()):
                raise ValueError("RolloutBatch.turn_ids must be -1 outside response_mask")
            if bool((self.turn_ids < -1).any()):
                raise ValueError("RolloutBatch.turn_ids must be >= -1 (-1 means 'no turn')")
            for name in ("turn_rewards", "anchor_states", "answer_probs"):
                turns = getattr(self, name)
                if turns is not None and self.turn_ids.numel() and int(self.turn_ids.max()) >= turns.shape[1]:
                    raise ValueError(f"RolloutBatch.{name} has N={turns.shape[1]} columns but turn_ids "
                                     f"reaches {int(self.turn_ids.max())}")
        if self.step_labels is not None and bool(((self.step_labels < -1) | (self.step_labels > 1)).any()):
            raise ValueError("RolloutBatch.step_labels must be in {-1, 0, 1}")
        if self.prompt_ids is not None and self.prompt_mask is not None \
                and self.prompt_ids.shape != self.prompt_mask.shape:
            raise ValueError(f"RolloutBatch.prompt_mask shape {tuple(self.prompt_mask.shape)} != prompt_ids "
                             f"shape {tuple(self.prompt_ids.shape)}")

    def _check_step_ids(self, mask: Tensor) -> None:
        """step_ids: -1 outside the response, >= -1 and < MAX_ID inside, below S of every [B,S] step field."""
        sid = self.step_ids
        if bool(((~mask) & (sid != -1)).any()):
            raise ValueError("RolloutBatch.step_ids must be -1 outside response_mask")
        if bool((sid < -1).any()):
            raise ValueError("RolloutBatch.step_ids must be >= -1 (-1 means 'no step')")
        top = int(sid.max()) if sid.numel() else -1  # T = 0: no step at all
        if top >= MAX_ID:
            raise ValueError(f"RolloutBatch.step_ids must be < 2^31 (step numbers), got {top}")
        for name in ("step_rewards", "step_labels"):  # mc_values is indexed by cut (mc_cuts), not by step
            steps = getattr(self, name)
            if steps is not None and top >= steps.shape[1]:
                raise ValueError(f"RolloutBatch.{name} has S={steps.shape[1]} columns but step_ids reaches {top}")


@dataclass
class Credit:
    """What an estimator returns.

    advantages: [B,T] float, exactly 0 where `response_mask` is False, no gradient.
    returns:    [B,T] float or None (value targets where the method defines them).
    metrics:    scalar diagnostics; names shared across estimators (e.g. "credit/shaped_frac").
    """

    advantages: Tensor
    returns: Tensor | None = None
    metrics: dict[str, float] = field(default_factory=dict)


def _describe(v: Any) -> str:
    if isinstance(v, Tensor):
        return f"tensor of shape {tuple(v.shape)} and dtype {v.dtype}"
    return f"{type(v).__name__}"


def _check_field(name: str, value: Any, sizes: dict[str, int], sources: dict[str, str],
                 device: torch.device) -> None:
    spec = FIELDS[name]
    if spec.kind == "list":
        if not isinstance(value, (list, tuple)) or len(value) != sizes["B"]:
            raise ValueError(f"RolloutBatch.{name} must be a list of B={sizes['B']} items, got {_describe(value)}"
                             + (f" of length {len(value)}" if isinstance(value, (list, tuple)) else ""))
        return
    if not isinstance(value, Tensor):
        raise ValueError(f"RolloutBatch.{name} must be a tensor {list(spec.shape)} {spec.kind}, "
                         f"got {_describe(value)}")
    if value.dtype not in _DTYPES[spec.kind]:
        raise ValueError(f"RolloutBatch.{name} must have a {spec.kind} dtype, got {value.dtype}")
    if value.dim() != len(spec.shape):
        raise ValueError(f"RolloutBatch.{name} must have shape {list(spec.shape)}, got {tuple(value.shape)}")
    for letter, n in zip(spec.shape, value.shape):
        expected = sizes.setdefault(letter, int(n))
        sources.setdefault(letter, name)
        if int(n) != expected:
            raise ValueError(f"RolloutBatch.{name} has {letter}={int(n)} but RolloutBatch.{sources[letter]} "
                             f"has {letter}={expected} (shape {list(spec.shape)}, got {tuple(value.shape)})")
    if value.device != device:
        raise ValueError(f"RolloutBatch.{name} is on {value.device}, response_ids on {device}")
    if spec.kind == "float" and value.numel():
        if not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise ValueError(f"RolloutBatch.{name} has {bad} NaN/inf value(s); padding must be finite (0)")
        biggest = float(value.detach().abs().max())
        if biggest > MAX_ABS:
            raise ValueError(f"RolloutBatch.{name} has |value| up to {biggest:.3g}, above the {MAX_ABS:g} that "
                             f"creditlab accepts (credit is float32, largest 3.4e38); rescale it")


def _check_cuts(cuts: Tensor, T: int) -> None:
    """mc_cuts: -1 padding after the valid columns, valid cuts strictly increasing (estimators check each cut
    against its row's response length; with T = 0 every row is empty and no cut is read)."""
    valid = cuts >= 0  # [B, C]
    if bool((cuts < -1).any()) or bool((cuts >= MAX_ID).any()):
        raise ValueError("RolloutBatch.mc_cuts must be -1 (padding) or a prefix length in [0, 2^31)")
    if bool((valid[:, 1:] & ~valid[:, :-1]).any()):
        raise ValueError("RolloutBatch.mc_cuts must hold its valid cuts first and -1 padding after them")
    if bool((valid[:, 1:] & (cuts[:, 1:] <= cuts[:, :-1])).any()):
        raise ValueError("RolloutBatch.mc_cuts must be strictly increasing along each row")


def fields_table() -> str:
    """Markdown table of all fields (used by docs and `creditlab list --fields`)."""
    rows = ["| field | shape | dtype | meaning | produced by |", "|---|---|---|---|---|"]
    for name, s in FIELDS.items():
        req = " (required)" if name in REQUIRED else ""
        rows.append(f"| `{name}`{req} | [{','.join(s.shape)}] | {s.kind} | {s.doc} | {s.producer} |")
    return "\n".join(rows)

