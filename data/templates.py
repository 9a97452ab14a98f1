"""Answer templates: the shape of the answer a completion gives, with the given numbers as letters.

Why: a policy that answers without reading the target writes the same shape on every puzzle (an accelerator run
answered every 3-number puzzle `a + b + c`: BUILD.md). Per-step shares of these shapes (`answer_templates` in
metrics.jsonl) make that collapse visible; tests/test_reward_templates.py checks the ladder's rewards against
every such shape.

For the numbers (12, 5, 30), "12+5 + 30" is "a + b + c" and "(30 - 5) * 12" is "(c - b) * a": letters by the
number's position in `nums`, each literal taking the first unused given number equal to it. A literal that is not
a given number (another integer, a given one used once too often, any decimal such as 5.0) is "#". Operators and
parentheses stay; tokens are joined by single spaces, except inside parentheses and after a sign ("(-a + b)").
The answer is found and parsed by data.countdown (never eval): NO_ANSWER without one, NOT_ARITHMETIC when
data.countdown.evaluate cannot parse it.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

from data import countdown

NO_ANSWER, NOT_ARITHMETIC, REST = "<no answer>", "<not arithmetic>", "<rest>"
LETTERS = string.ascii_lowercase
# After countdown.evaluate accepts an answer it is only these tokens and whitespace.
_TOKEN = re.compile(r"\d+\.\d*|\.\d+|\d+|[-+*/()]")
_SYMBOLS = frozenset("+-*/()")


def answer_template(completion: str, nums: Sequence[int]) -> str:
    """The completion's answer with the given numbers as letters (see the module docstring)."""
    if len(nums) > len(LETTERS):
        raise ValueError(f"answer_template names at most {len(LETTERS)} numbers, got {len(nums)}")
    answer = countdown.extract_answer(completion)
    if answer is None:
        return NO_ANSWER
    if countdown.evaluate(answer) is None:
        return NOT_ARITHMETIC
    unused = [(LETTERS[i], int(n)) for i, n in enumerate(nums)]
    tokens = []
    for token in _TOKEN.findall(answer):
        if token not in _SYMBOLS:
            hit = next((k for k, (_, n) in enumerate(unused) if token.isdigit() and int(token) == n), None)
            tokens.append("#" if hit is None else unused.pop(hit)[0])
        else:
            tokens.append(token)
    return _join(tokens)


def _join(tokens: list[str]) -> str:
    """Single spaces between tokens, none after "(", before ")" or after a sign: "(-a + b) * c"."""
    text, previous, glued = "", None, True
    for token in tokens:
        if not glued and token != ")":
            text += " "
        text += token
        sign = token in ("+", "-") and (previous is None or previous in _SYMBOLS - {")"})
        glued, previous = token == "(" or sign, token
    return text


def template_shares(completions: Sequence[str], nums_list: Sequence[Sequence[int]], top: int = 5) -> dict[str, float]:
    """The `top` most common templates -> share of all completions (ties by template string, so the result is
    deterministic), plus REST -> the share of the others when there are any."""
    counts = Counter(answer_template(c, n) for c, n in zip(completions, nums_list, strict=True))
    total = sum(counts.values())
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    shares = {t: c / total for t, c in ranked[:top]}
    rest = sum(c for _, c in ranked[top:])
    if rest:
        shares[REST] = rest / total
    return shares
