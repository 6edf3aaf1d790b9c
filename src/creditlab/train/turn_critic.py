"""ArCHer's utterance-level critic (on-policy): double Q(s, a) and V(s) heads with a soft-updated target copy.

Reference: YifeiZhou02/ArCHer@7c771a7 archer/algorithms/archer/trainer.py (`critic_loss`, `update`) and
archer/models/critic.py (`DoubleCritic`). Per turn k of a row (a single-turn row is one turn):

    Q_i(s_k, a_k) <- r_k + gamma (1 - done_k) V_i^target(s_{k+1})        i = 1, 2
    V_i(s_k)      <- Q_i^target(s_k, a_k)
    loss = sum of the four mean squared errors; after every optimizer step target <- (1 - tau) target + tau online

and `produce` writes, with the online critic, q_values = min(Q1, Q2)(s_k, a_k) on turn k's tokens and values =
min(V1, V2)(state before each token) (the `archer` estimator reads V at each turn's first token, i.e. V(s_k)).

Features: one causal LM (`--critic model:<p>`) reads prompt + response; s_k is its final hidden state before turn
k's first token and (s_k, a_k) the state after the turn's last token (it has read both). r_k is the sum of the turn's
token rewards (the outcome sits on the last turn; minus a KL reward with --critic-kl-in-reward). Heads are the
reference's MLPs (2H -> H -> H -> 1 for Q, H -> H -> H -> 1 for V).
Deviations: the reference encodes observation and action separately with roberta-base (pooled, 512 tokens
left-truncated) and concatenates them; it trains off-policy from a 100k-transition replay buffer for 50 critic epochs
per iteration, with V's target evaluated at a fresh action a ~ pi(s) and 20 warm-up iterations. Here the critic
trains on the step's own batch (`--critic-epochs` passes, `--critic-minibatches` steps each; a ~ pi is the sampled
action), with no warm-up and no replay buffer.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch
from torch import Tensor, nn

from creditlab.batch import Credit, RolloutBatch
from creditlab.credit.macro import _run_starts, _segment_index, _segment_sum
from creditlab.credit.ops import compact_left, discounted_reverse_cumsum
from creditlab.signals.produce import SignalContext
from creditlab.signals.rewards import token_rewards
from creditlab.signals.turns import single_turn_fields
from creditlab.train.components import Component
from creditlab.train.critic import explained_variance, trunk_hidden


def _mlp(d_in: int, d: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d), nn.ReLU(), nn.Linear(d, d), nn.ReLU(), nn.Linear(d, 1))


class DoubleHeads(nn.Module):
    """ArCHer's DoubleCritic heads: (Q1, Q2)([h_s, h_sa]) and (V1, V2)(h_s), each [K]."""

    def __init__(self, hidden: int, seed: int) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):  # seeded init without moving the global RNG
            torch.manual_seed(seed)
            self.q1, self.q2 = _mlp(2 * hidden, hidden), _mlp(2 * hidden, hidden)
            self.v1, self.v2 = _mlp(hidden, hidden), _mlp(hidden, hidden)

    def forward(self, h_s: Tensor, h_sa: Tensor) -> tuple[Tensor, ...]:
        sa = torch.cat([h_s, h_sa], dim=-1).float()
        return (self.q1(sa).squeeze(-1), self.q2(sa).squeeze(-1), self.v1(h_s.float()).squeeze(-1),
                self.v2(h_s.float()).squeeze(-1))


