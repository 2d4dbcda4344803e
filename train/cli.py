"""The ``critic-align`` command line.

    critic-align train [--config digits] [--out DIR] [--epochs N] [--set field=value ...] [--resume]
    critic-align sample [--model DIR | --run RUN_DIR] [--steps N] [--out grid.png]
    critic-align pretrain-digits [--out runs/digits_unet] [--steps 2000]     reproduce the shipped base model
    critic-align pretrain-digits-dit [--out runs/digits_dit] [--steps 1500]  reproduce the shipped flow-matching DiT
    critic-align train-classifier [--out runs/digit_classifier]              reproduce the shipped digit classifier
    critic-align evaluate-digits [--model DIR] [--out DIR]                   per-class accuracy + model card
    critic-align export-lora --run RUN_DIR --out DIR             a Stable Diffusion run's policy LoRA for
                                                                 pipe.load_lora_weights(DIR)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def cmd_train(args) -> int:
    from critic_align.checkpoint import latest_checkpoint
    from critic_align.viz import plot_metrics

    from .registry import build_trainer, load_run_config, parse_overrides, write_run_dir

    overrides = parse_overrides(args.set)
    if args.out:
        overrides["output_dir"] = args.out
    if args.epochs is not None:
        overrides["num_epochs"] = args.epochs
    run = load_run_config(args.config, overrides)
    cfg = run["ppo"]
    out = Path(cfg.output_dir)
    if out.exists() and (out / "metrics.jsonl").exists() and not args.resume:
        raise SystemExit(f"{out} already holds a run; pass --resume to continue it or --out to start a new one")
    trainer = build_trainer(run)
    if trainer.is_main_process:  # what steer / sample / export-lora need to rebuild the run
        write_run_dir(out, run)
    if args.resume:
        ckpt = latest_checkpoint(out / "checkpoints")
        if ckpt is None:
            raise SystemExit(f"--resume: no complete checkpoint in {out / 'checkpoints'} (the run stopped before its "
                             f"first one was written); start it again without --resume after removing {out}")
        trainer.load(ckpt)
        if trainer.is_main_process:
            print(f"resumed from {ckpt} (epoch {trainer.epoch})")
    else:
        trainer.save_grid(out / "grid_before.png", use_policy=False)
    start = time.time()
    history = trainer.train()
    trainer.save_grid(out / "grid_after.png")
    if not trainer.is_main_process:  # multi-process (torchrun): only the main process writes outputs
        return 0
    names = list(trainer.rewards.names) + (list(trainer.eval_rewards.names) if trainer.eval_rewards else [])
    head_ev = [f"value_ev/{n}" for n in trainer.rewards.names] if trainer.critic is not None else []
    plot_metrics(out / "metrics.jsonl", out / "reward_curve.png", [f"reward/{n}/mean" for n in names] + head_ev,
                 title=f"{cfg.advantage} on {run['task']}")
    summary = {"run_dir": str(out), "epochs": trainer.epoch, "reward_queries": trainer.reward_queries,
               "train_seconds": time.time() - start}
    if history:
        first, last = history[0], history[-1]
        for n in names:
            key = f"reward/{n}/mean"
            summary[f"{n}_first_epoch"] = first.get(key)
            summary[f"{n}_last_epoch"] = last.get(key)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return 0


def cmd_sample(args) -> int:
    """A digits grid from a base model, or from a run's policy with the run's own sampler (steps, noise level,
    guidance) unless --steps / --eta / --guidance-scale say otherwise."""
    import torch

    from critic_align.rollout import cfg_denoiser, sample
    from critic_align.steps import make_step
    from critic_align.tasks.digits import BASE_MODEL_DIR, NULL_CLASS, load_digits_model
    from critic_align.viz import save_grid

    model_dir, steps, noise, guidance, out = args.model or BASE_MODEL_DIR, 50, 0.0, 1.0, Path("runs") / "samples.png"
    if args.run:
        from critic_align.backbones import LoraAdapters
        from critic_align.checkpoint import latest_checkpoint, read_checkpoint
        from critic_align.registry import DIGITS_TASKS, resolve

        from .registry import load_run_dir

        run_dir = Path(args.run)
        if (run_dir / "state.json").exists():  # a checkpoint directory itself
            ckpt, run_dir = run_dir, run_dir.parent.parent
        else:
            ckpt = latest_checkpoint(run_dir / "checkpoints")
        if ckpt is None:
            raise SystemExit(f"no checkpoint under {run_dir / 'checkpoints'}")
        run = load_run_dir(run_dir)
        if run["task"] not in DIGITS_TASKS:
            raise SystemExit(f"`sample` draws digits grids; this run's task is {run['task']!r}")
        if args.model:
            raise SystemExit("--model and --run exclude each other: a run's policy LoRA belongs to the run's base model")
        cfg = run["ppo"]
        model, scheduler = resolve(DIGITS_TASKS[run["task"]][1])(run.get("base_model"))
        steps, noise, guidance, out = cfg.num_inference_steps, cfg.eta, cfg.guidance_scale, run_dir / "samples.png"
        tensors, _ = read_checkpoint(ckpt)
        adapters = LoraAdapters(model, fused=cfg.fused_lora)
        adapters.add("policy", rank=cfg.lora_rank, alpha=cfg.lora_alpha, target_modules=cfg.lora_target_modules)
        adapters.load_state_dict("policy", {k[7:]: v for k, v in tensors.items() if k.startswith("policy.")})
        adapters.activate("policy")
        print(f"loaded policy LoRA from {ckpt}")
    else:
        model, scheduler = load_digits_model(model_dir)  # the UNet DDPM or the flow-matching DiT
    steps = args.steps if args.steps is not None else steps
    noise = args.eta if args.eta is not None else noise
    guidance = args.guidance_scale if args.guidance_scale is not None else guidance
    step = make_step(scheduler, noise)  # DDIM (eta) or the flow-matching SDE (eta = its noise level)

    def den(x, t, c):
        return model(x, t, class_labels=c, return_dict=False)[0]

    den = cfg_denoiser(den, guidance, lambda n: torch.full((n,), NULL_CLASS, dtype=torch.long))
    g = torch.Generator().manual_seed(args.seed)
    labels = torch.arange(10).repeat_interleave(args.per_class)
    x_T = torch.randn((len(labels), 1, 16, 16), generator=g)
    x0 = sample(den, step, x_T, step.schedule.timesteps(steps), labels, generator=g, progress=True)
    path = save_grid(x0.clamp(-1, 1), args.out or out, nrow=args.per_class, labels=list(range(10)))
    print(f"wrote {path} ({steps} steps, noise level {noise}, guidance {guidance})")
    return 0


def cmd_export_lora(args) -> int:
    """Write a Stable Diffusion run's policy LoRA with the pipeline class's own save_lora_weights."""
    from critic_align.checkpoint import latest_checkpoint, read_checkpoint
    from critic_align.registry import SD_TASKS
    from critic_align.tasks.sd import save_lora

    run_dir = Path(args.run)
    if (run_dir / "state.json").exists():  # a checkpoint directory itself
        ckpt, run_dir = run_dir, run_dir.parent.parent
    else:
        ckpt = latest_checkpoint(run_dir / "checkpoints")
        if ckpt is None:
            raise SystemExit(f"no complete checkpoint under {run_dir / 'checkpoints'}; pass a run directory written by "
                             "`critic-align train` or one of its checkpoints/epoch_* directories")
    task = args.task
    if task is None:
        info = run_dir / "run.json"
        if not info.exists():
            raise SystemExit(f"{info} is missing, so the run's task is unknown; pass --task {'|'.join(SD_TASKS)}")
        task = json.loads(info.read_text())["task"]
    if task not in SD_TASKS:
        raise SystemExit(f"export-lora writes diffusers pipeline LoRA for the Stable Diffusion tasks {sorted(SD_TASKS)}; "
                         f"this run's task is {task!r} (use `critic-align sample --run` for digits runs)")
    tensors, state = read_checkpoint(ckpt)
    cfg = state["config"]
    policy = {k[len("policy."):]: v for k, v in tensors.items() if k.startswith("policy.")}
    out = save_lora(policy, SD_TASKS[task], args.out, cfg["lora_rank"], cfg["lora_alpha"], cfg["lora_target_modules"])
    print(f"wrote the policy LoRA of {ckpt} to {out}; load it with {task} pipelines' pipe.load_lora_weights({str(out)!r})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="critic-align", description="Align diffusion models with a latent critic.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="post-train a model with value pretraining + PPO (gae | grpo | ddpo)")
    p.add_argument("--config", default="digits", help="a named config in train/configs or a YAML path")
    p.add_argument("--out", help="run directory (overrides ppo.output_dir)")
    p.add_argument("--epochs", type=int, help="overrides ppo.num_epochs")
    p.add_argument("--set", action="append", metavar="FIELD=VALUE", help="override any PPOConfig field")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("sample", help="draw a PNG grid (one row per digit) from a model or a trained run")
    p.add_argument("--model", default=None, help="base model directory: the digits UNet (default) or a DiT such as "
                   "critic_align/assets/digits_dit")
    p.add_argument("--run", default=None, help="a run directory or checkpoint: its policy LoRA, base model and sampler")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the run's; 50 without --run)")
    p.add_argument("--eta", type=float, default=None, help="noise level: DDIM's eta or the flow SDE's; 0 = the "
                   "deterministic DDIM / Euler ODE (default: the run's; 0 without --run)")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="classifier-free guidance scale (default: the run's; 1 = none without --run)")
    p.add_argument("--per-class", type=int, default=8, help="samples per digit (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise and the sampler (default %(default)s)")
    p.add_argument("--out", default=None, help="the PNG (default: RUN/samples.png with --run, else runs/samples.png)")
    p.set_defaults(fn=cmd_sample)

    p = sub.add_parser("export-lora", help="write a Stable Diffusion run's policy LoRA for pipe.load_lora_weights(DIR)")
    p.add_argument("--run", required=True, help="a run directory (its latest checkpoint) or a checkpoint directory")
    p.add_argument("--out", required=True, help="output directory (gets pytorch_lora_weights.safetensors)")
    p.add_argument("--task", default=None, choices=("sd15", "sd3"), help="the run's task (default: from its run.json)")
    p.set_defaults(fn=cmd_export_lora)

    from .steer import add_parser as add_steer_parser

    add_steer_parser(sub)
    from .bench import add_parser as add_bench_parser

    add_bench_parser(sub)

    from . import evaluate_digits, pretrain_digits, pretrain_digits_dit, train_classifier

    for name, module, help_ in [
        ("pretrain-digits", pretrain_digits, "train the embedded digits DDPM (reproduces the shipped one)"),
        ("pretrain-digits-dit", pretrain_digits_dit,
         "train the embedded flow-matching digits DiT (reproduces the shipped one)"),
        ("train-classifier", train_classifier, "train the embedded digit classifier"),
        ("evaluate-digits", evaluate_digits, "per-class accuracy of a digits model + its model card"),
    ]:
        p = sub.add_parser(name, help=help_, description=module.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(fn=lambda args, module=module: (module.run(args), 0)[1])
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
