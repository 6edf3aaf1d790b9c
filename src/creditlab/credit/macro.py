"""Credit over actions longer than one token, from a learned critic: MA-RLHF (macro actions), POAD (token-level
backup inside an action) and ArCHer (an utterance-level Q/V critic).

All three work on each row's valid tokens in order (`compact_left`): masked tokens (padding, observation tokens
of multi-turn rows) belong to no action and are skipped, as `gae` skips them. An *action* is a maximal run of valid
tokens with equal `step_ids` (POAD's steps) or `turn_ids` (POAD's turns, ArCHer); a run of -1 step ids inside the
response (text outside any step) is an action of its own.

Shapes: values/q_values/token_rewards [B,T]; macro arrays [B,M] with M <= T macro actions per row.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from creditlab.batch import Credit, RolloutBatch
from creditlab.credit.metrics import advantage_metrics
from creditlab.credit.ops import compact_left, discounted_reverse_cumsum, masked_whiten
from creditlab.registry import estimator

MacroRule = Literal["fixed", "randomized", "ppl"]
MacroWeighting = Literal["equal", "unit", "position"]
RANDOMIZED_LENGTHS = (1, 2, 3, 5, 10)  # MA-RLHF's randomized n-gram list (each repeated `repeat_times`, shuffled)


# ------------------------------------------------------------------------------------------------ shared helpers
def _compact(x: Tensor, order: Tensor, cmask: Tensor) -> Tensor:
    """x [B,T] -> float64 [B,T] with each row's valid tokens moved to the front (0 after them)."""
    return x.to(torch.float64).gather(1, order) * cmask


def _scatter_back(xc: Tensor, order: Tensor, mask: Tensor) -> Tensor:
    """Inverse of `_compact`: compacted [B,T] -> original columns, 0 outside `mask`."""
    out = torch.zeros_like(xc).scatter(1, order, xc)
    return torch.where(mask, out, torch.zeros((), dtype=out.dtype, device=out.device))


def _run_starts(ids_c: Tensor, cmask: Tensor) -> Tensor:
    """[B,T] bool (compacted): True where a run of equal ids begins (position 0 always, when valid)."""
    prev = torch.nn.functional.pad(ids_c[:, :-1], (1, 0), value=0)
    first = torch.zeros_like(cmask)
    first[:, 0] = True
    return cmask & (first | (ids_c != prev))


def _segment_index(starts: Tensor, cmask: Tensor) -> tuple[Tensor, Tensor]:
    """(segment index [B,T] long, -1 outside cmask; index of the segment's first token [B,T] long)."""
    seg = torch.where(cmask, starts.long().cumsum(1) - 1, torch.full_like(starts, -1, dtype=torch.long))
    pos = torch.arange(starts.shape[1], device=starts.device).expand_as(starts)
    first = torch.where(starts, pos, torch.zeros_like(pos)).cummax(dim=1).values
    return seg, first


def _segment_sum(x: Tensor, seg: Tensor) -> Tensor:
    """Per-segment sums [B,M=T] of x [B,T] over tokens with seg >= 0."""
    valid = seg >= 0
    return torch.zeros_like(x).scatter_add(1, seg.clamp_min(0), torch.where(valid, x, torch.zeros_like(x)))


