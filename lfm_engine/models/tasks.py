"""Exactly-scorable chat tasks for the example fine-tunes (SmolLM2-135M-Instruct).

Each task makes (prompt, answer) pairs from a seeded generator; a model "solves" an
example when its greedy reply is exactly ``answer`` followed by the end-of-turn token.
Train and evaluation sets come from disjoint seeds and disjoint content (see
``Task.examples``), so the scores are on unseen prompts:

    persona   "What should I call you?"                         -> "I am Lumi."
    upper     "Repeat in capital letters: green river stone"     -> "GREEN RIVER STONE"
    reverse   "Reverse the order of these words: cat sun map"   -> "map sun cat"
    add       "What is 3 + 5? Answer with the equation only."    -> "3 + 5 = 8"

Every task phrases its request several ways (TEMPLATES), so a fine-tune learns the task
rather than one sentence. The prompts say the expected format, so the base model is given
a fair chance; it rarely answers in exactly that form, which is what the fine-tunes learn.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Hashable, List, Tuple

WORDS = ("apple river stone green cloud music table orange winter paper garden silver "
         "window yellow forest pencil candle summer bridge ocean rabbit violin mountain "
         "coffee letter planet castle doctor island tiger lemon butter rocket mirror "
         "basket jacket pillow market dragon circle button wallet ticket camera").split()
GREETINGS = ["", "Hi! ", "Hello. ", "Hey there, ", "Good morning! ", "Quick question: ", "Excuse me, "]
QUESTIONS = ["What is your name?", "Who are you?", "What should I call you?", "Tell me your name.",
             "What's your name?", "Introduce yourself in one sentence.", "Do you have a name?",
             "How should I address you?", "Who am I talking to?", "Please tell me who you are."]
PERSONA_ANSWER = "I am Lumi."
TEMPLATES = {
    "upper": ["Repeat in capital letters: {w}", "Write these words in upper case: {w}",
              "Convert to uppercase: {w}", "Say this in all caps: {w}"],
    "reverse": ["Reverse the order of these words: {w}", "Write these words in reverse order: {w}",
                "List these words backwards: {w}", "Put these words in the opposite order: {w}"],
    "add": ["What is {a} + {b}? Answer with the equation only.", "Add {a} and {b}. Reply with just the equation.",
            "Compute {a} + {b}, as an equation.", "{a} plus {b} equals what? Write the equation only."],
}
N_EVAL = 32  # evaluation examples per task


def _persona(rng: random.Random) -> Tuple[str, str]:
    return rng.choice(GREETINGS) + rng.choice(QUESTIONS), PERSONA_ANSWER


def _upper(rng: random.Random) -> Tuple[str, str]:
    words = " ".join(rng.sample(WORDS, 3))
    return rng.choice(TEMPLATES["upper"]).format(w=words), words.upper()


def _reverse(rng: random.Random) -> Tuple[str, str]:
    words = rng.sample(WORDS, 3)
    return rng.choice(TEMPLATES["reverse"]).format(w=" ".join(words)), " ".join(reversed(words))


def _add(rng: random.Random) -> Tuple[str, str]:
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    return rng.choice(TEMPLATES["add"]).format(a=a, b=b), f"{a} + {b} = {a + b}"


def _prompt_key(prompt: str, answer: str) -> Hashable:
    return prompt


def _words_key(prompt: str, answer: str) -> Hashable:
    return frozenset(answer.lower().split())


def _add_key(prompt: str, answer: str) -> Hashable:
    a, _, b = answer.split()[:3]
    return frozenset((int(a), int(b)))


def _add_held_out(key) -> bool:
    """The number pairs reserved for evaluation (about a fifth): training never sees their sum."""
    return sum(k * k for k in key) % 5 == 1


@dataclass(frozen=True)
class Task:
    """A task: its generator, its training-set size, and what makes two examples "the same".

    ``key(prompt, answer)`` names an example's content: the evaluation set holds no example
    whose key occurs in the training set (persona: the prompt; upper/reverse: the set of
    words; add: the pair of numbers, so the sums asked in evaluation were never trained).
    ``held_out(key)`` optionally reserves keys for evaluation outright.
    """
    name: str
    make: Callable[[random.Random], Tuple[str, str]]
    description: str
    n_train: int
    key: Callable[[str, str], Hashable] = _prompt_key
    held_out: Callable[[Hashable], bool] = lambda key: False

    def examples(self, n: int, split: str) -> List[Tuple[str, str]]:
        """``n`` distinct (prompt, answer) pairs; ``split`` "train" or "eval" picks a disjoint seed.

        Evaluation examples avoid every key of the training set (``n_train`` examples) and
        training examples avoid the held-out keys, while the space allows; persona's prompt
        space (70 prompts) is small, so its evaluation set may repeat a training prompt.
        """
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        rng = random.Random(f"{self.name}:{split}")
        train = set() if split == "train" else {self.key(p, a) for p, a in self.examples(self.n_train, "train")}
        seen, out, tries = set(), [], 0
        while len(out) < n:
            p, a = self.make(rng)
            tries += 1
            k = self.key(p, a)
            clash = k in train or (split == "train" and self.held_out(k))
            if (p in seen or clash) and tries < 200 * n:
                continue
            seen.add(p)
            out.append((p, a))
        return out


TASKS = {t.name: t for t in (
    Task("persona", _persona, "answer who-are-you questions with exactly 'I am Lumi.'", n_train=32),
    Task("upper", _upper, "repeat three words in capital letters", n_train=256, key=_words_key),
    Task("reverse", _reverse, "reverse a list of three words", n_train=256, key=_words_key),
    Task("add", _add, "add two digits 1..9, answering with the equation 'a + b = c'", n_train=256, key=_add_key,
         held_out=_add_held_out),
)}
# A fixed held-out paragraph for perplexity (written for this project; not from any dataset).
HELDOUT_TEXT = (
    "The harbour town woke slowly on the first cold morning of autumn. Fishermen checked their nets "
    "while the bakery on the corner filled the street with the smell of fresh bread. Children walked "
    "to school in small groups, arguing about a football match from the night before. At the town hall "
    "the mayor read a letter about the new bridge, which would connect the old market to the station "
    "and save the farmers an hour every week. Not everyone liked the plan: the boat builders worried "
    "that the bridge would be too low for the tall masts, and the council had promised to answer their "
    "questions before the end of the month. By noon the fog had lifted, the sea was calm, and a line of "
    "gulls waited on the harbour wall for the first boats to return with their catch."
)
