"""Log-probs and entropies of given tokens from hidden states, without materialising [B, T, V] logits.

    logp, ent = head_logprobs(hidden, model.lm_head, tokens, mask, temperature=1.0, with_entropy=True)

The LM head runs on chunks of the valid (masked-in) positions only: each chunk's logits z [n, V] are made, turned
into z[token] - logsumexp(z) (and the entropy), and dropped. With gradients enabled every chunk runs under
`torch.utils.checkpoint` (non-reentrant), so the backward recomputes one chunk's logits at a time instead of keeping
every chunk's: peak memory holds one chunk of logits (`chunk_logits` floats, 2^23 by default = 32 MiB in fp32)
instead of the [B, T, V] tensor and its fp32 copies. The cost is one more head matmul per chunk in the backward.

Numbers are those of `log_softmax(head(hidden).float() / temperature)` (the same ops per row, under whatever
autocast the caller set): equal to the full-logits computation up to float reassociation of the head matmul
(~1e-6), gradients included (tests/rollout/test_head.py). Outside `mask` both outputs are exactly 0 and carry no
gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

DEFAULT_CHUNK_LOGITS = 1 << 23  # logits per chunk: 2^23 fp32 = 32 MiB (170 rows of SmolLM2's 49k vocabulary)


def _chunk(head: torch.nn.Module, h: Tensor, tokens: Tensor, temperature: float,
           with_entropy: bool) -> tuple[Tensor, Tensor]:
    """h [n, D], tokens [n] -> (logp [n], entropy [n] or an empty tensor), fp32."""
    z = head(h).float()  # [n, V]
    if temperature != 1.0:
        z = z / temperature
    lse = torch.logsumexp(z, dim=-1)  # [n]
    logp = z.gather(-1, tokens[:, None]).squeeze(-1) - lse
    if not with_entropy:
        return logp, z.new_zeros(0)
    return logp, lse - (torch.softmax(z, dim=-1) * z).sum(dim=-1)  # H = logsumexp(z) - sum_v p_v z_v


def head_logprobs(hidden: Tensor, head: torch.nn.Module, tokens: Tensor, mask: Tensor, *, temperature: float = 1.0,
                  with_entropy: bool = False, chunk_logits: int = DEFAULT_CHUNK_LOGITS) -> tuple[Tensor, Tensor | None]:
    """Per-token log-prob of `tokens` [B, T] under softmax(head(hidden) / temperature), hidden [B, T, D].

    Returns (logp [B, T] fp32, entropy [B, T] fp32 or None), both exactly 0 where `mask` [B, T] is False.
    `head` is called as a module (forward hooks run); `chunk_logits` bounds the logits alive at once.
    """
    if chunk_logits < 1:
        raise ValueError(f"chunk_logits must be >= 1, got {chunk_logits}")
    B, T, D = hidden.shape
    V = int(head.weight.shape[0]) if hasattr(head, "weight") else 1
    idx = mask.reshape(-1).nonzero().squeeze(1)  # [N] valid positions
    h = hidden.reshape(B * T, D).index_select(0, idx)  # [N, D]
    tok = tokens.reshape(-1).index_select(0, idx)  # [N]
    rows = max(1, chunk_logits // max(V, 1))
    grad = torch.is_grad_enabled() and (h.requires_grad or any(p.requires_grad for p in head.parameters()))
    parts: list[tuple[Tensor, Tensor]] = []
    for start in range(0, h.shape[0], rows):
        args = (head, h[start:start + rows], tok[start:start + rows], temperature, with_entropy)
        parts.append(checkpoint(_chunk, *args, use_reentrant=False, preserve_rng_state=False) if grad
                     else _chunk(*args))
    zeros = torch.zeros(B * T, dtype=torch.float32, device=hidden.device)

    def place(values: list[Tensor]) -> Tensor:  # [N] -> [B, T], 0 outside the mask
        return (zeros.index_copy(0, idx, torch.cat(values)) if values else zeros).reshape(B, T)

    logp = place([p[0] for p in parts])
    entropy = place([p[1] for p in parts]) if with_entropy else None
    return logp, entropy
