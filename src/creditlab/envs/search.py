"""A search agent over a procedurally generated knowledge base, with a real BM25 index (``bm25s``).

The world (fixed per ``kb_seed``): invented people, cities, countries and companies, one short document per entity
("Alia Voren is a chemist. Alia Voren was born in Tessa."). A problem seed picks a multi-hop question whose
answer needs 1-3 look-ups, e.g. "In which country was the founder of Kelvar Labs born?" (company -> founder ->
birth city -> country). Names are invented, so the answer cannot come from the model's prior knowledge.

Actions (first match in the text):
  * ``search: <query>``: BM25 over the documents (``bm25s``, Lucene BM25, k1=1.5, b=0.75, English stopwords);
    the observation lists the top ``top_k`` documents with a positive score ("No results." otherwise).
  * ``answer: <text>``: ends the episode; reward 1 if the normalised text equals the answer (exact match after
    lower-casing and removing punctuation and articles; ``reward="f1"`` gives token F1 instead), else 0.
Anything else, or an empty query, is an invalid action (``-invalid_penalty``). ``retrieval_reward`` (default 0)
is added to a search whose results contain a document of the question's gold chain that was not retrieved
before (a verifiable turn-level reward, as MT-GRPO's "search result contains the answer").

Stratified GRPO's strata are the number of search calls per episode (``info["tool"] == "search"``).

``expert_action()`` is a demonstrator for multi-turn warm starts (`creditlab sft --task search`): it searches the
name of the first document of the question's chain it has not retrieved yet (a name that appears in the question or
in an earlier result), then answers. It solves every question of the default world in hops + 1 turns (tested).
"""

from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from creditlab.envs.base import StepResult, after_done, check_penalty

_ACTION = re.compile(r"\b(search|answer)\s*:\s*([^\n]*)", re.IGNORECASE)
_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "st", "th", "tr"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ei", "ou"]
_CODAS = ["", "", "n", "r", "s", "l", "m", "th"]
JOBS = ["chemist", "painter", "engineer", "teacher", "pilot", "farmer", "judge", "baker"]
QUESTION_KINDS = ("birth_city", "birth_country", "founder_city", "founder_country")


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables)).capitalize() \
        + rng.choice(_CODAS)


@dataclass(frozen=True)
class World:
    """The knowledge base: entity facts and one document per entity (``docs[i]`` has id i)."""

    born_in: dict[str, str]  # person -> city
    country_of: dict[str, str]  # city -> country
    founder: dict[str, str]  # company -> person
    docs: tuple[str, ...]
    doc_of: dict[str, int]  # entity -> its document id


def build_world(seed: int = 0, *, people: int = 40, cities: int = 12, countries: int = 4,
                companies: int = 12) -> World:
    """A deterministic world; names are unique across all entity kinds."""
    if min(people, cities, countries, companies) < 1 or companies > people:
        raise ValueError("search world needs >= 1 entity of each kind and companies <= people")
    rng = random.Random(f"kb:{seed}")
    used: set[str] = set()

    def fresh(make: Any) -> str:
        while True:
            name = make()
            if name.lower() not in used:
                used.add(name.lower())
                return name

    country_names = [fresh(lambda: _word(rng, 2) + "ia") for _ in range(countries)]
    city_names = [fresh(lambda: _word(rng, 2)) for _ in range(cities)]
    person_names = [fresh(lambda: f"{_word(rng, 2)} {_word(rng, 2)}") for _ in range(people)]
    company_names = [fresh(lambda: f"{_word(rng, 2)} {rng.choice(['Labs', 'Works', 'Foods', 'Motors'])}")
                     for _ in range(companies)]
    country_of = {c: country_names[i % countries] for i, c in enumerate(city_names)}
    born_in = {p: rng.choice(city_names) for p in person_names}
    founder = dict(zip(company_names, rng.sample(person_names, companies)))
    docs: list[str] = []
    doc_of: dict[str, int] = {}
    for p in person_names:
        doc_of[p] = len(docs)
        docs.append(f"{p} is a {rng.choice(JOBS)}. {p} was born in {born_in[p]}.")
    for c in city_names:
        doc_of[c] = len(docs)
        docs.append(f"{c} is a city in {country_of[c]}.")
    for k in country_names:
        doc_of[k] = len(docs)
        docs.append(f"{k} is a country with {sum(v == k for v in country_of.values())} large cities.")
    for co in company_names:
        doc_of[co] = len(docs)
        docs.append(f"{co} is a company founded by {founder[co]}.")
    return World(born_in, country_of, founder, tuple(docs), doc_of)


class BM25Index:
    """Top-k BM25 retrieval over a fixed list of documents (``bm25s``, Lucene variant)."""

    def __init__(self, docs: tuple[str, ...], *, k1: float = 1.5, b: float = 0.75) -> None:
        import bm25s

        self.docs = docs
        self._bm25s = bm25s
        self.retriever = bm25s.BM25(k1=k1, b=b, method="lucene")
        self.retriever.index(bm25s.tokenize(list(docs), stopwords="en", show_progress=False), show_progress=False)

    def search(self, query: str, k: int) -> list[tuple[int, float]]:
        """[(doc id, score)] of the top ``k`` documents with a positive score, best first (ties by id)."""
        tokens = self._bm25s.tokenize([query], stopwords="en", show_progress=False, return_ids=False)
        if not tokens[0]:
            return []
        k = min(k, len(self.docs))
        ids, scores = self.retriever.retrieve(tokens, k=k, show_progress=False)
        hits = [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if s > 0]
        return sorted(hits, key=lambda h: (-h[1], h[0]))


