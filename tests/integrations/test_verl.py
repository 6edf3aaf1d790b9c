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

# Fields a test can synthesize for any estimator: [B,T] floats/bools, [B] longs, and step fields ([B,T] step ids
# with [B,S] per-step values, S != T).
SYNTH = {"entropies", "certainty", "token_logits", "values", "planning_mask", "strata", "logprobs",
         "ref_logprobs", "token_rewards", "prm_logprobs", "attn_fai", "attn_waad", "punct_mask", "step_ids",
         "step_rewards", "step_labels", "mc_values"}
STEP_FIELDS = {"step_ids", "step_rewards", "step_labels", "mc_values"}


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
    extras = steps(mask, g)
    for name in SYNTH - {"token_rewards"} - STEP_FIELDS:
        spec = FIELDS[name]
        if spec.kind == "bool":
            extras[name] = (torch.rand(b, t, generator=g) > 0.5) & mask
        elif spec.kind == "long":
            extras[name] = torch.randint(0, 3, (b,), generator=g)
        else:
            extras[name] = torch.where(mask, torch.rand(b, t, generator=g), 0.0)
    return data, batch, extras


def steps(mask: torch.Tensor, g: torch.Generator, S: int = 3) -> dict:
    """Contiguous steps of about two tokens (at most S per row): step_ids [B,T], per-step values [B,S]."""
    b, t = mask.shape
    step_ids = torch.where(mask, (torch.arange(t) // 2).clamp_max(S - 1).expand(b, t), -1)
    n = step_ids.max(1).values + 1
    present = torch.arange(S) < n[:, None]  # [B,S]
    labels = torch.where(present, torch.randint(0, 2, (b, S), generator=g), -1)
    return {"step_ids": step_ids, "step_rewards": torch.rand(b, S, generator=g) * 2 - 1, "step_labels": labels,
            "mc_values": torch.rand(b, S, generator=g)}


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


def test_step_fields_are_not_masked_as_tokens_when_s_equals_t():
    """[B,S] step rewards must reach the estimator untouched even when S happens to equal T (a holey mask used to
    zero step 2 and 3 of row 1 in silence)."""
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 1]], dtype=torch.bool)  # row 1: two observation tokens
    step_ids = torch.tensor([[0, 1, 2, 3, 4], [0, 1, -1, -1, 2]])
    step_rewards = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5], [0.9, -0.8, 0.7, 0.0, 0.0]])  # S = T = 5
    batch = RolloutBatch(response_ids=torch.arange(10).view(2, 5), response_mask=mask, group_ids=torch.zeros(2).long(),
                         rewards=torch.tensor([1.0, 0.0]), step_ids=step_ids, step_rewards=step_rewards)
    tlr = torch.zeros(2, 5)
    tlr[0, 4], tlr[1, 4] = 1.0, 0.0
    data = DataProto.from_dict(tensors={"response_mask": mask.long(), "token_level_rewards": tlr},
                               non_tensors={"uid": np.array(["p", "p"], dtype=object)})
    with plugin.batch_fields(response_ids=batch.response_ids, step_ids=step_ids, step_rewards=step_rewards):
        out = verl_compute_advantage(data, adv_estimator="creditlab_sum_form", config=OmegaConf.create({}))
    expected = get_spec("sum_form").fn(batch.replace(token_rewards=tlr * mask)).advantages
    torch.testing.assert_close(out.batch["advantages"], expected.float())


def test_hook_errors_name_the_estimator_plainly():
    data, _, _ = sample()
    with pytest.raises(ValueError, match=r"verl estimator 'creditlab_sum_form' needs.*step_ids.*creditlab_sync") as e:
        verl_compute_advantage(data, adv_estimator="creditlab_sum_form", config=OmegaConf.create({}))
    assert "creditlab_'" not in str(e.value)
    with plugin.batch_fields(data), pytest.raises(ValueError, match="the trainer hook did not supply"):
        verl_compute_advantage(data, adv_estimator="creditlab_sum_form", config=OmegaConf.create({}))


# ---------------------------------------------------------------- the hook's own sources
WORDS = ["a", "b", "c", "d", "e", ";"]


