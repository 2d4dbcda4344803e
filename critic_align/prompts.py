"""Deterministic, resumable prompt iteration: each epoch draws distinct prompts, each repeated group_size times."""

from __future__ import annotations

import random


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
