"""GPU sections (benchmarks/gpu_check.py, benchmarks/gpu_throughput.py), rendered from their JSON; both render a note
while their JSON is missing. benchmarks/gpu_check.py imports GOALS from here (the section marks missed goals)."""

from __future__ import annotations

import json
import re
from pathlib import Path


def error_line(msg: str | None) -> str:
    """The line of a failure message that names the error (pytest's messages start with the assertion)."""
    lines = [ln.strip() for ln in (msg or "").splitlines() if ln.strip()]
    return next((ln for ln in lines if re.search(r"(\w+Error|error): ", ln)), lines[0] if lines else "")


GOALS = {"sd15_vs_trl": (">=", 1.5), "sd15_peak_mem_vs_trl": ("<=", 1.0), "gae_vs_grpo_epoch": ("<=", 1.15),
         "cuda_tests_failed": ("<=", 0)}


def section_gpu_check(path: Path) -> str:
    head = ["## The GPU check (CUDA tests, full-size throughput and memory)", ""]
    path = Path(path)
    if not path.exists():
        return "\n".join(head + ["`benchmarks/gpu_check.py` has not run on a GPU yet (no GPU was lent where this "
                                 "project was built); its `--tiny --device cpu` rehearsal is tested.", ""])
    d = json.loads(path.read_text())
    dev = d["device"]
    lines = head + [f"Command: `{d['command']}` on **{dev['name']}**, {d['wall_time_s'] / 60:.1f} min in all "
                    f"(torch {d['versions']['torch']}, diffusers {d['versions']['diffusers']}).", ""]
    if d.get("tiny"):
        lines += ["*Tiny models: a rehearsal of the script, not a measurement.*", ""]
    lines += ["| measure | value | goal |", "|---|---|---|"]
    at_trl = d.get("sd15_at_trl_memory") or {}
    extra = {f"sd15_at_trl_memory.{k}": at_trl[k] for k in ("micro_batch_memory_mb", "vs_trl", "peak_mem_vs_trl")
             if k in at_trl}
    d = {**d, **extra}
    for k in ("cuda_tests_passed", "cuda_tests_failed", "sd15_vs_trl", "sd15_peak_mem_vs_trl", *extra,
              "gae_vs_grpo_epoch", "flux_step_fits", "flux_step_variant", "flux_step_error", "flux_step_peak_memory_mb"):
        if k in d:
            v = d[k]
            goal = GOALS.get(k)
            met = "" if goal is None else (" ✓" if (v >= goal[1] if goal[0] == ">=" else v <= goal[1]) else " ✗ (missed)")
            val = f"{v:.2f}" if isinstance(v, float) else str(v)
            lines.append(f"| `{k}` | {val} | {'' if goal is None else goal[0] + ' ' + str(goal[1]) + met} |")
    for res, row in sorted(d.get("sd35m_img_per_s", {}).items(), key=lambda kv: int(kv[0])):
        lines.append(f"| SD3.5-M images/s (GRPO epoch) at {res}² | "
                     + ", ".join(f"{k.replace('_', ' ')} {v:.2f}" for k, v in sorted(row.items())) + " | — |")
    lines.append("")
    p = d["parts"]
    if p.get("tests", {}).get("failures"):
        lines += ["Failed CUDA tests:", ""] + [f"- `{k}`: {error_line(v)[:300]}"
                                               for k, v in p["tests"]["failures"].items()] + [""]
    ep = p.get("sd15", {}).get("epoch", {})
    gt_file = path.parent / p.get("sd15", {}).get("gpu_throughput", "gpu_throughput.json")
    if {"trl", "ddpo", "grpo", "gae"} <= ep.keys() and gt_file.exists():
        ph = {k: v["phases"] for k, v in json.loads(gt_file.read_text())["models"]["sd15"]["sides"].items()}
        t, o, g = ph["trl"], ph["ddpo"], ph["gae"]
        lines += [
            f"Why (the phases in `{gt_file.name}`): our update takes {o['update']['seconds']:.1f} s at a "
            f"{o['update']['peak_memory_mb'] / 1024:.1f} GB peak against TRL's {t['update']['seconds']:.1f} s at "
            f"{t['update']['peak_memory_mb'] / 1024:.1f} GB; rollouts are level ({o['rollout']['seconds']:.2f} s vs "
            f"{t['rollout']['seconds']:.2f} s). Our `micro_batch_size: auto` sizes micro-batches from half the GPU's "
            "free memory on CUDA, so on a 141 GB card it forwards many pairs at once: faster, and more memory than "
            "TRL's fixed `train_batch_size`; `micro_batch_memory_mb` bounds it (the next table). "
            f"GAE over GRPO: the critic's values add {g['rollout']['seconds'] - ph['grpo']['rollout']['seconds']:.2f} s "
            f"to the rollout and its value loss {g['update']['seconds'] - ph['grpo']['update']['seconds']:.2f} s to the "
            "update (the critic LoRA's forward and backward on every pair).", ""]
    mem = p.get("sd15_mem", {})
    if mem.get("budgets") and mem.get("trl"):
        trl = mem["trl"]
        lines += [f"Our ddpo side under an activation budget per micro-batch (`micro_batch_memory_mb`), against TRL's "
                  f"row above ({trl['samples_per_s']:.2f} samples/s at {trl['peak_memory_mb'] / 1024:.1f} GB; "
                  "measured in an earlier lease of the same kind of GPU):", "",
                  "| micro_batch_memory_mb | samples/s | peak GB | × TRL's samples/s | × TRL's peak memory |",
                  "|---|---|---|---|---|"]
        for mb, r in sorted(mem["budgets"].items(), key=lambda kv: float(kv[0])):
            lines.append(f"| {mb} | {r['samples_per_s']:.2f} | {r['peak_memory_mb'] / 1024:.1f} | "
                         f"{r.get('vs_trl', float('nan')):.2f} | {r.get('peak_mem_vs_trl', float('nan')):.2f} |")
        lines.append("")
    fl = p.get("flux", {})
    if fl.get("variants"):
        lines += ["FLUX.1-dev-size step, each variant in its own process until one fits:", ""]
        for name, r in fl["variants"].items():
            what = (f"fits: {r['epoch_s_including_warmup']:.1f} s epoch, {r['peak_memory_mb'] / 1024:.1f} GB peak"
                    if r.get("fits") else r.get("skipped") or error_line(r.get("failed"))[:200])
            lines.append(f"- `{name}`: {what}")
        lines.append("")
    for part, r in p.items():
        if r.get("skipped") or r.get("error"):
            lines.append(f"- part `{part}`: {(r.get('skipped') or r['error']).splitlines()[0][:300]}")
    if "sd3" in p and "runs" in p["sd3"]:
        lines += ["", "SD3.5-medium (GRPO, batch {batch}, {steps} steps, CFG {guidance}, T5 zeros):".format(
            **p["sd3"]["settings"]), "", "| run | images/s | peak GB | rollout s | update s |", "|---|---|---|---|---|"]
        for name, r in p["sd3"]["runs"].items():
            if "img_per_s" in r:
                lines.append(f"| {name} | {r['img_per_s']:.2f} | {r['peak_memory_mb'] / 1024:.1f} | "
                             f"{r['rollout_s']:.1f} | {r['update_s']:.1f} |")
            else:
                lines.append(f"| {name} | {(r.get('skipped') or r.get('failed', ''))[-120:]} | | | |")
    lines.append("")
    return "\n".join(lines)


