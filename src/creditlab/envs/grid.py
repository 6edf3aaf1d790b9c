"""Grid puzzles whose states repeat across rollouts of one seed: Sokoban and FrozenLake (deterministic).

Both are written here rather than taken from `textarena` 0.7.4 (checked in a scratch venv, see docs/agents.md):
its Sokoban imports numpy without declaring it, ends the episode at the second wall bump (a bump counts as an
invalid move), gives one reward at the end only (no per-step rewards for GiGPO's discounted returns), exposes
no canonical state (the anchor would need private attributes), and pulls openai/requests/websockets/nltk/chess.

Levels are drawn from a private ``random.Random(seed)`` and kept only when a breadth-first search solves them in
at most ``max_moves`` moves (so every level is solvable, and the optimal length is known: ``optimal_moves``).
Actions are direction words (``up``, ``down``, ``left``, ``right``; ``[up]`` and ``w/a/s/d`` in brackets too):
the first one found in the text is taken. Text with no direction is an invalid action.

Symbols (ASCII only, so that the character-level tiny policy can read them):
``#`` wall, ``_`` floor, ``O`` target, ``X`` box, ``*`` box on target, ``P`` player, ``S`` player on target;
FrozenLake: ``F`` frozen, ``H`` hole, ``G`` goal, ``P`` player.
"""

from __future__ import annotations

import random
import re
from collections import deque
from typing import Any

from creditlab.envs.base import StepResult, after_done, check_penalty

MOVES = {"up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1)}
_ALIASES = {"w": "up", "s": "down", "a": "left", "d": "right"}
_DIRECTION = re.compile(r"\b(up|down|left|right)\b|\[(up|down|left|right|w|a|s|d)\]", re.IGNORECASE)
INVALID_MOVE = "Invalid action {action!r}: reply with one move: up, down, left or right."


def parse_direction(text: str) -> str | None:
    """The first direction in ``text`` ("up"/"down"/"left"/"right"), or None."""
    m = _DIRECTION.search(text if isinstance(text, str) else "")
    if m is None:
        return None
    word = (m.group(1) or m.group(2)).lower()
    return _ALIASES.get(word, word)


def _move_or_refusal(action: str, done: bool, penalty: float) -> tuple[int, int] | StepResult:
    """The start of every grid step: the (row, col) offset of the move the action names, or the StepResult of an
    action after the episode ended or of one that names no move (penalised, not a step)."""
    if done:
        return after_done(penalty)
    move = parse_direction(action)
    if move is None:
        return StepResult(INVALID_MOVE.format(action=_shorten(action)), -penalty, False,
                          {"valid": False, "success": False, "tool": "invalid"})
    return MOVES[move]


def _shorten(text: str, n: int = 40) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 3] + "..."


