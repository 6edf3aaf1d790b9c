"""Token-selective shaping on top of GRPO: hicra (+ hicra_entropy), ktae, ucas (methods.md §5).

Every estimator here starts from GRPO's per-response advantage (`outcome.group_advantage`, with the same
explicit `singleton="zero" | "raw"` policy) and then reshapes it per token:
- hicra:   multiplicative, A + alpha |A| on planning tokens (strategic grams)
- ktae:    additive, A + w(token id), w from a per-group contingency statistic of token presence
- ucas:    multiplicative per row (certainty-dependent M_i) and additive per token (-lambda * normalised logit)
All shaping weights are computed under no-grad (the registry runs estimators under `torch.no_grad()`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from creditlab.batch import Credit, RolloutBatch
from creditlab.credit.metrics import advantage_metrics
from creditlab.credit.ops import Singleton, broadcast, group_index, group_stats
from creditlab.credit.outcome import group_advantage
from creditlab.registry import estimator

_F64 = torch.float64


def _shaped_credit(batch: RolloutBatch, adv64: Tensor, shaped: Tensor, **extra: float) -> Credit:
    mask = batch.response_mask
    adv = torch.where(mask, adv64, torch.zeros((), dtype=_F64)).to(torch.float32)
    n_valid = max(int(mask.sum()), 1)
    metrics = advantage_metrics(adv, mask, shaped_frac=float((shaped & mask).sum()) / n_valid, **extra)
    return Credit(advantages=adv, metrics=metrics)


# ------------------------------------------------------------------------------------------------ HICRA
@estimator("hicra", needs=("planning_mask",), ranges={"alpha": "[0, 1)", "eps": "[0, inf)"})
def hicra(batch: RolloutBatch, *, alpha: float = 0.2, eps: float = 1e-6, scale_by_std: bool = True,
          singleton: Singleton = "zero") -> Credit:
    """HICRA (paper form): amplify credit on planning tokens, A^H = A + alpha |A| on tokens in S_i.

    Paper: "Emergent Hierarchical Reasoning in LLMs through Reinforcement Learning" (arXiv 2509.03646).
    Shapes: rewards [B], group_ids [B], planning_mask [B,T] bool -> advantages [B,T].
    Formula: a_b = GRPO advantage (group_advantage); A[b,t] = a_b + alpha |a_b| if planning_mask[b,t] else a_b,
    i.e. positive credit x(1+alpha), blame x(1-alpha) on planning tokens. 0 outside response_mask.
    Defaults: alpha = 0.2 (paper); GRPO eps = 1e-6, std-normalised (the paper writes A = R - mean; set
    `scale_by_std=False` for that form).
    Deviations: alpha must lie in [0, 1) (a registry range: alpha >= 1 would flip the sign of negative
    advantages, A + alpha|A| = (1 - alpha) A for A < 0). planning_mask comes from
    `creditlab.signals.strategic` (strategic grams matched on decoded text); the paper's n-gram clustering
    is replaced by a curated gram list. The mask is combined into one [B,T] tensor (no chained indexing).
    Metric credit/shaped_frac: fraction of valid tokens that are planning tokens.
    """
    a = group_advantage(batch.rewards, batch.group_ids, scale_by_std=scale_by_std, eps=eps, singleton=singleton)
    base = broadcast(a, batch.response_mask, _F64)  # [B,T]
    plan = batch.planning_mask & batch.response_mask  # [B,T]
    adv = torch.where(plan, base + alpha * base.abs(), base)
    return _shaped_credit(batch, adv, plan)


def port_threshold(x: Tensor, mask: Tensor, top_frac: float) -> Tensor:
    """The TRL port's per-row threshold [B]: row b's valid values sorted ascending, taken at index
    int((1 - top_frac) * n_b) clamped to [0, n_b - 1] (`_topk_threshold`); 0 for a row with no valid value."""
    big = torch.finfo(_F64).max
    xs = torch.where(mask, x.to(_F64), big).sort(dim=1).values  # [B,T]: valid values first, ascending
    n = mask.sum(1)  # [B]
    # (1 - k) * n in float64 then truncation toward zero: Python's int((1 - k) * len(values)), bit for bit
    idx = torch.floor((1.0 - top_frac) * n.to(_F64)).long()
    idx = torch.minimum(idx.clamp_min(0), (n - 1).clamp_min(0))
    tau = xs.gather(1, idx[:, None])[:, 0] if xs.shape[1] else torch.zeros(n.shape, dtype=_F64)
    return torch.where(n > 0, tau, torch.zeros_like(tau))


@estimator("hicra_entropy", needs=("entropies",),
           ranges={"alpha": "[0, 1)", "top_frac": "(0, 1]", "eps": "[0, inf)"})
def hicra_entropy(batch: RolloutBatch, *, alpha: float = 0.2, top_frac: float = 0.3, length_gate: bool = True,
                  eps: float = 1e-6, singleton: Singleton = "zero") -> Credit:
    """HICRA entropy-proxy variant (TRL port): boost high-entropy tokens of long correct responses.

    Source: huggingface/trl `trl/trainer/hicra_trainer.py` (`_topk_threshold`, `modify_advantages_hicra`; a port
    that says it follows the authors' verl code; methods.md §5.1). Shapes: entropies [B,T] -> advantages [B,T].
    Formula: tau_b = sorted(H_b)[int((1 - top_frac) n_b)] over row b's n_b valid-token entropies (the port's
    index, clamped to n_b - 1; not an interpolated quantile); a row is touched iff a_b > 0 and (if
    `length_gate`) L_b > mean length of its group; A[b,t] = a_b (1 + alpha) at touched rows' tokens with
    H[b,t] > tau_b (strict), else a_b.
    Hand case (tests): H = 0..9, k = 0.3 -> tau = sorted(H)[7] = 7, tokens 8 and 9 boosted (2 of 10; an
    interpolated 0.7-quantile, 6.3, would boost 3).
    Defaults: alpha = 0.2, top_frac (k) = 0.3, length_gate = True (port behaviour).
    Deviations: this is not the paper's formula (use `hicra` with a strategic-gram planning_mask for that);
    the port's union with a planning mask is not offered here, because `needs` is static: combine masks
    upstream and call `hicra`. alpha must lie in [0, 1) (the port does not check).
    """
    mask = batch.response_mask
    a = group_advantage(batch.rewards, batch.group_ids, eps=eps, singleton=singleton)  # [B]
    tau = port_threshold(batch.entropies, mask, top_frac)  # [B]
    row_ok = a > 0
    if length_gate:
        length = mask.sum(1).to(_F64)
        mean_len, _, _, _ = group_stats(length, batch.group_ids)
        row_ok = row_ok & (length > mean_len)
    hot = row_ok[:, None] & mask & (batch.entropies.to(_F64) > tau[:, None])  # one combined [B,T] mask
    base = broadcast(a, mask, _F64)
    adv = torch.where(hot, base * (1.0 + alpha), base)
    return _shaped_credit(batch, adv, hot)


# ------------------------------------------------------------------------------------------------ KTAE
def _log_comb(n: Tensor, k: Tensor) -> Tensor:
    return torch.lgamma(n + 1) - torch.lgamma(k + 1) - torch.lgamma(n - k + 1)


def fisher_exact_two_sided(a: Tensor, b: Tensor, n_c: Tensor, n_w: Tensor, rtol: float = 1e-7) -> tuple[Tensor, Tensor]:
    """Two-sided Fisher exact p-value of [[a, b], [n_c - a, n_w - b]], vectorized over tables (float64).

    p = sum of the hypergeometric pmf over tables (same margins) with pmf <= pmf(observed) (1 + rtol), as
    scipy.stats.fisher_exact (the tolerance absorbs lgamma rounding on exact ties). Returns (p clamped to
    [0, 1], is_one) where is_one is True iff no table is strictly more probable than the observed one
    (p = 1 exactly; decided on the pmf comparison, not on a rounded sum).
    """
    a, b, n_c, n_w = (t.to(_F64) for t in (a, b, n_c, n_w))
    r1, n = a + b, n_c + n_w  # row margin (token present), total
    k_lo, k_hi = (r1 + n_c - n).clamp_min(0), torch.minimum(r1, n_c)
    k = torch.arange(int(k_hi.max()) + 1 if k_hi.numel() else 1, dtype=_F64, device=a.device)[None, :]  # [1,K]
    support = (k >= k_lo[:, None]) & (k <= k_hi[:, None])  # [P,K]
    kk = torch.minimum(torch.maximum(k, k_lo[:, None]), k_hi[:, None])  # clamp: keep lgamma finite off-support
    logp = (_log_comb(n_c[:, None], kk) + _log_comb((n - n_c)[:, None], r1[:, None] - kk)
            - _log_comb(n, r1)[:, None])  # [P,K]
    logp_obs = _log_comb(n_c, a) + _log_comb(n - n_c, r1 - a) - _log_comb(n, r1)  # [P]
    thresh = logp_obs[:, None] + rtol
    p = torch.where(support & (logp <= thresh), logp.exp(), torch.zeros_like(logp)).sum(1).clamp(0.0, 1.0)
    is_one = ~(support & (logp > thresh)).any(1)
    return torch.where(is_one, torch.ones_like(p), p), is_one


def _h2(p: Tensor) -> Tensor:
    """Binary entropy in bits with 0 log 0 = 0 (p may be exactly 0 or 1)."""
    def plogp(x: Tensor) -> Tensor:
        return torch.where(x > 0, -x * torch.log2(x.clamp_min(1e-300)), torch.zeros_like(x))
    return plogp(p) + plogp(1 - p)


def fisher_p_reference_float32(a: Tensor, b: Tensor, n_c: Tensor, n_w: Tensor, n_cols: Tensor) -> Tensor:
    """The KTAE reference's Fisher p-value, float32 arithmetic reproduced op for op ([P] float32).

    xiaolizh1/KTAE `compute_key_tokens.fisher_exact_test` evaluates each group's tables on one grid of
    `max_k + 1` columns (max_k the group's largest min(a + b, n_c)), keeps pmf(k) <= pmf(observed) with no
    tolerance and sums in float32, so a p = 1 table often sums to 1 - 6e-8 (then F = exp(-2p) ~ 0.135 instead of
    0). `n_cols` [P] is that grid width of each table's group; tables are batched by grid width, and a row sum
    over a [rows, K] float32 tensor does not depend on the number of rows (checked in the tests).
    """
    out = torch.zeros(a.shape, dtype=torch.float32)
    for width in torch.unique(n_cols).tolist():  # a handful of distinct widths (group sizes)
        sel = (n_cols == width).nonzero(as_tuple=True)[0]
        ta, tb = a[sel].float(), b[sel].float()
        tc, td = n_c[sel].float() - ta, n_w[sel].float() - tb
        r1, c1 = ta + tb, ta + tc
        n = r1 + (tc + td)
        k_min = torch.maximum(torch.zeros((), dtype=torch.float32), r1 + c1 - n)
        k_max = torch.minimum(r1, c1)
        k = torch.arange(width, dtype=torch.float32).expand(sel.numel(), width)
        on = (k >= k_min[:, None]) & (k <= k_max[:, None])
        log_p_k = _log_comb(c1[:, None], k) + _log_comb((n - c1)[:, None], r1[:, None] - k) - _log_comb(n, r1)[:, None]
        p_k = torch.exp(log_p_k) * on.float()
        p_obs = torch.exp(_log_comb(c1, ta) + _log_comb(n - c1, r1 - ta) - _log_comb(n, r1))
        out[sel] = torch.where((p_k <= p_obs[:, None]) & on, p_k, torch.zeros((), dtype=torch.float32)).sum(dim=1)
    return out


def _table_scores(a: Tensor, b: Tensor, n_c: Tensor, n_w: Tensor,
                  ref_cols: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(F, IG, h) for contingency tables (float64 [P]); all depend on the table only (and, for the reference's
    float32 Fisher sum, `ref_cols`, the grid width of the table's group)."""
    if ref_cols is None:
        p, is_one = fisher_exact_two_sided(a, b, n_c, n_w)
        fisher = torch.where(is_one, torch.zeros_like(p), torch.exp(-2.0 * p))
    else:
        p32 = fisher_p_reference_float32(a, b, n_c, n_w, ref_cols)
        fisher = torch.where(p32 != 1.0, torch.exp(-2 * p32), torch.zeros((), dtype=torch.float32)).to(_F64)
    n, present = n_c + n_w, a + b
    absent = n - present
    h_y_x = (present / n * torch.where(present > 0, _h2(a / present.clamp_min(1)), torch.zeros_like(a))
             + absent / n * torch.where(absent > 0, _h2((n_c - a) / absent.clamp_min(1)), torch.zeros_like(a)))
    ig = _h2(n_c / n) - h_y_x
    h = torch.asin((a / n_c).clamp(0, 1).sqrt()) - torch.asin((b / n_w).clamp(0, 1).sqrt())
    return fisher, ig, h


def _bm25_tf(count: Tensor, total: Tensor, other_total: Tensor, k1: float, b: float) -> Tensor:
    """BM25-style saturated term frequency of a token on one side (correct or wrong) of a group."""
    avg = ((total + other_total) / 2).clamp_min(1e-12)
    k_side = k1 * (1 - b + b * total / avg)
    f = count / total.clamp_min(1)
    return f * (k1 + 1) / (f + k_side)


def _token_pairs(batch: RolloutBatch, gi: Tensor, correct: Tensor) -> dict[str, Tensor]:
    """Every valid token grouped into (group, token id) pairs, memory O(valid tokens).

    Returns rows/cols [N] of the valid tokens in pair order, pair [N] (pair index of each), g_p / v_p [P] (group
    and token id of each pair), and per pair: cnt_c / cnt_w (occurrences on the correct / wrong side) and
    pres_c / pres_w (rows containing the token on each side).
    """
    rows, cols = batch.response_mask.nonzero(as_tuple=True)  # [N], row-major: rows ascending
    vocab, tok = torch.unique(batch.response_ids[rows, cols], return_inverse=True)  # dense ids: any int64 id
    pair_key = gi[rows] * vocab.numel() + tok  # [N] < B * N: no overflow
    pair_key, order = torch.sort(pair_key, stable=True)  # stable: rows stay ascending inside a pair
    rows, cols = rows[order], cols[order]
    new_pair = torch.ones_like(pair_key, dtype=torch.bool)
    new_pair[1:] = pair_key[1:] != pair_key[:-1]
    new_row = new_pair.clone()
    new_row[1:] |= rows[1:] != rows[:-1]  # first occurrence of the token in its row
    pair = new_pair.cumsum(0) - 1  # [N]
    n_pairs = int(pair[-1]) + 1
    is_c = correct[rows].to(_F64)  # [N]

    def per_pair(values: Tensor, index: Tensor) -> Tensor:
        return torch.zeros(n_pairs, dtype=_F64).index_add_(0, index, values)

    keys = pair_key[new_pair]  # [P]
    return {"rows": rows, "cols": cols, "pair": pair, "g_p": keys // vocab.numel(),
            "v_p": vocab[keys % vocab.numel()],
            "cnt_c": per_pair(is_c, pair), "cnt_w": per_pair(1 - is_c, pair),
            "pres_c": per_pair(is_c[new_row], pair[new_row]), "pres_w": per_pair(1 - is_c[new_row], pair[new_row])}


def ktae_token_weights(batch: RolloutBatch, *, alpha: float = 1.0, beta: float = 1.0, gamma_tf: float = 1.0,
                       top: float = 1.0, k1: float = 2.0, b: float = 0.5, tf_eps: float = 1e-5,
                       correct_threshold: float = 0.0, ignore_token_ids: tuple[int, ...] = (),
                       zero_last_token: bool = True, reference_float32: bool = False) -> Tensor:
    """KTAE's additive key-token weight w(group, token id), written on every valid token: [B,T] float64.

    Vectorized over (group, token id) pairs with one stable sort of the valid tokens (`_token_pairs`); the table
    statistics (F, IG, h) are computed once per *distinct* table and gathered back. Memory is linear in the
    number of valid tokens (plus the Fisher grid of the distinct tables, evaluated in bounded chunks).
    """
    mask = batch.response_mask
    out = torch.zeros(mask.shape, dtype=_F64)
    if not bool(mask.any()):
        return out
    gi, n_groups = group_index(batch.group_ids)  # [B]
    correct = batch.rewards.to(_F64) > correct_threshold  # [B]
    ones = torch.ones(batch.B, dtype=_F64)
    n_all = torch.zeros(n_groups, dtype=_F64).index_add_(0, gi, ones)
    n_c = torch.zeros(n_groups, dtype=_F64).index_add_(0, gi, correct.to(_F64))  # [G] correct rows
    n_w = n_all - n_c  # [G] wrong rows
    length = mask.sum(1).to(_F64)
    tot_c = torch.zeros(n_groups, dtype=_F64).index_add_(0, gi, length * correct)  # [G] tokens in correct rows
    tot_w = torch.zeros(n_groups, dtype=_F64).index_add_(0, gi, length * ~correct)
    tp = _token_pairs(batch, gi, correct)
    g_p = tp["g_p"]
    ref_cols = None
    if reference_float32:  # the reference's grid width per group: max over its tokens of min(a + b, n_c), + 1
        k_max = torch.minimum(tp["pres_c"] + tp["pres_w"], n_c[g_p])
        width = torch.zeros(n_groups, dtype=_F64).scatter_reduce(0, g_p, k_max, "amax")
        ref_cols = (width + 1).long()[g_p]
    # one-sided groups are zeroed below; clamp their margins so that the statistics stay finite
    fisher, ig, h = _scores_by_distinct_table(tp["pres_c"], tp["pres_w"], n_c[g_p].clamp_min(1),
                                              n_w[g_p].clamp_min(1), ref_cols)
    tf_c = _bm25_tf(tp["cnt_c"], tot_c[g_p], tot_w[g_p], k1, b)
    tf_w = _bm25_tf(tp["cnt_w"], tot_w[g_p], tot_c[g_p], k1, b)
    x = h + gamma_tf * (tf_c / (tf_w + tf_eps) - tf_w / (tf_c + tf_eps))
    z = (alpha * fisher + beta * ig) * x / (alpha + beta)
    w = 2.0 * top * (torch.sigmoid(z) - 0.5)  # [P]
    dead = (n_c[g_p] == 0) | (n_w[g_p] == 0)  # one-sided group (incl. singletons): no contrast
    if ignore_token_ids:
        dead = dead | torch.isin(tp["v_p"], torch.tensor(ignore_token_ids, dtype=tp["v_p"].dtype))
    w = torch.where(dead, torch.zeros_like(w), w)
    out[tp["rows"], tp["cols"]] = w[tp["pair"]]
    if zero_last_token:  # the response's final token (its EOS when it stopped) carries no key-token weight
        pos = torch.arange(batch.T, device=mask.device).expand_as(mask)
        last = torch.where(mask, pos, -1).amax(1).clamp_min(0)  # [B]
        out[torch.arange(batch.B), last] = 0.0
    return out


def _scores_by_distinct_table(a: Tensor, b: Tensor, n_c: Tensor, n_w: Tensor, ref_cols: Tensor | None,
                              chunk: int = 1 << 20) -> tuple[Tensor, Tensor, Tensor]:
    """(F, IG, h) per pair [P], computed once per distinct table (n_c, n_w, a, b[, grid width]).

    The distinct tables come from `torch.unique(dim=0)` (memory linear in P); the Fisher grid [U, K] is evaluated
    in chunks of about `chunk` cells, so memory stays bounded whatever the group sizes.
    """
    cols = [n_c, n_w, a, b] + ([ref_cols.to(_F64)] if ref_cols is not None else [])
    uniq, inv = torch.unique(torch.stack(cols, dim=1), dim=0, return_inverse=True)  # [U, 4|5], [P]
    k_width = int(uniq[:, 0].max()) + 1  # the exact Fisher grid spans at most n_c + 1 columns
    step = max(1, chunk // k_width)
    parts = [_table_scores(u[:, 2], u[:, 3], u[:, 0], u[:, 1], u[:, 4].long() if ref_cols is not None else None)
             for u in uniq.split(step)]
    fisher, ig, h = (torch.cat(x) for x in zip(*parts))
    return fisher[inv], ig[inv], h[inv]


@estimator("ktae", needs=("response_ids",),
           ranges={"alpha": "[0, inf)", "beta": "[0, inf)", "gamma_tf": "[0, inf)", "top": "(0, inf)",
                   "k1": "(0, inf)", "b": "[0, 1]", "tf_eps": "(0, inf)", "correct_threshold": "(-inf, inf)",
                   "ignore_token_ids": "[0, inf)", "eps": "[0, inf)"})
def ktae(batch: RolloutBatch, *, alpha: float = 1.0, beta: float = 1.0, gamma_tf: float = 1.0, top: float = 1.0,
         k1: float = 2.0, b: float = 0.5, tf_eps: float = 1e-5, correct_threshold: float = 0.0,
         ignore_token_ids: tuple[int, ...] = (), zero_last_token: bool = True, reference_float32: bool = False,
         eps: float = 1e-6, singleton: Singleton = "zero") -> Credit:
    """KTAE: GRPO advantage plus an additive per-token-id weight from correct-vs-wrong token statistics.

    Paper: "KTAE: A Model-Free Algorithm to Key-Tokens Advantage Estimation in Mathematical Reasoning"
    (arXiv 2505.16826). Reference: xiaolizh1/KTAE (commit ea9fb77) `verl/workers/actor/compute_key_tokens.py`
    and `compute_ktae_outcome_advantage_and_keytokens` in `verl/trainer/ppo/core_algos.py` (read for this port).
    Shapes: response_ids [B,T], rewards [B], group_ids [B] -> advantages [B,T].
    Formula, per group and token id v (correct row: R > correct_threshold; bag of tokens over valid tokens):
      a/b = #correct/#wrong rows containing v, c = n_c - a, d = n_w - b;
      F = exp(-2p) with p the two-sided Fisher exact p-value (F = 0 when p = 1);
      IG = H(correct) - H(correct | v present) in bits (log2, as the reference);
      h = asin sqrt(a/n_c) - asin sqrt(b/n_w)   (no factor 2, as the reference);
      tf_s = f_s (k1+1) / (f_s + k1 (1 - b + b T_s / avg(T_c, T_w))), f_s = count of v on side s / T_s,
        T_s = number of valid tokens on side s (BM25 with the whole side as the document);
      x = h + gamma_tf (tf_c / (tf_w + tf_eps) - tf_w / (tf_c + tf_eps));
      z = (alpha F + beta IG) x / (alpha + beta);  w = 2 top (sigmoid(z) - 0.5) in (-top, top);
      A[b,t] = a_b^GRPO + w(group(b), y[b,t]) at valid tokens.
    Defaults (reference): alpha = beta = gamma_tf = top = 1, k1 = 2, b = 0.5, tf_eps = 1e-5.
    EOS: the reference hard-codes w(151643) = 0 (Qwen's <|endoftext|>, its EOS and pad). The batch carries no
    tokenizer, so `zero_last_token=True` (default) gives w = 0 at each response's final valid token, which is
    its EOS whenever it stopped (creditlab / TRL / verl responses include the EOS); a response cut at the length
    limit loses the weight of its last real token instead (the only difference). `ignore_token_ids` zeroes
    further ids everywhere (e.g. the tokenizer's special ids). Checked by hand in the tests.
    Fisher: by default p is computed in float64 with a 1e-7 relative tolerance on ties (as scipy) and p = 1 is
    decided exactly, so a p = 1 table gives F = 0 as the reference intends. The reference sums the pmf in
    float32 with no tolerance, so such tables often give p = 1 - 6e-8 and F ~ 0.135; `reference_float32=True`
    reproduces that float32 sum op for op (bit-identical to a transcription of the reference function in the
    tests); IG, h and tf stay float64 (they agree with the reference's float32 values to ~1e-7).
    Deviations: alpha, beta, gamma_tf and top are honoured (the reference hard-codes them to 1 and uses
    alpha/beta/gamma_tf only as on/off switches); gamma_tf scales the tf term. One-sided groups (incl.
    singletons) get w = 0 (as the reference). Base advantage uses creditlab's singleton policy (reference: raw
    score). The additive w can flip the sign of a small |a_b| (as the reference); w saturates at +-top in
    float64 when a token occurs on one side only (tf ratio ~ 1/tf_eps). Metric credit/ktae_w_abs_mean: mean |w|
    over valid tokens.
    """
    if alpha + beta <= 0:
        raise ValueError(f"ktae needs alpha + beta > 0, got alpha={alpha}, beta={beta}")
    mask = batch.response_mask
    w = ktae_token_weights(batch, alpha=alpha, beta=beta, gamma_tf=gamma_tf, top=top, k1=k1, b=b, tf_eps=tf_eps,
                           correct_threshold=correct_threshold, ignore_token_ids=tuple(ignore_token_ids),
                           zero_last_token=zero_last_token, reference_float32=reference_float32)
    a = group_advantage(batch.rewards, batch.group_ids, eps=eps, singleton=singleton)
    adv = broadcast(a, mask, _F64) + w
    n_valid = max(int(mask.sum()), 1)
    return _shaped_credit(batch, adv, w != 0, ktae_w_abs_mean=float(w.abs().sum()) / n_valid)


# ------------------------------------------------------------------------------------------------ UCAS
def ucas_token_advantage(a: Tensor, zhat: Tensor, logit_norm: Tensor, mask: Tensor, *, beta_pos: float = 0.25,
                         beta_neg: float = 0.35, lam: float = 0.05, penalize_zero_signal: bool = True) -> Tensor:
    """UCAS shaping from its three ingredients: a [B], z-scored certainty zhat [B], normalised logit [B,T].

    u = a M - lam * logit_norm with M = exp(-beta_pos zhat) if a > 0 else exp(beta_neg zhat); u >= 0 where
    a M > 0; rows with a = 0 get 0 unless `penalize_zero_signal`. Returns [B,T] float64, 0 outside mask.
    """
    a, zhat = a.to(_F64), zhat.to(_F64)
    m = torch.where(a > 0, torch.exp(-beta_pos * zhat), torch.exp(beta_neg * zhat))  # [B]
    am = (a * m)[:, None]  # [B,1]
    u = am - lam * logit_norm.to(_F64)  # [B,T]
    u = torch.where(am > 0, u.clamp_min(0.0), u)
    if not penalize_zero_signal:
        u = torch.where((a == 0)[:, None], torch.zeros_like(u), u)
    return torch.where(mask, u, torch.zeros_like(u))


@estimator("ucas", needs=("certainty", "token_logits"),
           ranges={"beta_pos": "[0, inf)", "beta_neg": "[0, inf)", "lam": "[0, inf)", "eps": "[0, inf)"})
def ucas(batch: RolloutBatch, *, beta_pos: float = 0.25, beta_neg: float = 0.35, lam: float = 0.05,
         penalize_zero_signal: bool = True, eps: float = 1e-6, singleton: Singleton = "zero") -> Credit:
    """UCAS: certainty-aware sequence scaling plus a penalty on over-confident (high-logit) tokens.

    Paper: UCAS, uncertainty-aware advantage shaping (arXiv 2510.10649). Reference (per methods.md §5.4):
    xvolcano02/UCAS `compute_ucas_advantage` (constants hard-coded there).
    Shapes: certainty [B,T] (self-certainty logsumexp - mean of logits), token_logits [B,T] -> advantages [B,T].
    Formula: C_b = sum_t c_t m_t; zhat_b = (C_b - mean_g C) / (std_g C + eps) within the prompt group;
      M_b = exp(-beta_pos zhat_b) if a_b > 0 else exp(beta_neg zhat_b) (a_b the GRPO advantage);
      l~ = min-max normalisation of the sampled-token logit over all valid tokens of the batch (0.5 if max = min);
      u = a_b M_b - lam l~; where a_b M_b > 0, u := max(u, 0).
    Defaults: beta_pos = 0.25, beta_neg = 0.35, lam = 0.05 (reference constants, here keyword arguments).
    Deviations: zhat = 0 for singleton or zero-variance groups (no within-group contrast). Batch-level
    min-max: call once on the full batch, never per micro-batch. `penalize_zero_signal=True` (reference):
    rows with a_b = 0 (all-correct / all-wrong groups) still get -lam l~; False gives them exactly 0.
    """
    mask = batch.response_mask
    a = group_advantage(batch.rewards, batch.group_ids, eps=eps, singleton=singleton)  # [B]
    cert = (torch.where(mask, batch.certainty.to(_F64), torch.zeros((), dtype=_F64))).sum(1)  # [B]
    mean, std, count, constant = group_stats(cert, batch.group_ids)
    zhat = torch.where((count > 1) & ~constant, (cert - mean) / (std + eps), torch.zeros_like(cert))
    logits = batch.token_logits.to(_F64)
    if bool(mask.any()):
        lo, hi = logits[mask].min(), logits[mask].max()
        norm = (logits - lo) / (hi - lo) if hi > lo else torch.full_like(logits, 0.5)
    else:
        norm = torch.zeros_like(logits)
    adv = ucas_token_advantage(a, zhat, norm, mask, beta_pos=beta_pos, beta_neg=beta_neg, lam=lam,
                               penalize_zero_signal=penalize_zero_signal)
    return _shaped_credit(batch, adv, mask & (lam != 0))
