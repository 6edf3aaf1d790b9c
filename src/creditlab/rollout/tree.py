"""Segment-tree rollouts: each prompt's responses grow as a tree of fixed-length segments (SPO-tree, TreePO).

    rollout = TreeRollout(fanout=(4, 2), segment_len=16)       # `creditlab train --rollout tree --tree-fanout 4,2`
    batch, scores = rollout.collect(policy, task, problems, rollout_cfg, seed=0)

Level d of the tree samples `fanout[d]` children of every unfinished node: `segment_len` new tokens on every level but
the last, which runs free to the response budget (`max_new_tokens - (levels - 1) * segment_len`). A child that emits a
stop token is finished (a leaf); the others are expanded on the next level. This is SPO-tree's `_construct_tree`
(AIFrameResearch/SPO `hybrid_inference_strategy.py`: a branch-factor list per depth, M tokens per non-final level, the
last level free, finished children become leaves) and TreePO's sampler (`multimodal-art-projection/TreePO`
`recipe/treepo/vllm_rollout_tree.py`) with a fixed segment length and a fixed fan-out per divergence, without its
width-budget reallocation, answer-tag forcing and fallback.

Output: one row per leaf, ordered by (prompt, branch path). A row's response is its root-to-leaf path, so rows of one
tree share their real common prefix token for token (tempo / treepo see true branch points; treepo's segment_len
should equal `segment_len`). `tree_node [B,T]` tags each token with the node (segment) it was sampled in, which is
what spo_tree reads; `group_ids` is the prompt index, so each tree is one group (ragged when nodes finish early).
Every row gets the per-token signals of `generate` (logprobs, entropies, certainty, token_logits: a shared prefix's
tokens carry the values sampled once for it).

Cost: every node's prefix (prompt + its path) is prefilled once per level and its KV cache indexed out to its
children (`sample_tokens(expand=...)`); `batch.meta["tree"]` records the tokens generated (each node's segment once)
against the tokens of the leaf rows (what independent sampling of the same rows would generate).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from creditlab.batch import RolloutBatch
from creditlab.rollout.hf import SamplingConfig, _left_pad, sample_tokens


def parse_fanout(text: str | Sequence[int]) -> tuple[int, ...]:
    """'4,2' -> (4, 2); every entry >= 1, at least one level."""
    try:
        out = tuple(int(x) for x in (text.split(",") if isinstance(text, str) else text))
    except ValueError:
        raise ValueError(f"--tree-fanout must be comma-separated integers like 4,2, got {text!r}") from None
    if not out or any(k < 1 for k in out):
        raise ValueError(f"--tree-fanout needs at least one level and every fan-out >= 1, got {text!r}")
    return out


@dataclass
class _Path:
    """A node of the tree seen from its root: the whole response so far."""

    group: int
    ids: list[int]
    stats: list[Tensor]  # per segment: [4, n] logprob, entropy, certainty, token logit
    nodes: list[int]  # node id of every token
    branch: tuple[int, ...]  # child index at each level (row order)


class TreeRollout:
    """The `Rollout` of `--rollout tree`: a fixed-shape segment tree per prompt (see the module docstring)."""

    def __init__(self, fanout: Sequence[int], segment_len: int) -> None:
        self.fanout = parse_fanout(fanout)
        if segment_len < 1:
            raise ValueError(f"--tree-segment-len must be >= 1, got {segment_len}")
        self.segment_len = segment_len

    @classmethod
    def from_config(cls, mc: Any) -> TreeRollout:
        return cls(parse_fanout(mc.tree_fanout), mc.tree_segment_len)

    def collect(self, policy: Any, task: Any, problems: Sequence[Any], cfg: Any, *, seed: int
                ) -> tuple[RolloutBatch, list[Any]]:
        """(batch of leaves with rewards, one `Score` per row); `cfg` is the run's `RolloutConfig`."""
        sampling = SamplingConfig.from_rollout(cfg, policy.model)
        batch = self.sample(policy, [policy.format_prompt(p.prompt) for p in problems], sampling, seed=seed)
        scores = [task.score(problems[g], text) for g, text in zip(batch.group_ids.tolist(), batch.texts)]
        rewards = torch.tensor([s.reward for s in scores], dtype=torch.float32, device=batch.response_ids.device)
        return batch.replace(rewards=rewards), scores

    def sample(self, policy: Any, prompts: list[str], sampling: SamplingConfig, *, seed: int) -> RolloutBatch:
        """The leaves of one tree per formatted prompt (rewards 0); deterministic given `seed` on CPU."""
        levels, M = len(self.fanout), self.segment_len
        if (levels - 1) * M >= sampling.max_new_tokens:
            raise ValueError(f"a tree of {levels} levels with --tree-segment-len {M} leaves no tokens for its last "
                             f"level within --max-new-tokens {sampling.max_new_tokens}")
        device = policy.model.device
        prompt_ids, prompt_mask = (t.to(device) for t in policy.encode_prompts(prompts))  # [G, P]
        prompt_lists = [row[m].tolist() for row, m in zip(prompt_ids, prompt_mask)]
        generator = torch.Generator(device=device).manual_seed(seed)
        stops = set(policy.stop_ids)
        frontier = [_Path(g, [], [], [], ()) for g in range(len(prompts))]
        leaves: list[_Path] = []
        n_nodes, generated = 0, 0
        for depth, k in enumerate(self.fanout):
            if not frontier:
                break
            last = depth == levels - 1
            budget = sampling.max_new_tokens - depth * M if last else M
            ids, mask = _left_pad([prompt_lists[p.group] + p.ids for p in frontier], policy.tokenizer.pad_token_id,
                                  device)  # [N, L] each node's prefix, prefilled once
            out = sample_tokens(policy.model, ids, mask, dataclasses.replace(sampling, max_new_tokens=budget),
                                generator=generator, stop_ids=policy.stop_ids, pad_id=policy.tokenizer.pad_token_id,
                                expand=torch.arange(len(frontier), device=device).repeat_interleave(k))
            stats = torch.stack([out.logprobs, out.entropies, out.certainty, out.token_logits], dim=1)  # [N*k, 4, t]
            nxt = []
            for r in range(out.tokens.shape[0]):
                parent, m = frontier[r // k], out.mask[r]
                toks = out.tokens[r][m].tolist()
                child = _Path(parent.group, parent.ids + toks, [*parent.stats, stats[r][:, m]],
                              parent.nodes + [n_nodes] * len(toks), (*parent.branch, r % k))
                n_nodes, generated = n_nodes + 1, generated + len(toks)
                (leaves if last or any(t in stops for t in toks) else nxt).append(child)
            frontier = nxt
        leaves.sort(key=lambda p: (p.group, p.branch))
        batch = self._to_batch(policy, leaves, prompt_ids, prompt_mask)
        tree = {"fanout": list(self.fanout), "segment_len": M, "nodes": n_nodes, "generated_tokens": generated,
                "leaf_tokens": int(batch.response_mask.sum())}
        return batch.replace(meta={"sampling": asdict(sampling), "seed": seed, "policy": policy.name, "tree": tree})

    @staticmethod
    def _to_batch(policy: Any, leaves: list[_Path], prompt_ids: Tensor, prompt_mask: Tensor) -> RolloutBatch:
        device = prompt_ids.device
        B, T = len(leaves), max(len(p.ids) for p in leaves)
        pad = policy.tokenizer.pad_token_id
        ids = torch.full((B, T), pad, dtype=torch.long)
        node = torch.full((B, T), -1, dtype=torch.long)
        stats = torch.zeros(4, B, T)
        for b, p in enumerate(leaves):
            n = len(p.ids)
            ids[b, :n] = torch.tensor(p.ids, dtype=torch.long)
            node[b, :n] = torch.tensor(p.nodes, dtype=torch.long)
            stats[:, b, :n] = torch.cat(p.stats, dim=1).cpu()
        mask = node >= 0  # [B, T]
        group = torch.tensor([p.group for p in leaves], dtype=torch.long)
        texts = [policy.tokenizer.decode(p.ids, skip_special_tokens=True) for p in leaves]
        logprobs, entropies, certainty, token_logits = (s.to(device) for s in stats)
        return RolloutBatch(
            response_ids=ids.to(device), response_mask=mask.to(device), group_ids=group.to(device),
            rewards=torch.zeros(B, device=device), prompt_ids=prompt_ids[group.to(device)],
            prompt_mask=prompt_mask[group.to(device)], logprobs=logprobs, entropies=entropies, certainty=certainty,
            token_logits=token_logits, tree_node=node.to(device), texts=texts)
