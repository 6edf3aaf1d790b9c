"""Step scorers: one protocol for everything that gives each step of a response a score -> ``step_rewards [B,S]``.

    scorer = get_scorer("oracle")                                   # the task verifier's step labels
    scorer = get_scorer("prm", path="models/prm", convention="qwen")  # a discriminative PRM (local directory)
    scorer = get_scorer("judge", policy=judge_policy, k=3, vote="majority")   # LLM-as-judge (CAPO)
    scorer = get_scorer("implicit", model=policy, mode="prime")     # implicit PRM (creditlab.signals.implicit)

    batch = produce_step_signals(batch, scorer, ctx)    # fills step_ids and step_rewards (+ scorer extras)
    logs = scorer.update(batch, ctx) if is_online(scorer) else {}   # online-trained scorers only
    logs |= scorer.metrics()                            # counted events since the last call

Every scorer owns a `Segmenter` (its ``steps=`` / ``pattern=`` keywords) so that the steps it scores are exactly the
steps that ``step_ids`` numbers: use `produce_step_signals` (or `Scorer.produce`) to get both from one rule.
``score_steps`` returns ``[B, S]`` float32 with ``S = max(1, max steps of a row, max(step_ids)+1)``; step columns
beyond a row's last step hold 0 (a row with zero steps is all padding). Scores are finite: a scorer never emits
NaN. Each scorer records its score range in ``scale`` ((0, 1) or (-1, 1)): thresholds differ between the two.
Counted events (NaN PRM outputs, unparseable judge critiques, ...) are returned by ``metrics()`` as counts since
the previous ``metrics()`` call, under ``scorer/<event>``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from creditlab.batch import RolloutBatch
from creditlab.signals.steps import Segmentation, Segmenter, pad_step_values

logger = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------- protocol/registry


@runtime_checkable
class StepScorer(Protocol):
    """What the trainer needs from a step scorer (see the module docstring)."""

    name: str
    scale: tuple[float, float]

    def score_steps(self, batch: RolloutBatch, ctx: Any) -> Tensor:
        """``step_rewards [B,S]`` float32 for the batch's responses (no gradient)."""
        ...

    def metrics(self) -> dict[str, float]:
        """Counted events since the previous call, e.g. ``{"scorer/nan_count": 0.0}``."""
        ...


@runtime_checkable
class OnlineStepScorer(StepScorer, Protocol):
    """A scorer trained online on the rollouts (implicit PRM)."""

    def update(self, batch: RolloutBatch, ctx: Any) -> dict[str, float]:
        """One training step of the scorer on ``batch``; returns its loss metrics."""
        ...


_SCORERS: dict[str, Callable[..., StepScorer]] = {}


def register_scorer(name: str) -> Callable[[Callable[..., StepScorer]], Callable[..., StepScorer]]:
    """Register a scorer factory (usually the class) under ``name``; a duplicate name raises ValueError."""

    def register(factory: Callable[..., StepScorer]) -> Callable[..., StepScorer]:
        if name in _SCORERS:
            raise ValueError(f"a step scorer named {name!r} is already registered; registered: {sorted(_SCORERS)}")
        _SCORERS[name] = factory
        return factory

    return register


def _load_builtin() -> None:
    import creditlab.signals.implicit  # noqa: F401  (registers "implicit")


def list_scorers() -> list[str]:
    """Names accepted by `get_scorer`."""
    _load_builtin()
    return sorted(_SCORERS)


def get_scorer(name: str, **kwargs: Any) -> StepScorer:
    """Build the scorer ``name`` with its keyword options; an unknown name raises KeyError listing the names."""
    _load_builtin()
    if name not in _SCORERS:
        raise KeyError(f"unknown step scorer {name!r}; registered: {sorted(_SCORERS)}")
    return _SCORERS[name](**kwargs)


def is_online(scorer: StepScorer) -> bool:
    """True for scorers with an ``update`` method (trained on the rollouts)."""
    return callable(getattr(scorer, "update", None))


# ------------------------------------------------------------------------------------------- shared plumbing


