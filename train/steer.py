"""``critic-align steer``: steer a trained run (or the base model + a freshly pretrained critic) at test time.

    critic-align steer --config digits --out runs/steer                 # pretrain a critic on the base model, save it
    critic-align steer --run runs/steer --method smc --particles 4      # reuse it (or any trained run's checkpoint)

Writes ``<out>/steer_<method>_N<particles>.png`` (a grid: one row per prompt) and ``steer_results.json``
(per method: the trained rewards' mean, the eval rewards' mean, the cost: NFE, critic calls, wall time).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from critic_align.api import build_trainer, load_run, load_run_dir, write_run_dir
from critic_align.steering import METHODS
from critic_align.x0_reward import reads_x0_reward, refuse_guidance

from .registry import load_run_config, parse_overrides

if TYPE_CHECKING:  # annotations only: the command line starts without loading the library's networks
    from critic_align.models import Models
    from critic_align.rewards.base import MultiReward



def build_steering_trainer(config: str | None, run_dir: str | None, out: str, overrides: dict | None = None,
                           critic_epochs: int | None = None):
    """A GAE trainer whose critic is either loaded from a run's checkpoint or pretrained on the base policy.

    ``run_dir``: a directory written by ``critic-align train`` or ``steer`` (its run.json + config.json, so the
    run's ``--set`` overrides are kept).  A fresh critic is saved as a regular run directory under ``out``
    (run.json, config.json, checkpoints/), so ``--run out`` reuses it.
    """
    from critic_align.checkpoint import latest_checkpoint

    overrides = dict(overrides or {})
    overrides.setdefault("output_dir", out)
    if critic_epochs is not None:
        overrides["value_pretrain_epochs"] = critic_epochs
    if run_dir is None and "sde_window_size" not in overrides:
        # steering samples every step stochastically and queries the critic at every state: a fresh critic is
        # pretrained on full trajectories, not on a training config's SDE window (values elsewhere never fitted)
        overrides.update(sde_window_size=0, sde_window_range=None)
    if run_dir is None and "critic_x0_reward" not in overrides:
        # gradient guidance and the diffusers callbacks call the critic on a state alone (steering/values.py): a
        # fresh critic reads only the latent unless --set critic_x0_reward=true asks for one usable by SMC only
        overrides["critic_x0_reward"] = False
    ckpt = None
    if run_dir is not None:
        ckpt = latest_checkpoint(Path(run_dir) / "checkpoints")
        if ckpt is None:
            raise FileNotFoundError(f"no checkpoint under {Path(run_dir) / 'checkpoints'}")
        run = load_run_dir(run_dir, overrides)
    elif config is not None:
        run = load_run_config(config, overrides)
    else:
        raise ValueError("pass --config (pretrain a critic on the base model) or --run (a trained run)")
    if run["ppo"].advantage != "gae":
        raise ValueError(f"{run_dir or config}: steering needs a critic, but the config trains with advantage="
                         f"{run['ppo'].advantage!r}; use a gae config (e.g. digits)")
    if run_dir is not None and run["ppo"].sde_window_size:
        print(f"note: {run_dir} trained its critic on SDE windows of {run['ppo'].sde_window_size} steps "
              f"(first step in {run['ppo'].sde_window_range or 'anywhere'}); steering queries it at every step")
    # a run's weights are reused under this command's sampling config
    trainer = load_run(run_dir, overrides, ckpt) if ckpt is not None else build_trainer(run)
    Path(out).mkdir(parents=True, exist_ok=True)
    if ckpt is not None:
        print(f"loaded policy + critic from {ckpt}")
    else:
        print(f"pretraining the critic on the base policy ({run['ppo'].value_pretrain_epochs} rollout batches)")
        trainer.pretrain_value()
        write_run_dir(out, run)
        trainer.save()
    return trainer, run


@dataclass(frozen=True)
class SteeringRun:
    """What steering reads of a run: its networks (``models``: the policy, the stochastic step, classifier-free
    guidance, the critic or None), the task (encode, decode, latent shape), the sampler's ``timesteps``, the trained
    ``rewards`` (their weighted sum is what best-of-N and SMC maximise) and the ``eval_rewards`` (reported only)."""

    models: Models
    task: object
    timesteps: torch.Tensor
    rewards: MultiReward
    eval_rewards: MultiReward | None = None


def steer_run(run: SteeringRun, method: str, prompts: list[str], particles: int = 4, scale: float = 0.0,
              lam: float = 10.0, seed: int = 0, **kw):
    """Run one steering method (a key of ``steering.METHODS``) with the run's policy, step, critic and rewards;
    returns (SteerResult, eval dict).  ``kw``: ess_threshold, resample_every, scheme (SMC's :class:`Resampling`),
    output, guidance_max_kl (SMC's), reward_price, progress (:class:`SteerOptions`); each method gets the settings
    it takes."""
    from critic_align.steering import Resampling, SteerOptions, critic_value_fn, method_named, steer

    spec = method_named(method)
    check_steering_args(particles, scale, lam)
    models, task, rewards = run.models, run.task, run.rewards
    gen = torch.Generator().manual_seed(seed)
    n = particles if "num_particles" in spec.parameters else 1  # base and guidance: one sample per prompt
    x_T = torch.randn((len(prompts) * n, *task.latent_shape), generator=gen).to(models.device)
    cond = task.encode(prompts)

    def reward_fn(samples, ps):
        return rewards.weighted_sum(rewards(samples, ps))

    value_fn = None
    table = getattr(models.critic, "prompt_table", None)
    if table is not None:  # a grafted composition critic reads each prompt's clauses: it learns the prompts steered
        table.add(prompts)
    if models.critic is not None:
        # a critic that reads r(decode(x0_pred)) scores the step's x0 predictions with the rewards it was trained on
        x0_rewards = rewards if reads_x0_reward(models.critic) else None
        value_fn = critic_value_fn(models.critic, weights=rewards.weights.float().tolist(), x0_rewards=x0_rewards)
    if "scale" in spec.parameters:
        refuse_guidance(models.critic, method, ", ".join(m for m, s in METHODS.items() if "scale" not in s.parameters))
    settings = dict(kw)
    resampling = Resampling(**{field: settings.pop(name) for name, field in
                               (("ess_threshold", "ess_threshold"), ("resample_every", "every"), ("scheme", "scheme"))
                               if name in settings})
    rows_per_call = 2 if models.guidance_scale != 1.0 else 1  # the CFG denoiser runs two rows per sample
    options = SteerOptions(decode=task.decode, backbone_rows_per_call=rows_per_call,
                           reward_price=settings.pop("reward_price", 1.0), progress=settings.pop("progress", False))
    # every setting this command has, by the parameter name the methods use; each method takes its own subset
    # (best-of-N and guidance have no weights, so no output, resampling or proposal cap; guidance's own max_kl
    # is left uncapped; SMC's guided proposal is capped at 1 nat per step unless guidance_max_kl says otherwise)
    available = dict(num_particles=n, reward_fn=reward_fn, generator=gen, options=options, value_fn=value_fn,
                     scale=scale, guidance_scale=scale, lam=lam, resampling=resampling,
                     output=settings.pop("output", "sample"), guidance_max_kl=settings.pop("guidance_max_kl", 1.0))
    if settings:
        raise TypeError(f"steer_run got unknown setting(s) {sorted(settings)}")
    res = steer(method, models.policy_output, models.step, x_T, run.timesteps.to(models.device), cond, prompts,
                **{k: v for k, v in available.items() if k in spec.parameters})
    return res, evaluate_samples(rewards, run.eval_rewards, res.decoded, prompts)


@torch.no_grad()
def evaluate_samples(rewards: MultiReward, eval_rewards: MultiReward | None, decoded: torch.Tensor,
                     prompts: list[str]) -> dict[str, float]:
    """The mean of each trained reward (and its standard error over prompts: differences below ~2 SE are noise)
    and of each eval reward (NaN-skipping) over decoded samples, one per prompt."""
    evals = {}
    mat = rewards(decoded, prompts)
    for k, name in enumerate(rewards.names):
        evals[name] = float(mat[:, k].double().mean())
        evals[f"{name}_se"] = float(mat[:, k].double().std() / max(len(prompts), 1) ** 0.5)
    if eval_rewards is not None:
        emat = eval_rewards(decoded, prompts)
        for k, name in enumerate(eval_rewards.names):
            evals[name] = float(emat[:, k].double().nanmean())
    return evals


def cmd_steer(args) -> int:
    from critic_align.viz import save_grid

    methods = args.method or default_methods(args.scale, args.particles, args.ess_threshold)
    if "guidance" in methods and args.scale == 0:
        raise ValueError("--method guidance with --scale 0 is the base sampler; pass --scale w > 0 (e.g. 20)")
    torch.set_num_threads(args.threads) if args.threads else None
    trainer, run = build_steering_trainer(args.config, args.run, args.out, parse_overrides(args.set),
                                          args.critic_epochs)
    out = Path(args.out)
    task_prompts = list(trainer.task.prompts)
    unique_prompts = args.prompts or task_prompts
    prompts = [p for p in unique_prompts for _ in range(args.per_prompt)]  # grid: one row per prompt
    results_path = out / "steer_results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {"runs": []}
    steering = SteeringRun(trainer.models, trainer.task, trainer.timesteps, trainer.rewards, trainer.eval_rewards)
    for method in methods:
        t0 = time.time()
        res, evals = steer_run(steering, method, prompts, particles=args.particles, scale=args.scale,
                               lam=args.lam, seed=args.seed, ess_threshold=args.ess_threshold,
                               resample_every=args.resample_every, scheme=args.scheme, output=args.output,
                               guidance_max_kl=args.guidance_max_kl, progress=True)
        grid = save_grid(res.decoded.clamp(-1, 1), out / f"steer_{method}_N{args.particles}.png",
                         nrow=args.per_prompt, labels=unique_prompts)
        row = {"method": method, "particles": args.particles, "scale": args.scale, "lam": args.lam,
               "output": args.output if "output" in METHODS[method].parameters else "argmax",
               "final_ess_per_particle": float(res.final_ess.nanmean()) / res.log_weights.shape[1],
               "seed": args.seed, "num_prompts": len(prompts), "rewards": evals, "cost": res.cost.to_dict(),
               "grid": str(grid), "seconds": time.time() - t0}
        results["runs"].append(row)
        print(json.dumps({k: row[k] for k in ("method", "particles", "rewards")}), flush=True)
    results_path.write_text(json.dumps(results, indent=2))
    print(f"wrote {results_path}")
    return 0


def default_methods(scale: float, particles: int, ess_threshold: float) -> list[str]:
    """The methods run without --method: none of them a no-op.  Guidance only with a scale (w = 0 is the base
    sampler); SMC only if it can resample (ESS >= 1, so κ·N must exceed 1: else it equals best-of-N)."""
    methods = ["base", "bon"]
    if scale != 0:
        methods += ["guidance", "guidance+bon"]
    if ess_threshold * particles > 1:
        methods.append("smc")
    return methods


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {v}")
        return v
    return parse


def _finite(low: float | None = None, high: float | None = None, what: str = "a finite number"):
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if not math.isfinite(v) or (low is not None and v < low) or (high is not None and v > high):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return v
    return parse


def check_steering_args(particles: int, scale: float, lam: float) -> None:
    """The public entry's checks (the command line checks the same in its argument types): N >= 1, finite w, λ."""
    if isinstance(particles, bool) or not isinstance(particles, int) or particles < 1:
        raise ValueError(f"particles must be an integer >= 1, got {particles!r}")
    for name, v in (("scale", scale), ("lam", lam)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{name} must be a finite number, got {v!r} (an infinite guidance scale or λ turns every "
                             "step or weight into inf/NaN)")


def add_parser(sub) -> None:
    p = sub.add_parser("steer", help="steer sampling with the critic (best-of-N, guidance, SMC, guidance + best-of-N)")
    p.add_argument("--config", help="a gae run config: pretrain a critic on its base policy (saved under --out)")
    p.add_argument("--run", help="a run directory (from `train` or `steer`): its policy and critic checkpoint")
    p.add_argument("--out", default="runs/steer", help="where grids, results JSON (and a fresh critic) go")
    p.add_argument("--method", nargs="+", choices=list(METHODS),
                   help="methods to run: " + "; ".join(f"{name} ({m.summary})" for name, m in METHODS.items())
                        + ".  guidance needs --scale > 0; smc is guided by --scale if > 0.  Default: base bon, plus "
                        "guidance guidance+bon if --scale > 0, plus smc if it can resample (--ess-threshold × "
                        "--particles > 1)")
    p.add_argument("--particles", type=_int_at_least(1), default=4,
                   help="N: particles (SMC) / candidates (best-of-N) per prompt")
    p.add_argument("--scale", type=_finite(), default=0.0,
                   help="guidance scale w (score += w·∇V); 0 = no guidance (then guidance is not a default method)")
    p.add_argument("--lam", type=_finite(), default=10.0, help="SMC's λ: the target is p·exp(λ r), temperature 1/λ")
    p.add_argument("--ess-threshold", type=_finite(0, 1, "a number in [0, 1]"), default=0.5,
                   help="κ: SMC resamples a prompt's particles when their ESS < κ·N (needs κ·N > 1)")
    p.add_argument("--resample-every", type=_int_at_least(1), default=1, help="SMC may resample only every k-th step")
    p.add_argument("--scheme", default="systematic", choices=["systematic", "stratified", "residual", "multinomial"],
                   help="SMC resampling scheme (systematic has the lowest variance)")
    p.add_argument("--output", default="sample", choices=["sample", "argmax"],
                   help="SMC's choice per prompt: sample (drawn ∝ the final weights: a sample of p·exp(λ r)) or "
                        "argmax (the highest-reward particle, best-of-N style: maximises the reward)")
    p.add_argument("--guidance-max-kl", type=_finite(0, None, "a finite number >= 0"), default=1.0,
                   help="for smc with --scale > 0: cap, in nats per step, on KL(guided step ‖ model step), so the "
                        "proposal correction cannot collapse the weights at the last, low-noise steps")
    p.add_argument("--prompts", nargs="+", help="prompts (default: every task prompt); each gets --per-prompt samples")
    p.add_argument("--per-prompt", type=_int_at_least(1), default=4, help="samples (grid columns) per prompt")
    p.add_argument("--critic-epochs", type=_int_at_least(0), help="value-pretraining rollout batches for a fresh critic")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise and the resampling draws")
    p.add_argument("--threads", type=_int_at_least(0), default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--set", action="append", metavar="FIELD=VALUE", help="override any PPOConfig field")
    p.set_defaults(fn=cmd_steer)
