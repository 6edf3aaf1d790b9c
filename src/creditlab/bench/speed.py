"""`creditlab speed`: every registered estimator against its loop reference, and against a training step.

For each size B×T (default 64×512, 128×1024, 512×4096) and each registered estimator (whatever is registered
at run time), in one process on `--device` (default: cuda when present, else cpu; loop references always run on
the CPU, as they are plain Python):

    vectorized  the checked estimator `get_estimator(name)(batch)` (validation + math, what a trainer pays),
                best of a few repetitions;
    loop        its slow reference `LOOPS[name](batch)`. When the whole batch would not fit in `loop_budget`
                seconds, the loop runs on the first k whole groups (k doubling while the budget allows) and its
                time is scaled linearly to B rows; such cells are marked "~";
    step        a reference policy-gradient step: forward + backward of the tiny policy (`load_policy("tiny")`,
                2 layers, d=128; a local torch transformer if that cannot load) over the same B×T tokens, timed on
                a micro-batch of `step_tokens // T` rows and scaled to B ("~" when scaled);
    share       vectorized / (vectorized + step): the estimator's share of a training step. The tiny policy is
                far cheaper than any real LLM, so this share is an upper bound for real models.

Batches come from `realistic_batch`: groups of 8, vocab 32k, responses of 1/4..1 of T tokens, every row after the
first of its group branching off an earlier row of its group (shared prefixes, so prefix-tree estimators build
real trees), every optional `RolloutBatch` field filled.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from creditlab.batch import RolloutBatch

DEFAULT_SIZES = "64x512,128x1024,512x4096"


# ------------------------------------------------------------------------------------------------ batches
def _prefix_tree(B: int, T: int, group_size: int, g: torch.Generator) -> tuple[list[int], list[int]]:
    """Per row: the earlier row of its group it branches off (itself for a group's first row) and where."""
    parent, branch = list(range(B)), [0] * B
    for b in range(B):
        first = b - b % group_size
        if b > first:
            parent[b] = int(torch.randint(first, b, (1,), generator=g))
            branch[b] = int(torch.randint(0, max(1, 3 * T // 4), (1,), generator=g))
    return parent, branch


def realistic_batch(B: int, T: int, *, group_size: int = 8, vocab: int = 32_000, n_steps: int = 8,
                    prompt_len: int = 64, seed: int = 0) -> RolloutBatch:
    """A valid `RolloutBatch` [B,T] shaped like real RL rollouts, with every optional field filled (see module doc)."""
    g = torch.Generator().manual_seed(seed)
    group_ids = torch.arange(B) // group_size  # [B]; the last group is ragged when group_size does not divide B
    lengths = torch.randint(max(1, T // 4), T + 1, (B,), generator=g)
    lengths[torch.rand(B, generator=g) < 0.1] = T  # some responses hit the length limit
    ids = torch.randint(0, vocab, (B, T), generator=g)
    logprobs = -torch.rand(B, T, generator=g) * 3
    per_token = {"ids": ids, "logprobs": logprobs, "ref": logprobs + 0.1 * torch.randn(B, T, generator=g),
                 "entropies": torch.rand(B, T, generator=g) * 2, "certainty": torch.rand(B, T, generator=g) * 5,
                 "logits": torch.randn(B, T, generator=g) * 3 + 10, "values": torch.rand(B, T, generator=g),
                 "prm": logprobs + 0.2 * torch.randn(B, T, generator=g), "fai": torch.rand(B, T, generator=g),
                 "waad": torch.rand(B, T, generator=g) * 50, "planning": torch.rand(B, T, generator=g) < 0.1,
                 "cuts": torch.rand(B, T, generator=g) < n_steps / T}
    parent, branch = _prefix_tree(B, T, group_size, g)
    for b in range(B):  # rows in order, so a parent's prefix is final before a child copies it
        if parent[b] != b:
            for t in per_token.values():
                t[b, : branch[b]] = t[parent[b], : branch[b]]
    mask = torch.arange(T)[None, :] < lengths[:, None]  # [B, T]

    def masked(t: torch.Tensor) -> torch.Tensor:
        return torch.where(mask, t, torch.zeros_like(t))

    rewards = (torch.rand(B, generator=g) < 0.5).float()
    S = 2 * n_steps
    cuts = per_token["cuts"].clone()
    cuts[:, 0] = False
    step_ids = torch.where(mask, torch.cumsum(cuts.long(), dim=1).clamp_max(S - 1), -1)  # [B, T]
    n_step = step_ids.max(dim=1).values + 1  # [B]
    step_labels = torch.where(torch.arange(S)[None, :] < n_step[:, None], torch.randint(0, 2, (B, S), generator=g), -1)
    last = (lengths - 1)[:, None]
    prompts = torch.randint(0, vocab, (int(group_ids.max()) + 1, prompt_len), generator=g)[group_ids]  # [B, P]
    from creditlab.sample import step_starts

    mc_cuts = step_starts(step_ids, S)  # [B, S]: Monte-Carlo values at step starts (VinePPO's states)
    seg = max(T // 8, 1)  # segment-tree rows: chains of fixed-length segments (one node id per row and segment)
    tree_node = torch.where(mask, torch.arange(B)[:, None] * (T // seg + 1) + torch.arange(T)[None, :] // seg, -1)
    batch = RolloutBatch(
        response_ids=masked(ids), response_mask=mask, group_ids=group_ids, rewards=rewards,
        prompt_ids=prompts, prompt_mask=torch.ones(B, prompt_len, dtype=torch.bool),
        logprobs=masked(per_token["logprobs"]), ref_logprobs=masked(per_token["ref"]),
        entropies=masked(per_token["entropies"]), certainty=masked(per_token["certainty"]),
        token_logits=masked(per_token["logits"]), values=masked(per_token["values"]),
        q_values=masked(1.0 - per_token["values"]),
        token_rewards=torch.zeros(B, T).scatter(1, last, rewards[:, None]), step_ids=step_ids,
        step_rewards=torch.rand(B, S, generator=g) * 2 - 1, step_labels=step_labels,
        mc_values=torch.where(mc_cuts >= 0, torch.rand(B, S, generator=g), 0.0), mc_cuts=mc_cuts,
        tree_node=tree_node, planning_mask=per_token["planning"] & mask,
        prm_logprobs=masked(per_token["prm"]), attn_fai=masked(per_token["fai"]), attn_waad=masked(per_token["waad"]),
        turn_ids=torch.where(mask, 0, -1), traj_ids=torch.arange(B), anchor_obs=torch.randint(0, 4, (B,), generator=g),
        strata=torch.randint(0, 3, (B,), generator=g), texts=[f"<{int(n)} tokens>" for n in lengths],
    ).validate()
    from creditlab.sample import turn_fields

    # attention and budget fields from their own generator (the fields above stay what they were): punctuation
    # tokens, budget cut points ascending per row with unused columns -1, budgets in the prompt, correctness
    ga = torch.Generator().manual_seed(seed * 7919 + 17)
    K = 4
    cut_lens = torch.randint(0, T + 1, (B, K), generator=ga).sort(dim=1).values
    cut_lens = torch.where(torch.arange(K)[None, :] < torch.randint(1, K + 1, (B, 1), generator=ga), cut_lens, -1)
    extra = {"punct_mask": mask & (torch.rand(B, T, generator=ga) < 0.1), "cut_lens": cut_lens,
             "cut_scores": torch.where(cut_lens >= 0, torch.rand(B, K, generator=ga), 0.0),
             "think_budget": torch.tensor([T // 4, T // 2, T])[torch.randint(0, 3, (B,), generator=ga)].clamp_min(1),
             "correct": (rewards > 0) & (torch.rand(B, generator=ga) < 0.8)}
    return batch.replace(**turn_fields(mask, seed, n_steps), **extra).validate()  # turns for the agent estimators


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """'64x512,128x1024' -> [(64, 512), (128, 1024)]."""
    sizes = []
    for part in text.replace("×", "x").split(","):
        try:
            b, t = (int(v) for v in part.strip().lower().split("x"))
        except ValueError:
            raise ValueError(f"--sizes: cannot read {part!r}; expected BxT pairs like 64x512,512x4096") from None
        if b < 1 or t < 1:
            raise ValueError(f"--sizes: {part!r} must have B >= 1 and T >= 1")
        sizes.append((b, t))
    return sizes


# ------------------------------------------------------------------------------------------------ timing
def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()  # GPU work is asynchronous: time it to completion


def best_time(fn: Callable[[], object], *, min_time: float = 0.2, max_reps: int = 10) -> float:
    """Best wall time (s) of `fn()` over at least 2 repetitions (the first warms up), more until `min_time` has
    passed, at most `max_reps`."""
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < 2 or time.perf_counter() - start < min_time):  # >= 2: warm-up
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return min(times)


def _rows_of_groups(batch: RolloutBatch, groups: list[int], k: int) -> torch.Tensor:
    return torch.nonzero(torch.isin(batch.group_ids, torch.tensor(groups[:k]))).flatten()  # [b]


def time_loop(loop: Callable[..., object], batch: RolloutBatch, budget: float) -> tuple[float, int]:
    """(estimated seconds of `loop(batch)`, rows actually run).

    Runs the loop on the first k whole groups, k = 1, 2, 4, ... while the next run is predicted to fit in
    `budget` seconds, and scales the last time linearly to B rows (exact when all rows ran).
    """
    groups = list(dict.fromkeys(batch.group_ids.tolist()))
    k, spent = 1, 0.0
    while True:
        rows = _rows_of_groups(batch, groups, k)
        sub = batch if len(rows) == batch.B else batch.select(rows)
        t0 = time.perf_counter()
        loop(sub)
        elapsed = time.perf_counter() - t0
        spent += elapsed
        if len(rows) == batch.B:
            return elapsed, batch.B
        nxt = min(2 * k, len(groups))
        if spent + elapsed * nxt / k > budget:
            return elapsed * batch.B / len(rows), len(rows)
        k = nxt


class _LocalLM(torch.nn.Module):
    """Fallback reference model: 2 causal transformer layers, d=128 (the tiny policy's size)."""

    def __init__(self, vocab: int = 128, d: int = 128, layers: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, d)
        layer = torch.nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.body = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = torch.nn.Linear(d, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        causal = torch.nn.Transformer.generate_square_subsequent_mask(ids.shape[1])
        return self.head(self.body(self.embed(ids), mask=causal, is_causal=True))  # [b, T, V]


def reference_model(T: int, device: torch.device | str = "cpu") -> tuple[Callable[[torch.Tensor], torch.Tensor], int,
                                                                        str]:
    """(ids [b,T] -> logits [b,T,V], V, label): the tiny policy, else a local torch transformer of its size."""
    try:
        from creditlab.policy import load_policy

        model = load_policy("tiny", max_positions=max(T, 1024), device=device).model
        return (lambda ids: model(input_ids=ids).logits), int(model.config.vocab_size), "tiny policy (2L, d=128)"
    except Exception as e:  # any failure to build the policy falls back to a local model
        local = _LocalLM().to(device)
        return local, 128, f"local torch transformer (2L, d=128; tiny policy unavailable: {type(e).__name__})"


def time_step(batch: RolloutBatch, forward: Callable[[torch.Tensor], torch.Tensor], vocab: int,
              step_tokens: int = 8192) -> tuple[float, int]:
    """(estimated seconds of a policy-gradient forward+backward over the whole batch, rows actually run).

    Runs micro-batches of `step_tokens // T` rows (as a trainer with gradient accumulation would) and scales the
    best time linearly to B rows. Causal attention only: right padding cannot change valid positions.
    """
    m = max(1, min(batch.B, step_tokens // batch.T))
    ids = batch.response_ids[:m] % vocab  # [m, T]
    mask = batch.response_mask[:m, 1:].float()  # [m, T-1]
    adv = torch.randn(m, batch.T - 1, generator=torch.Generator().manual_seed(0)).to(ids.device)  # [m, T-1]

    def step() -> None:
        logits = forward(ids)  # [m, T, V]
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        loss = -(logp * adv * mask).sum() / mask.sum().clamp_min(1.0)
        loss.backward()

    return best_time(step, min_time=math.inf, max_reps=2) * batch.B / m, m  # best of 2: the first warms up


# ------------------------------------------------------------------------------------------------ benchmark
@dataclass
class SpeedRow:
    """One estimator at one size. Times in seconds; `*_rows` < B means the time was scaled from that many rows."""

    estimator: str
    B: int
    T: int
    vectorized_s: float  # the bare math (`spec.raw`)
    checked_s: float  # the registry's checked call: batch validation + math + output checks
    loop_s: float | None  # None: no loop reference registered in LOOPS
    loop_rows: int
    step_s: float | None  # None: no reference step measured
    step_rows: int
    note: str = ""

    @property
    def ratio(self) -> float:
        """Loop time / vectorized time (NaN without a loop)."""
        if self.loop_s is None or not self.vectorized_s > 0:
            return math.nan
        return self.loop_s / self.vectorized_s

    @property
    def share(self) -> float:
        """Checked estimator time / (checked estimator + reference step) (NaN without a step)."""
        if self.step_s is None:
            return math.nan
        return self.checked_s / (self.checked_s + self.step_s)


def _bench_one(name: str, batch: RolloutBatch, loop_budget: float, min_time: float,
               cpu_batch: RolloutBatch | None = None) -> dict:
    """SpeedRow fields of one estimator on one batch (times, loop rows, note); the loop runs on `cpu_batch`."""
    from creditlab.credit.loops import LOOPS
    from creditlab.registry import get_spec

    spec = get_spec(name)
    try:
        checked = best_time(lambda: spec.fn(batch), min_time=min_time)
        raw = best_time(lambda: spec.raw(batch), min_time=min_time)
    except Exception as e:  # one broken estimator must not hide the others' numbers
        return {"vectorized_s": math.nan, "checked_s": math.nan, "loop_s": None, "loop_rows": 0,
                "note": f"error: {type(e).__name__}: {e}"[:120]}
    out = {"vectorized_s": raw, "checked_s": checked, "loop_s": None, "loop_rows": 0, "note": ""}
    if name not in LOOPS:
        return out | {"note": "no loop reference"}
    out["loop_s"], out["loop_rows"] = time_loop(LOOPS[name], cpu_batch or batch, loop_budget)
    return out


def run_speed_bench(sizes: Sequence[tuple[int, int]], *, estimators: Sequence[str] | None = None,
                    loop_budget: float = 10.0, step_tokens: int = 8192, min_time: float = 0.2, seed: int = 0,
                    with_step: bool = True, log: Callable[[str], None] | None = None,
                    device: torch.device | str = "cpu") -> tuple[list[SpeedRow], str]:
    """Time every estimator (default: all registered) at every size on `device`; returns (rows, step label)."""
    from creditlab.registry import list_estimators

    names = list(estimators) if estimators else list_estimators()
    unknown = sorted(set(names) - set(list_estimators()))
    if unknown:
        raise KeyError(f"unknown estimator(s) {unknown}; registered estimators: {list_estimators()}")
    rows: list[SpeedRow] = []
    label = "none"
    for B, T in sizes:
        cpu_batch = realistic_batch(B, T, seed=seed)
        batch = cpu_batch.to(device)
        step_s, step_rows = None, 0
        if with_step:
            forward, vocab, label = reference_model(T, device)
            step_s, step_rows = time_step(batch, forward, vocab, step_tokens)
        for name in names:
            rows.append(SpeedRow(name, B, T, step_s=step_s, step_rows=step_rows,
                                 **_bench_one(name, batch, loop_budget, min_time, cpu_batch)))
            if log is not None:
                log(format_table([rows[-1]]).splitlines()[-1])
    return rows, label


# ------------------------------------------------------------------------------------------------ output
def _fmt_time(s: float | None) -> str:
    if s is None or not math.isfinite(s):
        return "—"
    if s < 1e-3:
        return f"{s * 1e6:.0f} µs"
    return f"{s * 1e3:.3g} ms" if s < 1 else f"{s:.3g} s"


def _cells(r: SpeedRow) -> list[str]:
    approx_loop = "~" if r.loop_s is not None and r.loop_rows < r.B else ""
    approx_step = "~" if r.step_s is not None and r.step_rows < r.B else ""
    ratio = f"{approx_loop}{r.ratio:,.0f}×" if r.ratio >= 10 else f"{approx_loop}{r.ratio:.2g}×"
    ratio = ratio if math.isfinite(r.ratio) else "—"
    share = f"{100 * r.share:.2g}%" if math.isfinite(r.share) else "—"
    return [r.estimator, f"{r.B}×{r.T}", _fmt_time(r.vectorized_s), _fmt_time(r.checked_s),
            approx_loop + _fmt_time(r.loop_s), ratio,
            approx_step + _fmt_time(r.step_s), share, r.note]


HEADER = ["estimator", "B×T", "vectorized", "checked", "loop", "loop/vec", "train step", "share of step", "note"]


def format_table(rows: Sequence[SpeedRow], *, markdown: bool = False) -> str:
    """The rows as a fixed-width text table, or a Markdown table (`markdown=True`)."""
    cells = [_cells(r) for r in rows]
    if markdown:
        lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * 2 + "---:|" * 6 + "---|"]
        return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in cells])
    widths = [max(len(x) for x in col) for col in zip(HEADER, *cells)]
    fmt = ["{:" + ("<" if i in (0, 1, 8) else ">") + f"{w}}}" for i, w in enumerate(widths)]
    line = lambda c: "  ".join(f.format(x) for f, x in zip(fmt, c)).rstrip()  # noqa: E731
    return "\n".join([line(HEADER), "-" * len(line(HEADER))] + [line(c) for c in cells])


def environment(device: torch.device | str = "cpu") -> str:
    """One line: torch version, device (CPU model and flags, GPU name), threads, git commit."""
    from creditlab.device import describe

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=5).stdout.strip() or "?"
    except (OSError, subprocess.SubprocessError):
        commit = "?"
    return f"torch {torch.__version__}, {describe(device)}, python {platform.python_version()}, commit {commit}"


def notes(step_label: str, loop_budget: float, step_tokens: int) -> str:
    """Footnotes explaining the columns and the "~" marker."""
    text = ("vectorized: the estimator's math alone; checked: the registry's call a trainer makes (batch validation "
            "+ math + output checks); both best of >= 2 runs. loop/vec = loop / vectorized. "
            f"~ loop: ran on whole groups within a {loop_budget:g} s budget and scaled linearly to B rows.")
    if step_label == "none":
        return text + " train step: not measured (--no-step)."
    return text + (f" train step: forward+backward of the {step_label} on micro-batches of {step_tokens} tokens "
                   f"(~: scaled to B rows). share of step: checked / (checked + train step); real LLM steps "
                   f"cost far more, so real shares are smaller.")


def add_speed_args(parser: argparse.ArgumentParser) -> None:
    """Arguments of `creditlab speed`."""
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help=f"comma-separated BxT sizes (default {DEFAULT_SIZES})")
    parser.add_argument("--estimators", default="", help="comma-separated estimator names (default: all registered)")
    parser.add_argument("--loop-budget", type=float, default=10.0,
                        help="seconds of loop-reference time per cell before extrapolating from a row subset")
    parser.add_argument("--step-tokens", type=int, default=8192, help="tokens per micro-batch of the reference step")
    parser.add_argument("--no-step", action="store_true", help="skip the reference training step")
    parser.add_argument("--min-time", type=float, default=0.2, help="repeat vectorized calls for at least this long")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda[:N]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table (for the README)")
    parser.add_argument("--json", default="", help="also write the rows to this JSON file")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run_speed(args: argparse.Namespace) -> int:
    """`creditlab speed`: run the benchmark and print the table."""
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    from creditlab.device import device_info, resolve_device

    device = resolve_device(args.device)
    names = [n.strip() for n in args.estimators.split(",") if n.strip()] or None
    rows, label = run_speed_bench(parse_sizes(args.sizes), estimators=names, loop_budget=args.loop_budget,
                                  step_tokens=args.step_tokens, min_time=args.min_time, seed=args.seed,
                                  with_step=not args.no_step, log=None if args.quiet else _progress, device=device)
    print(format_table(rows, markdown=args.markdown))
    print(("\n" if args.markdown else "") + notes(label, args.loop_budget, args.step_tokens))
    print(("\n" if args.markdown else "") + f"measured with {environment(device)}")
    if args.json:
        Path(args.json).write_text(json.dumps({"environment": environment(device), "device": device_info(device),
                                               "step": label,
                                               "rows": [asdict(r) | {"ratio": r.ratio, "share": r.share}
                                                        for r in rows]}, indent=2))
    return 0


def speed_main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry point (`python -m creditlab.bench.speed --sizes 8x16`)."""
    parser = argparse.ArgumentParser(prog="creditlab speed", description=__doc__.splitlines()[0])
    add_speed_args(parser)
    return run_speed(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(speed_main())