class Scorer:
    """Base class: a `Segmenter`, event counters, and ``produce`` (step_ids + step_rewards from one rule)."""

    name = "base"
    scale: tuple[float, float] = (0.0, 1.0)

    def __init__(self, steps: str = "newline", pattern: str | None = None) -> None:
        self.segmenter = Segmenter(steps, pattern)
        self._events: dict[str, float] = {}

    @property
    def neutral(self) -> float:
        """The middle of ``scale`` (0.5 or 0): the score used where no verdict exists."""
        return (self.scale[0] + self.scale[1]) / 2

    def count(self, event: str, n: float = 1.0) -> None:
        self._events[f"scorer/{event}"] = self._events.get(f"scorer/{event}", 0.0) + float(n)

    def metrics(self) -> dict[str, float]:
        out, self._events = self._events, {}
        return out

    def segment(self, batch: RolloutBatch, ctx: Any) -> Segmentation:
        return self.segmenter.segment(batch, ctx)

    def score_segmented(self, batch: RolloutBatch, ctx: Any, seg: Segmentation) -> Tensor:
        raise NotImplementedError

    def score_steps(self, batch: RolloutBatch, ctx: Any) -> Tensor:
        """``step_rewards [B,S]`` for the steps of this scorer's segmenter (which ``batch.step_ids`` must share)."""
        return self.score_segmented(batch, ctx, self.segment(batch, ctx))

    def produce(self, batch: RolloutBatch, ctx: Any) -> dict[str, Tensor]:
        """``{"step_ids", "step_rewards"}`` from one segmentation (subclasses may add fields)."""
        seg = self.segment(batch, ctx)
        return {"step_ids": seg.step_ids, "step_rewards": self.score_segmented(batch, ctx, seg)}

    def _pad(self, rows: Sequence[Sequence[float]], batch: RolloutBatch, seg: Segmentation) -> Tensor:
        S = max(seg.num_steps, int(seg.step_ids.max()) + 1 if seg.step_ids.numel() else 1)
        out = pad_step_values(rows, S, device=batch.response_ids.device)
        bad = ~torch.isfinite(out)
        if bool(bad.any()):  # every scorer's last line of defence: NaN never reaches an estimator
            self.count("nan_count", int(bad.sum()))
            out = torch.where(bad, torch.full_like(out, self.neutral), out)
        return out


def produce_step_signals(batch: RolloutBatch, scorer: StepScorer, ctx: Any) -> RolloutBatch:
    """Fill the batch fields the scorer produces (step_ids, step_rewards, ...) that the batch does not have yet.

    Keeps an existing ``step_ids`` only if the scorer has no ``produce`` method (then it must share the rule).
    Fields in the scorer's ``overwrites`` (e.g. the implicit PRM's recomputed old-policy ``logprobs``) replace the
    batch's own.
    """
    produce = getattr(scorer, "produce", None)
    fields = produce(batch, ctx) if callable(produce) else {"step_rewards": scorer.score_steps(batch, ctx)}
    overwrites = set(getattr(scorer, "overwrites", ()))
    return batch.replace(**{k: v for k, v in fields.items() if getattr(batch, k) is None or k in overwrites})


def oracle_step_rewards(batch: RolloutBatch, ctx: Any) -> dict[str, Tensor]:
    """Producer (``PRODUCERS["step_rewards"]``): step_ids and step_rewards from the task verifier's step labels."""
    return OracleScorer().produce(batch, ctx)


def _problem_text(batch: RolloutBatch, ctx: Any, b: int) -> str:
    """The prompt of row ``b``: ``ctx.problems`` is indexed by group id (as the trainer builds it)."""
    problems = list(getattr(ctx, "problems", ()) or ())
    g = int(batch.group_ids[b])
    return getattr(problems[g], "prompt", "") if 0 <= g < len(problems) else ""


# ------------------------------------------------------------------------------------------------ oracle

# One arithmetic step "a op b = c" on its own line (the arith_chain format), used by ``hackable=True``.
STEP_FORMAT = r"-?\d+\s*[-+*/x×÷]\s*-?\d+\s*=\s*-?\d+\s*\.?"


