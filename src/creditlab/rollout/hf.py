"""Batched, KV-cached sampling with a Hugging Face causal LM, scoring of responses, continuation from prefixes.

    cfg = SamplingConfig(temperature=1.0, max_new_tokens=40)
    batch = generate(policy, [policy.format_prompt(q) for q in questions], n=4, cfg=cfg, seed=step)
    logp, ent = sequence_logprobs(policy.model, batch.prompt_ids, batch.prompt_mask,
                                  batch.response_ids, batch.response_mask, temperature=cfg.temperature)
    conts = continue_from(policy, prefixes, n=8, cfg=cfg, seed=step)   # Monte-Carlo values from prefixes

Which distribution the numbers refer to (one convention, used by all three functions):
- `logprobs` and `entropies` are those of the *sampling* distribution softmax(z / temperature) before top-p
  truncation (as in verl and TRL); temperature 0 means greedy decoding and scores under temperature 1. The
  trainer recomputes old/ref/current log-probs with `sequence_logprobs(..., temperature=cfg.temperature)` in
  fp32, which matches the rollout's `logprobs` to ~1e-5 when sampling ran in fp32. Under `bf16=True` the
  rollout values are bf16-noisy: use them as signals, never as PPO's old log-probs.
- `certainty` (logsumexp(z) - mean(z)) and `token_logits` (z of the sampled token) use the raw logits z.

A prompt shared by n samples runs through the model once: `generate` and `continue_from` prefill each distinct
prompt/prefix and index its KV cache out to the n rows, and `sequence_logprobs(share_prompts=True)` (the default)
does the same for the trainer's forward/backward, where it removes (G - 1) / G of the prompt tokens.

The sampling loop is hand-written rather than `model.generate`: it needs the full next-token distribution at
every step for the signals, a private `torch.Generator` (determinism without touching the global RNG), and the
same code serves prompts and arbitrary prefixes.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedModel

from creditlab.batch import RolloutBatch
from creditlab.policy import Policy
from creditlab.rollout.head import DEFAULT_CHUNK_LOGITS, head_logprobs
from creditlab.signals.entropy import self_certainty, token_entropy


@dataclass
class SamplingConfig:
    """How responses are sampled."""

    temperature: float = 1.0  # softmax temperature; 0 means greedy (argmax) decoding
    top_p: float = 1.0  # nucleus sampling: keep the smallest set of tokens with probability >= top_p
    max_new_tokens: int = 64  # response length cap (tokens, EOS included)
    bf16: bool = False  # sample under bf16 autocast (faster on CPU); master weights stay fp32

    @classmethod
    def from_rollout(cls, cfg: Any, model: torch.nn.Module) -> SamplingConfig:
        """From a `RolloutConfig`; its ``bf16=None`` (auto) is decided for `model`'s device and size."""
        from creditlab.device import resolve_bf16

        bf16 = resolve_bf16(cfg.bf16, model.device, sum(p.numel() for p in model.parameters()))
        return cls(temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens, bf16=bf16)


@dataclass
class Sampled:
    """Output of `sample_tokens`: B rows, T = number of decoding steps taken (<= max_new_tokens)."""

    tokens: Tensor  # [B, T] long, pad id after the first stop token
    mask: Tensor  # [B, T] bool, True through the first stop token inclusive
    logprobs: Tensor  # [B, T] float, 0 outside mask
    entropies: Tensor  # [B, T] float, 0 outside mask
    certainty: Tensor  # [B, T] float, 0 outside mask
    token_logits: Tensor  # [B, T] float, 0 outside mask


