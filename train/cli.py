"""The ``critic-align`` command line.

    critic-align train [--config digits] [--out DIR] [--epochs N] [--set field=value ...] [--resume]
    critic-align sample [--model DIR] [--steps N] [--out grid.png]            the digits base model's ten classes
    critic-align sample --run RUN [--prompt TEXT ...] [--seed S] [--n N]      any trained run, its own sampler
    critic-align pretrain-digits [--out runs/digits_unet] [--steps 2000]     reproduce the shipped base model
    critic-align pretrain-digits-dit [--out runs/digits_dit] [--steps 1500]  reproduce the shipped flow-matching DiT
    critic-align train-classifier [--out runs/digit_classifier]              reproduce the shipped digit classifier
    critic-align evaluate-digits [--model DIR] [--out DIR]                   per-class accuracy + model card
    critic-align pretrain-t2i [--out runs/tiny_t2i]                          reproduce the tiny text-to-image pipeline
    critic-align pretrain-t2i --kind sd3 [--out runs/tiny_t2i_sd3]           ... its flow-matching SD3 twin
    critic-align evaluate-t2i [--model DIR]                                  its composition accuracy + model card
    critic-align export-lora --run RUN_DIR --out DIR             a Stable Diffusion / FLUX run's policy LoRA for
        [--push-to-hub OWNER/NAME]                               pipe.load_lora_weights(DIR) + README.md model card
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def cmd_train(args) -> int:
    from critic_align.api import build_trainer, write_run_dir
    from critic_align.best import CollapseError
    from critic_align.diagnostics import bucket_edges
    from critic_align.launch import check_launch
    from critic_align.runlock import check_free, check_writable
    from critic_align.trackers import check_trackers_installed
    from critic_align.viz import plot_metrics

    from .registry import load_run_config, parse_overrides

    overrides = parse_overrides(args.set)
    if args.out:
        overrides["output_dir"] = args.out
    if args.epochs is not None:
        overrides["num_epochs"] = args.epochs
    run = load_run_config(args.config, overrides)
    cfg = run["ppo"]
    check_launch(cfg)  # launch settings and process counts, before the run directory is touched or a model loads
    check_trackers_installed(cfg.log_with)  # log_with: [wandb] without wandb: refused before anything is touched
    out = Path(cfg.output_dir)
    resume = args.resume or args.resume_from is not None
    check_free(out, "resume" if resume else "write to")  # before anything is built or written
    check_writable(out, "resume" if resume else "write to")
    if out.exists() and (out / "metrics.jsonl").exists() and not resume:
        raise SystemExit(f"{out} already holds a run; pass --resume to continue it or --out to start a new one")
    ckpt = _checkpoint_to_resume(out, args.resume_from) if resume else None
    if ckpt is not None:
        _check_epochs_left(ckpt, cfg.num_epochs)
    trainer = build_trainer(run)
    trainer.lock.take("resume" if resume else "write to")  # held until this process exits
    if trainer.is_main_process:  # what steer / sample / export-lora need to rebuild the run
        write_run_dir(out, run)
    if resume:
        if trainer.is_main_process:
            _set_aside_newer(out, ckpt)
        trainer.load(ckpt)
        if trainer.is_main_process:
            print(f"resumed from {ckpt} (epoch {trainer.epoch})")
    else:
        trainer.save_grid(out / "grid_before.png", use_policy=False)
    start = time.time()
    try:
        trainer.train()
    except CollapseError:  # stop_on_collapse: the summary (with the collapse and best/) is written first
        if trainer.is_main_process:
            summary = run_summary(out, list(trainer.rewards.names), trainer.epoch, trainer.reward_queries, cfg,
                                  trainer.rewards.names)
            (out / "summary.json").write_text(json.dumps(summary, indent=2))
        raise
    trainer.save_grid(out / "grid_after.png")
    if not trainer.is_main_process:  # multi-process (torchrun): only the main process writes outputs
        trainer.processes.close()  # waits for the main process's close below
        return 0
    names = list(trainer.rewards.names) + (list(trainer.eval_rewards.names) if trainer.eval_rewards else [])
    head_ev = [f"value_ev/{n}" for n in trainer.rewards.names] if trainer.critic is not None else []
    held_out = [f"eval/reward/{n}" for n in names] + ["eval/diversity/pairwise_l2", "eval/diversity/pixel_std"]
    plot_metrics(out / "metrics.jsonl", out / "reward_curve.png",
                 [f"reward/{n}/mean" for n in names] + head_ev + held_out, title=f"{cfg.advantage} on {run['task']}")
    if trainer.critic is not None and cfg.eval_every:  # the critic on the held-out batch, per timestep bucket
        buckets = [f"{a}-{b - 1}" for a, b in bucket_edges(cfg.num_inference_steps)]
        plot_metrics(out / "metrics.jsonl", out / "critic_eval.png",
                     ["eval/value_ev"] + [f"eval/value_ev_steps_{b}" for b in buckets]
                     + [f"eval/value_calib_steps_{b}" for b in buckets], title="critic on the held-out batch")
    summary = run_summary(out, names, trainer.epoch, trainer.reward_queries, cfg, trainer.rewards.names)
    summary["this_process_seconds"] = time.time() - start
    summary["device"], summary["num_processes"] = str(trainer.device), trainer.num_processes  # where it ran
    if resume:
        summary["resumed_from"] = str(ckpt)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    trainer.log.close()  # the trackers' runs end (W&B offline: its run directory is complete)
    trainer.lock.release()
    trainer.processes.close()  # several processes: the process group ends together, before the interpreters exit
    return 0


def run_summary(out: Path, names: list[str], epochs: int, reward_queries: int, cfg=None, trained=None) -> dict:
    """summary.json from the whole metrics.jsonl (not this process's history): after a resume, the first epoch is
    still the run's first epoch.  train_seconds sums the logged pretraining iterations and epochs (the time of a
    killed process's unfinished epoch is not in the log).  With the config and the trained rewards' names: the
    ``collapse`` entry (the held-out best_metric's best, its best/ checkpoint and any collapse,
    :func:`critic_align.best.collapse_report`)."""
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    train = [r for r in rows if r.get("phase") == "train"]
    seconds = sum(r.get("time_s", 0) for r in rows if r.get("phase") == "value_pretrain") + \
        sum(r.get("time_epoch_s", 0) for r in train)
    summary = {"run_dir": str(out), "epochs": epochs, "reward_queries": reward_queries, "train_seconds": seconds,
               "logged_epochs": len(train)}
    if train:
        first, last = train[0], train[-1]
        for n in names:
            key = f"reward/{n}/mean"
            summary[f"{n}_first_epoch"] = first.get(key)
            summary[f"{n}_last_epoch"] = last.get(key)
    evals = [r for r in rows if r.get("phase") == "eval"]
    if evals:  # the fixed held-out batch: before PPO (the base policy) and at the last evaluation
        summary["eval_epochs"] = [evals[0]["epoch"], evals[-1]["epoch"]]
        for k in evals[0]:
            if k.startswith("eval/"):
                summary[f"{k}_base"], summary[f"{k}_final"] = evals[0][k], evals[-1].get(k)
    if evals and cfg is not None and trained:
        from critic_align.best import collapse_report, metric_name

        summary["collapse"] = collapse_report(rows, metric_name(cfg.best_metric, trained), cfg.collapse_margin, out)
    return summary


def _checkpoint_to_resume(out: Path, resume_from: str | None) -> Path:
    """--resume-from PATH (it must verify), or the newest checkpoint of the run that verifies; corrupt newer ones
    are set aside (renamed ``corrupt-epoch_*``, kept for inspection) with a message naming each."""
    from critic_align.checkpoint import CheckpointError, find_resumable, set_aside, verify_checkpoint

    if resume_from is not None:
        why = verify_checkpoint(resume_from)
        if why is not None:
            raise CheckpointError(f"--resume-from {resume_from}: {why}")
        return Path(resume_from)
    ckpt, skipped = find_resumable(out / "checkpoints")
    main = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 renames
    for path, why in skipped:
        if ckpt is not None and main:
            dest = set_aside(path, "corrupt")
            print(f"skipping {path.name}: {why}; moved it to {dest.name}", file=sys.stderr)
    if ckpt is None:
        if skipped:
            raise CheckpointError(f"--resume: no checkpoint in {out / 'checkpoints'} verifies: "
                                  + "; ".join(why for _, why in skipped))
        raise SystemExit(f"--resume: no complete checkpoint in {out / 'checkpoints'} (the run stopped before its "
                         f"first one was written); start it again without --resume after removing {out}")
    if skipped:
        print(f"resuming from {ckpt.name}, the newest checkpoint that verifies", file=sys.stderr)
    return ckpt


def _check_epochs_left(ckpt: Path, num_epochs: int) -> None:
    """A resume must have epochs to train: num_epochs below the checkpoint's epoch is refused (a resume cannot go
    back); equal to it trains nothing, and says so (the outputs are rewritten, nothing is trained)."""
    done = int(json.loads((Path(ckpt) / "state.json").read_text())["epoch"])
    if num_epochs < done:
        raise SystemExit(f"--resume: {ckpt} has already trained {done} epochs, more than num_epochs={num_epochs}: a "
                         f"resume cannot go back; pass --epochs N with N > {done} to train further, or --resume-from "
                         "an earlier checkpoint")
    if num_epochs == done:
        print(f"nothing to do: {ckpt} has already trained num_epochs={num_epochs} epochs; pass --epochs N with N > "
              f"{done} to train further (the grids and summary.json are rewritten, nothing is trained)",
              file=sys.stderr)


def _set_aside_newer(out: Path, ckpt: Path) -> None:
    """Resuming from a checkpoint older than the run's newest: the newer checkpoints are renamed
    ``superseded-epoch_*`` and metrics.jsonl is copied, so the resumed run overwrites nothing saved."""
    import shutil

    ckpts = out / "checkpoints"
    if ckpt.resolve().parent not in (ckpts.resolve(), (out / "best").resolve()):
        return
    from critic_align.checkpoint import set_aside

    # checkpoints (and best/) of later epochs than the one resumed from: e.g. --resume-from RUN/best/epoch_X
    newer = sorted(p for d in (ckpts, out / "best") for p in d.glob("epoch_*") if p.is_dir() and p.name > ckpt.name)
    for p in newer:
        dest = set_aside(p, "superseded")
        print(f"{p.relative_to(out)} is newer than {ckpt.name}: moved it to {dest.name}", file=sys.stderr)
    metrics = out / "metrics.jsonl"
    if newer and metrics.exists():
        copy = out / f"metrics.before-resume-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
        shutil.copy(metrics, copy)
        print(f"the rows logged after {ckpt.name} are cut from metrics.jsonl; the full log is kept as {copy.name}",
              file=sys.stderr)


def cmd_sample(args) -> int:
    """A digits grid from a base model, or a grid from a run's policy (any task: digits, tiny t2i, SD1.5, SD3,
    FLUX) with the run's own sampler (steps, noise level, guidance) unless --steps / --eta / --guidance-scale say
    otherwise; ``--prompt`` (repeatable) chooses the rows of a run's grid (default: the task's grid prompts)."""
    if args.run:
        return _sample_run(args)
    if args.prompt:
        raise SystemExit("--prompt needs --run (a trained run); without it `sample` draws the digits base model's "
                         "ten classes")
    import torch

    from critic_align.rollout import cfg_denoiser, sample
    from critic_align.steps import make_step
    from critic_align.tasks.digits import BASE_MODEL_DIR, NULL_CLASS, load_digits_model
    from critic_align.viz import save_grid

    model, scheduler = load_digits_model(args.model or BASE_MODEL_DIR)  # the UNet DDPM or the flow-matching DiT
    steps = args.steps if args.steps is not None else 50
    noise = args.eta if args.eta is not None else 0.0
    guidance = args.guidance_scale if args.guidance_scale is not None else 1.0
    step = make_step(scheduler, noise)  # DDIM (eta) or the flow-matching SDE (its noise level)

    def den(x, t, c):
        return model(x, t, class_labels=c, return_dict=False)[0]

    den = cfg_denoiser(den, guidance, lambda n: torch.full((n,), NULL_CLASS, dtype=torch.long))
    g = torch.Generator().manual_seed(args.seed)
    labels = torch.arange(10).repeat_interleave(args.n)
    x_T = torch.randn((len(labels), 1, 16, 16), generator=g)
    x0 = sample(den, step, x_T, step.schedule.timesteps(steps), labels, generator=g, progress=True)
    path = save_grid(x0.clamp(-1, 1), args.out or Path("runs") / "samples.png", nrow=args.n, labels=list(range(10)))
    print(f"wrote {path} ({steps} steps, noise level {noise}, guidance {guidance})")
    return 0


def _sample_run(args) -> int:
    """``sample --run``: the run's trainer rebuilt from its directory (run.json + config.json, the command line's
    sampler overrides applied), its newest checkpoint's policy loaded, ``--n`` samples per prompt drawn with the
    trainer's own sampler from noise seeded by ``--seed``, written as a grid with one labelled row per prompt."""
    from critic_align.api import load_run, load_run_dir
    from critic_align.checkpoint import find_resumable
    from critic_align.registry import DIGITS_TASKS, SD_TASKS
    from critic_align.viz import save_grid

    if args.model:
        raise SystemExit("--model and --run exclude each other: a run's policy LoRA belongs to the run's base model")
    run_dir = Path(args.run)
    if (run_dir / "state.json").exists():  # a checkpoint directory itself
        ckpt, run_dir = run_dir, run_dir.parent.parent
    else:  # a run: its newest checkpoint that verifies
        ckpt, skipped = find_resumable(run_dir / "checkpoints")
        for path, why in skipped:
            print(f"skipping {path.name}: {why}", file=sys.stderr)
    if ckpt is None:
        raise SystemExit(f"no checkpoint under {run_dir / 'checkpoints'} verifies")
    prompts = list(args.prompt or [])
    for p in prompts:
        if not p.strip():
            raise SystemExit("--prompt is empty: give the text of the prompt, e.g. --prompt 'a red 3 left of a blue 7'")
    overrides = {"progress": False}
    if args.steps is not None:
        overrides["num_inference_steps"] = args.steps
    if args.guidance_scale is not None:
        overrides["guidance_scale"] = args.guidance_scale
    ode = args.eta is not None and args.eta == 0  # the deterministic sampler: not a training config (PPO needs noise)
    if args.eta is not None and not ode:  # the noise level of whichever sampler the run uses: DDIM's eta or the flow SDE's
        overrides.update(eta=args.eta, sde_noise_level=args.eta)
    run = load_run_dir(run_dir, overrides)
    if run["task"] not in DIGITS_TASKS and run["task"] not in SD_TASKS:
        raise SystemExit(f"unknown task {run['task']!r} in {run_dir / 'run.json'}")
    if run["task"] in DIGITS_TASKS:
        from critic_align.tasks.digits import prompts_to_labels

        prompts_to_labels(prompts)  # a digits run's prompts are '0'..'9': refused before the model loads
    # the trainer writes nothing unless asked (its log is lazy); its output_dir stays the run's
    trainer = load_run(run_dir, overrides, ckpt)
    print(f"loaded the policy LoRA of {ckpt}")
    cfg = trainer.config
    rows = prompts or list(trainer.task.grid_prompts)
    if ode:
        import dataclasses

        from critic_align.collect import sample_images

        models = dataclasses.replace(trainer.models, step=trainer.step.ode())
        images = sample_images(models, trainer.task, trainer.timesteps, [p for p in rows for _ in range(args.n)],
                               seed=args.seed)
    else:
        images = trainer.sample([p for p in rows for _ in range(args.n)], seed=args.seed, use_policy=True)
    out = Path(args.out) if args.out else run_dir / "samples.png"
    path = save_grid(images, out, nrow=args.n, labels=rows, scale=trainer.task.grid_scale)
    noise = 0.0 if ode else cfg.sde_noise_level if "Flow" in type(trainer.step).__name__ else cfg.eta
    print(f"wrote {path} ({len(rows)} prompts x {args.n}, {cfg.num_inference_steps} steps, noise level {noise}, "
          f"guidance {cfg.guidance_scale}, seed {args.seed})")
    return 0