@register_scorer("oracle")
class OracleScorer(Scorer):
    """The task's own verifier labels: 1.0 for a step labelled right, 0.0 wrong (0.5 for "no label" = -1).

    Exact for ``arith_chain``. Steps are the task's (``steps="task"``, ``Score.step_spans``).

    Knobs (for robustness experiments, all off by default):
        noise:     each step's 0/1 verdict is flipped with this probability (seeded, fresh draws per call).
        bias:      added to every score after flipping (the stored ``scale`` shifts with it; no clamping).
        hackable:  ignore correctness and reward *form*: steps become the non-blank lines (``steps="newline"``)
                   and a line scores 1.0 iff it fully matches ``step_format`` (default ``a op b = c``), else 0.0.
                   A deliberately exploitable reward for the reward-hacking experiment.
        seed:      seed of the flip draws.
    """

    name = "oracle"

    def __init__(self, *, noise: float = 0.0, bias: float = 0.0, hackable: bool = False,
                 step_format: str = STEP_FORMAT, seed: int = 0) -> None:
        if not 0.0 <= noise <= 1.0:
            raise ValueError(f"oracle noise is a flip probability in [0, 1], got {noise}")
        super().__init__("newline" if hackable else "task")
        self.noise, self.bias, self.hackable = noise, bias, hackable
        self.step_format = re.compile(step_format)
        self.scale = (bias, 1.0 + bias)
        self._gen = torch.Generator().manual_seed(seed)

    def score_segmented(self, batch: RolloutBatch, ctx: Any, seg: Segmentation) -> Tensor:
        rows: list[list[float]] = []
        for b in range(batch.B):
            if self.hackable:
                rows.append([float(self.step_format.fullmatch(t) is not None) for t in seg.step_texts(b)])
                continue
            labels = getattr(ctx.scores[b], "step_labels", None) if b < len(ctx.scores) else None
            if labels is None:
                raise ValueError("the oracle scorer needs a task with oracle step labels (e.g. arith_chain); "
                                 f"the score of row {b} has none")
            rows.append([1.0 if lab == 1 else 0.0 if lab == 0 else 0.5 for lab in labels])
        out = self._pad(rows, batch, seg).cpu()  # [B, S]
        n_steps = torch.tensor([len(r) for r in rows], dtype=torch.long)
        valid = torch.arange(out.shape[1])[None, :] < n_steps[:, None]  # [B, S] real (not padded) steps
        if self.noise > 0:
            flip = (torch.rand(out.shape, generator=self._gen) < self.noise) & valid & (out != 0.5)
            out = torch.where(flip, 1.0 - out, out)
            self.count("flipped", int(flip.sum()))
        out = torch.where(valid, out + self.bias, torch.zeros_like(out))
        return out.to(batch.response_ids.device)

    def state_dict(self) -> dict[str, Any]:
        """The noise generator's state: a resumed run draws the same flips as an uninterrupted one."""
        return {"generator": self._gen.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "generator" in state:
            self._gen.set_state(state["generator"])
        elif self.noise > 0:
            raise ValueError("the checkpoint holds no oracle noise-generator state: cannot resume the flips exactly")


# ------------------------------------------------------------------------------------------- discriminative PRM

# methods.md §9.1. "two_class": a 2-logit head at each tag, score p(class 1); "tokens": softmax over the LM logits
# of the good/bad candidate tokens at each tag, score p(good).
PRM_CONVENTIONS: dict[str, dict[str, Any]] = {
    "qwen": {"tag": "<extra_0>", "head": "two_class"},  # Qwen2.5-Math-PRM, Qwen2.5-Math-7B-PRM800K
    "math_shepherd": {"tag": "ки", "head": "tokens", "candidates": ("+", "-")},  # Math-Shepherd (openr ms_prm)
}
QWEN_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."


def load_prm(path: str, *, trust_remote_code: bool = False, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """(model, tokenizer) from a local HF directory, never the hub; the Auto class follows config.architectures
    (token classification -> 2-class head, causal LM -> LM logits, anything else -> AutoModel, e.g. the remote-code
    ``Qwen2ForProcessRewardModel``)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForTokenClassification, AutoTokenizer

    kw = {"local_files_only": True, "trust_remote_code": trust_remote_code}
    arch = " ".join(AutoConfig.from_pretrained(path, **kw).architectures or [])
    cls = (AutoModelForTokenClassification if "TokenClassification" in arch
           else AutoModelForCausalLM if "CausalLM" in arch else AutoModel)
    return cls.from_pretrained(path, dtype=dtype, **kw).eval(), AutoTokenizer.from_pretrained(path, **kw)


def _single_token_id(tokenizer: Any, text: str) -> int:
    """The id of ``text`` as one token: an added/vocab token if it is one, else the last id of its encoding."""
    tid = tokenizer.convert_tokens_to_ids(text)
    if isinstance(tid, int) and tid != getattr(tokenizer, "unk_token_id", None) and tid >= 0:
        return tid
    return int(tokenizer.encode(text, add_special_tokens=False)[-1])


@register_scorer("prm")
class PRMScorer(Scorer):
    """A discriminative PRM read at a tag after every step (methods.md §9.1).

    Input: the question, then the response's steps, each followed by the tag (inserted at the text level; tag
    strings the policy wrote itself are stripped from the steps first, counted as ``scorer/tags_stripped``). The
    tags are located by token id; their count must equal the number of steps (else ValueError: the tag is not
    one token for this tokenizer), so a K-step response yields exactly K scores.

    Args:
        path: local model directory (see `load_prm`), or pass ``model`` and ``tokenizer`` objects.
        convention: "qwen" (``<extra_0>``, 2-class head, p(class 1)) or "math_shepherd" (``ки``, p("+") from the
            "+"/"-" LM logits). ``tag``, ``candidate_ids`` override the convention's tag and good/bad token ids.
        signed: report p(good) - p(bad) in [-1, 1] (PURE style) instead of p(good) in [0, 1]; sets ``scale``.
        steps, pattern: how the policy's responses are split into steps (see `creditlab.signals.steps`).
        batch_size: PRM forward passes per chunk.
    A non-finite PRM output is replaced by the neutral score (0.5, or 0 when signed) and counted as
    ``scorer/nan_count``.
    """

    name = "prm"

    def __init__(self, path: str | None = None, *, model: Any = None, tokenizer: Any = None,
                 convention: str = "qwen", tag: str | None = None, candidate_ids: tuple[int, int] | None = None,
                 signed: bool = False, steps: str = "newline", pattern: str | None = None, batch_size: int = 8,
                 trust_remote_code: bool = False) -> None:
        if convention not in PRM_CONVENTIONS:
            raise ValueError(f"unknown PRM convention {convention!r}; valid: {sorted(PRM_CONVENTIONS)}")
        super().__init__(steps, pattern)
        if model is None:
            if path is None:
                raise ValueError("the prm scorer needs path= (a local model directory) or model= and tokenizer=")
            model, tokenizer = load_prm(path, trust_remote_code=trust_remote_code)
        self.model, self.tokenizer, self.convention = model.eval(), tokenizer, convention
        conv = PRM_CONVENTIONS[convention]
        self.tag, self.head, self.signed, self.batch_size = tag or conv["tag"], conv["head"], signed, batch_size
        self.tag_id = _single_token_id(tokenizer, self.tag)
        if self.head == "tokens" and candidate_ids is None:
            good, bad = conv["candidates"]
            candidate_ids = (_single_token_id(tokenizer, good), _single_token_id(tokenizer, bad))
        self.candidate_ids = candidate_ids
        self.scale = (-1.0, 1.0) if signed else (0.0, 1.0)

    def prm_input(self, question: str, steps: Sequence[str]) -> str:
        """The PRM's input text for one response (tags inserted after every step)."""
        clean = [s.replace(self.tag, "") for s in steps]
        self.count("tags_stripped", sum(s.count(self.tag) for s in steps))
        if self.convention == "qwen":
            answer = "".join(s + self.tag for s in clean)
            if getattr(self.tokenizer, "chat_template", None):
                return self.tokenizer.apply_chat_template(
                    [{"role": "system", "content": QWEN_SYSTEM}, {"role": "user", "content": question},
                     {"role": "assistant", "content": answer}], tokenize=False, add_generation_prompt=False)
            return f"{question}\n{answer}"
        return f"{question} " + "\n".join(f"Step {i + 1}: {s} {self.tag}" for i, s in enumerate(clean))

    @torch.no_grad()
    def score_texts(self, texts: Sequence[str], n_steps: Sequence[int]) -> list[list[float]]:
        """Scores at the tags of each PRM input text (``n_steps[i]`` tags expected in text i)."""
        out: list[list[float]] = []
        device = next(self.model.parameters()).device
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        for lo in range(0, len(texts), self.batch_size):
            enc = [self.tokenizer.encode(t, add_special_tokens=True) for t in texts[lo:lo + self.batch_size]]
            width = max(len(e) for e in enc)
            ids = torch.full((len(enc), width), pad, dtype=torch.long)  # right-padded [b, L]
            attn = torch.zeros((len(enc), width), dtype=torch.long)
            for i, e in enumerate(enc):
                ids[i, : len(e)], attn[i, : len(e)] = torch.tensor(e), 1
            res = self.model(input_ids=ids.to(device), attention_mask=attn.to(device))
            logits = (res.logits if hasattr(res, "logits") else res[0]).float().cpu()  # [b, L, C]
            for i, e in enumerate(enc):
                at = (ids[i, : len(e)] == self.tag_id).nonzero().squeeze(1)
                if len(at) != n_steps[lo + i]:
                    raise ValueError(f"PRM tag {self.tag!r} (id {self.tag_id}) found {len(at)} times for "
                                     f"{n_steps[lo + i]} steps: it is not a single token for this tokenizer")
                out.append(self._read(logits[i, at]).tolist())
        return out

    def _read(self, tag_logits: Tensor) -> Tensor:
        """Step scores from the logits at the tags, ``[K, C] -> [K]``."""
        if self.head == "tokens":
            tag_logits = tag_logits[:, list(self.candidate_ids)]
        elif tag_logits.shape[-1] != 2:
            raise ValueError(f"the {self.convention!r} PRM convention needs a 2-class head at the tag; the model "
                             f"returns {tag_logits.shape[-1]} logits per position")
        p = tag_logits.softmax(dim=-1)  # [K, 2]; column 1 = class 1 (two_class), column 0 = good token (tokens)
        good, bad = (p[:, 1], p[:, 0]) if self.head == "two_class" else (p[:, 0], p[:, 1])
        return good - bad if self.signed else good

    def score_segmented(self, batch: RolloutBatch, ctx: Any, seg: Segmentation) -> Tensor:
        rows: list[list[float]] = [[] for _ in range(batch.B)]
        todo = [b for b in range(batch.B) if seg.spans[b]]  # zero-step rows need no PRM call
        texts = [self.prm_input(_problem_text(batch, ctx, b), seg.step_texts(b)) for b in todo]
        for b, scores in zip(todo, self.score_texts(texts, [len(seg.spans[b]) for b in todo])):
            rows[b] = scores
        return self._pad(rows, batch, seg)


# -------------------------------------------------------------------------------------------- LLM-as-judge

JUDGE_TEMPLATE = (
    "Check the solution to the problem below. Judge each step only on its own correctness.\n"
    "Problem: {problem}\n\nSolution:\n{steps}\n\n"
    "List the numbers of all incorrect steps on one line as 'Wrong steps: 2, 4', "
    "or write 'Wrong steps: none' if every step is correct.")
VOTES = ("intersection", "majority", "union")
_VERDICT_RE = re.compile(r"(?:wrong|incorrect|erroneous)\s+steps?\s*(?:are|is)?\s*[:=\-]?\s*([^\n]*)", re.IGNORECASE)
_NONE_RE = re.compile(r"\b(?:none|no|nothing|n/a)\b", re.IGNORECASE)
_STEP_WRONG_RE = re.compile(r"step\s*(\d+)\s*(?:is|was)?\s*(?:wrong|incorrect|an error)", re.IGNORECASE)
_ALL_RIGHT_RE = re.compile(r"all (?:the )?steps are correct|no (?:wrong|incorrect) steps|no errors", re.IGNORECASE)


def parse_critique(text: str, n_steps: int) -> set[int] | None:
    """The 0-based steps a critique flags as wrong, or None when it gives no readable verdict.

    Reads the last "Wrong steps: ..." line (numbers 1..n_steps, or "none"); failing that, "step N is wrong"
    phrases or "all steps are correct". Numbers outside 1..n_steps are ignored; a verdict that names only such
    numbers, or an empty one, is unreadable.
    """
    found = _VERDICT_RE.findall(text)
    if found:
        body = found[-1]
        nums = [int(x) for x in re.findall(r"\d+", body)]
        if nums:
            flagged = {n - 1 for n in nums if 1 <= n <= n_steps}
            return flagged or None
        return set() if _NONE_RE.search(body) else None
    phrases = {int(x) - 1 for x in _STEP_WRONG_RE.findall(text) if 1 <= int(x) <= n_steps}
    if phrases:
        return phrases
    return set() if _ALL_RIGHT_RE.search(text) else None


def vote_steps(verdicts: Sequence[set[int]], n_steps: int, rule: str) -> list[float]:
    """Per-step score from K parsed critiques: 0.0 where the rule flags the step, 1.0 elsewhere.

    intersection: flagged by every critique; majority: by more than half; union: by any. No critique -> all 1.0.
    """
    if rule not in VOTES:
        raise ValueError(f"unknown judge vote {rule!r}; valid: {list(VOTES)}")
    k = len(verdicts)
    counts = [sum(j in v for v in verdicts) for j in range(n_steps)]
    need = {"intersection": k, "majority": k // 2 + 1, "union": 1}[rule]
    return [0.0 if k and c >= need else 1.0 for c in counts]


@register_scorer("judge")
class JudgeScorer(Scorer):
    """LLM-as-judge (CAPO, methods.md §8.3): one prompt per response with numbered steps, K critiques, a vote.

    Scores are 1.0 (not flagged) / 0.0 (flagged as wrong). A critique without a readable verdict is counted as
    ``scorer/unparseable`` (and logged) and left out of the vote; a response with no readable critique gets
    "no verdict" = every step 1.0 (counted as ``scorer/no_verdict``). Never raises on judge output.

    Args:
        policy: the judge, a `Policy` or a name for `load_policy` ("smollm2", a local directory, "tiny").
        k: critiques per response; vote: "intersection" | "majority" | "union".
        generate_fn: optional ``(prompts, k) -> k texts per prompt`` replacing the policy (tests, API judges).
        template: prompt with ``{problem}`` and ``{steps}``; max_new_tokens, temperature: judge sampling.
        seed: sampling seed (advanced every call, so repeated calls draw fresh critiques deterministically).
    """

    name = "judge"

    def __init__(self, policy: Any = None, *, k: int = 1, vote: str = "majority",
                 generate_fn: Callable[[list[str], int], list[list[str]]] | None = None,
                 template: str = JUDGE_TEMPLATE, steps: str = "newline", pattern: str | None = None,
                 max_new_tokens: int = 48, temperature: float = 0.7, batch_size: int = 16, seed: int = 0) -> None:
        if vote not in VOTES or k < 1:
            raise ValueError(f"judge needs k >= 1 and vote in {list(VOTES)}, got k={k}, vote={vote!r}")
        if policy is None and generate_fn is None:
            raise ValueError("the judge scorer needs policy= (a Policy or a name for load_policy) or generate_fn=")
        super().__init__(steps, pattern)
        if isinstance(policy, str):
            from creditlab.policy import load_policy

            policy = load_policy(policy, seed=seed)
        self.policy, self.k, self.rule, self.generate_fn, self.template = policy, k, vote, generate_fn, template
        self.max_new_tokens, self.temperature, self.batch_size = max_new_tokens, temperature, batch_size
        self.seed, self._calls = seed, 0

    def judge_prompt(self, problem: str, steps: Sequence[str]) -> str:
        numbered = "\n".join(f"Step {i + 1}: {s}" for i, s in enumerate(steps))
        return self.template.format(problem=problem, steps=numbered)

    def critiques(self, prompts: list[str]) -> list[list[str]]:
        """K critique texts for each judge prompt."""
        if self.generate_fn is not None:
            return self.generate_fn(prompts, self.k)
        from creditlab.rollout.hf import SamplingConfig, generate

        cfg = SamplingConfig(temperature=self.temperature, max_new_tokens=self.max_new_tokens)
        out: list[list[str]] = []
        for lo in range(0, len(prompts), self.batch_size):
            part = [self.policy.format_prompt(p) for p in prompts[lo:lo + self.batch_size]]
            texts = generate(self.policy, part, self.k, cfg, seed=self.seed + 7919 * self._calls + lo).texts
            out.extend(texts[i * self.k:(i + 1) * self.k] for i in range(len(part)))
        return out

    def score_segmented(self, batch: RolloutBatch, ctx: Any, seg: Segmentation) -> Tensor:
        rows: list[list[float]] = [[] for _ in range(batch.B)]
        todo = [b for b in range(batch.B) if seg.spans[b]]
        prompts = [self.judge_prompt(_problem_text(batch, ctx, b), seg.step_texts(b)) for b in todo]
        all_critiques = self.critiques(prompts) if prompts else []
        self._calls += 1
        for b, crits in zip(todo, all_critiques):
            n = len(seg.spans[b])
            parsed = [parse_critique(c if isinstance(c, str) else "", n) for c in crits]
            readable = [p for p in parsed if p is not None]
            bad = len(parsed) - len(readable)
            if bad:
                self.count("unparseable", bad)
                logger.info("judge: %d of %d critiques of row %d unparseable, e.g. %r", bad, len(parsed), b,
                            next(c for c, p in zip(crits, parsed) if p is None)[:200])
            if not readable:
                self.count("no_verdict")
            rows[b] = vote_steps(readable, n, self.rule)
            self.count("flagged_steps", rows[b].count(0.0))
        self.count("critiques", sum(len(c) for c in all_critiques))
        return self._pad(rows, batch, seg)

    def state_dict(self) -> dict[str, Any]:
        """The call counter that seeds the judge's sampling (the judge model itself is frozen)."""
        return {"calls": self._calls}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "calls" not in state:
            raise ValueError("the checkpoint holds no judge call counter: the critiques cannot be resumed exactly")
        self._calls = int(state["calls"])