def scoring_temperature(temperature: float) -> float:
    """The temperature log-probs and entropies refer to: the sampling one, or 1 for greedy (0)."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    return temperature if temperature > 0 else 1.0


def generate(policy: Policy, prompts: list[str], n: int, cfg: SamplingConfig, *, seed: int,
             group_offset: int = 0) -> RolloutBatch:
    """Sample `n` responses to each already-formatted prompt; rows are prompt-major (prompt i -> rows i*n..).

    Returns a `RolloutBatch` with prompt_ids/prompt_mask (left-padded), response_ids/response_mask (through the
    first EOS inclusive), group_ids = group_offset + prompt index, rewards = 0 (the trainer fills them),
    texts (decoded without special tokens) and the per-token signals logprobs, entropies, certainty and
    token_logits of the sampling policy (see the module docstring for their temperature).
    Deterministic given `seed` on CPU.
    """
    if n < 1 or not prompts:
        raise ValueError(f"generate needs at least one prompt and n >= 1, got {len(prompts)} prompts, n={n}")
    device = policy.model.device
    prompt_ids, prompt_mask = (t.to(device) for t in policy.encode_prompts(prompts))  # [G, P]
    expand = torch.arange(len(prompts), device=device).repeat_interleave(n)  # [B] row -> its prompt
    generator = torch.Generator(device=device).manual_seed(seed)
    out = sample_tokens(policy.model, prompt_ids, prompt_mask, cfg, generator=generator,
                        stop_ids=policy.stop_ids, pad_id=policy.tokenizer.pad_token_id, expand=expand)
    prompt_ids, prompt_mask = prompt_ids[expand], prompt_mask[expand]  # [B, P]
    texts = [policy.tokenizer.decode(row[m].tolist(), skip_special_tokens=True)
             for row, m in zip(out.tokens, out.mask)]
    group_ids = group_offset + expand  # [B]
    return RolloutBatch(
        response_ids=out.tokens, response_mask=out.mask, group_ids=group_ids,
        rewards=torch.zeros(len(texts), device=device), prompt_ids=prompt_ids, prompt_mask=prompt_mask,
        logprobs=out.logprobs, entropies=out.entropies, certainty=out.certainty, token_logits=out.token_logits,
        texts=texts, meta={"sampling": asdict(cfg), "seed": seed, "policy": policy.name})


def continue_from(policy: Policy, prefixes: list[list[int]], n: int, cfg: SamplingConfig, *, seed: int,
                  max_rows: int | None = None) -> list[list[list[int]]]:
    """Sample `n` continuations of each token-id prefix (prompt + partial response, no padding).

    Returns `out[i][j]`: the token ids of continuation j of prefix i, up to and including the first stop token
    (or `cfg.max_new_tokens` ids). Prefixes are left-padded into one batch; `max_rows` splits the len(prefixes)*n
    rows into chunks (whole prefixes per chunk) to bound memory. Deterministic given `seed` and `max_rows`.
    """
    if n < 1 or any(len(p) == 0 for p in prefixes):
        raise ValueError("continue_from needs n >= 1 and non-empty prefixes")
    per_chunk = max(1, (max_rows or n * max(len(prefixes), 1)) // n)  # prefixes per chunk
    generator = torch.Generator(device=policy.model.device).manual_seed(seed)
    out: list[list[list[int]]] = []
    for start in range(0, len(prefixes), per_chunk):
        chunk = prefixes[start:start + per_chunk]
        ids, mask = _left_pad(chunk, policy.tokenizer.pad_token_id, policy.model.device)  # [b, L]
        res = sample_tokens(policy.model, ids, mask, cfg, generator=generator, stop_ids=policy.stop_ids,
                            pad_id=policy.tokenizer.pad_token_id,
                            expand=torch.arange(len(chunk), device=ids.device).repeat_interleave(n))
        rows = [t[m].tolist() for t, m in zip(res.tokens, res.mask)]
        out.extend(rows[i * n:(i + 1) * n] for i in range(len(chunk)))
    return out


def _left_pad(seqs: list[list[int]], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Ragged id lists -> left-padded (ids [b, L] long, mask [b, L] bool)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = True
    return ids.to(device), mask.to(device)


@torch.no_grad()
def sample_tokens(model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor, cfg: SamplingConfig, *,
                  generator: torch.Generator, stop_ids: list[int], pad_id: int,
                  expand: Tensor | None = None, compact: float = 0.75) -> Sampled:
    """KV-cached autoregressive sampling from left-padded inputs [N, L]; stops early once every row has stopped.

    `expand` ([B] long, optional): output row b continues input row expand[b]. The inputs are prefilled once and
    their KV cache is indexed out to the B rows (n samples of one prompt share its prefill); without it B = N.
    Finished rows leave the batch: whenever the rows still sampling fall to `compact` × the rows in the forward
    (0.75 by default; 0 never), the KV cache, mask and positions are indexed down to them, so later steps run
    only those rows (`model.generate` keeps computing finished rows to the end). Tokens are drawn for the rows
    in the forward, so the random stream depends on `compact` (greedy decoding does not).
    The model runs in eval mode (restored afterwards) and under bf16 autocast when `cfg.bf16`.
    """
    was_training = model.training
    model.eval()
    device = input_ids.device
    mask = attention_mask.long()  # [N, L]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # [N, L] left padding does not shift positions
    cols: list[tuple[Tensor, ...]] = []
    try:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                        logits_to_keep=1)
            cache, logits = output_cache(out), out.logits[:, -1]  # logits: [N, V]
            if expand is not None:  # one prefill per distinct input, then one cache row per sample
                cache.batch_select_indices(expand)
                logits, mask, positions = logits[expand], mask[expand], positions[expand]
            B = mask.shape[0]
            stops = torch.tensor(stop_ids, device=device)
            rows = torch.arange(B, device=device)  # [b] output row of each row in the forward
            live = torch.ones(B, dtype=torch.bool, device=device)  # [b] not yet past a stop token
            for _ in range(cfg.max_new_tokens):
                token, stats = _sample_step(logits.float(), cfg, generator)  # [b], 4 x [b]
                token = torch.where(live, token, torch.full_like(token, pad_id))
                cols.append(_scatter_column(rows, B, pad_id, token, live, stats))
                live &= ~torch.isin(token, stops)
                n_live = int(live.sum())
                if n_live == 0:
                    break
                if n_live <= compact * live.numel():  # drop finished rows from the forward
                    keep = live.nonzero().squeeze(1)
                    cache.batch_select_indices(keep)
                    rows, live, token, mask, positions = rows[keep], live[keep], token[keep], mask[keep], \
                        positions[keep]
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)  # [b, L + t + 1]
                positions = positions[:, -1:] + 1  # [b, 1]
                out = model(input_ids=token[:, None], attention_mask=mask, position_ids=positions,
                            use_cache=True, **{cache_kwarg(model): cache})
                cache, logits = output_cache(out), out.logits[:, -1]
    finally:
        model.train(was_training)
    return _stack(cols, B, device)


def _scatter_column(rows: Tensor, B: int, pad_id: int, token: Tensor, live: Tensor,
                    stats: list[Tensor]) -> tuple[Tensor, ...]:
    """One decoding step's values for the rows in the forward [b] -> full columns [B] (pad / False / 0 elsewhere)."""
    if rows.numel() == B:
        return (token, live.clone(), *stats)
    full_token = torch.full((B,), pad_id, dtype=token.dtype, device=token.device).index_copy(0, rows, token)
    full_live = torch.zeros(B, dtype=torch.bool, device=token.device).index_copy(0, rows, live)
    return (full_token, full_live, *(torch.zeros(B, dtype=x.dtype, device=x.device).index_copy(0, rows, x)
                                     for x in stats))


