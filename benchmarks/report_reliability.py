"""Reliability sections (kill and resume, fault injection, engine equivalence), rendered from their JSON; benchmarks/
report.py collects them into benchmarks/results/reliability.md."""

from __future__ import annotations

import json
from pathlib import Path

from report_fmt import fmt as _fmt


def section_kill_resume(path: Path) -> str:
    d = json.loads(path.read_text())
    m = d["machine"]
    def bucket(phase: str) -> str:
        for start, name in (("during epoch", "during an epoch (rollout, rewards, update)"),
                            ("after epoch", "after an epoch was logged, before its checkpoint"),
                            ("inside a checkpoint write", "inside a checkpoint write")):
            if phase.startswith(start):
                return name
        return phase

    phases: dict = {}
    for k in d["kill_log"]:
        phases[bucket(k["phase"])] = phases.get(bucket(k["phase"]), 0) + 1
    lines = [
        "## Kill and resume: SIGKILL at random moments, then resume",
        "",
        f"Command: `python benchmarks/kill_resume.py --kills {d['kills_requested']} --seed {d['seed']} --epochs "
        f"{d['epochs']}` (writes `benchmarks/results/kill_resume.json`). A small digits run (`{d['command']}`, "
        f"a checkpoint every epoch) runs once uninterrupted ({_fmt(d['uninterrupted_wall_s'], 1)} s), then again "
        f"as a subprocess that is SIGKILLed after a random delay and resumed with `--resume` until "
        f"{d['kills']} kills were made, then finishes. Compared: {d['compared']}. Machine: {m['cpu_count']} CPU "
        f"cores, torch {m['torch']}, {m['threads']} thread.",
        "",
        f"**Result: {d['verdict']}**" + ("" if d["identical"] else ": " + "; ".join(d["differences"][:5])),
        "",
        "| where the kills landed | kills |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v} |" for k, v in sorted(phases.items(), key=lambda kv: -kv[1])]
    lines += ["", f"Total wall time {_fmt(d['total_wall_s'], 0)} s.", ""]
    multi = [(int(k.split("_")[1]), v) for k, v in d.items() if k.startswith("processes_")]
    if multi:
        lines += ["Several processes (`--processes N`: every command under `torchrun --nproc_per_node N` on CPU, each "
                  "kill SIGKILLs one rank chosen at random, the resume runs on N processes):", "",
                  "| processes | kills | verdict | ranks killed | lost |", "|---|---|---|---|---|"]
        for n, r in sorted(multi):
            ranks = sorted({k.get("rank_killed") for k in r["kill_log"]}, key=str)
            lines.append(f"| {n} | {r['kills']} | {r['verdict']} | {', '.join(map(str, ranks))} | "
                         f"{0 if r['identical'] else len(r['differences'])} |")
        lines.append("")
    return "\n".join(lines)


def section_fault_injection(path: Path) -> str:
    d = json.loads(path.read_text())
    m = d["machine"]
    yes = {True: "yes", False: "no"}
    how = " ".join(d["how_loss_is_detected"].split()).replace("* ", "")
    lines = [
        "## Fault injection: nothing saved is lost",
        "",
        f"Command: `python benchmarks/fault_injection.py` (writes `benchmarks/results/fault_injection.json`). Each fault "
        f"is injected into real `critic-align train` runs of the kill/resume command (`{d['command']}`). How loss is "
        f"detected: {how} Machine: {m['cpu_count']} CPU cores, torch {m['torch']}, "
        f"{m['threads']} thread.",
        "",
        (f"**Data lost in {d['data_lost_count']} of {d['faults_count']} faults; a clear error in "
         f"{d['clear_errors_where_an_error_is_expected']} of the {d['faults_that_should_error']} faults that should "
         f"error; the right silent recovery or report (SIGKILL: an exact resume; a collapse: a warning and summary.json; "
         f"stalled uploads: a real request served) in {d['clear_error_count'] - d['clear_errors_where_an_error_is_expected']}"
         f" of the other {d['faults_count'] - d['faults_that_should_error']}; best/ kept in every collapse: "
         f"{yes[d['best_checkpoint_kept']]}.**") if "faults_that_should_error" in d else
        (f"**Data lost in {d['data_lost_count']} of {d['faults_count']} faults; a clear error (or, for SIGKILL, an exact "
         f"silent resume) in {d['clear_error_count']} of {d['faults_count']}.**"),
        "",
        "| fault | data lost | clear error | what the run said |",
        "|---|---|---|---|",
    ]
    for f in d["faults"]:
        said = f.get("stderr") or f.get("second_stderr") or f.get("first_stderr") or f.get("resume_stderr") \
            or f.get("verdict") or f.get("note") or ""
        said = " ".join(said) if isinstance(said, list) else said
        said = said.replace("|", "\\|").replace("\n", " ")
        if len(said) > 220:
            said = said[:220] + " …"
        lines.append(f"| {f['fault']} | {yes[f['data_lost']]} | {yes[f['clear_error']]} | {said} |")
    lines += ["", f"Total wall time {_fmt(d['total_wall_s'], 0)} s.", ""]
    return "\n".join(lines)


def section_engine_equivalence(path: Path) -> str:
    """``engine_equivalence_after.json`` against ``engine_equivalence_before.json`` beside it (the script's
    ``--compare``): per config, whether every logged row and the final weights' digest are the same."""
    after = json.loads(path.read_text())
    before_path = path.with_name(path.name.replace("_after", "_before"))
    before = json.loads(before_path.read_text()) if before_path.exists() else {"runs": {}}
    s = after["settings"]
    lines = [
        "## Engine equivalence: the same seed gives the same numbers after a restructure",
        "",
        f"Command: `python benchmarks/engine_equivalence.py --out benchmarks/results/{path.name} --compare "
        f"benchmarks/results/{before_path.name}` (the `_before` file was written by the code before the restructure). "
        f"A tiny run per config ({s['num_epochs']} epochs of {s['batch_size']} samples in groups of {s['group_size']}, "
        f"{s['num_inference_steps']} steps, {s['value_pretrain_epochs']} value-pretraining batch): every metrics.jsonl "
        "row without its timings, and a SHA-256 digest of the final trainable tensors.",
        "",
        "| config | rows | rows identical | weights digest before | after | identical |",
        "|---|---|---|---|---|---|",
    ]
    for config, run in after["runs"].items():
        old = before["runs"].get(config)
        same_rows = old is not None and old["rows"] == run["rows"]
        same = old is not None and old == run
        lines.append(f"| {config} | {len(run['rows'])} | {'yes' if same_rows else 'no'} | "
                     f"`{old['weights'] if old else 'n/a'}` | `{run['weights']}` | {'yes' if same else 'no'} |")
    n_same = sum(before["runs"].get(c) == r for c, r in after["runs"].items())
    lines += ["", f"**{n_same} of {len(after['runs'])} configs identical.**", ""]
    return "\n".join(lines)
