"""Countdown prompts: TinyZero's base template, and the same question as a Gemma chat turn.

Both end with "Let me solve this step by step.\\n<think>", so the completion starts inside the think
block and `data.countdown.score` reads it the same way (it keeps only the completion's last line).

"chat" is our choice for instruction-tuned Gemma: the user turn holds TinyZero's question text
verbatim and the model turn is pre-filled with TinyZero's opening, as TinyZero's own
"qwen-instruct" template does for Qwen. There is no system turn (Gemma has none), and no "<bos>":
the tokenizer adds it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

_QUESTION = (
    "Using the numbers {nums}, create an equation that equals {target}. You can use basic arithmetic "
    "operations (+, -, *, /) and each number can only be used once. Show your work in <think> </think> tags. "
    "And return the final answer in <answer> </answer> tags, for example <answer> (1 + 2) / 3 </answer>."
)
_OPENING = "Let me solve this step by step.\n<think>"

# TinyZero examples/data_preprocess/countdown.py, make_prefix(template_type="base"), verbatim.
BASE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with the "
    "answer.\nUser: " + _QUESTION + "\nAssistant: " + _OPENING
)
CHAT = "<start_of_turn>user\n" + _QUESTION + "<end_of_turn>\n<start_of_turn>model\n" + _OPENING

TEMPLATES = {"base": BASE, "chat": CHAT}
# Where a worked example goes: after the base template's preamble (as an earlier User/Assistant exchange), or as
# an earlier chat exchange.
_BASE_PREAMBLE_END = "answer.\n"


@dataclasses.dataclass(frozen=True)
class WorkedExample:
    """A solved puzzle shown before the question (the difficulty ladder's easy levels; never TinyZero's level):
    the model sees the format filled in once, with the given numbers in the answer."""

    nums: tuple[int, ...]
    target: int
    work: str  # the think block's text
    answer: str

    def reply(self) -> str:
        return f"{_OPENING} {self.work} </think>\n<answer> {self.answer} </answer>"


def render(template: str, nums: Sequence[int], target: int, example: WorkedExample | None = None) -> str:
    """The prompt for one puzzle; template is a name in TEMPLATES. nums print as a Python list. With `example`,
    that solved puzzle comes first, as an earlier exchange of the same conversation."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown prompt template {template!r}; known templates: {sorted(TEMPLATES)}")
    # str.format never re-reads what it substitutes, so braces in the values cannot break the template.
    question = TEMPLATES[template].format(nums=[int(n) for n in nums], target=int(target))
    if example is None:
        return question
    shown = _QUESTION.format(nums=list(example.nums), target=example.target)
    if template == "chat":
        turns = f"<start_of_turn>user\n{shown}<end_of_turn>\n<start_of_turn>model\n{example.reply()}"
        return f"{turns}<end_of_turn>\n{question}"
    head, _, rest = question.partition(_BASE_PREAMBLE_END)
    return f"{head}{_BASE_PREAMBLE_END}User: {shown}\nAssistant: {example.reply()}\n{rest}"