def _sample_step(logits: Tensor, cfg: SamplingConfig, generator: torch.Generator) -> tuple[Tensor, list[Tensor]]:
    """One decoding step from raw logits [B, V] fp32 -> (token [B], [logprob, entropy, certainty, logit] [B])."""
    scaled = logits / scoring_temperature(cfg.temperature)  # [B, V]
    logp_all = torch.log_softmax(scaled, dim=-1)  # [B, V]
    if cfg.temperature == 0:
        token = logits.argmax(dim=-1)  # [B]
    else:
        probs = logp_all.exp()
        if cfg.top_p < 1.0:
            probs = _top_p_filter(probs, cfg.top_p)
        token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # [B]
    pick = token[:, None]
    stats = [logp_all.gather(-1, pick).squeeze(-1), token_entropy(scaled), self_certainty(logits),
             logits.gather(-1, pick).squeeze(-1)]
    return token, stats


def _top_p_filter(probs: Tensor, top_p: float) -> Tensor:
    """Zero all but the smallest top-probability set whose mass reaches `top_p` (the top token always stays)."""
    sorted_p, order = probs.sort(dim=-1, descending=True)  # [B, V]
    drop = (sorted_p.cumsum(dim=-1) - sorted_p) >= top_p  # mass before this token already enough
    sorted_p = sorted_p.masked_fill(drop, 0.0)
    return torch.zeros_like(probs).scatter(-1, order, sorted_p)


