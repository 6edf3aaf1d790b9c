"""creditlab.signals.entropy: token entropy and self-certainty against their definitions."""

from __future__ import annotations

import math

import torch

from creditlab.signals.entropy import self_certainty, token_entropy


def test_uniform_and_peaked_logits():
    V = 50
    uniform = torch.zeros(3, V)
    assert torch.allclose(token_entropy(uniform), torch.full((3,), math.log(V)))
    assert torch.allclose(self_certainty(uniform), torch.full((3,), math.log(V)))
    peaked = torch.zeros(V)
    peaked[7] = 100.0
    assert token_entropy(peaked).item() < 1e-6
    assert self_certainty(peaked).item() > self_certainty(uniform[0]).item()


def test_match_definitions_on_random_logits():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 5, 30, generator=g, dtype=torch.float64) * 3  # [B, T, V]
    p = torch.softmax(logits, -1)
    assert torch.allclose(token_entropy(logits), -(p * p.log()).sum(-1).float(), atol=1e-5)
    kl_uniform = (-math.log(30) - p.log().mean(-1))  # KL(U || p)
    assert torch.allclose(self_certainty(logits), (kl_uniform + math.log(30)).float(), atol=1e-5)
    assert token_entropy(logits.to(torch.bfloat16)).dtype == torch.float32