@pytest.fixture(scope="module")
def tok():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    t = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def step_batch(tok):
    """Responses with steps separated by ';', their reward_extra_info as a reward function would return it."""
    from creditlab.signals.steps import split_steps

    texts = ["a b ; c", "a ; b ; c d", "d e", "a b ; e ; a"]
    ids = [tok(x, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for x in texts]
    t = max(map(len, ids))
    responses = torch.tensor([r + [0] * (t - len(r)) for r in ids])
    mask = torch.tensor([[1] * len(r) + [0] * (t - len(r)) for r in ids])
    pieces = [[x[s:e] for s, e in split_steps(x, "regex", pattern=";")] for x in texts]  # the reward's own split
    infos = [{"step_rewards": [len(p.split()) - 1.5 for p in row], "step_labels": ["b" in p.split() for p in row],
              "n_calls": len(row)} for row in pieces]
    return responses, mask, infos, pieces


def test_signal_fields_from_reward_extra_info(tok):
    from creditlab.integrations.verl_hook import HookConfig, signal_fields
    from creditlab.signals.steps import pad_step_values

    responses, mask, infos, _ = step_batch(tok)
    hook = HookConfig(split="regex", pattern=";", rewards_key="step_rewards", labels_key="step_labels",
                      row_fields={"strata": "n_calls"})
    out = signal_fields({"step_ids", "step_rewards", "step_labels", "strata", "planning_mask", "texts"},
                        responses, mask, tok, hook, infos)
    assert out["step_ids"][1].tolist()[:6] == [0, -1, 1, -1, 2, 2]  # "a ; b ; c d": separators in no step
    assert int(out["step_ids"][1, 6]) == -1  # EOS
    torch.testing.assert_close(out["step_rewards"], pad_step_values([i["step_rewards"] for i in infos], 3))
    assert out["step_labels"].tolist() == [[1, 0, -1], [0, 1, 0], [0, -1, -1], [1, 0, 0]]
    assert out["strata"].tolist() == [2, 3, 1, 3]
    assert out["texts"][0] == "a b ; c"
    assert not bool(out["planning_mask"].any())  # no strategic gram in these texts
    bad = [dict(i) for i in infos]
    bad[2]["step_rewards"] = [1.0, 2.0]
    with pytest.raises(ValueError, match=r"reward_extra_info\['step_rewards'\].*response 2, which has 1 step"):
        signal_fields({"step_rewards"}, responses, mask, tok, hook, bad)
    with pytest.raises(ValueError, match="response 0 has no 'step_rewards'"):
        signal_fields({"step_rewards"}, responses, mask, tok, hook, [{} for _ in infos])


def test_legacy_compute_advantage_reads_step_rewards_from_non_tensor_batch(tok):
    from creditlab.integrations.verl_hook import HookConfig, signal_fields

    responses, mask, infos, _ = step_batch(tok)
    b, t = responses.shape
    lengths = mask.sum(1)
    tlr = torch.zeros(b, t)
    tlr[torch.arange(b), lengths - 1] = torch.tensor([1.0, 0.0, 1.0, 0.0])
    data = DataProto.from_dict(tensors={"responses": responses, "response_mask": mask, "token_level_rewards": tlr},
                               non_tensors={"uid": np.array(["p", "p", "q", "q"], dtype=object),
                                            "step_rewards": np.array([i["step_rewards"] for i in infos], dtype=object)})
    config = OmegaConf.create({"creditlab_steps": {"split": "regex", "pattern": ";", "rewards_key": "step_rewards"}})
    out = plugin.compute_advantage(data, adv_estimator="creditlab_pure", config=config, tokenizer=tok)
    made = signal_fields({"step_ids", "step_rewards"}, responses, mask, tok, HookConfig.from_algorithm(config), infos)
    batch = RolloutBatch(response_ids=responses, response_mask=mask.bool(), group_ids=torch.tensor([0, 0, 1, 1]),
                         rewards=tlr.sum(1), token_rewards=tlr, **made)
    torch.testing.assert_close(out.batch["advantages"], get_spec("pure").fn(batch).advantages.float())
    with pytest.raises(ValueError, match="tokenizer="):
        plugin.compute_advantage(data, adv_estimator="creditlab_pure", config=config)


def test_v1_hook_reads_transferqueue_rows(tok):
    """`hook_fields` on what TransferQueue returns: ragged (jagged) rows and each row's extra_fields dict."""
    from tensordict import NonTensorStack, TensorDict

    from creditlab.integrations.verl_hook import HookConfig

    responses, mask, infos, _ = step_batch(tok)
    rows = [r[m.bool()] for r, m in zip(responses, mask)]
    store = TensorDict({"responses": torch.nested.as_nested_tensor(rows, layout=torch.jagged),
                        "response_mask": torch.nested.as_nested_tensor([torch.ones_like(r) for r in rows],
                                                                       layout=torch.jagged),
                        "old_log_probs": torch.nested.as_nested_tensor([-torch.rand(len(r)) for r in rows],
                                                                       layout=torch.jagged),
                        "extra_fields": NonTensorStack(*[{"reward_extra_info": i} for i in infos])},
                       batch_size=[len(rows)])

    class FakeTQ:
        def kv_batch_get(self, keys, partition_id, select_fields):
            assert keys == ["k0", "k1", "k2", "k3"] and partition_id == "train"
            return store.select(*select_fields)

    class Meta:
        keys, partition_id = ["k0", "k1", "k2", "k3"], "train"

    hook = HookConfig(split="regex", pattern=";", rewards_key="step_rewards")
    out = plugin.hook_fields(FakeTQ(), Meta(), {"response_ids", "logprobs", "step_ids", "step_rewards"}, tok, hook)
    assert torch.equal(out["response_ids"], responses)  # padded with 0 to the longest row, as verl pads
    assert out["logprobs"].shape == responses.shape
    assert out["step_rewards"].shape == (4, 3) and out["step_ids"].shape == responses.shape


@pytest.fixture(scope="module")
def verl_config():
    import os

    from hydra import compose, initialize_config_dir

    folder = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")

    def make(*overrides):
        with initialize_config_dir(config_dir=folder, version_base=None):
            return compose("ppo_trainer", overrides=list(overrides))

    return make


@pytest.mark.parametrize(("overrides", "match"), [
    (["algorithm.adv_estimator=creditlab_sum_form"], r"step_rewards.*creditlab_steps=\{split: newline, rewards_key"),
    (["algorithm.adv_estimator=creditlab_tp_grpo", "+algorithm.creditlab_steps={rewards_key: s}"], "labels_key"),
    (["algorithm.adv_estimator=creditlab_gae"], "critic.enable=True"),
    (["algorithm.adv_estimator=creditlab_prime"], r"prm_logprobs.*batch_fields\(prm_logprobs=.*use_kl_loss=True"),
    (["algorithm.adv_estimator=creditlab_stratified"], r"creditlab_row_fields=\{strata: <key>\}"),
    (["algorithm.adv_estimator=creditlab_tempo", "+algorithm.creditlab_kwargs={tdcoef: 1}"],
     r"creditlab_kwargs: estimator 'tempo' has no hyper-parameter 'tdcoef'"),
    (["algorithm.adv_estimator=creditlab_grpo", "+algorithm.creditlab_kwargs={singleton: bogus}"], "singleton"),
    (["algorithm.adv_estimator=creditlab_capo", "+algorithm.creditlab_kwargs={w_whole: 1.0, w_process: 2.0}",
      "+algorithm.creditlab_steps={rewards_key: s}"], "creditlab_kwargs for estimator 'capo'.*w_whole > w_process"),
    (["algorithm.adv_estimator=creditlab_nope"], "no creditlab estimator 'nope'"),
    (["algorithm.adv_estimator=creditlab_pure", "+algorithm.creditlab_steps={split: lines}"], "split mode 'lines'"),
])
def test_check_config_fails_at_trainer_start(verl_config, overrides, match):
    with pytest.raises(ValueError, match=match):
        plugin.check_config(verl_config(*overrides))


def test_check_config_accepts_what_the_hook_can_supply(verl_config):
    ok = [["algorithm.adv_estimator=creditlab_tempo"], ["algorithm.adv_estimator=grpo"],
          ["algorithm.adv_estimator=creditlab_sum_form", "+algorithm.creditlab_steps={rewards_key: step_rewards}"],
          ["algorithm.adv_estimator=creditlab_gae", "critic.enable=True"],
          ["algorithm.adv_estimator=creditlab_hicra"],
          ["algorithm.adv_estimator=creditlab_stratified", "+algorithm.creditlab_row_fields={strata: n_calls}"]]
    for overrides in ok:
        plugin.check_config(verl_config(*overrides))


def test_multi_turn_rows_from_the_agent_loop_give_gigpo_its_turns(verl_config):
    """Real multi-turn episodes (creditlab's engine on Sokoban, tiny policy) laid out as verl's agent loop lays them
    out: response_mask 0 on the environment's observation tokens, per-turn lists in the rows' extra info. The hook's
    turn_ids are the runs of the mask; the advantages equal gigpo on the engine's own batch."""
    from creditlab.policy import load_policy
    from creditlab.rollout.hf import SamplingConfig
    from creditlab.rollout.multiturn import MultiTurn
    from creditlab.tasks import get_task

    policy, task = load_policy("tiny", seed=0), get_task("sokoban")
    own, scores = MultiTurn(max_turns=3).run(policy, task, task.problems("train", 2, 0), 3,
                                             SamplingConfig(max_new_tokens=6), seed=0)
    assert int(own.turn_ids.max()) >= 1 and (~own.response_mask & (own.response_ids != 0)).any()
    b, t = own.response_ids.shape
    last = (own.response_mask.long() * torch.arange(1, t + 1)).argmax(1)
    tlr = torch.zeros(b, t)
    tlr[torch.arange(b), last] = own.rewards
    turns = [s.turns for s in scores]
    data = DataProto.from_dict(
        tensors={"responses": own.response_ids, "response_mask": own.response_mask.long(), "token_level_rewards": tlr},
        non_tensors={"uid": np.array([f"p{g}" for g in own.group_ids.tolist()], dtype=object),
                     "turn_rewards": np.array([own.turn_rewards[i, :k].tolist() for i, k in enumerate(turns)] + [None],
                                              dtype=object)[:-1],
                     "states": np.array([own.anchor_states[i, :k].tolist() for i, k in enumerate(turns)] + [None],
                                        dtype=object)[:-1]})
    config = verl_config("algorithm.adv_estimator=creditlab_gigpo",
                         "+algorithm.creditlab_row_fields={turn_rewards: turn_rewards, anchor_states: states}")
    plugin.check_config(config)
    out = plugin.compute_advantage(data, adv_estimator="creditlab_gigpo", config=config.algorithm,
                                   tokenizer=policy.tokenizer)
    want = get_spec("gigpo").fn(own.replace(token_rewards=tlr)).advantages
    torch.testing.assert_close(out.batch["advantages"], want.float(), atol=1e-6, rtol=1e-5)
    assert out.batch["advantages"].abs().sum() > 0 and (out.batch["advantages"][~own.response_mask] == 0).all()
    with pytest.raises(ValueError, match=r"creditlab_row_fields=\{turn_rewards: <key>\}"):
        plugin.check_config(verl_config("algorithm.adv_estimator=creditlab_gigpo",
                                        "+algorithm.creditlab_row_fields={anchor_states: states}"))


def test_turn_lists_are_checked_and_read_from_the_agent_loops_extra_fields(tok):
    from creditlab.integrations.verl_hook import HookConfig, signal_fields

    responses = torch.tensor([[3, 4, 5, 6, 7, 1], [3, 4, 1, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 0, 0, 1, 1], [1, 1, 0, 0, 0, 0]])  # row 0: two turns around a tool response
    hook = HookConfig(row_fields={"turn_rewards": "tr"})
    out = signal_fields({"turn_ids", "turn_rewards"}, responses, mask, tok, hook, [{"tr": [0.5, 1.0]}, {"tr": [2.0]}])
    assert out["turn_ids"].tolist() == [[0, 0, -1, -1, 1, 1], [0, 0, -1, -1, -1, -1]]
    assert out["turn_rewards"].tolist() == [[0.5, 1.0], [2.0, 0.0]]
    with pytest.raises(ValueError, match="response 1, which has 1 turn"):
        signal_fields({"turn_rewards"}, responses, mask, tok, hook, [{"tr": [0.5, 1.0]}, {"tr": [2.0, 3.0]}])
    # v1 trainer: the agent loop's extra_fields (top level) and the reward's extra info both count
    assert plugin._row_info({"tr": [1.0], "reward_extra_info": {"acc": 1}}) == {"tr": [1.0], "acc": 1}