class Sokoban:
    """Push every box onto a target. One box by default on a 6x6 room (4x4 interior).

    Rewards (RAGEN / gym-sokoban shape, scaled so an episode return stays near [-1, 1.5]): ``step_reward`` per
    valid move (-0.01), +0.1 for pushing a box onto a target, -0.1 for pushing one off, +1 when all boxes are on
    targets (the episode ends, ``success``); an invalid action gives ``-invalid_penalty`` (0.1, verl-agent's
    coefficient) and changes nothing. Walking into a wall is a valid move that changes nothing.
    """

    name = "sokoban"
    instructions = ("Sokoban. Push the box X onto the target O. Symbols: # wall, _ floor, P you, "
                    "* box on target, S you on a target. Reply with one move: up, down, left or right.")

    def __init__(self, *, size: int = 6, boxes: int = 1, walls: int = 2, max_moves: int = 8, min_moves: int = 1,
                 invalid_penalty: float = 0.1, step_reward: float = -0.01) -> None:
        if size < 4 or boxes < 1 or walls < 0 or not 1 <= min_moves <= max_moves:
            raise ValueError(f"sokoban needs size >= 4, boxes >= 1, walls >= 0, 1 <= min_moves <= max_moves; got "
                             f"size={size}, boxes={boxes}, walls={walls}, min_moves={min_moves}, max_moves={max_moves}")
        self.size, self.n_boxes, self.n_walls = size, boxes, walls
        self.max_moves, self.min_moves = max_moves, min_moves
        self.invalid_penalty, self.step_reward = check_penalty(invalid_penalty), float(step_reward)
        self.walls: frozenset[tuple[int, int]] = frozenset()
        self.targets: frozenset[tuple[int, int]] = frozenset()
        self.boxes: frozenset[tuple[int, int]] = frozenset()
        self.player = (0, 0)
        self.done, self.optimal_moves = True, 0
        self.solution: list[str] = []  # a shortest move list from the reset state

    # ---------------------------------------------------------------- level generation
    def _draw(self, rng: random.Random) -> tuple[frozenset, frozenset, frozenset, tuple[int, int]]:
        n = self.size
        border = {(r, c) for r in range(n) for c in range(n) if r in (0, n - 1) or c in (0, n - 1)}
        inner = [(r, c) for r in range(1, n - 1) for c in range(1, n - 1)]
        cells = rng.sample(inner, self.n_walls + 2 * self.n_boxes + 1)
        walls = frozenset(border | set(cells[: self.n_walls]))
        rest = cells[self.n_walls:]
        targets = frozenset(rest[: self.n_boxes])
        boxes = frozenset(rest[self.n_boxes: 2 * self.n_boxes])
        return walls, targets, boxes, rest[-1]

    def reset(self, seed: int) -> str:
        rng = random.Random(f"sokoban:{self.size}:{self.n_boxes}:{self.n_walls}:{seed}")
        for _ in range(10_000):
            walls, targets, boxes, player = self._draw(rng)
            path = _solve(walls, targets, boxes, player, self.max_moves)
            if path is not None and len(path) >= self.min_moves:
                break
        else:
            raise ValueError(f"sokoban: no solvable level within {self.max_moves} moves for these settings")
        self.walls, self.targets, self.boxes, self.player = walls, targets, boxes, player
        self.done, self.solution = False, path
        self.optimal_moves = len(path)
        return self.render()

    # ---------------------------------------------------------------- dynamics
    def step(self, action: str) -> StepResult:
        move = _move_or_refusal(action, self.done, self.invalid_penalty)
        if isinstance(move, StepResult):
            return move
        dr, dc = move
        nxt = (self.player[0] + dr, self.player[1] + dc)
        reward = self.step_reward
        if nxt in self.boxes:
            beyond = (nxt[0] + dr, nxt[1] + dc)
            if beyond not in self.walls and beyond not in self.boxes:
                reward += 0.1 * ((beyond in self.targets) - (nxt in self.targets))
                self.boxes = (self.boxes - {nxt}) | {beyond}
                self.player = nxt
        elif nxt not in self.walls:
            self.player = nxt
        success = self.boxes <= self.targets
        if success:
            reward += 1.0
            self.done = True
        return StepResult(self.render(), reward, self.done, {"valid": True, "success": success, "tool": "move"})

    def render(self) -> str:
        rows = []
        for r in range(self.size):
            line = []
            for c in range(self.size):
                p = (r, c)
                if p in self.walls:
                    ch = "#"
                elif p == self.player:
                    ch = "S" if p in self.targets else "P"
                elif p in self.boxes:
                    ch = "*" if p in self.targets else "X"
                else:
                    ch = "O" if p in self.targets else "_"
                line.append(ch)
            rows.append("".join(line))
        return "\n".join(rows)

    def state_key(self) -> str:
        return self.render()


def _solve(walls: frozenset, targets: frozenset, boxes: frozenset, player: tuple[int, int],
           limit: int) -> list[str] | None:
    """A shortest move list that puts every box on a target (breadth-first over (player, boxes)); None if no
    solution has at most ``limit`` moves."""
    start = (player, boxes)
    parent: dict[Any, Any] = {start: None}
    frontier: deque[tuple[tuple[int, int], frozenset, int]] = deque([(player, boxes, 0)])
    while frontier:
        pos, bx, d = frontier.popleft()
        if bx <= targets:
            path, node = [], (pos, bx)
            while parent[node] is not None:
                node, move = parent[node]
                path.append(move)
            return path[::-1]
        if d == limit:
            continue
        for name, (dr, dc) in MOVES.items():
            nxt = (pos[0] + dr, pos[1] + dc)
            if nxt in walls:
                continue
            nb = bx
            if nxt in bx:
                beyond = (nxt[0] + dr, nxt[1] + dc)
                if beyond in walls or beyond in bx:
                    continue
                nb = (bx - {nxt}) | {beyond}
            if (nxt, nb) not in parent:
                parent[(nxt, nb)] = ((pos, bx), name)
                frontier.append((nxt, nb, d + 1))
    return None


