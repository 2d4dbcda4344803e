"""Publishing a run's policy LoRA: a model card (``README.md``) beside the weights, and a push to the Hugging Face hub.

The card says what the LoRA is (base model, task, rewards and their weights, algorithm, epochs, reward queries,
sampler, LoRA shape), what the run measured (before / after: the held-out evaluation and the training reward, from
the run's ``summary.json`` or, for a run that did not finish, its ``metrics.jsonl``) and shows its sample grids.
The metrics table has one row per metric, ``| name | before | after |``; :func:`read_card_metrics` reads it back.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

CARD_METRICS_HEADER = "| metric | before | after |"
_GRIDS = (("grid_before.png", "base model (before training)"), ("grid_after.png", "policy (after training)"),
          ("samples.png", "`critic-align sample --run`"))
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def run_metrics(run_dir) -> tuple[list[tuple[str, float | None, float | None]], str]:
    """(metric, before, after) rows of a run and where they come from.  Before / after: the held-out evaluation's
    first (the base policy) and last rows (``eval/...``), then each training reward's first and last epoch."""
    run_dir = Path(run_dir)
    summary_file = run_dir / "summary.json"
    rows: list[tuple[str, float | None, float | None]] = []
    if summary_file.exists():
        summary, source = json.loads(summary_file.read_text()), "summary.json"
        for k, v in summary.items():
            if k.startswith("eval/") and k.endswith("_base"):
                rows.append((k[: -len("_base")], v, summary.get(k[: -len("_base")] + "_final")))
        for k, v in summary.items():
            if k.endswith("_first_epoch"):
                rows.append((f"train/{k[: -len('_first_epoch')]}", v, summary.get(k[: -len("_first_epoch")] + "_last_epoch")))
        return rows, source
    metrics = run_dir / "metrics.jsonl"
    if not metrics.exists():
        return rows, "no metrics (neither summary.json nor metrics.jsonl in the run directory)"
    logged = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
    evals = [r for r in logged if r.get("phase") == "eval"]
    if evals:
        rows += [(k, evals[0][k], evals[-1].get(k)) for k in evals[0] if k.startswith("eval/")]
    train = [r for r in logged if r.get("phase") == "train"]
    if train:
        rows += [(f"train/{k[len('reward/'):-len('/mean')]}", train[0][k], train[-1].get(k))
                 for k in train[0] if k.startswith("reward/") and k.endswith("/mean")]
    return rows, "metrics.jsonl (the run has no summary.json: it did not finish)"


def _fmt(v) -> str:
    return "–" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)


def _reward_rows(rewards) -> list[tuple[str, float, str]]:
    out = []
    for r in rewards or []:
        if isinstance(r, str):
            out.append((r, 1.0, ""))
        else:
            r = dict(r)
            name, weight = r.pop("name"), r.pop("weight", 1.0)
            out.append((name, weight, ", ".join(f"{k}={v}" for k, v in r.items())))
    return out


def _hub_base_model(model_path) -> str | None:
    """A hub model id for the card's ``base_model`` field (a local directory is not one)."""
    if not model_path or Path(str(model_path)).exists() or str(model_path).startswith((".", "/")):
        return None
    return str(model_path) if _REPO_ID.match(str(model_path)) else None


