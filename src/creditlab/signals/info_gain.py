"""IGPO's answer probabilities: ``answer_probs [B,N]``, the policy's belief in the ground truth before each turn.

    probs, n_tokens = answer_probs(policy, batch, answers, template="answer: {answer}", temperature=1.0)

For row b and turn n (< the row's number of turns), the context is the prompt plus every response token before
turn n's first action token (earlier actions *and* the observations they produced), followed by the answer action
``template.format(answer=gold)`` as the policy would write it; only the gold answer's tokens are scored:

    P[b, n] = exp( (1/L) sum_j log pi(a_j | context, answer prefix, a_<j) )           (geometric-mean probability)

exactly IGPO's quantity (GuoqingWang1/IGPO ``scrl/llm_agent/generation.py``: the ground truth teacher-forced in a
pseudo answer turn after the current context, ``exp(mean(old_log_probs))`` over the answer tokens), computed here
after the rollout from the rows themselves instead of inside the generation loop (same contexts, same numbers up to
float noise). P[b, 0] is measured before the first action. The estimator (`credit.agent.igpo`) turns these into
turn rewards r_n = P[n+1] - P[n]. Cost: one teacher-forced forward per (row, turn), charged as ``tokens/extra``.
Log-probs are those of softmax(z / temperature) (the rollout's, as verl's ``old_log_probs``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from creditlab.batch import RolloutBatch
from creditlab.rollout.hf import _left_pad, scoring_temperature


def _contexts(batch: RolloutBatch) -> list[tuple[int, int, list[int]]]:
    """[(row, turn, context ids)] for every turn of every row (prompt + response before the turn's first token)."""
    out = []
    turn_ids = batch.turn_ids.cpu()
    for b in range(batch.B):
        prompt = batch.prompt_ids[b][batch.prompt_mask[b]].tolist() if batch.prompt_ids is not None else []
        resp = batch.response_ids[b].tolist()
        n_turns = int(turn_ids[b].max()) + 1
        for n in range(max(n_turns, 0)):
            first = int(torch.nonzero(turn_ids[b] == n)[0]) if bool((turn_ids[b] == n).any()) else len(resp)
            out.append((b, n, prompt + resp[:first]))
    return out


@torch.no_grad()
def answer_probs(policy: Any, batch: RolloutBatch, answers: list[str], *, template: str = "{answer}",
                 temperature: float = 1.0, chunk: int = 64) -> tuple[Tensor, int]:
    """(answer_probs [B,N] float32, number of tokens run through the model). ``answers[b]`` is row b's gold text;
    ``template`` holds ``{answer}`` once (text before it is the action prefix, text after it is not scored)."""
    if batch.turn_ids is None:
        raise ValueError("answer_probs needs RolloutBatch.turn_ids (from the multi-turn rollout)")
    if template.count("{answer}") != 1:
        raise ValueError(f"the answer template must hold '{{answer}}' once, got {template!r}")
    tok, model = policy.tokenizer, policy.model
    prefix_text = template.split("{answer}")[0]
    prefix = tok(prefix_text, add_special_tokens=False)["input_ids"] if prefix_text else []
    gold = [tok(a, add_special_tokens=False)["input_ids"] or [tok.unk_token_id or 0] for a in answers]
    items = _contexts(batch)
    N = max(1, int(batch.turn_ids.max()) + 1)
    out = torch.zeros(batch.B, N)
    tau = scoring_temperature(temperature)
    was_training = model.training
    model.eval()
    n_tokens = 0
    try:
        for start in range(0, len(items), chunk):
            part = items[start:start + chunk]
            seqs = [ctx + prefix + gold[b] for b, _, ctx in part]
            ids, mask = _left_pad(seqs, tok.pad_token_id, model.device)  # [c, L]
            attn = mask.long()
            logits = model(input_ids=ids, attention_mask=attn, position_ids=(attn.cumsum(-1) - 1).clamp(min=0),
                           use_cache=False).logits.float() / tau  # [c, L, V]
            logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)  # [c, L-1]
            for row, (b, n, _) in enumerate(part):
                L = len(gold[b])
                out[b, n] = logp[row, -L:].mean().exp()  # the last L positions predict the gold tokens
            n_tokens += int(mask.sum())
    finally:
        model.train(was_training)
    return out.to(batch.response_ids.device), n_tokens
