"""Render the benchmark pages from the JSON files the benchmarks wrote (no hand-typed numbers).

    python benchmarks/report.py            # rewrites BENCHMARKS.md and benchmarks/results/<topic>.md

BENCHMARKS.md is the index: per topic a few headline numbers (``report_index``) and a link to the topic's full page,
``benchmarks/results/<topic>.md``, which holds every section of that topic (the ``report_<topic>`` modules render them,
each a function of its JSON) and the topic's part of benchmarks/NOTES.md. The pages live beside the JSON and PNG they
render, so their image links are relative to benchmarks/results/. This module imports the renderers; no renderer
imports it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from report_ceiling import answer as ceiling_answer
from report_ceiling import section_ceiling, section_grafted
from report_critic import section_critic_quality, section_gmm_critic
from report_gpu import section_gpu_check, section_gpu_throughput
from report_index import HEADLINES
from report_perf import (
    section_critic_modes,
    section_perf,
    section_scaleout,
    section_scaleout_engines,
    section_scaling,
    section_speed_defaults,
    section_trl_compare,
)
from report_reliability import section_engine_equivalence, section_fault_injection, section_kill_resume
from report_steering import section_digits_steering, section_gmm_steering, section_t2i_steering, section_t2i_steering_flops
from report_t2i import section_t2i_advantages, section_t2i_critic_offline
from report_training import (
    section_advantages,
    section_baselines,
    section_dit_job,
    section_diversity_tradeoff,
    section_gmm_finetune,
    section_main_job,
    section_reward_hacking,
    section_sde_window,
)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
NOTES = ROOT / "benchmarks" / "NOTES.md"
INDEX = ROOT / "BENCHMARKS.md"

Section = Callable[[Path], str]


@dataclass(frozen=True)
class Topic:
    """One page: its title, the one-line summary the index shows, its sections as (JSON under benchmarks/results/,
    renderer) in page order, and the sections rendered even while their JSON is missing (they then say so)."""

    name: str
    title: str
    summary: str
    sections: tuple[tuple[str, Section], ...]
    always: tuple[tuple[str, Section], ...] = ()

    @property
    def page(self) -> Path:
        return RESULTS / f"{self.name}.md"


TOPICS = {t.name: t for t in (
    Topic("critic", "The critic: what a perfect one buys, and how well the learned one fits",
          "The oracle ceiling per task, the grafted critic, critic quality after value pretraining, and the critic's "
          "accuracy against the exact mixture value.",
          (("critic_ceiling.json", section_ceiling), ("critic_grafted.json", section_grafted),
           ("critic_quality.json", section_critic_quality), ("gmm_critic.json", section_gmm_critic))),
    Topic("training", "Training: the main jobs, advantage estimators and RL algorithms",
          "The README's main job and its DiT twin, GAE vs GRPO vs DDPO at an equal budget, reward vs diversity, the "
          "strongest baselines (GRPO, DiffusionNFT, AWM), the exact mixture's tilted target, reward hacking and the SDE "
          "window.",
          (("main_job/summary.json", section_main_job), ("dit_job/summary.json", section_dit_job),
           ("digits_advantages.json", section_advantages), ("diversity_tradeoff.json", section_diversity_tradeoff),
           ("baselines.json", section_baselines), ("gmm_finetune.json", section_gmm_finetune),
           ("reward_hacking.json", section_reward_hacking), ("sde_window.json", section_sde_window))),
    Topic("steering", "Steering with the critic: the exact mixture and digits",
          "SMC potentials against the exact tilted target, and reward vs NFE on digits.",
          (("gmm_steering.json", section_gmm_steering), ("digits_steering.json", section_digits_steering))),
    Topic("t2i", "The tiny text-to-image task",
          "GAE vs GRPO vs DDPO on `composition` (SD and SD3 twins), the offline critic fit, steering the pipeline, and "
          "the SDE window there.",
          (("t2i_advantages.json", section_t2i_advantages), ("t2i_sd3_advantages.json", section_t2i_advantages),
           ("t2i_critic_offline.json", section_t2i_critic_offline),
           ("t2i_critic_offline_x0.json", section_t2i_critic_offline),
           ("t2i_sd3_critic_offline.json", section_t2i_critic_offline),
           ("t2i_sd3_critic_offline_x0.json", section_t2i_critic_offline),
           ("t2i_steering.json", section_t2i_steering), ("t2i_steering_x0.json", section_t2i_steering),
           ("t2i_steering_flops.json", section_t2i_steering_flops),
           ("t2i_steering_grafted.json", section_t2i_steering),
           ("t2i_steering_grafted_flops.json", section_t2i_steering_flops),
           ("sde_window_t2i.json", section_sde_window))),
    Topic("perf", "Performance: speed, memory, scale-out and the GPU",
          "Throughput and memory against TRL, the speed defaults, critic modes, where the time went, scaling with batch "
          "and size, 1 vs 2 processes, and the GPU check on an H200.",
          (("trl_compare.json", section_trl_compare), ("speed_defaults.json", section_speed_defaults),
           ("critic_modes.json", section_critic_modes), ("perf.json", section_perf), ("scaling.json", section_scaling),
           ("scaleout.json", section_scaleout), ("scaleout_engines.json", section_scaleout_engines)),
          always=(("gpu_check.json", section_gpu_check), ("gpu_throughput.json", section_gpu_throughput))),
    Topic("reliability", "Reliability: kill and resume, fault injection, engine equivalence",
          "SIGKILL at random moments then resume, injected faults with nothing saved lost, and the same numbers for the "
          "same seed across an engine restructure.",
          (("kill_resume.json", section_kill_resume), ("fault_injection.json", section_fault_injection),
           ("engine_equivalence_after.json", section_engine_equivalence))),
)}

# which topic page each "## Reading ..." part of benchmarks/NOTES.md belongs to
NOTES_TOPIC = {
    "Reading the oracle ceiling and the grafted critic": "critic",
    "Reading the digits comparison": "training",
    "Reading the SDE window": "training",
    "Reading the diversity trade-off": "training",
    "Reading the baselines": "training",
    "Reading the steering results": "steering",
    "Reading the t2i task": "t2i",
}


def notes_by_topic(path: Path = NOTES) -> dict[str, str]:
    """benchmarks/NOTES.md cut at its ``## `` headings, each part joined to its topic's text (in file order)."""
    parts: dict[str, str] = {}
    if not path.exists():
        return parts
    chunks = re.split(r"(?m)^(?=## )", path.read_text())
    for chunk in chunks:
        if not chunk.strip():
            continue
        heading = chunk.splitlines()[0][3:].strip()
        if heading not in NOTES_TOPIC:
            raise ValueError(f"benchmarks/NOTES.md: the part {heading!r} belongs to no topic; add it to NOTES_TOPIC in "
                             f"benchmarks/report.py (topics: {', '.join(TOPICS)})")
        topic = NOTES_TOPIC[heading]
        parts[topic] = parts.get(topic, "") + chunk
    return parts