def write_model_card(out_dir, run_dir, run: dict, state: dict, task: str, checkpoint) -> Path:
    """``out_dir/README.md`` for the LoRA exported from ``checkpoint`` of ``run_dir``; copies the run's grids beside it.

    ``run``: the run's ``run.json`` (task, model_path, rewards, eval_rewards); ``state``: the checkpoint's state
    (its ``config`` and ``epoch`` / ``reward_queries``)."""
    out_dir, run_dir = Path(out_dir), Path(run_dir)
    cfg = state.get("config", {})
    base = run.get("model_path") or run.get("base_model") or "(the task's default base model)"
    hub_base = _hub_base_model(run.get("model_path"))
    front = ["---", "library_name: diffusers", "tags:", "- lora", "- text-to-image", "- critic-align",
             f"- {task}"]
    if hub_base:
        front.append(f"base_model: {hub_base}")
    front.append("---")
    rows, source = run_metrics(run_dir)
    flow = task in ("sd3", "flux")
    noise = f"SDE noise level {cfg.get('sde_noise_level')}" if flow else f"DDIM eta {cfg.get('eta')}"
    lines = front + [
        "", f"# {run_dir.name}: a policy LoRA trained with critic-align", "",
        f"- **Base model:** `{base}` (task `{task}`)",
        f"- **Algorithm:** advantage `{cfg.get('advantage')}`, update `{cfg.get('algorithm', 'ppo')}`, "
        f"learning rate {cfg.get('learning_rate')}",
        f"- **Steps:** {state.get('epoch')} epochs, {state.get('reward_queries')} reward queries "
        f"(checkpoint `{Path(checkpoint).name}`)",
        f"- **Sampler:** {cfg.get('num_inference_steps')} steps, {noise}, guidance scale {cfg.get('guidance_scale')}",
        f"- **LoRA:** rank {cfg.get('lora_rank')}, alpha {cfg.get('lora_alpha')}, on "
        f"{', '.join(f'`{m}`' for m in cfg.get('lora_target_modules') or [])}",
        "", "## Rewards", "", "| reward | weight | options |", "| --- | --- | --- |",
    ]
    lines += [f"| {n} | {w} | {o} |" for n, w, o in _reward_rows(run.get("rewards"))]
    if run.get("eval_rewards"):
        lines += ["", "Reported, not trained on: " + ", ".join(f"`{n}`" for n, _, _ in _reward_rows(run["eval_rewards"]))]
    lines += ["", "## Metrics", "", f"Before = the base policy, after = the trained policy (from the run's {source}).",
              "", CARD_METRICS_HEADER, "| --- | --- | --- |"]
    lines += [f"| {k} | {_fmt(b)} | {_fmt(a)} |" for k, b, a in rows]
    grids = []
    for name, what in _GRIDS:
        if (run_dir / name).exists():
            shutil.copy(run_dir / name, out_dir / name)
            grids.append(f"![{what}]({name})  \n*{what}*")
    if grids:
        lines += ["", "## Samples", ""] + [g + "\n" for g in grids]
    pipe_cls = {"sd15": "StableDiffusionPipeline", "sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}[task]
    lines += ["", "## Use", "", "```python", f"from diffusers import {pipe_cls}", "",
              f"pipe = {pipe_cls}.from_pretrained({str(base)!r})", "pipe.load_lora_weights('<this repository or folder>')",
              "```", ""]
    path = out_dir / "README.md"
    path.write_text("\n".join(lines))
    return path


def read_card_metrics(card) -> dict[str, tuple[float | None, float | None]]:
    """The metrics table of a model card written by :func:`write_model_card`: {metric: (before, after)}."""
    text = Path(card).read_text() if not isinstance(card, str) or "\n" not in card else card
    lines = text.splitlines()
    start = lines.index(CARD_METRICS_HEADER) + 2
    out = {}
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        name, before, after = (c.strip() for c in line.strip("|").split("|"))
        out[name] = tuple(None if c == "–" else float(c) for c in (before, after))
    return out


def check_push(repo_id: str, token: str | None = None) -> str:
    """Everything a push needs, checked before anything is read or written: huggingface_hub installed, a repo id
    ``owner/name`` and a token (``--hub-token``, ``HF_TOKEN`` or ``huggingface-cli login``).  Returns the token."""
    if not _REPO_ID.match(repo_id or ""):
        raise ValueError(f"--push-to-hub {repo_id!r} is not a hub repository id: use owner/name, e.g. me/sd15-pickscore-lora")
    try:
        import huggingface_hub
    except ImportError as exc:
        raise SystemExit("--push-to-hub needs huggingface_hub: pip install 'critic-align[hub]'") from exc
    token = token or os.environ.get("HF_TOKEN") or huggingface_hub.get_token()
    if not token:
        raise SystemExit("--push-to-hub: no Hugging Face token; run `huggingface-cli login`, set HF_TOKEN or pass "
                         "--hub-token (nothing was written or pushed)")
    return token


def push_to_hub(folder, repo_id: str, token: str, private: bool = False) -> str:
    """Create ``repo_id`` (a model repository; kept if it exists) and upload ``folder`` to it; returns its URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                      commit_message="critic-align export-lora: policy LoRA and model card")
    return str(url)
