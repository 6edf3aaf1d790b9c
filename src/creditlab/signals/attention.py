"""Attention signals for preplan/anchor credit: head spans, local/global head sets, WAAD and FAI per token.

    sig = attention_signals(policy.model, batch.prompt_ids, batch.prompt_mask, batch.response_ids,
                            batch.response_mask, AttnSignalConfig())
    batch = batch.replace(attn_waad=sig.waad, attn_fai=sig.fai)

Paper: "Attention Illuminates LLM Reasoning" (arXiv 2510.13554) §4.1 and §5.1: one extra forward over prompt +
response; attention maps of five evenly spaced layers in [floor(L/3), floor(2L/3)]; per head the span
d(l,h) = (1/|R|) sum_{t in R} sum_{s<=t} A[t,s] (t - s) over response rows R; the lowest / highest `head_frac` of
heads (30% in the paper's example) are the local / global sets; Abar_loc / Abar_glob their mean maps;
WAAD_t = sum_s Abar_loc[t,s] min(t - s, W) (Def. 4.1); FAI_s = mean of Abar_glob[t,s] over response rows t with
s + H_lo <= t <= s + H_hi (Def. 4.2).

How it is computed (never the [L,H,N,N] stack, never even one layer's [B,H,N,N]): a forward pre-hook on each chosen
layer's attention module takes the layer's input, recomputes q and k (projection, optional q/k norm, rotary
embedding; the model's own fused attention runs untouched), and turns chunks of `chunk` response rows into
softmax probabilities [B,H,C,N] that are reduced at once into per-head statistics: the span numerator [B,H],
WAAD [B,H,T] and the windowed FAI column sums [B,H,T]. WAAD and FAI are linear in the map, so the mean over a head
set of the per-head statistics *is* the statistic of the mean map: head sets can be chosen per response after
the pass. The forward stops after the last chosen layer and computes no logits.

Library choices (not in the paper): head sets are chosen per response; `sink` leading valid positions of each
sequence (the BOS / first prompt token, an attention sink) are dropped from the keys and each row renormalised
(`sink=0` keeps the paper's raw maps); FAI of a token with no response row in its horizon is 0; rows are
processed `rows_per_pass` at a time; with `bf16` (the trainer follows --bf16, as the sampler does) the layers run
under bf16 autocast, which moves WAAD by ~1% of its range (signals, as the sampler's bf16 log-probs).
Supported: Llama-style attention modules (q_proj/k_proj, rotary position embeddings, optional q_norm/k_norm as in
Qwen3) with full causal attention; sliding-window or soft-capped attention is not reproduced.
"""

from __future__ import annotations

import string
import sys
import time
import unicodedata
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from creditlab.batch import RolloutBatch


@dataclass(frozen=True)
class AttnSignalConfig:
    """Parameters of the attention signals (defaults from the paper where it gives them)."""

    window: int = 10  # W, WAAD clipping window (paper: 10)
    h_lo: int = 10  # FAI horizon lower bound H_lo (paper: 10)
    h_hi: int = 100  # FAI horizon upper bound H_hi (ICML text: 100; arXiv v1 text: 50)
    head_frac: float = 0.3  # share of heads in each of the local / global sets (paper's example: 30%)
    layers: tuple[int, ...] | None = None  # layer indices; None = five evenly spaced in [L//3, 2L//3]
    sink: int = 1  # leading valid positions dropped from the keys (library choice; 0 = paper's raw maps)
    chunk: int = 128  # response rows per attention-probability chunk (memory ~ B*H*chunk*N floats)
    rows_per_pass: int = 8  # sequences per forward
    bf16: bool = False  # run the model's forward under bf16 autocast (q/k, probabilities and reductions stay fp32)

    def validate(self) -> None:
        if self.window < 1 or self.h_lo < 0 or self.h_hi < self.h_lo:
            raise ValueError(f"attention signals need window >= 1 and 0 <= h_lo <= h_hi, got window={self.window}, "
                             f"h_lo={self.h_lo}, h_hi={self.h_hi}")
        if not 0.0 < self.head_frac <= 0.5:
            raise ValueError(f"head_frac must be in (0, 0.5] (local and global sets must not overlap), got "
                             f"{self.head_frac}")
        if self.sink < 0 or self.chunk < 1 or self.rows_per_pass < 1:
            raise ValueError("attention signals need sink >= 0, chunk >= 1 and rows_per_pass >= 1")


@dataclass
class AttnSignals:
    """Output of `attention_signals`: per-token fields and per-head diagnostics (L' chosen layers, H heads)."""

    waad: Tensor  # [B,T] float32, 0 outside response_mask
    fai: Tensor  # [B,T] float32, 0 outside response_mask
    spans: Tensor  # [B, L'*H] mean backward distance of each head over the response rows
    local_heads: Tensor  # [B, L'*H] bool
    global_heads: Tensor  # [B, L'*H] bool
    layers: tuple[int, ...]