def section_gpu_throughput(path: Path) -> str:
    """The section (benchmarks/results/perf.md): the table from ``gpu_throughput.json`` or, while that file
    does not exist, a note that the script is ready and has not been run on a GPU yet."""
    head = ["## Throughput and GPU memory at full size (SD1.5 UNet, SD3.5-medium transformer)", ""]
    path = Path(path)
    if not path.exists():
        return "\n".join(head + [
            "`benchmarks/gpu_throughput.py` is ready and has **not been run on a GPU yet** (no GPU was available "
            "where this project was built; its `--tiny --device cpu` path is tested). On a CUDA machine, "
            "`python benchmarks/gpu_throughput.py` writes `benchmarks/results/gpu_throughput.json` (samples/s and "
            "peak GPU memory per phase for ddpo / grpo / gae and TRL's DDPOTrainer, bf16, LoRA, gradient "
            "checkpointing, random weights from the published configs) and this section renders it.", ""])
    d = json.loads(path.read_text())
    s = d["settings"]
    dev = d["device"]
    if d.get("tiny"):
        head += ["*Tiny configs (`--tiny`): a check that the script runs, not a measurement of the full-size models.*",
                 ""]
    lines = head + [
        f"Command: `{d['command']}` on **{dev['name']}** ({d['time_s'] / 60:.0f} min in all). Random weights from the "
        f"published configs (SD1.5 UNet / VAE / CLIP-L; SD3.5-medium transformer / VAE / CLIP-L / CLIP-G, T5 dropped), "
        f"{s['dtype']} base, LoRA rank {s['lora_rank']}, gradient checkpointing "
        f"{'on' if s['gradient_checkpointing'] else 'off'}; {s['batch']} samples per epoch in groups of "
        f"{s['group_size']}, {s['steps']} steps, {s['ours_minibatch_pairs']} pairs per optimiser step, median of "
        f"{s['epochs']} epochs after {s['warmup']} warm-up. Peak memory: {d['memory_measure']}.", ""]
    for kind, e in d["models"].items():
        m = s["models"][kind]
        lines += [f"**{kind}** ({m['resolution']} px, CFG {m['guidance']}):", "",
                  "| side | rollout samples/s | update samples/s | epoch samples/s | peak MB rollout | peak MB update "
                  "| vs TRL (epoch samples/s, peak memory) |",
                  "|---|---|---|---|---|---|---|"]
        for side, r in e["sides"].items():
            ph = r["phases"]
            vs = e.get("vs_trl", {}).get(side)
            rel = f"{vs['epoch_samples_per_s']:.2f}×, {vs['peak_memory']:.2f}×" if vs else "—"
            name = "TRL DDPOTrainer" if side == "trl" else f"critic_align {side}"
            lines.append(f"| {name} | {ph['rollout']['samples_per_s']:.2f} | {ph['update']['samples_per_s']:.2f} | "
                         f"{ph['epoch']['samples_per_s']:.2f} | {ph['rollout']['peak_memory_mb']:.0f} | "
                         f"{ph['update']['peak_memory_mb']:.0f} | {rel} |")
        lines.append("")
    if d.get("trl", {}) and d["trl"].get("skipped"):
        lines += [f"TRL not run: {d['trl']['skipped']}.", ""]
    return "\n".join(lines)