def cmd_export_lora(args) -> int:
    """Write a Stable Diffusion / FLUX run's policy LoRA with the pipeline class's own save_lora_weights, a model card
    (README.md) and the run's sample grids beside it; ``--push-to-hub REPO`` uploads that folder."""
    from critic_align.checkpoint import find_resumable, read_checkpoint
    from critic_align.publish import check_push, push_to_hub, write_model_card
    from critic_align.registry import SD_TASKS
    from critic_align.tasks.sd import save_lora

    token = check_push(args.push_to_hub, args.hub_token) if args.push_to_hub else None  # before anything is read
    run_dir = Path(args.run)
    if (run_dir / "state.json").exists():  # a checkpoint directory itself
        ckpt, run_dir = run_dir, run_dir.parent.parent
    else:
        ckpt, skipped = find_resumable(run_dir / "checkpoints")  # the newest checkpoint that verifies
        for path, why in skipped:
            print(f"skipping {path.name}: {why}", file=sys.stderr)
        if ckpt is None:
            raise SystemExit(f"no complete checkpoint that verifies under {run_dir / 'checkpoints'}; pass a run "
                             "directory written by "
                             "`critic-align train` or one of its checkpoints/epoch_* directories")
    info_file = run_dir / "run.json"
    info = json.loads(info_file.read_text()) if info_file.exists() else {}
    task = args.task or info.get("task")
    if task is None:
        raise SystemExit(f"{info_file} is missing, so the run's task is unknown; pass --task {'|'.join(SD_TASKS)}")
    if task not in SD_TASKS:
        raise SystemExit(f"export-lora writes diffusers pipeline LoRA for the Stable Diffusion tasks {sorted(SD_TASKS)}; "
                         f"this run's task is {task!r} (use `critic-align sample --run` for digits runs)")
    tensors, state = read_checkpoint(ckpt)
    cfg = state["config"]
    if cfg.get("policy", "lora") != "lora":
        raise SystemExit(f"{ckpt} is a policy: {cfg['policy']} run: its policy.* tensors are the backbone's full "
                         "weights, not a LoRA adapter, so there is nothing for export-lora to write (load them with the "
                         "model's load_state_dict)")
    policy = {k[len("policy."):]: v for k, v in tensors.items() if k.startswith("policy.")}
    out = save_lora(policy, SD_TASKS[task], args.out, cfg["lora_rank"], cfg["lora_alpha"], cfg["lora_target_modules"])
    card = write_model_card(out, run_dir, info, state, task, ckpt)
    print(f"wrote the policy LoRA of {ckpt} to {out} with its model card {card.name}; load it with {task} pipelines' "
          f"pipe.load_lora_weights({str(out)!r})")
    if args.push_to_hub:
        url = push_to_hub(out, args.push_to_hub, token, private=args.private)
        print(f"pushed {out} to {url}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="critic-align", description="Align diffusion models with a latent critic.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="post-train a model with value pretraining + PPO (gae | grpo | ddpo)")
    p.add_argument("--config", default="digits", help="a named config in train/configs or a YAML path")
    p.add_argument("--out", help="run directory (overrides ppo.output_dir)")
    p.add_argument("--epochs", type=int, help="overrides ppo.num_epochs")
    p.add_argument("--set", action="append", metavar="FIELD=VALUE", help="override any PPOConfig field")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its newest checkpoint that verifies")
    p.add_argument("--resume-from", metavar="PATH", help="continue the run in --out from this checkpoint directory")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("sample", help="draw a PNG grid (one row per prompt / digit) from a model or a trained run")
    p.add_argument("--model", default=None, help="base model directory: the digits UNet (default) or a DiT such as "
                   "critic_align/assets/digits_dit")
    p.add_argument("--run", default=None, help="a run directory or checkpoint: its policy LoRA, base model and sampler")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the run's; 50 without --run)")
    p.add_argument("--eta", type=float, default=None, help="noise level: DDIM's eta or the flow SDE's noise level; 0 = "
                   "the deterministic DDIM / Euler ODE (default: the run's eta / sde_noise_level; 0 without --run)")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="classifier-free guidance scale (default: the run's; 1 = none without --run)")
    from .steer import _int_at_least

    p.add_argument("--prompt", action="append", default=None, metavar="TEXT",
                   help="with --run: a prompt of the grid, one row each (repeatable; a digits run's prompts are '0'..'9'; "
                   "default: the task's grid prompts)")
    p.add_argument("--n", "--per-class", dest="n", type=_int_at_least(1), default=8,
                   help="samples per prompt / digit (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise and the sampler (default %(default)s)")
    p.add_argument("--out", default=None, help="the PNG (default: RUN/samples.png with --run, else runs/samples.png)")
    p.set_defaults(fn=cmd_sample)

    p = sub.add_parser("export-lora", help="write a Stable Diffusion / FLUX run's policy LoRA for "
                       "pipe.load_lora_weights(DIR), with a model card; --push-to-hub publishes it")
    p.add_argument("--run", required=True, help="a run directory (its latest checkpoint) or a checkpoint directory")
    p.add_argument("--out", required=True, help="output directory (gets pytorch_lora_weights.safetensors)")
    p.add_argument("--task", default=None, choices=("sd15", "sd3", "flux"),
                   help="the run's task (default: from its run.json)")
    p.add_argument("--push-to-hub", metavar="REPO", default=None,
                   help="upload the folder (LoRA, model card, grids) to this hub model repository, owner/name "
                   "(needs huggingface_hub: pip install 'critic-align[hub]', and a token)")
    p.add_argument("--hub-token", default=None, help="the hub token (default: HF_TOKEN or `huggingface-cli login`)")
    p.add_argument("--private", action="store_true", help="create the hub repository private")
    p.set_defaults(fn=cmd_export_lora)

    from .steer import add_parser as add_steer_parser

    add_steer_parser(sub)
    from .bench import add_parser as add_bench_parser

    add_bench_parser(sub)

    from . import evaluate_digits, evaluate_t2i, pretrain_digits, pretrain_digits_dit, train_classifier, train_t2i

    for name, module, help_ in [
        ("pretrain-digits", pretrain_digits, "train the embedded digits DDPM (reproduces the shipped one)"),
        ("pretrain-digits-dit", pretrain_digits_dit,
         "train the embedded flow-matching digits DiT (reproduces the shipped one)"),
        ("train-classifier", train_classifier, "train the embedded digit classifier"),
        ("evaluate-digits", evaluate_digits, "per-class accuracy of a digits model + its model card"),
        ("pretrain-t2i", train_t2i, "train the tiny text-to-image pipeline (reproduces critic_align/assets/tiny_t2i)"),
        ("evaluate-t2i", evaluate_t2i, "composition accuracy of a tiny text-to-image pipeline + its model card"),
    ]:
        p = sub.add_parser(name, help=help_, description=module.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(fn=lambda args, module=module: (module.run(args), 0)[1])
    return parser


def main(argv=None) -> int:
    argv = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--debug"]  # cli() handles --debug
    args = build_parser().parse_args(argv)
    return args.fn(args)


def cli(argv=None) -> int:
    """The ``critic-align`` entry point: :func:`main` with every error as one clean line on stderr and exit code 2
    (1 for an unexpected exception); ``--debug`` anywhere on the line shows the traceback instead."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        return main(argv)
    except Exception as exc:
        if debug:
            raise
        return _report(exc)
    except SystemExit as exc:
        if debug or not isinstance(exc.code, str):  # argparse's own exits (usage errors: 2, --help: 0) pass
            raise
        return _report(exc)


# Errors that are the user's input or environment, reported as one line (exit 2); any other exception is a bug
# (or an unforeseen case): one line too, with its type, exit 1; --debug shows the traceback of either.
def _user_error_types() -> tuple:
    from critic_align.best import CollapseError
    from critic_align.checkpoint import CheckpointError
    from critic_align.guard import DivergenceError
    from critic_align.rewards import RewardError
    from critic_align.runlock import RunLockedError

    return (ValueError, TypeError, FileNotFoundError, NotADirectoryError, PermissionError, CheckpointError,
            RewardError, RunLockedError, DivergenceError, CollapseError, SystemExit)


def _report(exc: BaseException) -> int:
    import errno

    msg = str(exc.code) if isinstance(exc, SystemExit) else str(exc)
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        print(f"critic-align: error: the disk is full ({exc}); free disk space, then continue the run with --resume "
              "(a half-written checkpoint or log row is never picked up)", file=sys.stderr)
        return 2
    if isinstance(exc, _user_error_types()):
        print(f"critic-align: error: {msg}", file=sys.stderr)
        return 2
    print(f"critic-align: error: {type(exc).__name__}: {msg} (run with --debug for the traceback)", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(cli())
