"""Rewards for GRPO: built-in ones and the user's own functions, combined with weights.

    --reward=exact_match                           # 1 if the answer equals `response` (normalised)
    --reward=lcs_f1                                # F1 of the longest common character subsequence
    --reward='exact_match=1.0,lcs_f1=0.5'          # a weighted sum
    --reward=my_rewards:brevity                    # my_rewards.py (importable from the working directory)

A reward function is called with keyword lists of one entry per completion: `prompts`,
`completions`, and the row's other columns it names as parameters (`response`, `task`, ...;
a `**kwargs` parameter receives every string column of the file). It returns one float per
completion.

Built-in rewards compare texts as evaluation does (`utils.metrics.normalise`: NFKC, whitespace of
every kind removed), so an answer evaluation counts as a match earns the full reward.
"""
import importlib
import inspect
import math
import os
import sys
from collections import Counter
from collections.abc import Callable

from utils.errors import UserError
from utils.metrics import normalise


def exact_match(prompts: list[str], completions: list[str], response: list[str], **_) -> list[float]:
    return [float(normalise(c) == normalise(r)) for c, r in zip(completions, response)]


def lcs_length(a: str, b: str) -> int:
    """Length of the longest common subsequence of two strings (O(len(a) x len(b)), one row kept)."""
    if len(a) < len(b):
        a, b = b, a
    row = [0] * (len(b) + 1)
    for ca in a:
        diagonal = 0  # row[j - 1] of the previous row
        for j, cb in enumerate(b, 1):
            diagonal, row[j] = row[j], diagonal + 1 if ca == cb else max(row[j], row[j - 1])
    return row[-1]


def lcs_f1(prompts: list[str], completions: list[str], response: list[str], **_) -> list[float]:
    """F1 of the longest common subsequence of characters (as Chinese reading-comprehension
    evaluations score partial answers): order counts, so an anagram scores below 1."""
    scores = []
    for completion, reference in zip(completions, response):
        a, b = normalise(completion), normalise(reference)
        common = lcs_length(a, b) if a and b else 0
        if not common:
            scores.append(float(a == b))
            continue
        precision, recall = common / len(a), common / len(b)
        scores.append(2 * precision * recall / (precision + recall))
    return scores


def char_bag_f1(prompts: list[str], completions: list[str], response: list[str], **_) -> list[float]:
    """F1 of the characters as multisets, order ignored: an anagram (6912 for 6219) scores 1.0.
    Kept under this name for runs that want it; `lcs_f1` is the partial credit to train on."""
    scores = []
    for completion, reference in zip(completions, response):
        a, b = Counter(normalise(completion)), Counter(normalise(reference))
        common = sum((a & b).values())
        if not a or not b or not common:
            scores.append(float(a == b))
            continue
        precision, recall = common / sum(a.values()), common / sum(b.values())
        scores.append(2 * precision * recall / (precision + recall))
    return scores


BUILTIN = {"exact_match": exact_match, "lcs_f1": lcs_f1, "char_bag_f1": char_bag_f1}
# Names that were built-ins, and what a run that named one should use now.
RENAMED = {"char_f1": "char_f1 compared bags of characters (an anagram scored 1.0) and is gone: use lcs_f1 "
                      "(order-aware partial credit) or char_bag_f1 (the old behaviour)"}
FIXED = ("prompts", "completions")


class Reward:
    """One named reward function, its weight and the columns it reads."""

    def __init__(self, name: str, fn: Callable, weight: float, columns: tuple[str, ...], all_columns: bool):
        self.name, self.fn, self.weight, self.columns, self.all_columns = name, fn, weight, columns, all_columns

    def __call__(self, prompts: list[str], completions: list[str], columns: dict) -> list[float]:
        try:
            values = self.fn(prompts=prompts, completions=completions, **columns)
        except Exception as err:  # noqa: BLE001 (the user's code: any failure is theirs to see)
            raise UserError(f"--reward={self.name} raised {type(err).__name__}: {err}; fix the function "
                            "(it is called with prompts, completions and the row's columns as lists)") from None
        try:
            values = [float(v) for v in values]
        except (TypeError, ValueError):
            raise UserError(f"--reward={self.name} returned {type(values).__name__}, not a list of numbers") from None
        if len(values) != len(completions) or not all(math.isfinite(v) for v in values):
            raise UserError(f"--reward={self.name} returned {len(values)} values for {len(completions)} completions "
                            "(or a value that is not finite); return one finite number per completion")
        return values


def load_function(name: str) -> Callable:
    if name in BUILTIN:
        return BUILTIN[name]
    if name in RENAMED:
        raise UserError(f"--reward={name}: {RENAMED[name]}")
    module_name, _, attr = name.partition(":")
    if not attr:
        raise UserError(f"--reward={name} is neither a built-in reward ({', '.join(BUILTIN)}) nor "
                        "module:function")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # noqa: BLE001 (ImportError, or the module's own code failing)
        raise UserError(f"--reward={name}: cannot import {module_name} ({type(err).__name__}: {err}); give "
                        "module:function importable from the working directory") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UserError(f"--reward={name}: {module_name} has no function {attr}")
    return fn


def parse_rewards(spec: str) -> list[Reward]:
    """'a=1.0,b=0.5' (or one name) -> Rewards; every function is imported and checked now."""
    rewards = []
    for part in [p.strip() for p in str(spec).split(",") if p.strip()]:
        name, _, weight = part.partition("=")
        try:
            weight = float(weight) if weight else 1.0
        except ValueError:
            raise UserError(f"--reward: the weight of {name} is {weight!r}, not a number") from None
        if not math.isfinite(weight):
            raise UserError(f"--reward: the weight of {name} must be finite")
        fn = load_function(name.strip())
        try:
            params = inspect.signature(fn).parameters
        except (TypeError, ValueError):
            params = {}
        all_columns = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        columns = tuple(n for n, p in params.items() if n not in FIXED and p.kind not in
                        (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL))
        if fn in BUILTIN.values():
            columns, all_columns = ("response",), False
        rewards.append(Reward(name.strip(), fn, weight, columns, all_columns))
    if not rewards:
        raise UserError("--reward is empty; name a reward, e.g. --reward=exact_match")
    return rewards
