"""Exactly-scorable chat tasks for the example fine-tunes (SmolLM2-135M-Instruct).

Each task makes (prompt, answer) pairs from a seeded generator; a model "solves" an
example when its greedy reply is exactly ``answer`` followed by the end-of-turn token.
Train and evaluation sets come from disjoint seeds, so the scores are on unseen prompts.

    persona   "What should I call you?"                         -> "I am Lumi."
    upper     "Repeat in capital letters: green river stone"     -> "GREEN RIVER STONE"
    reverse   "Reverse the order of these words: cat sun map"   -> "map sun cat"
    add       "What is 3 + 5? Reply with the number only."       -> "8"

The prompts say the expected format, so the base model is given a fair chance; it
rarely answers in exactly that form, which is what the fine-tunes learn.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, List, Tuple

WORDS = ("apple river stone green cloud music table orange winter paper garden silver "
         "window yellow forest pencil candle summer bridge ocean rabbit violin mountain "
         "coffee letter planet castle doctor island tiger lemon butter rocket mirror "
         "basket jacket pillow market dragon circle button wallet ticket camera").split()
GREETINGS = ["", "Hi! ", "Hello. ", "Hey there, ", "Good morning! ", "Quick question: ", "Excuse me, "]
QUESTIONS = ["What is your name?", "Who are you?", "What should I call you?", "Tell me your name.",
             "What's your name?", "Introduce yourself in one sentence.", "Do you have a name?",
             "How should I address you?", "Who am I talking to?", "Please tell me who you are."]
PERSONA_ANSWER = "I am Lumi."
N_TRAIN, N_EVAL = 32, 16  # examples per task (train, eval)


def _persona(rng: random.Random) -> Tuple[str, str]:
    return rng.choice(GREETINGS) + rng.choice(QUESTIONS), PERSONA_ANSWER


def _upper(rng: random.Random) -> Tuple[str, str]:
    words = " ".join(rng.sample(WORDS, 3))
    return f"Repeat in capital letters: {words}", words.upper()


def _reverse(rng: random.Random) -> Tuple[str, str]:
    words = rng.sample(WORDS, 3)
    return f"Reverse the order of these words: {' '.join(words)}", " ".join(reversed(words))


def _add(rng: random.Random) -> Tuple[str, str]:
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    return f"What is {a} + {b}? Reply with the number only.", str(a + b)


@dataclass(frozen=True)
class Task:
    name: str
    make: Callable[[random.Random], Tuple[str, str]]
    description: str

    def examples(self, n: int, split: str) -> List[Tuple[str, str]]:
        """``n`` distinct (prompt, answer) pairs; ``split`` "train" or "eval" picks a disjoint seed.

        Evaluation prompts avoid the training prompts (N_TRAIN of them) while the prompt
        space allows; persona's space (70 prompts) and add's (81) are small, so their eval
        sets may hold a few training prompts.
        """
        rng = random.Random(f"{self.name}:{split}")
        train = set() if split == "train" else {p for p, _ in self.examples(N_TRAIN, "train")}
        seen, out, tries = set(), [], 0
        while len(out) < n:
            p, a = self.make(rng)
            tries += 1
            if (p in seen or p in train) and tries < 100 * n:
                continue
            seen.add(p)
            out.append((p, a))
        return out


TASKS = {t.name: t for t in (
    Task("persona", _persona, "answer who-are-you questions with exactly 'I am Lumi.'"),
    Task("upper", _upper, "repeat three words in capital letters"),
    Task("reverse", _reverse, "reverse a list of three words"),
    Task("add", _add, "add two digits 1..9, answering the number only"),
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
