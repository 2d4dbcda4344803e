"""The best checkpoint and the collapse guard, from the held-out evaluation (``eval_every``).

Every evaluation row whose ``best_metric`` (higher is better; default the held-out mean of the first trained
reward) beats the best so far writes ``output_dir/best/epoch_XXXXXX``: one checkpoint (atomic, verified like
any other), replaced only by a better one, outside ``checkpoints/`` so ``keep_last`` rotation never removes it.
A run that collapses late (finite weights, so the finiteness guard does not stop it) keeps its best policy;
``critic-align train --out RUN --resume-from RUN/best/epoch_XXXXXX`` continues from it.

A collapse is an evaluation whose metric falls more than ``collapse_margin``·|best| below the best so far: it is
printed (once, when it starts) and written to ``summary.json`` (:func:`collapse_report`, from the log alone), and
with ``stop_on_collapse`` the run stops with :class:`CollapseError` naming ``best/`` and how to resume from it.

The best so far is read back from ``metrics.jsonl`` when a run starts (a resumed run's log holds exactly the
rows up to its checkpoint), so a resumed run keeps the same best as an uninterrupted one.  With several
processes the main process decides and shares each decision (the checkpoint write is collective).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Callable

BEST_DIR = "best"


class CollapseError(RuntimeError):
    """The held-out metric fell beyond ``collapse_margin`` below its best and ``stop_on_collapse`` is set."""


def metric_name(best_metric: str | None, reward_names) -> str:
    """The watched eval key: ``best_metric``, or ``eval/reward/<first trained reward>``."""
    return best_metric if best_metric is not None else f"eval/reward/{list(reward_names)[0]}"


def read_rows(metrics: Path) -> list[dict]:
    metrics = Path(metrics)
    if not metrics.exists():
        return []
    out = []
    for line in metrics.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:  # a half-written last row of a killed run
            continue
    return out


def _value(row: dict, metric: str) -> float | None:
    v = row.get(metric)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def best_so_far(rows: list[dict], metric: str) -> tuple[float, int] | None:
    """(value, epoch) of the best evaluation row (the first of equals), or None without one."""
    best = None
    for r in rows:
        if r.get("phase") != "eval":
            continue
        v = _value(r, metric)
        if v is not None and (best is None or v > best[0]):
            best = (v, int(r["epoch"]))
    return best


def is_collapse(value: float | None, best: float | None, margin: float) -> bool:
    """True if ``value`` lies more than ``margin``·|best| below ``best`` (margin 0: never)."""
    if margin <= 0 or value is None or best is None:
        return False
    return best - value > margin * abs(best)


def best_checkpoint(out: Path) -> Path | None:
    done = sorted(p for p in (Path(out) / BEST_DIR).glob("epoch_*") if (p / "state.json").exists())
    return done[-1] if done else None


def resume_hint(out: Path, ckpt: Path | None) -> str:
    if ckpt is None:
        return "no best checkpoint was written"
    return f"the best checkpoint is {ckpt}; continue from it with critic-align train --out {out} --resume-from {ckpt}"


def collapse_report(rows: list[dict], metric: str, margin: float, out: Path) -> dict:
    """The summary.json entry: the watched metric's best (value, epoch, checkpoint), its last value, and the
    first collapse (epoch, value, drop) if any, all from the log rows."""
    report = {"metric": metric, "collapse_margin": margin, "best_value": None, "best_epoch": None,
              "best_checkpoint": None, "final_value": None, "collapsed": False}
    best = None
    for r in rows:
        if r.get("phase") != "eval":
            continue
        v = _value(r, metric)
        if v is None:
            continue
        report["final_value"], report["final_epoch"] = v, int(r["epoch"])
        if not report["collapsed"] and is_collapse(v, best and best[0], margin):
            report.update(collapsed=True, collapse_epoch=int(r["epoch"]), collapse_value=v, collapse_best=best[0],
                          collapse_best_epoch=best[1])
        if best is None or v > best[0]:
            best = (v, int(r["epoch"]))
    if best is not None:
        report["best_value"], report["best_epoch"] = best
    ckpt = best_checkpoint(out)
    report["best_checkpoint"] = str(ckpt) if ckpt is not None else None
    if report["collapsed"]:
        report["message"] = collapse_message(metric, report["collapse_value"], report["collapse_epoch"],
                                             report["collapse_best"], report["collapse_best_epoch"], margin, out, ckpt)
    return report


def collapse_message(metric: str, value: float, epoch: int, best: float, best_epoch: int, margin: float, out: Path,
                     ckpt: Path | None) -> str:
    return (f"collapse: the held-out {metric} fell to {value:.4g} at epoch {epoch}, {best - value:.4g} below its best "
            f"{best:.4g} (epoch {best_epoch}; collapse_margin={margin:g} allows {margin * abs(best):.4g}); "
            f"{resume_hint(out, ckpt)} (a smaller learning_rate / critic_learning_rate is another config: start a new "
            "run with it)")


class BestKeeper:
    """The trainer's hook: :meth:`after_eval` on each evaluation row (every process, in the same order)."""

    def __init__(self, out, metric: str, margin: float, stop: bool, share: Callable = lambda v: v,
                 is_main: bool = True):
        self.out, self.metric, self.margin, self.stop = Path(out), metric, float(margin), bool(stop)
        self.share, self.is_main = share, is_main
        found = None
        if is_main:
            rows = read_rows(self.out / "metrics.jsonl")
            found = best_so_far(rows, metric), sorted({int(r["epoch"]) for r in rows if r.get("phase") == "eval"})
        # (value, epoch) from the log: a resumed run has the same best; and the epochs already evaluated
        self.best, self.evaluated = share(found)
        self.collapsed = False

    @classmethod
    def for_run(cls, config, reward_names, out, share=lambda v: v, is_main: bool = True) -> "BestKeeper":
        return cls(out, metric_name(config.best_metric, reward_names), config.collapse_margin, config.stop_on_collapse,
                   share, is_main)

    def needs_eval(self, epoch: int) -> bool:
        """False if the log already holds this epoch's evaluation (a run resumed from ``best/epoch_000000``,
        written after the evaluation before training)."""
        return epoch not in self.evaluated

    @property
    def directory(self) -> Path:
        return self.out / BEST_DIR

    def after_eval(self, row: dict, save_best: Callable[[], object]) -> None:
        """Write best/ if ``row`` beats the best so far (``save_best()``, called on every process); report a
        collapse (and raise :class:`CollapseError` with ``stop``)."""
        if self.metric not in row:
            raise ValueError(f"config field best_metric={self.metric!r}: the evaluation rows have no such key; use one "
                             f"of {sorted(k for k in row if k.startswith('eval/'))}")
        decision = None
        if self.is_main:
            v = _value(row, self.metric)
            if v is not None and (self.best is None or v > self.best[0]):
                decision = ("better", v)
            elif is_collapse(v, self.best and self.best[0], self.margin):
                decision = ("collapse", v)
        decision = self.share(decision)
        if decision is None:
            return
        kind, v = decision
        if kind == "better":
            save_best()
            self.best = (v, int(row["epoch"]))
            return
        message = collapse_message(self.metric, v, int(row["epoch"]), self.best[0], self.best[1], self.margin,
                                   self.out, best_checkpoint(self.out))
        if self.stop:
            raise CollapseError(f"training stopped (stop_on_collapse: true): {message}")
        if not self.collapsed and self.is_main:
            print(f"critic_align: warning: {message}; set stop_on_collapse: true to stop at a collapse",
                  file=sys.stderr, flush=True)
        self.collapsed = True