def reverse_scan(x: Tensor, discount: Tensor, chunk: int = 64) -> Tensor:
    """y_t = x_t + discount_t * y_{t+1} along the last axis (y_T = 0), with a per-token discount [B,T] in [0, 1].

    Vectorized within chunks of `chunk` tokens: W[i,k] = prod_{j=i}^{k-1} discount_j is built by a cumulative
    product (exact, no logarithms, so a zero discount is fine); chunks are chained in a loop over T/chunk blocks,
    one [B, K, K] matrix at a time (memory B*K*K, not B*T*K).
    """
    b, t = x.shape
    n = -(-t // chunk)
    pad = n * chunk - t
    xp = torch.nn.functional.pad(x.to(torch.float64), (0, pad)).view(b, n, chunk)  # [B, C, K]
    dp = torch.nn.functional.pad(discount.to(torch.float64), (0, pad)).view(b, n, chunk)
    i = torch.arange(chunk, device=x.device)
    upper = i[None, :] >= i[:, None]  # [K(i), K(j)]: j >= i
    diag = (i[None, :] == i[:, None]).to(torch.float64)
    one = torch.ones((), dtype=torch.float64, device=x.device)
    out = torch.empty_like(xp)
    carry = torch.zeros(b, dtype=torch.float64, device=x.device)  # y at the start of the next chunk
    for c in range(n - 1, -1, -1):
        prod = torch.where(upper, dp[:, c, None, :], one).cumprod(-1)  # [B, K, K]: prod_{j=i}^{k} d_j
        shifted = torch.nn.functional.pad(prod[..., :-1], (1, 0), value=1.0)  # prod_{j=i}^{k-1} d_j
        w = torch.where(i[None, :] > i[:, None], shifted, diag)
        out[:, c] = (w * xp[:, c, None, :]).sum(-1) + prod[..., -1] * carry[:, None]
        carry = out[:, c, 0]
    return out.view(b, -1)[:, :t]


def _finish(adv: Tensor, returns: Tensor, mask: Tensor, whiten: bool) -> Credit:
    adv = masked_whiten(adv, mask) if whiten else adv
    adv = torch.where(mask, adv, torch.zeros((), dtype=adv.dtype)).to(torch.float32)
    return Credit(advantages=adv, returns=returns.to(torch.float32), metrics=advantage_metrics(adv, mask))


def _check_unit(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


# ------------------------------------------------------------------------------------------------ MA-RLHF
_M31 = (1 << 31) - 1


def _mix(x: Tensor) -> Tensor:
    """A nonlinear integer hash of int64 values in [0, 2^31) (xor-shift-multiply rounds, all products < 2^58)."""
    for _ in range(3):
        x = x ^ (x >> 16)
        x = (x * 0x45D9F3B) & _M31
    return x ^ (x >> 16)


def _hash_rows(ids_c: Tensor, cmask: Tensor, seed: int) -> Tensor:
    """A deterministic integer [B] in [0, 2^31) from each row's valid token ids and `seed` (row order and padding
    do not change it)."""
    pos = torch.arange(ids_c.shape[1], device=ids_c.device, dtype=torch.int64)
    terms = _mix(((ids_c.to(torch.int64) & _M31) ^ _mix(pos)[None, :]) & _M31) * cmask.to(torch.int64)
    return _mix((terms.sum(1) + cmask.sum(1) * 40_503 + (seed & _M31)) & _M31)


def shuffle_keys(h: Tensor, K: int) -> Tensor:
    """Per-row pseudo-random sort keys [B, K] from row hashes h [B]: argsort gives each row's shuffle."""
    j = torch.arange(K, device=h.device, dtype=torch.int64)
    return _mix((h[:, None] ^ _mix(j + 1)[None, :]) & _M31)


def macro_starts(rule: MacroRule, cmask: Tensor, *, n: int = 5, ids_c: Tensor | None = None,
                 ref_logp_c: Tensor | None = None, repeat_times: int = 3, seed: int = 0) -> Tensor:
    """MA-RLHF's termination rules on compacted rows -> [B,T] bool, True where a macro action begins.

    Every rule starts a macro at token 0 and makes the last valid token (L-1) a macro of its own, as the reference's
    final split of length 1 does. Among tokens 0..L-2:
    - fixed: a macro starts every n tokens (0, n, 2n, ...);
    - randomized: lengths from a per-row shuffle of RANDOMIZED_LENGTHS x repeat_times, then the rest is one macro;
    - ppl: token i starts a macro when the reference perplexity rises from i to i+1 (ppl[i+1] > ppl[i], i.e.
      ref_logp[i+1] < ref_logp[i]), the reference's `ppl_selection` index convention.
    """
    B, T = cmask.shape
    lengths = cmask.sum(1, keepdim=True)  # [B, 1]
    pos = torch.arange(T, device=cmask.device).expand(B, T)
    body = pos < lengths - 1  # tokens before the last one
    if rule == "fixed":
        starts = pos % n == 0
    elif rule == "randomized":
        K = len(RANDOMIZED_LENGTHS) * repeat_times
        base = torch.tensor(RANDOMIZED_LENGTHS, device=cmask.device).repeat_interleave(repeat_times)  # [K]
        keys = shuffle_keys(_hash_rows(ids_c, cmask, seed), K)  # [B, K]
        perm = base[keys.argsort(dim=1, stable=True)]  # [B, K] shuffled lengths
        cuts = torch.nn.functional.pad(perm.cumsum(1), (1, 0))  # [B, K+1]: 0, c_1, ..., c_K
        starts = torch.zeros(B, T + 1, dtype=torch.bool, device=cmask.device)
        starts.scatter_(1, cuts.clamp_max(T), True)
        starts = starts[:, :T]
    elif rule == "ppl":
        nxt = torch.nn.functional.pad(ref_logp_c[:, 1:], (0, 1))
        starts = (nxt < ref_logp_c) | (pos == 0)
    else:
        raise ValueError(f"rule must be one of ['fixed', 'randomized', 'ppl'], got {rule!r} ('parsing' is not "
                         "offered: it needs a constituency parser model that cannot be loaded offline)")
    return cmask & ((starts & body) | (pos == lengths - 1))


def macro_weights(starts: Tensor, cmask: Tensor, weighting: MacroWeighting) -> tuple[Tensor, Tensor]:
    """(macro index [B,T] long, -1 outside; weight sigma_i [B,T] float64 of each token within its macro).

    equal: 1/|tau| (a mean); unit: 1 on the macro's last token; position: (1/(j+1)) / sum_k 1/(k+1), j the token's
    position inside the macro (MA-RLHF `modeling_macro_action`).
    """
    seg, first = _segment_index(starts, cmask)
    pos = torch.arange(starts.shape[1], device=starts.device).expand_as(starts)
    ones = cmask.to(torch.float64)
    if weighting == "equal":
        size = _segment_sum(ones, seg)  # [B, M]
        sigma = 1.0 / size.gather(1, seg.clamp_min(0)).clamp_min(1.0)
    elif weighting == "unit":
        nxt_start = torch.nn.functional.pad(starts[:, 1:], (0, 1), value=True)
        nxt_valid = torch.nn.functional.pad(cmask[:, 1:], (0, 1), value=False)
        sigma = (nxt_start | ~nxt_valid).to(torch.float64)
    elif weighting == "position":
        inv = 1.0 / (pos - first + 1).to(torch.float64)
        harmonic = _segment_sum(inv * ones, seg)
        sigma = inv / harmonic.gather(1, seg.clamp_min(0)).clamp_min(1e-12)
    else:
        raise ValueError(f"weighting must be one of ['equal', 'unit', 'position'], got {weighting!r}")
    return seg, sigma * ones


@estimator("ma_rlhf", needs=("token_rewards", "values", "ref_logprobs"),
           ranges={"n": "[1, inf)", "repeat_times": "[1, 1000]", "seed": "[0, inf)", "gamma": "[0, 1]",
                   "lam": "[0, 1]"})
def ma_rlhf(batch: RolloutBatch, *, rule: MacroRule = "fixed", n: int = 5, repeat_times: int = 3, seed: int = 0,
            weighting: MacroWeighting = "equal", reward_agg: Literal["sum", "weighted"] = "sum",
            gamma: float = 1.0, lam: float = 0.95, whiten: bool = False) -> Credit:
    """MA-RLHF: PPO's GAE over macro actions (token spans); every token of a macro gets the macro's advantage.

    Paper: MA-RLHF (arXiv 2410.02743). Reference: ernie-research/MA-RLHF@807551d
    applications/DeepSpeed-Chat/dschat/rlhf/ppo_trainer.py (`*_selection`, `modeling_macro_action`,
    `get_advantages_and_returns`, `critic_loss_fn`); defaults from training_scripts/run_gemma.sh and main.py.
    Shapes: token_rewards, values, ref_logprobs [B,T] -> advantages, returns [B,T].
    Formula: macros from `rule` (see `macro_starts`; the last token is its own macro and carries the outcome);
    V_tau = sum_{i in tau} sigma_i V_i (`weighting`); R_tau = sum_{i in tau} r_i; delta_tau = R_tau + gamma V_{tau+1}
    - V_tau (V after the last macro = 0); A_tau = delta_tau + gamma lam A_{tau+1}. Advantages: A_tau on each token of
    tau; returns: A_tau + V_tau on each token of tau (the reference's critic regresses every token to its macro's
    return). No whitening by default (DeepSpeed-Chat does not whiten).
    Defaults: fixed n=5, equal, gamma=1, lam=0.95 (run_gemma.sh); repeat_times has no reference default (3 here).
    Deviations: (1) segmentation per row from its own valid tokens (the reference segments the batch's first row
    and applies it to all rows, correct only at one generation per device; its last macro is the padded batch's
    last column and a count that ends exactly there leaves an empty macro with V = R = 0); (2) macro rewards are
    summed (`reward_agg="sum"`): the reference weights rewards like values, so under `equal` the per-token KL
    reward is averaged over the macro (divided by |tau|); `reward_agg="weighted"` restores that; (3) `unit`
    works (the reference indexes a 1-D tensor as 2-D there); (4) the randomized shuffle is seeded from `seed` and
    each row's token ids (the reference calls Python's unseeded `random.shuffle` once per batch); (5) `parsing`
    (constituency-parse spans) is not offered: its parser model is downloaded at run time.
    n = 1 (fixed) is token-level PPO (`gae` with the same gamma, lam and whiten).
    """
    if n < 1 or repeat_times < 1:
        raise ValueError(f"n and repeat_times must be >= 1, got n={n}, repeat_times={repeat_times}")
    if reward_agg not in ("sum", "weighted"):
        raise ValueError(f"reward_agg must be 'sum' or 'weighted', got {reward_agg!r}")
    _check_unit("gamma", gamma)
    _check_unit("lam", lam)
    mask = batch.response_mask
    order, cmask = compact_left(mask)
    ids_c = batch.response_ids.gather(1, order)
    ref_c = _compact(batch.ref_logprobs, order, cmask) if rule == "ppl" else None
    starts = macro_starts(rule, cmask, n=n, ids_c=ids_c, ref_logp_c=ref_c, repeat_times=repeat_times, seed=seed)
    seg, sigma = macro_weights(starts, cmask, weighting)
    v_c, r_c = _compact(batch.values, order, cmask), _compact(batch.token_rewards, order, cmask)
    v_m = _segment_sum(sigma * v_c, seg)  # [B, M]
    r_m = _segment_sum(r_c if reward_agg == "sum" else sigma * r_c, seg)
    n_macro = starts.sum(1, keepdim=True)  # [B, 1]
    m_mask = torch.arange(v_m.shape[1], device=mask.device)[None, :] < n_macro  # [B, M]
    v_next = torch.nn.functional.pad(v_m[:, 1:], (0, 1)) * torch.nn.functional.pad(m_mask[:, 1:], (0, 1))
    delta = (r_m + gamma * v_next - v_m) * m_mask
    a_m = discounted_reverse_cumsum(delta, gamma * lam) * m_mask  # [B, M]
    idx = seg.clamp_min(0)
    adv = _scatter_back(a_m.gather(1, idx) * cmask, order, mask)
    returns = _scatter_back((a_m + v_m).gather(1, idx) * cmask, order, mask)
    credit = _finish(adv, returns, mask, whiten)
    credit.metrics["credit/macro_len"] = float(cmask.sum() / n_macro.sum().clamp_min(1))
    return credit


# ------------------------------------------------------------------------------------------------ POAD
def _poad(batch: RolloutBatch, action_ids: Tensor, gamma: float, lam: float, whiten: bool) -> Credit:
    _check_unit("gamma", gamma)
    _check_unit("lam", lam)
    mask = batch.response_mask
    order, cmask = compact_left(mask)
    starts = _run_starts(action_ids.gather(1, order), cmask)
    seg, _ = _segment_index(starts, cmask)
    v_c, r_c = _compact(batch.values, order, cmask), _compact(batch.token_rewards, order, cmask)
    nxt_valid = torch.nn.functional.pad(cmask[:, 1:], (0, 1), value=False)
    last = cmask & (torch.nn.functional.pad(starts[:, 1:], (0, 1), value=False) | ~nxt_valid)  # action's last token
    r_action = _segment_sum(r_c, seg).gather(1, seg.clamp_min(0))  # [B,T] its action's summed reward
    v_next = torch.nn.functional.pad(v_c[:, 1:], (0, 1)) * nxt_valid  # next token, or the next action's first
    delta = torch.where(last, r_action + gamma * v_next - v_c, v_next - v_c) * cmask
    discount = torch.where(last, torch.full_like(v_c, gamma * lam), torch.full_like(v_c, lam))
    g = reverse_scan(delta, discount) * cmask
    adv = _scatter_back(g, order, mask)
    returns = _scatter_back(g + v_c, order, mask)
    credit = _finish(adv, returns, mask, whiten)
    credit.metrics["credit/action_len"] = float(cmask.sum() / starts.sum().clamp_min(1))
    return credit


_POAD_DOC = """
    Reference: morning9393/ADRL@5ec1aa5 mappo/utils/language_buffer.py (`batch_process_tppo`, algo "POAD");
    whitening as in mappo/trainers/llm_trainer_tppo.py; defaults gamma = lam = 0.95 from mappo/config.py.
    Shapes: token_rewards, values [B,T] -> advantages, returns [B,T].
    Formula (backwards over each row's valid tokens, V the critic's value of the state before each token):
    inside an action delta_j = V_{j+1} - V_j (no reward, no gamma) and g_j = delta_j + lam g_{j+1}; at the action's
    last token delta = R_a + gamma V(next action's first token) - V and g = delta + gamma lam g'; nothing is
    bootstrapped past the row's last token. Returns = g + V; advantages = masked_whiten(g) (or g, whiten=False).
    R_a = the sum of the action's token rewards (the outcome sits on the last action's last token; a per-token KL
    reward is summed into its action, since POAD rewards actions only).
    Deviations: whitening over every valid token of the batch (the reference whitens per minibatch over the
    entries that are exactly nonzero); no bootstrap at truncation (the reference bootstraps the next observation's
    value unless the episode ended).
    Invariants: one action per response with gamma = 1 is token-level GAE (`gae`, lam); one token per action is
    action-level GAE.
"""


def _poad_doc(fn):  # the shared part of both POAD docstrings, appended before registration
    fn.__doc__ = (fn.__doc__ or "") + _POAD_DOC
    return fn


@estimator("poad", needs=("token_rewards", "values", "step_ids"), ranges={"gamma": "[0, 1]", "lam": "[0, 1]"})
@_poad_doc
def poad(batch: RolloutBatch, *, gamma: float = 0.95, lam: float = 0.95, whiten: bool = True) -> Credit:
    """POAD with actions = reasoning steps (`step_ids`): token-level Bellman backup inside each step.

    Paper: Policy Optimization with Action Decomposition (arXiv 2405.15821).
    """
    return _poad(batch, batch.step_ids, gamma, lam, whiten)


@estimator("poad_turns", needs=("token_rewards", "values", "turn_ids"), ranges={"gamma": "[0, 1]", "lam": "[0, 1]"})
@_poad_doc
def poad_turns(batch: RolloutBatch, *, gamma: float = 0.95, lam: float = 0.95, whiten: bool = True) -> Credit:
    """POAD with actions = turns (`turn_ids`, the paper's utterances); a single-turn row is one action.

    Paper: Policy Optimization with Action Decomposition (arXiv 2405.15821).
    """
    return _poad(batch, batch.turn_ids, gamma, lam, whiten)


# ------------------------------------------------------------------------------------------------ ArCHer
@estimator("archer", needs=("values", "q_values", "turn_ids"))
def archer(batch: RolloutBatch, *, whiten: bool = False) -> Credit:
    """ArCHer (on-policy): an utterance-level critic's A = Q(s_k, a_k) - V(s_k) on every token of turn k.

    Paper: ArCHer (arXiv 2402.19446). Reference: YifeiZhou02/ArCHer@7c771a7 archer/algorithms/archer/trainer.py
    (`update`: advantages = min(Q1, Q2)(s, a) - min(V1, V2)(s), applied to every token of the utterance).
    Shapes: values, q_values, turn_ids [B,T] -> advantages [B,T]; `returns` is None (the critic trains on TD targets,
    see creditlab.train.turn_critic).
    Formula: for the turn k containing token t, A_t = q_values[first_k] - values[first_k], where first_k is the
    turn's first valid token (the critic writes Q(s_k, a_k) on every token of turn k and V(state before t) on every
    token, so values[first_k] = V(s_k)). No whitening (the reference uses the raw advantage).
    Deviations: on-policy: A is evaluated on the sampled action; the reference samples a fresh action from the
    current policy for the actor update and trains its critic off-policy from a 100k replay buffer (50 critic
    epochs, 20 warm-up iterations); the trainer's PPO-clip loss replaces REINFORCE (identical gradient at one epoch,
    one minibatch, where the ratio is 1).
    """
    mask = batch.response_mask
    order, cmask = compact_left(mask)
    starts = _run_starts(batch.turn_ids.gather(1, order), cmask)
    _, first = _segment_index(starts, cmask)
    q_c, v_c = _compact(batch.q_values, order, cmask), _compact(batch.values, order, cmask)
    adv = _scatter_back((q_c.gather(1, first) - v_c.gather(1, first)) * cmask, order, mask)
    adv = (masked_whiten(adv, mask) if whiten else adv).to(torch.float32)
    metrics = {**advantage_metrics(adv, mask), "credit/action_len": float(cmask.sum() / starts.sum().clamp_min(1))}
    return Credit(advantages=adv, metrics=metrics)