def _relative_to_results(text: str) -> str:
    """Image and file links of a section name paths from the checkout's root; a page in benchmarks/results/ needs
    them relative to itself (inline code, e.g. commands, keeps the root-relative path that a shell needs)."""
    return text.replace("](benchmarks/results/", "](")


def render_page(topic: Topic, notes: str = "") -> str:
    parts = [f"# {topic.title}", "",
             "[All benchmarks](../../BENCHMARKS.md). Every number below is rendered by `python benchmarks/report.py` "
             "from the JSON a benchmark script wrote; rerun the script named in each section to reproduce it.", ""]
    if topic.name == "critic":
        parts.append(ceiling_answer(RESULTS))
    for name, fn in topic.sections:
        path = RESULTS / name
        if path.exists():
            parts.append(fn(path))
    # rendered also while their JSON is missing: then they say the script is ready and has not been run yet
    parts += [fn(RESULTS / name) for name, fn in topic.always]
    if notes:
        parts.append(notes)
    return _relative_to_results("\n".join(parts))


def render_index() -> str:
    lines = ["# Benchmarks", "",
             "Every number here and on the topic pages is rendered by `python benchmarks/report.py` from the JSON a "
             "benchmark script wrote under `benchmarks/results/` (`critic-align bench report` does the same). Each topic "
             "below shows its headline numbers; its page holds every section: the command that reproduces it, the "
             "machine, the full tables and plots, and how to read them.", ""]
    for topic in TOPICS.values():
        page = topic.page.relative_to(ROOT).as_posix()
        lines += [f"## {topic.title}", "", f"{topic.summary} Full page: [{page}]({page}).", ""]
        lines += HEADLINES[topic.name](RESULTS)
        lines.append("")
    return "\n".join(lines)


def write_topic(name: str) -> Path:
    """Re-render one topic's page and the index (whose headlines read the same JSON)."""
    if name not in TOPICS:
        raise ValueError(f"unknown benchmark topic {name!r}; the topics are {', '.join(TOPICS)}")
    topic = TOPICS[name]
    topic.page.write_text(render_page(topic, notes_by_topic().get(name, "")))
    INDEX.write_text(render_index())
    return topic.page


def main() -> str:
    notes = notes_by_topic()
    for topic in TOPICS.values():
        topic.page.write_text(render_page(topic, notes.get(topic.name, "")))
    text = render_index()
    INDEX.write_text(text)
    return text


if __name__ == "__main__":
    print(main())