class FrozenLake:
    """Walk from the top-left corner to the goal G without falling into a hole H (not slippery).

    Rewards: +1 on reaching the goal (``success``, episode ends), 0 for falling into a hole (episode ends),
    ``step_reward`` (0) per other valid move, ``-invalid_penalty`` for an invalid action. Moving off the grid is a
    valid move that changes nothing (as in gymnasium's FrozenLake).
    """

    name = "frozenlake"
    instructions = ("FrozenLake. Walk from P to the goal G over frozen cells F without stepping into a hole H. "
                    "Reply with one move: up, down, left or right.")

    def __init__(self, *, size: int = 4, holes: int = 3, invalid_penalty: float = 0.1,
                 step_reward: float = 0.0) -> None:
        if size < 2 or not 0 <= holes <= size * size - 2:
            raise ValueError(f"frozenlake needs size >= 2 and 0 <= holes <= size*size - 2, got {size}, {holes}")
        self.size, self.n_holes = size, holes
        self.invalid_penalty, self.step_reward = check_penalty(invalid_penalty), float(step_reward)
        self.holes: frozenset[tuple[int, int]] = frozenset()
        self.goal, self.player, self.done, self.optimal_moves = (0, 0), (0, 0), True, 0

    def reset(self, seed: int) -> str:
        rng = random.Random(f"frozenlake:{self.size}:{self.n_holes}:{seed}")
        n = self.size
        cells = [(r, c) for r in range(n) for c in range(n) if (r, c) != (0, 0)]
        for _ in range(10_000):
            picked = rng.sample(cells, self.n_holes + 1)
            goal, holes = picked[0], frozenset(picked[1:])
            d = _shortest_path(n, holes, (0, 0), goal)
            if d is not None:
                break
        else:
            raise ValueError("frozenlake: no level with a path for these settings")
        self.holes, self.goal, self.player, self.done, self.optimal_moves = holes, goal, (0, 0), False, d
        return self.render()

    def step(self, action: str) -> StepResult:
        move = _move_or_refusal(action, self.done, self.invalid_penalty)
        if isinstance(move, StepResult):
            return move
        dr, dc = move
        r, c = self.player[0] + dr, self.player[1] + dc
        if 0 <= r < self.size and 0 <= c < self.size:
            self.player = (r, c)
        info: dict[str, Any] = {"valid": True, "success": self.player == self.goal, "tool": "move"}
        if self.player == self.goal:
            self.done = True
            return StepResult(self.render(), 1.0, True, info)
        if self.player in self.holes:
            self.done = True
            return StepResult(self.render() + "\nYou fell into a hole.", 0.0, True, info)
        return StepResult(self.render(), self.step_reward, False, info)

    def render(self) -> str:
        rows = []
        for r in range(self.size):
            line = []
            for c in range(self.size):
                p = (r, c)
                line.append("P" if p == self.player else "H" if p in self.holes else "G" if p == self.goal else "F")
            rows.append("".join(line))
        return "\n".join(rows)

    def state_key(self) -> str:
        return self.render()


def _shortest_path(n: int, holes: frozenset, start: tuple[int, int], goal: tuple[int, int]) -> int | None:
    seen, frontier = {start}, deque([(start, 0)])
    while frontier:
        (r, c), d = frontier.popleft()
        if (r, c) == goal:
            return d
        for dr, dc in MOVES.values():
            p = (r + dr, c + dc)
            if 0 <= p[0] < n and 0 <= p[1] < n and p not in holes and p not in seen:
                seen.add(p)
                frontier.append((p, d + 1))
    return None
