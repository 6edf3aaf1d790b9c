"""How often anchor states repeat across the G rollouts of one seed (what GiGPO's step advantage depends on).

    PYTHONPATH=src python benchmarks/agents_anchors.py --env sokoban --group 8 --turns 6 --seeds 200
    PYTHONPATH=src python benchmarks/agents_anchors.py --env sokoban --policy runs/x/policy --group 8 --turns 6

Without ``--policy`` each episode takes uniformly random *valid* moves (a policy that explores but knows the action
format; pure Python, seconds). With ``--policy`` the episodes come from the trainer's multi-turn rollout of that
policy at temperature 1. For every turn, its step group is the set of turns of the same seed's G episodes that
start from the same state (repeats inside one episode count, as in GiGPO's reference). Reported: the share of turns
whose step group has >= 2 members (the step-group hit rate; a singleton gets A^S = 0), the mean group size, and
both by turn index (turn 0 always hits: every episode of a seed starts from the same state).
"""

from __future__ import annotations

import argparse
import random
from collections import Counter, defaultdict

from creditlab.envs import get_env, state_hash

MOVES = ["up", "down", "left", "right"]


def random_episodes(env_name: str, seeds: list[int], group: int, turns: int, rng: random.Random) -> list[list[tuple]]:
    """Per seed, the (turn, state hash) of every turn of its G random-move episodes."""
    out = []
    for seed in seeds:
        keys = []
        for _ in range(group):
            env = get_env(env_name)
            env.reset(seed)
            for n in range(turns):
                keys.append((n, state_hash(env.state_key())))
                if env.step(rng.choice(MOVES))[2]:
                    break
        out.append(keys)
    return out


def policy_episodes(args: argparse.Namespace, seeds: list[int]) -> list[list[tuple]]:
    from creditlab.policy import load_policy
    from creditlab.rollout.hf import SamplingConfig
    from creditlab.rollout.multiturn import MultiTurn
    from creditlab.tasks import get_task

    policy = load_policy(args.policy)
    task = get_task(args.env)
    problems = task.problems("train", len(seeds), seed=0)
    batch, _ = MultiTurn(max_turns=args.turns).run(policy, task, problems, args.group,
                                                   SamplingConfig(max_new_tokens=args.tokens), seed=0)
    out: dict[int, list[tuple]] = defaultdict(list)
    k = (batch.turn_ids.max(1).values + 1).tolist()
    for b in range(batch.B):
        for n in range(k[b]):
            out[int(batch.group_ids[b])].append((n, int(batch.anchor_states[b, n])))
    return list(out.values())


def summarize(per_seed: list[list[tuple]]) -> str:
    hits, sizes = defaultdict(list), defaultdict(list)
    for keys in per_seed:
        count = Counter(h for _, h in keys)
        for n, h in keys:
            hits[n].append(count[h] >= 2)
            sizes[n].append(count[h])
    every_hit = [x for v in hits.values() for x in v]
    every_size = [x for v in sizes.values() for x in v]
    lines = [f"all turns: hit rate {sum(every_hit) / len(every_hit):.3f}, mean step-group size "
             f"{sum(every_size) / len(every_size):.2f} ({len(every_hit)} turns)", "",
             "| turn | turns | hit rate (group >= 2) | mean group size |", "|---|---|---|---|"]
    for n in sorted(hits):
        lines.append(f"| {n} | {len(hits[n])} | {sum(hits[n]) / len(hits[n]):.3f} | "
                     f"{sum(sizes[n]) / len(sizes[n]):.2f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--env", default="sokoban", choices=["sokoban", "frozenlake"])
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--turns", type=int, default=6)
    p.add_argument("--seeds", type=int, default=200)
    p.add_argument("--policy", default="", help="a policy for the trainer's rollout (default: random valid moves)")
    p.add_argument("--tokens", type=int, default=8, help="max tokens per action (with --policy)")
    args = p.parse_args()
    seeds = list(range(args.seeds))
    per_seed = policy_episodes(args, seeds) if args.policy else \
        random_episodes(args.env, seeds, args.group, args.turns, random.Random(0))
    who = args.policy or "random valid moves"
    print(f"{args.env}, G={args.group}, <= {args.turns} turns, {len(per_seed)} seeds, policy: {who}\n")
    print(summarize(per_seed))


if __name__ == "__main__":
    main()