def _stack(cols: list[tuple[Tensor, ...]], B: int, device: torch.device) -> Sampled:
    """Per-step columns -> [B, T] tensors with every signal zeroed outside the mask."""
    if not cols:
        empty = torch.zeros(B, 0, device=device)
        return Sampled(empty.long(), empty.bool(), empty, empty, empty, empty)
    token, alive, *stats = (torch.stack(c, dim=1) for c in zip(*cols))  # each [B, T]
    return Sampled(token, alive, *(s.masked_fill(~alive, 0.0) for s in stats))


DEFAULT_LENGTH_BUCKETS = 4  # sequence_logprobs: response-length buckets (padding after EOS skipped)

# Model types whose causal-LM forward is exactly `logits = lm_head(trunk(...).last_hidden_state)` (no logit scaling
# or soft-capping), so `sequence_logprobs` can run the trunk and the head separately; others take the full-logits path.
HEAD_SPLIT_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "smollm3", "olmo2", "gpt2"})


def cache_kwarg(model: torch.nn.Module) -> str:
    """The forward keyword that takes a KV cache: `cache` (transformers >= 5.2x, which warns on the old name) or
    `past_key_values` (older releases, e.g. the one verl pins)."""
    return _cache_kwarg(type(model))


@functools.cache
def _cache_kwarg(cls: type) -> str:
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def output_cache(out: Any) -> Any:
    """The KV cache of a model output (`cache`, or `past_key_values` before the rename)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def split_head(model: PreTrainedModel) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """(trunk, lm_head) when the model's logits are lm_head(trunk's last hidden state), else None."""
    if getattr(model.config, "model_type", None) not in HEAD_SPLIT_TYPES:
        return None
    trunk = getattr(model, model.base_model_prefix, None)
    head = model.get_output_embeddings()
    if trunk is None or trunk is model or not isinstance(head, torch.nn.Linear):
        return None
    return trunk, head


def sequence_logprobs(model: PreTrainedModel, prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor,
                      response_mask: Tensor, *, temperature: float = 1.0, with_entropy: bool = False,
                      share_prompts: bool = True, return_hidden: bool = False, full_logits: bool = False,
                      chunk_logits: int = DEFAULT_CHUNK_LOGITS,
                      length_buckets: int = DEFAULT_LENGTH_BUCKETS) -> tuple[Tensor, ...]:
    """Log-probs [B, T] of the response tokens (and entropies [B, T] if asked): `(logp, entropy or None)`, plus the
    hidden states when `return_hidden`: `(logp, entropy, hidden)`.

    Scores softmax(z / temperature) (temperature 0 scores at 1, as `generate` does); differentiable when called
    with grad enabled; exactly 0 outside `response_mask`. Every response position is attended (padding after
    EOS only follows valid tokens, so causality keeps it out), which also keeps masked observation tokens of
    multi-turn rows visible.

    The model's trunk runs once and the LM head runs on chunks of the valid positions (`rollout.head`): no
    [B, T, V] logits tensor exists, forward or backward, and padding positions cost no head matmul. Models whose
    logits are not plainly lm_head(hidden) (`HEAD_SPLIT_TYPES`), or `full_logits=True`, take the full-logits path
    (the T needed logits rows, z[token] - logsumexp(z)); both give the same numbers up to float reassociation.

    `hidden` [B, T, D]: the last hidden state (after the final norm) at the position that predicts response token
    t, i.e. the state before token t, aligned with `response_ids` (for a value head on the policy's trunk); not
    zeroed outside the mask. On the full-logits path it is the model's last `hidden_states` entry.

    `share_prompts`: rows with identical prompts (a GRPO group) run the prompt through the model once; its KV
    cache is then indexed out to every row of the group and the responses run on top of it. Same numbers up to
    float reassociation (~1e-6), gradients included (the cache's backward sums over the group), and
    (G - 1) / G fewer prompt tokens through the forward and backward. Falls back to one forward over
    prompt + response when no prompt repeats or the model's cache cannot be re-indexed.

    `length_buckets`: the padding after each row's last valid token is not run through the model. Rows are sorted
    by that length and split into up to `length_buckets` equal-count buckets, each run only up to its longest row
    (after the one shared prompt pass); positions past a bucket's width get zeros (logp and entropy are 0 there
    anyway; `hidden` is zero there). Causality makes this exact up to float reassociation: a valid token never
    attends to a later position. Used when it removes at least 10% of the response positions; 1 disables it.
    """
    if length_buckets < 1:
        raise ValueError(f"length_buckets must be >= 1, got {length_buckets}")
    tau = scoring_temperature(temperature)
    split = None if full_logits else split_head(model)
    if split is None:
        logp, entropy, hidden = _full_logits_logprobs(model, prompt_ids, prompt_mask, response_ids, response_mask,
                                                      tau, with_entropy, share_prompts, return_hidden, length_buckets)
    else:
        trunk, head = split
        hidden = _response_hidden(trunk, prompt_ids, prompt_mask, response_ids, response_mask, share_prompts,
                                  length_buckets)  # [B, T, D]
        logp, entropy = head_logprobs(hidden, head, response_ids, response_mask, temperature=tau,
                                      with_entropy=with_entropy, chunk_logits=chunk_logits)
    return (logp, entropy, hidden) if return_hidden else (logp, entropy)


def _response_hidden(trunk: torch.nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor,
                     response_mask: Tensor, share_prompts: bool, length_buckets: int) -> Tensor:
    """Last hidden states [B, T, D] at the positions predicting each response token (prompt shared when it pays)."""
    buckets = length_bucket_rows(response_mask, length_buckets)
    hidden = _shared_prompt_states(trunk, prompt_ids, prompt_mask, response_ids, buckets, hidden=True) \
        if share_prompts else None
    if hidden is None:
        parts = []
        for rows, width in buckets:
            ids, mask, positions = _joined(prompt_ids[rows], prompt_mask[rows], response_ids[rows, :width])
            out = trunk(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
            parts.append(out.last_hidden_state[:, -width - 1:-1])  # position P - 1 + t predicts response token t
        hidden = _unbucket(parts, buckets, response_ids.shape[1])
    return hidden


def length_bucket_rows(response_mask: Tensor, n_buckets: int, *, min_saving: float = 0.1) -> list[tuple[Tensor, int]]:
    """Rows grouped for the forward: [(row indices, width)], width = the longest valid length in the group (at least
    1). Rows sorted by the position after their last valid token, split into up to `n_buckets` equal-count groups;
    one group of every row at full width when that saves less than `min_saving` of the positions."""
    B, T = response_mask.shape
    everything = [(torch.arange(B, device=response_mask.device), T)]
    if n_buckets <= 1 or B < 2 or T == 0:
        return everything
    pos = torch.arange(1, T + 1, device=response_mask.device)
    length = (response_mask * pos).amax(dim=1).clamp(min=1)  # [B] position after the last valid token
    order = torch.argsort(length, stable=True)
    buckets = [(rows, int(length[rows].max())) for rows in order.tensor_split(min(n_buckets, B)) if rows.numel()]
    if bucketed_positions(buckets) > (1 - min_saving) * B * T:
        return everything
    return buckets


def bucketed_positions(buckets: list[tuple[Tensor, int]]) -> int:
    """Response positions a bucketed forward runs: sum over buckets of rows x width."""
    return sum(rows.numel() * width for rows, width in buckets)


def _unbucket(parts: list[Tensor], buckets: list[tuple[Tensor, int]], T: int) -> Tensor:
    """Per-bucket outputs [n_b, width_b, *] -> [B, T, *] in the original row order, zeros past each width."""
    if len(parts) == 1 and buckets[0][1] == T:  # one bucket of every row in order (length_bucket_rows)
        return parts[0]
    padded = [torch.nn.functional.pad(x, (0, 0, 0, T - x.shape[1])) for x in parts]
    rows = torch.cat([r for r, _ in buckets])
    return torch.cat(padded, dim=0)[torch.argsort(rows)]


def _joined(prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Prompt + response as one left-padded sequence: (ids, attention mask, position ids), each [B, P + T]."""
    ids = torch.cat([prompt_ids, response_ids], dim=1)
    mask = torch.cat([prompt_mask.long(), torch.ones_like(response_ids)], dim=1)
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def _full_logits_logprobs(model: PreTrainedModel, prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor,
                          response_mask: Tensor, tau: float, with_entropy: bool, share_prompts: bool,
                          return_hidden: bool, length_buckets: int) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The [B, T, V]-logits path (any causal LM): only the T needed logits rows, z[token] - logsumexp(z)."""
    T = response_ids.shape[1]
    buckets = length_bucket_rows(response_mask, length_buckets)
    logits, hidden = None, None
    if share_prompts and not return_hidden:
        logits = _shared_prompt_states(model, prompt_ids, prompt_mask, response_ids, buckets, hidden=False)
    if logits is None:
        parts, hiddens = [], []
        for rows, width in buckets:
            ids, mask, positions = _joined(prompt_ids[rows], prompt_mask[rows], response_ids[rows, :width])
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False,
                        logits_to_keep=width + 1, output_hidden_states=return_hidden)
            parts.append(out.logits[:, :-1])  # [n_b, width, V] predicts response token t
            if return_hidden:
                hiddens.append(out.hidden_states[-1][:, -width - 1:-1])  # [n_b, width, D]
        logits = _unbucket(parts, buckets, T)
        hidden = _unbucket(hiddens, buckets, T) if return_hidden else None
    logits = logits.float()
    if tau != 1.0:
        logits = logits / tau
    logp = logits.gather(-1, response_ids[..., None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)  # [B, T]
    logp = logp.masked_fill(~response_mask, 0.0)
    entropy = token_entropy(logits).masked_fill(~response_mask, 0.0) if with_entropy else None
    return logp, entropy, hidden


def _shared_prompt_states(module: torch.nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor,
                          buckets: list[tuple[Tensor, int]], *, hidden: bool) -> Tensor | None:
    """[B, T, *] outputs at the positions predicting each response token, each distinct prompt run once: the last
    hidden states [B, T, D] of a trunk (`hidden=True`) or the logits [B, T, V] of a causal LM. The responses run
    on top of the prompts' KV cache in `buckets` (`length_bucket_rows`). None when no prompt repeats or the cache
    cannot be re-indexed."""
    B, P = prompt_ids.shape
    T = response_ids.shape[1]
    if P == 0 or T == 0:
        return None
    keyed = torch.where(prompt_mask, prompt_ids, -1)  # [B, P] padding ids cannot make equal prompts differ
    unique, inverse = torch.unique(keyed, dim=0, return_inverse=True)  # inverse: [B] row -> distinct prompt
    U = unique.shape[0]
    if U == B:
        return None
    first = torch.full((U,), B, device=prompt_ids.device).scatter_reduce(
        0, inverse, torch.arange(B, device=prompt_ids.device), reduce="amin")  # [U] a row holding each prompt
    p_mask = prompt_mask[first].long()  # [U, P]
    last = {} if hidden else {"logits_to_keep": 1}
    out = module(input_ids=prompt_ids[first], attention_mask=p_mask,
                 position_ids=(p_mask.cumsum(-1) - 1).clamp(min=0), use_cache=True, **last)
    cache = output_cache(out)
    caches = [_indexed_cache(cache, inverse[rows]) for rows, _ in buckets] if len(buckets) > 1 else [None]
    if any(c is None for c in caches):  # one full-width bucket on the cache itself (other cache types included)
        if not hasattr(cache, "batch_select_indices"):
            return None
        buckets = [(torch.arange(B, device=prompt_ids.device), T)]
        cache.batch_select_indices(inverse)  # [U, ...] -> [B, ...]; differentiable indexing
        caches = [cache]
    first_out = out.last_hidden_state[:, -1:] if hidden else out.logits  # [U, 1, *]: predicts response token 0
    parts = []
    for (rows, width), c in zip(buckets, caches):
        mask = torch.cat([prompt_mask[rows].long(), torch.ones_like(response_ids[rows, :width])], dim=1)
        positions = prompt_mask[rows].sum(-1, keepdim=True) + torch.arange(width, device=prompt_ids.device)
        keep = {} if hidden else {"logits_to_keep": width}
        resp = module(input_ids=response_ids[rows, :width], attention_mask=mask, position_ids=positions,
                      use_cache=True, **{cache_kwarg(module): c}, **keep)
        rest = resp.last_hidden_state if hidden else resp.logits  # [n_b, width, *]; position t predicts token t + 1
        parts.append(torch.cat([first_out[inverse[rows]], rest[:, :-1]], dim=1))  # [n_b, width, *]
    return _unbucket(parts, buckets, T)


def _indexed_cache(cache: Any, index: Tensor) -> Any:
    """A new DynamicCache holding rows `index` of `cache` (differentiable indexing), or None for other caches."""
    try:
        from transformers import DynamicCache

        if type(cache) is not DynamicCache:
            return None
        return DynamicCache(ddp_cache_data=[(k[index], v[index], *rest) for k, v, *rest in cache])
    except (ImportError, TypeError, ValueError):
        return None