def turn_table(turn_ids: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """Every turn of the batch in row-major order: rows, first and last column [K], next turn's first column (-1 for a
    row's last turn), and the turn index of each token [B, T] (-1 outside) for gathering per-turn values back."""
    order, cmask = compact_left(mask)
    starts = _run_starts(turn_ids.gather(1, order), cmask)
    seg_c, _ = _segment_index(starts, cmask)
    nxt_valid = torch.nn.functional.pad(cmask[:, 1:], (0, 1), value=False)
    ends = cmask & (torch.nn.functional.pad(starts[:, 1:], (0, 1), value=False) | ~nxt_valid)
    rows = starts.nonzero()[:, 0]  # [K]
    first, last = order[starts], order[ends]  # [K] original columns, row-major
    same_row = torch.nn.functional.pad(rows[1:] == rows[:-1], (0, 1), value=False)
    next_first = torch.where(same_row, torch.nn.functional.pad(first[1:], (0, 1), value=0), -1)
    offset = torch.nn.functional.pad(starts.sum(1).cumsum(0)[:-1], (1, 0))  # [B] index of each row's first turn
    turn_of = torch.full_like(turn_ids, -1).scatter(1, order, torch.where(cmask, seg_c + offset[:, None], -1))
    return {"rows": rows, "first": first, "last": last, "next_first": next_first,
            "turn_of": torch.where(mask, turn_of, -1), "seg_c": seg_c, "order": order, "cmask": cmask}


def turn_rewards(token_rewards: Tensor, table: dict[str, Tensor], gamma: float | None = None) -> Tensor:
    """Sum of each turn's token rewards [K] in `turn_table` order; with `gamma`, the turn's discounted Monte-Carlo
    return sum_{j >= k} gamma^(j-k) r_j over the row's later turns instead."""
    order, cmask, seg = table["order"], table["cmask"], table["seg_c"]
    grid = _segment_sum(token_rewards.double().gather(1, order) * cmask, seg)  # [B, T]: row b, its turn j
    keep = torch.arange(grid.shape[1], device=seg.device)[None, :] <= seg.max(dim=1, keepdim=True).values
    if gamma is not None:
        grid = discounted_reverse_cumsum(grid * keep, gamma)
    return grid[keep].float()


class TurnCritic(Component):
    """The utterance-level critic behind `archer` (see the module docstring)."""

    name = "critic"

    def __init__(self, cfg: Any, trunk: nn.Module) -> None:
        c = cfg.critic
        self.gamma, self.tau, self.max_norm, self.epochs = c.critic_gamma, c.critic_tau, c.critic_max_grad_norm, \
            c.critic_epochs
        self.minibatches = c.critic_minibatches or cfg.optim.minibatches
        self.trunk = trunk
        self.heads = DoubleHeads(trunk.config.hidden_size, cfg.run.seed + 2).to(trunk.device)
        self.target_trunk = copy.deepcopy(trunk).eval().requires_grad_(False)
        self.target_heads = copy.deepcopy(self.heads).eval().requires_grad_(False)
        self.optim = torch.optim.AdamW([*trunk.parameters(), *self.heads.parameters()], lr=c.critic_lr,
                                       weight_decay=0.0)
        self.seconds = 0.0

    @staticmethod
    def _forward(trunk: nn.Module, heads: DoubleHeads, batch: RolloutBatch, t: dict[str, Tensor]) -> tuple[Tensor, ...]:
        """(Q1, Q2, V1, V2) of every turn [K], V(s_{k+1}) pair [K] x 2, and min(V1, V2) of every token [B, T]."""
        h = trunk_hidden(trunk, batch.prompt_ids, batch.prompt_mask, batch.response_ids)  # [B, T+1, H]
        rows = t["rows"]
        h_s, h_sa = h[rows, t["first"]], h[rows, t["last"] + 1]  # [K, H]
        q1, q2, v1, v2 = heads(h_s, h_sa)
        h_next = h[rows, t["next_first"].clamp_min(0)]
        nv1, nv2 = heads.v1(h_next.float()).squeeze(-1), heads.v2(h_next.float()).squeeze(-1)
        v_tok = torch.minimum(heads.v1(h[:, :-1].float()), heads.v2(h[:, :-1].float())).squeeze(-1)  # [B, T]
        return q1, q2, v1, v2, nv1, nv2, v_tok

    def produce(self, batch: RolloutBatch, ctx: SignalContext) -> RolloutBatch:
        if batch.turn_ids is None:
            batch = batch.replace(turn_ids=single_turn_fields(batch)["turn_ids"])
        if batch.values is not None and batch.q_values is not None:
            return batch
        t0 = time.perf_counter()
        table = turn_table(batch.turn_ids, batch.response_mask)
        self.trunk.eval()
        with torch.no_grad():
            q1, q2, _, _, _, _, v_tok = self._forward(self.trunk, self.heads, batch, table)
        self.trunk.train()
        mask, turn_of = batch.response_mask, table["turn_of"]
        q_turn = torch.minimum(q1, q2) if q1.numel() else torch.zeros(1, device=mask.device)
        q_tok = q_turn[turn_of.clamp_min(0)]  # [B, T]
        zero = torch.zeros((), device=mask.device)
        self.seconds += time.perf_counter() - t0
        return batch.replace(values=torch.where(mask, v_tok, zero), q_values=torch.where(mask, q_tok, zero))

    def update(self, batch: RolloutBatch, ctx: SignalContext, credit: Credit) -> dict[str, float]:
        t0 = time.perf_counter()
        rewards_tok = batch.token_rewards if batch.token_rewards is not None else \
            token_rewards(batch, ctx)["token_rewards"]  # outcome (minus --critic-kl-in-reward x KL)
        gen = torch.Generator().manual_seed(ctx.seed + 130_363)
        sums, n = {"critic/q_loss": 0.0, "critic/v_loss": 0.0}, 0
        for _ in range(self.epochs):
            for idx in torch.randperm(batch.B, generator=gen).chunk(self.minibatches):
                part = batch.select(idx)
                table = turn_table(part.turn_ids, part.response_mask)
                if table["rows"].numel() == 0:  # no valid token in these rows: nothing to regress
                    continue
                r, done = turn_rewards(rewards_tok[idx], table), (table["next_first"] < 0).float()
                with torch.no_grad():
                    tq1, tq2, _, _, tv1, tv2, _ = self._forward(self.target_trunk, self.target_heads, part, table)
                q1, q2, v1, v2, _, _, _ = self._forward(self.trunk, self.heads, part, table)
                mse = nn.functional.mse_loss
                q_loss = mse(q1, r + self.gamma * (1 - done) * tv1) + mse(q2, r + self.gamma * (1 - done) * tv2)
                v_loss = mse(v1, tq1) + mse(v2, tq2)
                self.optim.zero_grad(set_to_none=True)
                (q_loss + v_loss).backward()
                torch.nn.utils.clip_grad_norm_([p for g in self.optim.param_groups for p in g["params"]],
                                               self.max_norm)
                self.optim.step()
                self._soft_update()
                sums["critic/q_loss"] += float(q_loss.detach())
                sums["critic/v_loss"] += float(v_loss.detach())
                n += 1
        self.seconds += time.perf_counter() - t0
        out = {k: v / max(n, 1) for k, v in sums.items()}
        out["critic/value_loss"] = out["critic/q_loss"] + out["critic/v_loss"]
        out["critic/explained_variance"] = self._explained_variance(batch, rewards_tok)
        return out

    def _explained_variance(self, batch: RolloutBatch, rewards_tok: Tensor) -> float:
        """Of V(s_k) (before the update) against each turn's discounted Monte-Carlo return."""
        table = turn_table(batch.turn_ids, batch.response_mask)
        ret = turn_rewards(rewards_tok, table, gamma=self.gamma)
        v = batch.values[table["rows"], table["first"]]
        return explained_variance(ret, v, torch.ones_like(ret, dtype=torch.bool))

    @torch.no_grad()
    def _soft_update(self) -> None:
        for online, target in ((self.trunk, self.target_trunk), (self.heads, self.target_heads)):
            for p, tp in zip(online.parameters(), target.parameters()):
                tp.mul_(1.0 - self.tau).add_(p.detach(), alpha=self.tau)

    def metrics(self) -> dict[str, float]:
        out, self.seconds = {"time/critic": self.seconds}, 0.0
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"trunk": self.trunk.state_dict(), "heads": self.heads.state_dict(),
                "target_trunk": self.target_trunk.state_dict(), "target_heads": self.target_heads.state_dict(),
                "optim": self.optim.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {"trunk", "heads", "target_trunk", "target_heads", "optim"} - set(state)
        if missing:
            raise ValueError(f"checkpoint of component 'critic' lacks {sorted(missing)}: was it saved with another "
                             "--critic or estimator?")
        for name in ("trunk", "heads", "target_trunk", "target_heads"):
            getattr(self, name).load_state_dict(state[name])
        self.optim.load_state_dict(state["optim"])
