"""What the benchmark scripts share: the machine record, a time budget, the policy evaluation, and the result writer.

    from harness import Budget, evaluate, machine_info, run_parts, write_result

* ``machine_info()``: where a number was measured (cores, platform, Python, torch and its threads); every script that
  records the machine calls it, adding its own fields (``note=...``, ``cores_used=...``).
* ``Budget`` / ``run_parts``: a wall-clock deadline, and parts run one after another within it: a part that would
  start with less than its minimum left is skipped (and says so), a part that raises is recorded with its error
  and the next one runs.
* ``evaluate``: the mean of each reward over the policy's samples of fixed prompts and noise (the evaluation the
  digits, reward-hacking and text-to-image benchmarks share).
* ``write_result``: the JSON with a ``schema_version``, then the topic's page and the BENCHMARKS.md index re-rendered.
"""

from __future__ import annotations

import json
import os
import platform
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

# bumped when a result file's layout changes in a way its renderer must know about; files written before the harness
# have no such field (the renderers read both)
SCHEMA_VERSION = 1


def machine_info(*, torch_threads: int | None = None, **extra: Any) -> dict:
    """Where a benchmark ran: CPU cores, platform, Python, torch and its intra-op threads (``torch_threads`` when the
    script set its own count, else torch's current one), then the script's own fields in ``extra``."""
    import torch

    info = {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads() if torch_threads is None else torch_threads}
    clash = sorted(set(extra) & set(info))
    if clash:
        raise ValueError(f"machine_info: {clash} are recorded by machine_info itself; pass torch_threads= for the "
                         "thread count and other names for the script's own fields")
    return {**info, **extra}


@dataclass(frozen=True)
class Budget:
    """A wall-clock deadline (``time.time()`` seconds) and the budget it came from, for messages."""

    deadline: float
    seconds: float

    @classmethod
    def starting_now(cls, seconds: float) -> Budget:
        if not seconds > 0:
            raise ValueError(f"a time budget must be positive seconds, got {seconds!r}")
        return cls(deadline=time.time() + seconds, seconds=float(seconds))

    def left(self) -> float:
        return self.deadline - time.time()

    def expired(self, margin_s: float = 0.0) -> bool:
        """True once less than ``margin_s`` seconds are left."""
        return self.left() < margin_s


def run_parts(parts: Sequence[str], budget: Budget, run_part: Callable[[str, float], dict], *,
              min_seconds: Mapping[str, float] | None = None,
              on_done: Callable[[str, dict], None] = lambda part, res: None,
              log: Callable[[str], None] = lambda msg: None) -> dict[str, dict]:
    """Run ``run_part(part, seconds_left)`` for each part in order within ``budget``; returns {part: its record}.

    A part with less than ``min_seconds[part]`` left is skipped: its record is ``{"skipped": "<left> s of the <budget>
    s budget left"}``. A part that raises is recorded as ``{"error", "traceback"}`` (one broken part must not lose the
    others' numbers). Every record that ran gets ``part_s``, its wall time. ``on_done`` sees each record as it lands
    (a script writes its JSON there, so a later crash keeps the parts done)."""
    min_seconds = min_seconds or {}
    done: dict[str, dict] = {}
    for part in parts:
        left = budget.left()
        if left < min_seconds.get(part, 0.0):
            done[part] = {"skipped": f"{left:.0f} s of the {budget.seconds:.0f} s budget left"}
            on_done(part, done[part])
            continue
        log(f"{part} ({left:.0f} s left)")
        t0 = time.time()
        try:
            res = run_part(part, left)
        except Exception as e:  # noqa: BLE001  (recorded, and the next part runs)
            res = {"error": f"{type(e).__name__}: {e}"[:2000], "traceback": traceback.format_exc()[-3000:]}
        res["part_s"] = time.time() - t0
        done[part] = res
        on_done(part, res)
        log(f"{part} done in {res['part_s']:.0f} s")
    return done


@dataclass(frozen=True)
class Evaluation:
    """The samples an evaluation drew (for grids) and each reward's mean over them, by reward name."""

    samples: Any
    means: dict[str, float]


def evaluate(trainer, prompts: list[str], rewards: Sequence, *, seed: int = 999, use_policy: bool = True) -> Evaluation:
    """Sample ``prompts`` once with the trainer's stochastic sampler on fixed noise (``seed``; ``use_policy=False``:
    the base model) and take each reward's mean over the samples. ``rewards`` is a list of MultiRewards (``None``
    entries are skipped, e.g. a trainer without evaluation rewards); a name in a later one overwrites an earlier."""
    import torch

    with torch.no_grad():
        samples = trainer.sample(prompts, seed=seed, use_policy=use_policy)
        means: dict[str, float] = {}
        for reward in rewards:
            if reward is None:
                continue
            values = reward(samples, prompts)
            for k, name in enumerate(reward.names):
                means[name] = values[:, k].mean().item()
    return Evaluation(samples=samples, means=means)


def per_prompt(prompts: Sequence[str], n: int) -> list[str]:
    """Each prompt ``n`` times in a row (the evaluation sets of the digits benchmarks: ``n`` samples per digit)."""
    return [p for p in prompts for _ in range(n)]


def write_result(path: Path | str, data: Mapping, *, topic: str | None = None, indent: int = 2) -> dict:
    """Write ``data`` as JSON with ``schema_version`` first, then re-render ``topic``'s page and the index
    (``topic=None``: write only, e.g. a file outside benchmarks/results/ or a part of a run). Returns what was
    written."""
    record = {"schema_version": SCHEMA_VERSION, **{k: v for k, v in data.items() if k != "schema_version"}}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=indent))
    if topic is not None:
        import report  # at call time: report imports the renderers, which import nothing of the scripts

        report.write_topic(topic)
    return record


def save_tensor_cache(path: Path | str, data: Mapping[str, Any]) -> None:
    """A benchmark's cache as safetensors: its tensors as tensors, everything else (prompts, counts, seconds) as one
    JSON string in the file's metadata, so reading it back never unpickles anything."""
    import torch
    from safetensors.torch import save_file

    tensors = {k: v.contiguous() for k, v in data.items() if isinstance(v, torch.Tensor)}
    rest = {k: v for k, v in data.items() if not isinstance(v, torch.Tensor)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".partial")  # a crash mid-write leaves the earlier cache whole
    save_file(tensors, str(tmp), metadata={"json": json.dumps(rest)})
    os.replace(tmp, path)


def load_tensor_cache(path: Path | str) -> dict:
    """What :func:`save_tensor_cache` wrote: tensors and the JSON values in one dict."""
    from safetensors import safe_open

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{str(path)!r}: benchmark caches are .safetensors files (written by save_tensor_cache); "
                         "pickled .pt caches are not read: rerun the script that drew it")
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("json", "{}"))
        return {**meta, **{k: f.get_tensor(k) for k in f.keys()}}