@lru_cache(maxsize=8)
def _cached(seed: int, people: int, cities: int, countries: int, companies: int) -> tuple[World, BM25Index]:
    world = build_world(seed, people=people, cities=cities, countries=countries, companies=companies)
    return world, BM25Index(world.docs)


def question(world: World, seed: int) -> tuple[str, str, tuple[int, ...], int]:
    """(question, answer, gold document chain, hops) for a problem seed."""
    rng = random.Random(f"q:{seed}")
    kind = QUESTION_KINDS[rng.randrange(len(QUESTION_KINDS))]
    if kind.startswith("birth"):
        person = rng.choice(sorted(world.born_in))
        city = world.born_in[person]
        chain = [world.doc_of[person]]
        if kind == "birth_city":
            return f"In which city was {person} born?", city, tuple(chain), 1
        return (f"In which country was {person} born?", world.country_of[city],
                (*chain, world.doc_of[city]), 2)
    company = rng.choice(sorted(world.founder))
    person = world.founder[company]
    city = world.born_in[person]
    chain = [world.doc_of[company], world.doc_of[person]]
    if kind == "founder_city":
        return f"In which city was the founder of {company} born?", city, tuple(chain), 2
    return (f"In which country was the founder of {company} born?", world.country_of[city],
            (*chain, world.doc_of[city]), 3)


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and the articles a/an/the, collapse spaces (SQuAD-style)."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def token_f1(pred: str, gold: str) -> float:
    p, g = normalize_answer(pred).split(), normalize_answer(gold).split()
    common = sum(min(p.count(w), g.count(w)) for w in set(p))
    if not p or not g or common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


class SearchQA:
    """Multi-hop questions over the knowledge base, answered with ``search:`` and ``answer:`` actions."""

    name = "search"
    instructions = ("Answer the question using the search tool. Reply with exactly one action per turn: "
                    "'search: <query>' to search the knowledge base, or 'answer: <answer>' to give the final answer.")
    answer_template = "answer: {answer}"
    stratum_tool = "search"  # Stratified GRPO's strata: search calls per episode

    def __init__(self, *, kb_seed: int = 0, people: int = 40, cities: int = 12, countries: int = 4,
                 companies: int = 12, top_k: int = 2, reward: str = "em", retrieval_reward: float = 0.0,
                 invalid_penalty: float = 0.1) -> None:
        if top_k < 1 or reward not in ("em", "f1"):
            raise ValueError(f"search needs top_k >= 1 and reward in ('em', 'f1'), got {top_k}, {reward!r}")
        self.world, self.index = _cached(kb_seed, people, cities, countries, companies)
        self._name_of = {doc: name for name, doc in self.world.doc_of.items()}
        self.top_k, self.reward_kind, self.retrieval_reward = top_k, reward, float(retrieval_reward)
        self.invalid_penalty = check_penalty(invalid_penalty)
        self.question, self.answer, self.chain, self.hops = "", "", (), 0
        self.seen: set[int] = set()
        self.last: tuple[int, ...] = ()
        self.done = True

    def reset(self, seed: int) -> str:
        self.question, self.answer, self.chain, self.hops = question(self.world, seed)
        self.seen, self.last, self.done = set(), (), False
        return f"Question: {self.question}"

    def _invalid(self, why: str) -> StepResult:
        return StepResult(f"Invalid action: {why} Use 'search: <query>' or 'answer: <answer>'.",
                          -self.invalid_penalty, False, {"valid": False, "success": False, "tool": "invalid"})

    def step(self, action: str) -> StepResult:
        if self.done:
            return after_done(self.invalid_penalty)
        m = _ACTION.search(action if isinstance(action, str) else "")
        if m is None:
            return self._invalid("no 'search:' or 'answer:' found.")
        kind, arg = m.group(1).lower(), m.group(2).strip()
        if kind == "answer":
            self.done = True
            score = token_f1(arg, self.answer) if self.reward_kind == "f1" else \
                float(normalize_answer(arg) == normalize_answer(self.answer))
            success = normalize_answer(arg) == normalize_answer(self.answer)
            verdict = "correct" if success else "wrong"
            return StepResult(f"Your answer is {verdict}.", score, True,
                              {"valid": True, "success": success, "tool": "answer"})
        if not arg:
            return self._invalid("empty search query.")
        hits = self.index.search(arg, self.top_k)
        ids = tuple(i for i, _ in hits)
        new_gold = any(i in self.chain and i not in self.seen for i in ids)
        self.seen.update(ids)
        self.last = ids
        text = "\n".join(f"- {self.world.docs[i]}" for i in ids) if ids else "No results."
        return StepResult(f"Results:\n{text}", self.retrieval_reward * new_gold, False,
                          {"valid": True, "success": False, "tool": "search"})

    def expert_action(self) -> str:
        """The demonstrator's next action from the current state (see the module docstring)."""
        missing = next((doc for doc in self.chain if doc not in self.seen), None)
        if missing is None:
            return self.answer_template.format(answer=self.answer)
        return f"search: {self._name_of[missing]}"

    def state_key(self) -> str:
        return "results:" + ",".join(map(str, self.last)) if self.last else "start"