def default_layers(n_layers: int, count: int = 5) -> tuple[int, ...]:
    """`count` evenly spaced layer indices in [floor(L/3), floor(2L/3)] (paper §5.1), deduplicated, in range."""
    lo, hi = n_layers // 3, min((2 * n_layers) // 3, n_layers - 1)
    idx = torch.linspace(lo, hi, count).round().long().clamp(0, n_layers - 1)
    return tuple(sorted(set(idx.tolist())))


class _StopForwardError(Exception):
    """Raised after the last chosen layer: the rest of the forward (and the logits) is not needed."""


# ---------------------------------------------------------------------------------------------- pure reductions
def accumulate_chunk(probs: Tensor, row_t: Tensor, row_valid: Tensor, P: int, window: int, h_lo: int, h_hi: int,
                     out: dict[str, Tensor]) -> None:
    """Add one chunk of attention probabilities to the per-head statistics.

    probs [B,H,C,N]: rows = response tokens row_t [C] (response index; sequence position P + t), keys = the N
    sequence positions (P prompt then T response). row_valid [B,C]. out["dist"] [B,H] += sum_t sum_s A (t - s);
    out["waad"][..., t] = sum_s A min(t - s, W); out["fai"] [B,H,T] += sum_t A[t,s] over the horizon band.
    """
    N = probs.shape[-1]
    pos = P + row_t  # [C] sequence positions of the rows
    dist = (pos[:, None] - torch.arange(N, device=probs.device)[None, :]).clamp_min(0).to(probs.dtype)  # [C,N]
    a = probs * row_valid[:, None, :, None].to(probs.dtype)  # [B,H,C,N] invalid rows contribute nothing
    out["dist"] += torch.einsum("bhcn,cn->bh", a, dist)
    out["waad"][:, :, row_t] = torch.einsum("bhcn,cn->bhc", a, dist.clamp_max(window))
    T = out["fai"].shape[-1]
    lag = row_t[:, None] - torch.arange(T, device=probs.device)[None, :]  # [C,T] t - s
    band = ((lag >= h_lo) & (lag <= h_hi)).to(probs.dtype)
    out["fai"] += torch.einsum("bhct,ct->bht", a[..., P:P + T], band)


def fai_counts(response_mask: Tensor, h_lo: int, h_hi: int) -> Tensor:
    """|T(s)| [B,T]: number of valid response rows t with s + h_lo <= t <= s + h_hi."""
    c = torch.cat([torch.zeros_like(response_mask[:, :1], dtype=torch.long), response_mask.long().cumsum(1)], 1)
    T = response_mask.shape[1]
    s = torch.arange(T, device=response_mask.device)
    hi = (s + h_hi + 1).clamp(max=T)
    lo = (s + h_lo).clamp(max=T)
    return (c[:, hi] - c[:, lo]).clamp_min(0)


def select_heads(spans: Tensor, head_frac: float) -> tuple[Tensor, Tensor]:
    """Per row: the floor(head_frac n + 1/2) (at least 1) heads of lowest span (local) and of highest span (global);
    ties broken by head index. spans [B,n] -> two [B,n] bool masks."""
    n = spans.shape[1]
    k = max(1, int(head_frac * n + 0.5))
    rank_lo = torch.argsort(torch.argsort(spans, dim=1, stable=True), dim=1)
    rank_hi = torch.argsort(torch.argsort(spans, dim=1, descending=True, stable=True), dim=1)
    return rank_lo < k, rank_hi < k


