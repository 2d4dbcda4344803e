"""Prompt files and deterministic, resumable prompt iteration (each epoch draws distinct prompts, each repeated
group_size times).

A prompt file is a text file with one prompt per line, or a JSONL file (``.jsonl``) with one JSON object per line:
a ``"prompt"`` string and any metadata beside it, as GenEval's ``evaluation_metadata.jsonl`` (``tag``, ``include``
with each object's ``class`` / ``count`` / ``color`` / ``position``, ...).  The metadata reach the rewards as a
table prompt -> metadata (:meth:`critic_align.rewards.Reward.metadata`): a GenEval-style server behind ``remote``
receives them, ``composition`` reads its clauses from them instead of parsing the prompt.
"""

from __future__ import annotations

import json
import random
from pathlib import Path


def read_prompt_file(path) -> tuple[list[str], dict[str, dict] | None]:
    """(prompts, metadata table or None) of a prompt file: ``.jsonl`` (one JSON object a line with a ``"prompt"``
    string; blank lines skipped) or text (one prompt a line; blank lines and ``#`` comments skipped).  A malformed
    JSONL line is a ValueError naming the file and line number; so is a prompt given twice with different metadata
    (a reward could not tell which applies)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() != ".jsonl":
        prompts = [ln.strip() for ln in text.splitlines()]
        prompts = [p for p in prompts if p and not p.startswith("#")]
        if not prompts:
            raise ValueError(f"prompt file {path} has no prompts (one per line)")
        return prompts, None
    prompts, table, first_line = [], {}, {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: not valid JSON ({exc.msg} at column {exc.colno}); each line of a "
                             '.jsonl prompt file is one object such as {"prompt": "a red 3", "tag": "single_object"}') from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise ValueError(f"{path}:{number}: each line needs a non-empty \"prompt\" string beside its metadata, "
                             f"got {line.strip()[:120]}")
        prompt = row.pop("prompt").strip()
        if prompt in table and table[prompt] != row:
            raise ValueError(f"{path}:{number}: prompt {prompt!r} is also on line {first_line[prompt]} with other "
                             "metadata; give each prompt one set of metadata")
        if prompt not in table:
            prompts.append(prompt)
        table.setdefault(prompt, row)
        first_line.setdefault(prompt, number)
    if not prompts:
        raise ValueError(f"prompt file {path} has no prompts (one JSON object with a \"prompt\" a line)")
    return prompts, table


class PromptIterator:
    """Cycles through shuffled passes over ``prompts``; its state is two ints and a seed (checkpointable)."""

    def __init__(self, prompts, seed: int = 0):
        prompts = list(prompts)
        if not prompts:
            raise ValueError("the prompt list is empty: give at least one prompt")
        bad = [p for p in prompts if not isinstance(p, str)]
        if bad:
            raise TypeError(f"prompts must be strings, got {type(bad[0]).__name__} ({bad[0]!r})")
        self.prompts = prompts
        self.seed = seed
        self.pass_index = 0
        self.position = 0
        self._order = self._make_order()

    def _make_order(self) -> list[int]:
        order = list(range(len(self.prompts)))
        random.Random(self.seed * 1_000_003 + self.pass_index).shuffle(order)
        return order

    def next(self, n: int) -> list[str]:
        out = []
        while len(out) < n:
            if self.position >= len(self._order):
                self.pass_index += 1
                self.position = 0
                self._order = self._make_order()
            out.append(self.prompts[self._order[self.position]])
            self.position += 1
        return out

    def batch(self, num_prompts: int, group_size: int) -> list[str]:
        """``num_prompts`` prompts, each repeated ``group_size`` times consecutively."""
        return [p for p in self.next(num_prompts) for _ in range(group_size)]

    def state_dict(self) -> dict:
        return {"seed": self.seed, "pass_index": self.pass_index, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.pass_index, self.position = int(state["seed"]), int(state["pass_index"]), int(state["position"])
        self._order = self._make_order()
