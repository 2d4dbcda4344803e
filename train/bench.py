"""``critic-align bench``: run the benchmark scripts of a source checkout, then re-render BENCHMARKS.md.

    critic-align bench gmm                # exact Gaussian-mixture suite: critic accuracy, fine-tuning, steering (≈ 6 min)
    critic-align bench digits-steering    # reward vs NFE on digits (≈ 15 min)
    critic-align bench t2i-steering       # reward vs NFE on the tiny text-to-image task (≈ 30 min, one core)
    critic-align bench report             # only re-render BENCHMARKS.md from benchmarks/results/*.json

Each script writes its JSON + PNG under benchmarks/results/ (names in BENCHMARKS.md); extra arguments after
``--`` go to every script of the suite (e.g. ``-- --seed 1``).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

SUITES = {
    "gmm": ["gmm_critic.py", "gmm_finetune.py", "gmm_steering.py"],
    "digits-steering": ["digits_steering.py"],
    "digits-advantages": ["digits_advantages.py"],
    "t2i-steering": ["t2i_steering.py"],
    "report": [],
}


def benchmarks_dir() -> Path:
    path = Path(__file__).resolve().parents[1] / "benchmarks"
    if not (path / "report.py").exists():
        raise SystemExit("`critic-align bench` runs the scripts in a source checkout's benchmarks/ folder, which this "
                         f"installation does not have ({path}); clone the repository and `pip install -e .`")
    return path


def cmd_bench(args) -> int:
    bench = benchmarks_dir()
    extra = [a for a in (args.rest or []) if a != "--"]
    for script in SUITES[args.suite]:
        t0 = time.time()
        print(f"== {script} {' '.join(extra)}", flush=True)
        rc = subprocess.call([sys.executable, str(bench / script), *extra], cwd=bench.parent)
        if rc != 0:
            print(f"{script} failed with exit code {rc}", file=sys.stderr)
            return rc
        print(f"== {script} done in {time.time() - t0:.0f} s", flush=True)
    rc = subprocess.call([sys.executable, str(bench / "report.py")], cwd=bench.parent)
    print("BENCHMARKS.md re-rendered" if rc == 0 else "report.py failed")
    return rc


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="run a benchmark suite (gmm, digits-steering, ...) and re-render BENCHMARKS.md")
    p.add_argument("suite", choices=list(SUITES))
    p.add_argument("rest", nargs="*", help="arguments passed to each script (after --)")
    p.set_defaults(fn=cmd_bench)
