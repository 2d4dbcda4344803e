"""Experiment trackers through accelerate (``log_with: [tensorboard, wandb, ...]`` in a run config).

TensorBoard is written by :class:`~critic_align.runio.RunLog` itself (a ``SummaryWriter`` whose ``purge_step`` hides a
killed run's events after a resume).  Every other name is one of accelerate's tracker classes
(``accelerate.tracking.LOGGER_TYPE_TO_CLASS``: wandb, comet_ml, aim, mlflow, clearml, dvclive, swanlab, trackio),
started on the main process at the run's first log row with the run directory's name, its files under the run
directory where the tracker writes files (W&B: ``RUN/wandb/``), and the run's config as its hyper-parameters.
Each metrics row is logged as ``<phase>/<key>`` (a key that already starts with its phase, as ``eval/...``, as it
is) at step ``reward_queries`` (the x axis of TensorBoard and the
plots); the sample grids (before / after, every ``grid_every`` epochs) as images where the tracker logs images.

Names are checked when the config is read (:func:`check_tracker_names`) and the tracker's package when a run
starts (:func:`check_trackers_installed`), both before any model loads.
"""

from __future__ import annotations

import difflib
import importlib.util
import math
from pathlib import Path

# tracker name -> the package it needs (pip extra where critic-align has one)
_PACKAGES = {"wandb": "wandb", "comet_ml": "comet_ml", "aim": "aim", "mlflow": "mlflow", "clearml": "clearml",
             "dvclive": "dvclive", "swanlab": "swanlab", "trackio": "trackio"}
_EXTRAS = {"wandb": "critic-align[wandb]"}


def known_trackers() -> list[str]:
    """``tensorboard`` and accelerate's tracker names."""
    try:
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS

        names = set(LOGGER_TYPE_TO_CLASS)
    except ImportError:  # pragma: no cover - accelerate is a dependency
        names = set(_PACKAGES)
    return sorted(names | {"tensorboard"})


def check_tracker_names(log_with) -> None:
    """``log_with`` is None or a list of known tracker names, each once (a ValueError saying what is wrong otherwise;
    :class:`~critic_align.config.PPOConfig` puts the field's name and value in front)."""
    if log_with is None:
        return
    if isinstance(log_with, str) or not isinstance(log_with, (list, tuple)):
        raise ValueError("must be a list of tracker names, e.g. [tensorboard, wandb]")
    known = known_trackers()
    for name in log_with:
        if not isinstance(name, str) or name not in known:
            hint = difflib.get_close_matches(str(name), known, n=1)
            raise ValueError(f"unknown tracker {name!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                             + f"; known trackers: {known}")
    if len(set(log_with)) != len(log_with):
        raise ValueError("names a tracker twice")


def check_trackers_installed(log_with) -> None:
    """Every tracker of ``log_with`` is importable (ValueError naming the package to install otherwise)."""
    for name in log_with or []:
        package = _PACKAGES.get(name)
        if package is not None and importlib.util.find_spec(package) is None:
            how = f"pip install '{_EXTRAS[name]}'" if name in _EXTRAS else f"pip install {package}"
            raise ValueError(f"log_with: {name} needs the {package} package, which is not installed: {how} "
                              f"(or remove {name} from log_with)")


def _config_values(config: dict) -> dict:
    """A run config as tracker hyper-parameters (lists and dicts as strings: not every tracker takes them)."""
    return {k: v if isinstance(v, (int, float, str, bool)) or v is None else str(v) for k, v in config.items()}


class Trackers:
    """accelerate's trackers for the names of ``log_with`` other than tensorboard, started on first use."""

    def __init__(self, names, out, config: dict | None = None):
        self.names = [n for n in (names or []) if n != "tensorboard"]
        self.out, self.config = Path(out), dict(config or {})
        self._trackers: list | None = None

    def __bool__(self) -> bool:
        return bool(self.names)

    def _start(self) -> list:
        if self._trackers is None:
            from accelerate.tracking import LOGGER_TYPE_TO_CLASS

            check_trackers_installed(self.names)
            self._trackers = []
            for name in self.names:
                cls = LOGGER_TYPE_TO_CLASS[name]
                if name == "wandb":  # project critic-align, the run directory's name, its files in RUN/wandb
                    self.out.mkdir(parents=True, exist_ok=True)
                    tracker = cls("critic-align", name=self.out.name, dir=str(self.out))
                elif getattr(cls, "requires_logging_directory", False):
                    tracker = cls(self.out.name, logging_dir=str(self.out / name))
                else:
                    tracker = cls(self.out.name)
                if callable(getattr(tracker, "start", None)):  # accelerate >= 1.5 starts trackers explicitly
                    tracker.start()
                if self.config:
                    tracker.store_init_configuration(_config_values(self.config))
                self._trackers.append(tracker)
        return self._trackers

    def log(self, row: dict) -> None:
        if not self.names:
            return
        phase, step = row.get("phase", "train"), int(row.get("reward_queries", 0))
        values = {k if k.startswith(f"{phase}/") else f"{phase}/{k}": v for k, v in row.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        for tracker in self._start():
            tracker.log(values, step=step)

    def log_image(self, name: str, path, step: int) -> None:
        if not self.names:
            return
        from PIL import Image

        with Image.open(path) as img:
            image = img.convert("RGB")
        for tracker in self._start():
            if callable(getattr(tracker, "log_images", None)):
                tracker.log_images({name: [image]}, step=step)

    def finish(self) -> None:
        for tracker in self._trackers or []:
            tracker.finish()
        self._trackers = None if not self.names else []
