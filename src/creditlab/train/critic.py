"""A token-level value critic for PPO-style estimators (gae, ma_rlhf, poad): `--critic head` or `--critic model:<p>`.

    --critic head          a scalar head on the policy's trunk: values come from the policy's final hidden states,
                           the value loss joins the policy's backward, the head learns from all of it with its own
                           AdamW (--critic-lr, stepped after each policy step) and the trunk from --critic-coef x its
                           gradient (0: the trunk ignores the critic, a linear probe on the policy's features).
                           --critic-epochs N > 1 adds N-1 head-only passes over the step's trunk states (kept from
                           the values pass, so no extra forward).
    --critic model:tiny    a separate causal LM (tiny, smollm2 or a local directory) with a scalar head on its final
                           hidden states, trained after the policy step (--critic-epochs x --critic-minibatches).

--critic-warmup N (verl's trainer.critic_warmup): the first N steps sample and train the critic only; the policy is
not updated (head: --critic-epochs head-only passes; model: its usual passes). Those steps' samples still count.

Per step (see creditlab.train.components): `produce` writes values [B,T] = V(state before token t) with the critic
as it is before the update (verl's "values"); the estimator returns `returns`; the critic regresses V onto them with
verl's clipped loss (`compute_value_loss`: 0.5 max((V - R)^2, (clip(V, V_old +- c) - R)^2), token-mean); an
estimator without returns (grpo, ...) trains it on Monte-Carlo returns (the batch's token rewards summed to the
end, or the outcome alone when the estimator did not ask for token rewards).
Logged: critic/value_loss, critic/clipfrac, critic/explained_variance (1 - Var(R - V_old) / Var(R) over valid tokens,
as verl's critic/vf_explained_var), critic/values_mean, critic/returns_mean and time/critic (seconds the critic's
own forward/backward passes took this step; in head mode the value loss's share of the joint policy backward is
not separable and is not included).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor, nn

from creditlab.batch import Credit, RolloutBatch
from creditlab.signals.produce import SignalContext
from creditlab.signals.rewards import outcome_to_token_rewards
from creditlab.train.components import Component
from creditlab.train.losses import aggregate


# ------------------------------------------------------------------------------------------------ pure functions
def value_loss(vpreds: Tensor, returns: Tensor, old_values: Tensor, mask: Tensor,
               clip: float | None) -> tuple[Tensor, Tensor]:
    """verl `compute_value_loss` (token-mean): (0.5 * mean max((V - R)^2, (V_clip - R)^2), clip fraction)."""
    loss1 = (vpreds - returns) ** 2
    if clip is None:
        return 0.5 * aggregate(loss1, mask), torch.zeros(())
    clipped = old_values + (vpreds - old_values).clamp(-clip, clip)
    loss2 = (clipped - returns) ** 2
    frac = aggregate((loss2 > loss1).float(), mask).detach()
    return 0.5 * aggregate(torch.maximum(loss1, loss2), mask), frac


def explained_variance(returns: Tensor, values: Tensor, mask: Tensor) -> float:
    """1 - Var(returns - values) / Var(returns) over valid tokens (verl's formula, +1e-5 in the denominator); 0 when
    the returns do not vary (nothing to explain: verl would report 1 - Var(V) / 1e-5)."""
    m = mask.to(torch.bool)
    if int(m.sum()) < 2:
        return 0.0
    r, v = returns[m].double(), values[m].double()
    if float(r.var()) == 0.0:
        return 0.0
    return float(1.0 - (r - v).var() / (r.var() + 1e-5))


def monte_carlo_returns(token_rewards: Tensor, mask: Tensor) -> Tensor:
    """Sum of the row's token rewards from t to its end (gamma = 1): the value target when an estimator has none."""
    r = torch.where(mask, token_rewards, torch.zeros((), dtype=token_rewards.dtype))
    return torch.where(mask, r.flip(1).cumsum(1).flip(1), torch.zeros((), dtype=r.dtype))


def trunk_hidden(model: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor) -> Tensor:
    """Final hidden states [B, T+1, H] of a causal LM's trunk: position t is the state before response token t,
    position T the state after the last column. One forward over left-padded prompt + response, no LM head."""
    T = response_ids.shape[1]
    ids = torch.cat([prompt_ids, response_ids], dim=1)  # [B, P + T]
    mask = torch.cat([prompt_mask.long(), torch.ones_like(response_ids)], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    hidden = model.base_model(input_ids=ids, attention_mask=mask, position_ids=positions,
                              use_cache=False).last_hidden_state  # [B, P + T, H]
    return hidden[:, -(T + 1):]


class ValueHead(nn.Module):
    """A scalar head on final hidden states: [..., H] -> [...] (fp32). Initialised as verl's critic head (HF
    `_init_weights`: weight ~ N(0, 0.02^2), bias 0) from a private generator seeded by `seed`."""

    def __init__(self, hidden_size: int, seed: int) -> None:
        super().__init__()
        self.proj = nn.Linear(hidden_size, 1)
        with torch.no_grad():
            self.proj.weight.copy_(torch.randn(1, hidden_size, generator=torch.Generator().manual_seed(seed)) * 0.02)
            self.proj.bias.zero_()

    def forward(self, hidden: Tensor) -> Tensor:
        return self.proj(hidden.float()).squeeze(-1)


# ------------------------------------------------------------------------------------------------ the component
class ValueCritic(Component):
    """`--critic head` (trunk = the policy's model) or `--critic model:<p>` (trunk = a separate model it owns)."""

    name = "critic"

    def __init__(self, cfg: Any, policy_model: nn.Module, *, separate: nn.Module | None = None) -> None:
        c = cfg.critic
        self.clip, self.coef, self.max_norm = c.critic_clip, c.critic_coef, c.critic_max_grad_norm
        self.epochs = c.critic_epochs
        self.minibatches = c.critic_minibatches or cfg.optim.minibatches
        self.separate = separate is not None
        self.trunk = separate if separate is not None else policy_model
        self.wants_hidden = not self.separate  # ppo_update passes the policy's hidden states to `loss`
        self.head = ValueHead(self.trunk.config.hidden_size, cfg.run.seed + 3).to(self.trunk.device)
        params = [*self.head.parameters(), *(self.trunk.parameters() if self.separate else ())]
        self.optim = torch.optim.AdamW(params, lr=c.critic_lr, weight_decay=0.0)
        self.bf16 = bool(cfg.optim.update_bf16)  # the policy update's (decided by now): old and new V agree
        self.warmup = c.critic_warmup
        self.features: Tensor | None = None  # head: this step's detached trunk states, kept for head-only passes
        self.seconds = 0.0

    def _head_passes(self, step: int) -> int:
        """Head-only passes over the step's features: all epochs while the critic warms up (no policy step), the
        epochs beyond the joint step's one afterwards; 0 with a separate critic (it trains in `update`)."""
        if self.separate:
            return 0
        return self.epochs if step <= self.warmup else self.epochs - 1

    def _values(self, batch: RolloutBatch, keep: bool = False) -> Tensor:
        """V [B, T] of the state before each response token (differentiable when grad is enabled); `keep`: also
        keep the trunk states (detached) for head-only passes."""
        with torch.autocast(batch.response_ids.device.type, torch.bfloat16, enabled=self.bf16):
            hidden = trunk_hidden(self.trunk, batch.prompt_ids, batch.prompt_mask, batch.response_ids)[:, :-1]
        self.features = hidden.detach() if keep else None
        return self.head(hidden)

    def produce(self, batch: RolloutBatch, ctx: SignalContext) -> RolloutBatch:
        if batch.values is not None:
            return batch
        t0 = time.perf_counter()
        was_training = self.trunk.training
        self.trunk.eval()
        with torch.no_grad():
            values = self._values(batch, keep=self._head_passes(ctx.step) > 0)
        self.trunk.train(was_training)
        self.seconds += time.perf_counter() - t0
        return batch.replace(values=torch.where(batch.response_mask, values, torch.zeros((), device=values.device)))

    def _targets(self, batch: RolloutBatch, credit: Credit | None) -> Tensor:
        if credit is not None and credit.returns is not None:
            return credit.returns.float()
        rewards = batch.token_rewards if batch.token_rewards is not None else \
            outcome_to_token_rewards(batch.rewards, batch.response_mask)
        return monte_carlo_returns(rewards.float(), batch.response_mask)

    def loss(self, batch: RolloutBatch, idx: Tensor, outputs: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        if self.separate:
            return torch.zeros(()), {}
        t0 = time.perf_counter()
        returns = outputs.get("returns")
        returns = returns.float() if returns is not None else self._targets(batch, None)[idx]
        hidden = outputs["hidden"]
        hidden = hidden.detach() + self.coef * (hidden - hidden.detach())  # same values; the trunk's gradient x coef
        vpreds = self.head(hidden)  # [b, T]
        loss, frac = value_loss(vpreds, returns, batch.values[idx].float(), batch.response_mask[idx], self.clip)
        self.seconds += time.perf_counter() - t0
        return loss, {"critic/value_loss": float(loss.detach()), "critic/clipfrac": float(frac)}

    def step(self) -> None:
        if self.separate:
            return
        t0 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(self.head.parameters(), self.max_norm)
        self.optim.step()
        self.optim.zero_grad(set_to_none=True)
        self.seconds += time.perf_counter() - t0

    def update(self, batch: RolloutBatch, ctx: SignalContext, credit: Credit) -> dict[str, float]:
        returns, mask = self._targets(batch, credit), batch.response_mask
        out = {"critic/explained_variance": explained_variance(returns, batch.values, mask),
               "critic/values_mean": float(batch.values[mask].mean()) if bool(mask.any()) else 0.0,
               "critic/returns_mean": float(returns[mask].mean()) if bool(mask.any()) else 0.0}
        if not self.separate:
            return out | self._fit_head(batch, returns, self._head_passes(ctx.step), ctx.seed)
        t0 = time.perf_counter()
        self.trunk.train()
        loss, frac = self._regress(lambda idx: self._values(batch.select(idx)), batch, returns, self.epochs, ctx.seed)
        self.seconds += time.perf_counter() - t0
        return {**out, "critic/value_loss": loss, "critic/clipfrac": frac}

    def _fit_head(self, batch: RolloutBatch, returns: Tensor, passes: int, seed: int) -> dict[str, float]:
        """`passes` head-only epochs (x minibatches) of the clipped value loss on the features `produce` kept (the
        trunk before this step's policy update); the trunk is not touched. Returns the mean loss when any ran."""
        features, self.features = self.features, None
        if passes <= 0 or features is None:
            return {}
        t0 = time.perf_counter()
        loss, _ = self._regress(lambda idx: self.head(features[idx]), batch, returns, passes, seed)
        self.seconds += time.perf_counter() - t0
        return {"critic/head_fit_loss": loss}

    def _regress(self, values_of: Any, batch: RolloutBatch, returns: Tensor, passes: int,
                 seed: int) -> tuple[float, float]:
        """`passes` epochs x `self.minibatches` AdamW steps of the clipped value loss of `values_of(rows)` against
        `returns` (old values: `batch.values`), gradients clipped over the optimizer's parameters; returns the mean
        loss and clip fraction. Gradients are cleared at the end (a head's must not reach the next joint step)."""
        gen = torch.Generator().manual_seed(seed + 104_729)
        mask, old = batch.response_mask, batch.values.float()
        params = [p for g in self.optim.param_groups for p in g["params"]]
        loss_sum, frac_sum, n = 0.0, 0.0, 0
        for _ in range(passes):
            for idx in torch.randperm(batch.B, generator=gen).chunk(self.minibatches):
                loss, frac = value_loss(values_of(idx), returns[idx], old[idx], mask[idx], self.clip)
                self.optim.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, self.max_norm)
                self.optim.step()
                loss_sum, frac_sum, n = loss_sum + float(loss.detach()), frac_sum + float(frac), n + 1
        self.optim.zero_grad(set_to_none=True)
        return loss_sum / max(n, 1), frac_sum / max(n, 1)

    def metrics(self) -> dict[str, float]:
        out, self.seconds = {"time/critic": self.seconds}, 0.0
        return out

    def state_dict(self) -> dict[str, Any]:
        state = {"head": self.head.state_dict(), "optim": self.optim.state_dict()}
        if self.separate:
            state["trunk"] = self.trunk.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {"head", "optim", *(("trunk",) if self.separate else ())} - set(state)
        if missing:
            raise ValueError(f"checkpoint of component 'critic' lacks {sorted(missing)}: was it saved with another "
                             "--critic?")
        self.head.load_state_dict(state["head"])
        if self.separate:
            self.trunk.load_state_dict(state["trunk"])
        self.optim.load_state_dict(state["optim"])


# ------------------------------------------------------------------------------------------------ factory
def critic_component(cfg: Any, spec: Any, policy: Any, task: Any) -> Component | None:
    """`FACTORIES` entry: the run's critic, or None; a clear error when the estimator needs one and none is set."""
    c = cfg.critic
    c.validate()
    needs = set(spec.needs)
    if not c.critic:
        if needs & {"values", "q_values"}:
            raise ValueError(f"estimator {spec.name!r} needs critic values: pass --critic head or "
                             "--critic model:<policy> (e.g. model:tiny)")
        return None
    separate = _load_separate(c.critic, cfg.run.seed, policy) if c.critic.startswith("model:") else None
    if "q_values" in needs:
        if separate is None:
            raise ValueError(f"estimator {spec.name!r} needs an utterance-level critic with a target copy: "
                             "pass --critic model:<policy> (--critic head is not offered for it)")
        from creditlab.train.turn_critic import TurnCritic

        return TurnCritic(cfg, separate)
    return ValueCritic(cfg, policy.model, separate=separate)


def _load_separate(spec: str, seed: int, policy: Any) -> nn.Module:
    """The critic's own model (fresh weights for tiny, the pretrained ones otherwise); it reads the policy's token
    ids, so its vocabulary must be the policy's."""
    from creditlab.policy import load_policy

    name = spec.split(":", 1)[1]
    model = load_policy(name, seed=seed + 1).model.to(policy.model.device)
    if model.config.vocab_size != policy.model.config.vocab_size:
        raise ValueError(f"--critic {spec}: the critic's vocabulary ({model.config.vocab_size}) is not the policy's "
                         f"({policy.model.config.vocab_size}); it reads the policy's token ids, so pick a model with "
                         f"the policy's tokenizer (e.g. model:{policy.name})")
    return model.train()
