"""Per-token uncertainty signals computed from next-token logits.

Both functions reduce the last (vocabulary) dimension: logits [..., V] -> [...], computed in fp32.

    token_entropy(z)  = H(softmax(z)) = logsumexp(z) - sum_v softmax(z)_v z_v       (nats, in [0, log V])
    self_certainty(z) = logsumexp(z) - mean_v z_v                                     (>= log V)

`self_certainty` follows "Scalable Best-of-N Selection via Self-Certainty" (Kang et al., 2025) and INTUITOR:
KL(U || p) = -log V - mean_v log p_v = logsumexp(z) - mean_v z_v - log V. We keep the form without the constant
log V (the `certainty` field of `RolloutBatch`); higher means more confident.

Logits must be finite (a -inf logit makes mean(z) and 0 * -inf undefined); model outputs are.
"""

from __future__ import annotations

import torch
from torch import Tensor


def token_entropy(logits: Tensor) -> Tensor:
    """Entropy in nats of softmax(logits) over the last dimension: [..., V] -> [...] fp32."""
    z = logits.float()
    lse = torch.logsumexp(z, dim=-1)  # [...]
    return lse - (torch.softmax(z, dim=-1) * z).sum(dim=-1)


def self_certainty(logits: Tensor) -> Tensor:
    """Self-certainty logsumexp(logits) - mean(logits) over the last dimension: [..., V] -> [...] fp32."""
    z = logits.float()
    return torch.logsumexp(z, dim=-1) - z.mean(dim=-1)
