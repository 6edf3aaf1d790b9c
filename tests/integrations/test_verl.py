"""The creditlab verl plugin against the real verl==0.9.1 on CPU (run in .venv-verl: `make test-verl`)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import subprocess
import sys

import pytest

verl = pytest.importorskip("verl", reason="verl is not installed (make test-verl builds .venv-verl)")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from verl import DataProto  # noqa: E402
from verl.trainer.ppo.core_algos import get_adv_estimator_fn  # noqa: E402
from verl.trainer.ppo.ray_trainer import compute_advantage as verl_compute_advantage  # noqa: E402

from creditlab.batch import FIELDS, RolloutBatch  # noqa: E402
from creditlab.integrations import verl as plugin  # noqa: E402
from creditlab.registry import get_spec, list_estimators  # noqa: E402

# Fields a test can synthesize for any estimator ([B,T] floats/bools, [B] longs); step-level fields are not.
SYNTH = {"entropies", "certainty", "token_logits", "values", "planning_mask", "strata", "logprobs",
         "ref_logprobs", "token_rewards", "prm_logprobs", "attn_fai", "attn_waad"}


def test_entry_point_is_declared():
    eps = importlib.metadata.entry_points(group="verl.plugins")
    assert any(ep.name == "creditlab" and ep.value == "creditlab.integrations.verl" for ep in eps)


def test_import_verl_alone_registers_every_estimator():
    # A fresh interpreter that imports only verl: the entry point must load the plugin by itself.
    code = ("import verl\nfrom verl.trainer.ppo.core_algos import get_adv_estimator_fn\n"
            "from creditlab.registry import list_estimators\n"
            "for n in list_estimators():\n"
            "    assert get_adv_estimator_fn('creditlab_' + n).creditlab_estimator == n, n\n"
            "import creditlab.integrations.verl as p\nassert p.check() == [], p.check()\nprint('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


def test_every_name_resolves_and_check_is_clean():
    for name in list_estimators():
        fn = get_adv_estimator_fn(plugin.PREFIX + name)
        assert fn.creditlab_estimator == name
    assert plugin.check() == []
    assert plugin.register_all() == [plugin.PREFIX + n for n in list_estimators()]  # idempotent


def sample(seed: int = 0):
    """A ragged batch: groups of 4, 3 and 1 responses, shared prefixes inside groups, varied lengths."""
    g = torch.Generator().manual_seed(seed)
    uids = np.array(["p0"] * 4 + ["p1"] * 3 + ["p2"], dtype=object)
    b, t = len(uids), 7
    responses = torch.randint(3, 9, (b, t), generator=g)
    responses[1, :3] = responses[0, :3]  # shared prefixes (tree estimators)
    responses[2, :2] = responses[0, :2]
    responses[5, :4] = responses[4, :4]
    lengths = torch.tensor([7, 5, 6, 3, 7, 2, 4, 5])
    mask = torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)  # [B,T]
    rewards = torch.tensor([1.0, 0.0, 0.5, 1.0, 0.0, 1.0, 0.2, 1.0])
    token_level_rewards = torch.zeros(b, t)
    token_level_rewards[torch.arange(b), lengths - 1] = rewards
    data = DataProto.from_dict(
        tensors={"responses": responses, "response_mask": mask.long(),
                 "token_level_rewards": token_level_rewards, "prompts": torch.randint(3, 9, (b, 3), generator=g),
                 "attention_mask": torch.cat([torch.ones(b, 3, dtype=torch.long), mask.long()], dim=1)},
        non_tensors={"uid": uids})
    group_ids = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2])
    batch = RolloutBatch(response_ids=responses, response_mask=mask, group_ids=group_ids, rewards=rewards,
                         token_rewards=token_level_rewards)
    extras = {}
    for name in SYNTH - {"token_rewards"}:
        spec = FIELDS[name]
        if spec.kind == "bool":
            extras[name] = (torch.rand(b, t, generator=g) > 0.5) & mask
        elif spec.kind == "long":
            extras[name] = torch.randint(0, 3, (b,), generator=g)
        else:
            extras[name] = torch.where(mask, torch.rand(b, t, generator=g), 0.0)
    return data, batch, extras


def feedable() -> list[str]:
    return [n for n in list_estimators() if set(get_spec(n).needs) <= SYNTH]


@pytest.mark.parametrize("name", feedable())
def test_verl_compute_advantage_returns_creditlab_advantages(name):
    data, batch, extras = sample()
    needed = {k: v for k, v in extras.items() if k in get_spec(name).needs}
    expected = get_spec(name).fn(batch.replace(**needed)).advantages
    with plugin.batch_fields(data, **needed):  # the trainer hook: token ids + whatever else the estimator needs
        out = verl_compute_advantage(data, adv_estimator=plugin.PREFIX + name, config=OmegaConf.create({}))
    torch.testing.assert_close(out.batch["advantages"], expected.float())
    assert "returns" in out.batch.keys()


def test_hyperparameters_come_from_config():
    data, batch, _ = sample()
    config = OmegaConf.create({"creditlab_kwargs": {"scale_by_std": False}})
    out = verl_compute_advantage(data, adv_estimator="creditlab_grpo", config=config)
    torch.testing.assert_close(out.batch["advantages"], get_spec("dr_grpo").fn(batch).advantages)


def test_grpo_matches_verl_grpo():
    data, _, _ = sample()
    data.non_tensor_batch["uid"] = np.array(["p0"] * 4 + ["p1"] * 4, dtype=object)  # no singleton group
    ours = verl_compute_advantage(data, adv_estimator="creditlab_grpo", config=OmegaConf.create({}))
    ours = ours.batch["advantages"].clone()
    theirs = verl_compute_advantage(data, adv_estimator="grpo", config=OmegaConf.create({}))
    torch.testing.assert_close(ours, theirs.batch["advantages"], atol=1e-5, rtol=1e-5)


def test_legacy_drop_in_supplies_token_ids():
    data, batch, _ = sample()
    out = plugin.compute_advantage(data, adv_estimator="creditlab_tempo", config=OmegaConf.create({}))
    torch.testing.assert_close(out.batch["advantages"], get_spec("tempo").fn(batch).advantages.float())


def test_estimator_reading_token_ids_fails_without_the_hook():
    if "tempo" not in list_estimators():
        pytest.skip("tempo is not registered")
    data, _, _ = sample()
    with pytest.raises(ValueError, match="response_ids"):
        verl_compute_advantage(data, adv_estimator="creditlab_tempo", config=OmegaConf.create({}))


def test_missing_declared_field_names_it():
    name = next((n for n in list_estimators() if "values" in get_spec(n).needs), None)
    if name is None:
        pytest.skip("no estimator needs values")
    data, _, _ = sample()
    with pytest.raises(ValueError, match="values"):
        verl_compute_advantage(data, adv_estimator=plugin.PREFIX + name, config=OmegaConf.create({}))


@pytest.mark.skipif(importlib.util.find_spec("transfer_queue") is None,
                    reason="verl's v1 trainer needs verl[verl-core] (TransferQueue)")
def test_v1_trainer_mode_is_registered():
    from verl.trainer.ppo.v1 import get_trainer_cls

    assert get_trainer_cls(plugin.V1_TRAINER_MODE).creditlab_hook