def combine_heads(stats: dict[str, Tensor], counts: Tensor, n_rows: Tensor, response_mask: Tensor,
                  head_frac: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Per-head statistics [B,n,T] -> (waad [B,T], fai [B,T], spans [B,n], local [B,n], global [B,n])."""
    spans = stats["dist"] / n_rows.clamp_min(1)[:, None].to(stats["dist"].dtype)  # [B,n]
    local, glob = select_heads(spans, head_frac)
    lw = local.to(spans.dtype)[..., None]
    gw = glob.to(spans.dtype)[..., None]
    waad = (stats["waad"] * lw).sum(1) / lw.sum(1)  # [B,T]
    fai_head = stats["fai"] / counts.clamp_min(1)[:, None, :].to(spans.dtype)  # [B,n,T]
    fai = (fai_head * gw).sum(1) / gw.sum(1)
    fai = torch.where(counts > 0, fai, torch.zeros_like(fai))
    zero = torch.zeros((), dtype=spans.dtype, device=spans.device)
    return (torch.where(response_mask, waad, zero), torch.where(response_mask, fai, zero), spans, local, glob)


# ---------------------------------------------------------------------------------------------- the pass
def _qk(module: torch.nn.Module, hidden: Tensor, position_embeddings: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """q [B,H,N,d] and k [B,H,N,d] (kv heads repeated) as the module's own forward computes them."""
    if not (hasattr(module, "q_proj") and hasattr(module, "k_proj")):
        raise NotImplementedError(f"attention signals need a Llama-style attention module with q_proj/k_proj; got "
                                  f"{type(module).__name__}")
    B, N, _ = hidden.shape
    hd = module.head_dim
    q = module.q_proj(hidden).view(B, N, -1, hd)
    k = module.k_proj(hidden).view(B, N, -1, hd)
    if hasattr(module, "q_norm"):
        q, k = module.q_norm(q), module.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    rotary = getattr(sys.modules[type(module).__module__], "apply_rotary_pos_emb", None)
    if rotary is None:
        raise NotImplementedError(f"attention signals: no apply_rotary_pos_emb next to {type(module).__name__}")
    cos, sin = position_embeddings
    q, k = rotary(q, k, cos, sin)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # GQA: kv head j serves query heads j*rep ..
    return q.float(), k.float()


def _layer_stats(module: torch.nn.Module, hidden: Tensor, pe: tuple[Tensor, Tensor], key_ok: Tensor, P: int,
                 response_mask: Tensor, cfg: AttnSignalConfig) -> dict[str, Tensor]:
    q, k = _qk(module, hidden, pe)  # [B,H,N,d] fp32 (the projections may run under the caller's autocast)
    with torch.autocast(q.device.type, enabled=False):  # probabilities and reductions in fp32
        return _chunked_stats(module, q, k, key_ok, P, response_mask, cfg)


def _chunked_stats(module: torch.nn.Module, q: Tensor, k: Tensor, key_ok: Tensor, P: int, response_mask: Tensor,
                   cfg: AttnSignalConfig) -> dict[str, Tensor]:
    B, H, N, _ = q.shape
    T = N - P
    out = {"dist": q.new_zeros(B, H), "waad": q.new_zeros(B, H, T), "fai": q.new_zeros(B, H, T)}
    scale = getattr(module, "scaling", q.shape[-1] ** -0.5)
    keys = torch.arange(N, device=q.device)
    for start in range(0, T, cfg.chunk):
        row_t = torch.arange(start, min(start + cfg.chunk, T), device=q.device)  # [C]
        pos = P + row_t
        scores = torch.einsum("bhcd,bhnd->bhcn", q[:, :, pos], k) * scale  # [B,H,C,N]
        allowed = key_ok[:, None, :] & (keys[None, None, :] <= pos[None, :, None])  # [B,C,N]
        allowed |= keys[None, None, :] == pos[None, :, None]  # a row always sees itself (even a sink)
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        accumulate_chunk(probs, row_t, response_mask[:, row_t], P, cfg.window, cfg.h_lo, cfg.h_hi, out)
    return out


@torch.no_grad()
def _one_pass(model: Any, prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor, response_mask: Tensor,
              layers: tuple[int, ...], cfg: AttnSignalConfig) -> dict[str, Tensor]:
    P = prompt_ids.shape[1]
    ids = torch.cat([prompt_ids, response_ids], dim=1)  # [b, N]
    mask = torch.cat([prompt_mask.long(), torch.ones_like(response_ids)], dim=1)  # as sequence_logprobs attends
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    key_ok = mask.bool() & ~((mask.cumsum(-1) <= cfg.sink) & mask.bool())  # drop the `sink` first valid positions
    decoder_layers = model.get_decoder().layers
    per_layer: dict[int, dict[str, Tensor]] = {}

    def hook(idx: int):
        def pre(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            pe = kwargs.get("position_embeddings", args[1] if len(args) > 1 else None)
            per_layer[idx] = _layer_stats(module, hidden, pe, key_ok, P, response_mask, cfg)
            if idx == layers[-1]:
                raise _StopForwardError
        return pre

    handles = [decoder_layers[i].self_attn.register_forward_pre_hook(hook(i), with_kwargs=True) for i in layers]
    was_training = model.training
    model.eval()
    try:
        with torch.autocast(ids.device.type, torch.bfloat16, enabled=cfg.bf16):
            model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False, logits_to_keep=1)
    except _StopForwardError:
        pass
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {key: torch.cat([per_layer[i][key] for i in layers], dim=1) for key in ("dist", "waad", "fai")}


def attention_signals(model: Any, prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor,
                      response_mask: Tensor, cfg: AttnSignalConfig | None = None) -> AttnSignals:
    """WAAD and FAI [B,T] for every response token, from one no-grad forward per `rows_per_pass` rows."""
    cfg = cfg or AttnSignalConfig()
    cfg.validate()
    n_layers = len(model.get_decoder().layers)
    layers = tuple(cfg.layers) if cfg.layers else default_layers(n_layers)
    if any(not 0 <= i < n_layers for i in layers):
        raise ValueError(f"--attn-layers {list(layers)} out of range for a model with {n_layers} layers")
    layers = tuple(sorted(set(layers)))
    parts = [_one_pass(model, prompt_ids[i:i + cfg.rows_per_pass], prompt_mask[i:i + cfg.rows_per_pass],
                       response_ids[i:i + cfg.rows_per_pass], response_mask[i:i + cfg.rows_per_pass], layers, cfg)
             for i in range(0, response_ids.shape[0], cfg.rows_per_pass)]
    stats = {key: torch.cat([p[key] for p in parts]) for key in ("dist", "waad", "fai")}
    counts = fai_counts(response_mask, cfg.h_lo, cfg.h_hi)
    waad, fai, spans, local, glob = combine_heads(stats, counts, response_mask.sum(1), response_mask, cfg.head_frac)
    return AttnSignals(waad.float(), fai.float(), spans, local, glob, layers)


# ---------------------------------------------------------------------------------------------- punctuation
def _is_punct(text: str) -> bool:
    return bool(text) and all(c.isspace() or c in string.punctuation or unicodedata.category(c).startswith("P")
                              for c in text)


def punctuation_mask(response_ids: Tensor, response_mask: Tensor, tokenizer: Any) -> Tensor:
    """[B,T] bool: valid tokens whose decoded text is non-empty and only punctuation and/or whitespace."""
    uniq, inverse = torch.unique(response_ids, return_inverse=True)
    texts = tokenizer.batch_decode([[int(i)] for i in uniq.tolist()], skip_special_tokens=True)
    table = torch.tensor([_is_punct(t) for t in texts], dtype=torch.bool, device=response_ids.device)
    return table[inverse] & response_mask


def produce_attention_fields(batch: RolloutBatch, policy: Any, cfg: AttnSignalConfig) -> tuple[RolloutBatch,
                                                                                                dict[str, float]]:
    """Fill attn_waad, attn_fai and punct_mask where the batch lacks them; returns (batch, diagnostics)."""
    changes: dict[str, Tensor] = {}
    metrics: dict[str, float] = {}
    if batch.attn_waad is None or batch.attn_fai is None:
        if batch.prompt_ids is None or batch.prompt_mask is None:
            raise ValueError("attention signals need RolloutBatch.prompt_ids and prompt_mask (the rollout engine)")
        t0 = time.perf_counter()
        sig = attention_signals(policy.model, batch.prompt_ids, batch.prompt_mask, batch.response_ids,
                                batch.response_mask, cfg)
        metrics["time/attn_signal"] = time.perf_counter() - t0
        has = batch.response_mask.any(1)
        metrics["attn/local_span"] = float(torch.where(sig.local_heads, sig.spans, 0).sum(1)[has].mean()
                                           / sig.local_heads[0].sum()) if bool(has.any()) else 0.0
        metrics["attn/global_span"] = float(torch.where(sig.global_heads, sig.spans, 0).sum(1)[has].mean()
                                            / sig.global_heads[0].sum()) if bool(has.any()) else 0.0
        if batch.attn_waad is None:
            changes["attn_waad"] = sig.waad
        if batch.attn_fai is None:
            changes["attn_fai"] = sig.fai
    if batch.punct_mask is None:
        changes["punct_mask"] = punctuation_mask(batch.response_ids, batch.response_mask, policy.tokenizer)
    return batch.replace(**changes), metrics


def attention_producers(model: Any, tokenizer: Any, cfg: AttnSignalConfig | None = None
                        ) -> dict[str, Any]:
    """`{field: fn(batch) -> tensor}` for attn_waad, attn_fai and punct_mask, for trainers that take field producers
    (TRL's `CreditGRPOTrainer(field_producers=...)`). Pass the model object the trainer trains (it is updated in
    place, so the signals come from the current policy). One attention pass per batch serves both fields."""
    cache: dict[str, Any] = {}

    def signals(batch: RolloutBatch) -> AttnSignals:
        if cache.get("ids") is not batch.response_ids:
            if batch.prompt_ids is None or batch.prompt_mask is None:
                raise ValueError("attention signals need RolloutBatch.prompt_ids and prompt_mask")
            cache["ids"] = batch.response_ids
            cache["sig"] = attention_signals(model, batch.prompt_ids, batch.prompt_mask, batch.response_ids,
                                             batch.response_mask, cfg)
        return cache["sig"]

    return {"attn_waad": lambda batch: signals(batch).waad, "attn_fai": lambda batch: signals(batch).fai,
            "punct_mask": lambda batch: punctuation_mask(batch.response_ids, batch.response_mask, tokenizer)}
