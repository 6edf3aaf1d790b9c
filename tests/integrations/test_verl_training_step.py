"""A real `python -m verl.trainer.main_ppo` step on the CPU with creditlab estimators (slow; CI runs it).

Each case starts verl 0.9.1's own entry point on a tiny random Llama and a 16-row parquet, through the shims in
`verl_cpu/` (loaded by verl's VERL_USE_EXTERNAL_MODULES hook): a CPU platform, an HF-generate rollout replica and
probe trainer modes that save what verl stored after its advantage step. 4 prompts x 4 responses, 8 tokens at
most, ragged EOS lengths; one training step each (rollout, old log-probs, advantages, FSDP2 update on gloo,
weight sync). See docs/integrations.md for the CPU recipe.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

verl = pytest.importorskip("verl", reason="verl is not installed (make test-verl builds .venv-verl)")
if importlib.util.find_spec("transfer_queue") is None or importlib.util.find_spec("ray") is None:
    pytest.skip("verl's v1 trainer needs verl[verl-core] (TransferQueue, Ray)", allow_module_level=True)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from creditlab.batch import RolloutBatch  # noqa: E402
from creditlab.integrations._signals import segment  # noqa: E402
from creditlab.registry import get_spec  # noqa: E402
from creditlab.signals.steps import Segmenter, pad_step_values  # noqa: E402

HERE = Path(__file__).parent / "verl_cpu"
sys.path.insert(0, str(HERE))
import creditlab_reward  # noqa: E402
import run_verl_step  # noqa: E402

pytestmark = pytest.mark.slow


def run(tmp_path: Path, estimator: str, mode: str, *extra: str) -> tuple[int, str, dict | None]:
    out = tmp_path / "run"
    code = run_verl_step.main(out, estimator, mode, list(extra), timeout=900)
    probe = out / "probe" / "step1.pt"
    stored = torch.load(probe, weights_only=True) if probe.exists() else None
    return code, (out / "main_ppo.log").read_text(), stored


def stored_batch(stored: dict) -> RolloutBatch:
    """The RolloutBatch of what verl stored: responses, masks, rewards, uids (as the plugin maps them)."""
    mask = stored["response_mask"].bool()
    _, groups = np.unique(np.asarray(stored["uid"]), return_inverse=True)
    scores = stored["rm_scores"].float() * mask  # verl's token-level rewards: the score on the last token
    return RolloutBatch(response_ids=stored["responses"].long(), response_mask=mask,
                        group_ids=torch.as_tensor(groups, dtype=torch.long), rewards=scores.sum(1),
                        token_rewards=scores)


def test_tempo_with_the_creditlab_sync_hook(tmp_path):
    code, log, stored = run(tmp_path, "creditlab_tempo", "creditlab_sync_probe")
    assert code == 0 and stored is not None, log[-6000:]
    batch = stored_batch(stored)
    lengths = batch.response_mask.sum(1)
    assert len(set(lengths.tolist())) > 1, "responses of one length: nothing ragged was tested"
    assert int(batch.group_ids.max()) + 1 == 4 and batch.B == 16
    expected = get_spec("tempo").fn(batch).advantages
    torch.testing.assert_close(stored["advantages"].float(), expected.float(), atol=1e-6, rtol=1e-5)
    placeholder = get_spec("tempo").fn(batch.replace(response_ids=torch.zeros_like(batch.response_ids))).advantages
    assert float((placeholder - expected).abs().max()) > 1e-3, "token ids made no difference to tempo here"
    # the hook's step fields, read back from the rows' reward_extra_info as verl stored it
    texts = stored["texts"]
    seg = Segmenter("regex", ";")
    scores = [creditlab_reward.compute_score("toy", t, "a")["step_rewards"] for t in texts]
    torch.testing.assert_close(stored["step_rewards"], pad_step_values(scores, stored["step_rewards"].shape[1]))
    assert max(len(s) for s in scores) >= 2, "no response had two steps"
    tok = AutoTokenizer.from_pretrained(tmp_path / "run" / "model")
    assert torch.equal(stored["step_ids"], segment(batch.response_ids, batch.response_mask, tok, seg).step_ids)


def test_creditlab_grpo_with_the_stock_trainer_equals_verl_grpo(tmp_path):
    from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage

    code, log, stored = run(tmp_path, "creditlab_grpo", "sync_probe")
    assert code == 0 and stored is not None, log[-6000:]
    batch = stored_batch(stored)
    theirs, _ = compute_grpo_outcome_advantage(token_level_rewards=batch.token_rewards,
                                               response_mask=batch.response_mask.float(),
                                               index=np.asarray(stored["uid"], dtype=object))
    torch.testing.assert_close(stored["advantages"].float(), theirs.float(), atol=1e-5, rtol=1e-5)
    assert float(theirs.abs().max()) > 0, "every group had equal rewards: the comparison is vacuous"


def test_tempo_without_the_hook_names_response_ids(tmp_path):
    code, log, stored = run(tmp_path, "creditlab_tempo", "sync")
    assert code != 0 and stored is None
    assert "verl estimator 'creditlab_tempo' needs RolloutBatch field(s) ['response_ids']" in log, log[-6000:]
    assert "trainer.v1.trainer_mode=creditlab_sync" in log
