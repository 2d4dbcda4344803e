"""Is the text-to-image critic data-starved or unable to learn?  An offline fit on a large fixed set of rollouts.

    python benchmarks/t2i_critic_offline.py                       # the SD1.5-format tiny_t2i, about 15 min on one core
    python benchmarks/t2i_critic_offline.py --config t2i_sd3      # its flow-matching twin
    python benchmarks/t2i_critic_offline.py --set critic_x0_reward=true   # a critic that also reads r(decode(x̂0))

In PPO and in value pretraining the critic sees each batch (4 prompts x 8 samples) a few times and is asked about
new prompts the next epoch (``t2i_critic_probe.json``: explained variance 0 on unseen prompts).  Here the frozen
base policy samples ``--train-prompts`` x ``--group`` full stochastic trajectories once (every step's state recorded)
and ``--test-prompts`` x ``--group`` of other prompts; the config's critic (``train/configs/<config>.yaml``, its own
LoRA + value head, a fresh one) is fitted on all training states for ``--rounds`` x ``--passes`` passes with
Monte-Carlo targets (the final reward), and after each round its explained variance (EV) of the returns is measured,
overall and per block of denoising steps, on the held-out prompts (``test``) and on a fixed part of its own
training data (``fit``).  For scale, on the same held-out samples:

* ``prompt_loo``: each sample predicted by the mean reward of the *other* samples of its prompt (a critic that knew
  each prompt's expected reward from ``group - 1`` draws; what the between-prompt share of the variance allows);
* ``arrangement``: each sample predicted by the mean training reward of prompts with the same arrangement (one / two
  / three digits, left of / right of / above / below): a prompt feature any text-conditioned critic could learn;
* ``x0_reward``: each state predicted by the reward of its one-step denoised prediction, r(decode(x̂0(x_t))) (FK
  steering's potential; no learning, but a decode and a reward query per state), per block of steps;
* ``x0_reward_calibrated``: the same, shrunk per step by least squares on the training states, a_k·r(decode(x̂0)) +
  b_k (two numbers per step: what a critic that read r(decode(x̂0)) as an input would get at the least).

Writes ``benchmarks/results/<config>_critic_offline.json`` (``_x0.json`` with ``critic_x0_reward``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]

from harness import machine_info  # noqa: E402
from t2i_advantages import CONFIGS  # noqa: E402

from critic_align.api import build_trainer  # noqa: E402
from critic_align.collect import critic_values  # noqa: E402
from critic_align.diagnostics import explained_variance, value_report  # noqa: E402
from critic_align.rollout import Rollout  # noqa: E402
from critic_align.tasks.composition import parse_prompt  # noqa: E402
from critic_align.tasks.digits import ASSETS  # noqa: E402
from critic_align.tasks.sd import read_prompts  # noqa: E402
from critic_align.train.registry import load_run_config  # noqa: E402
from critic_align.value_data import trajectory_states  # noqa: E402
from critic_align.value_fit import fit_values, mc_returns  # noqa: E402
from critic_align.x0_reward import x0_prediction_rewards  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def draw_prompts(config: str, n_train: int, n_test: int, seed: int) -> tuple[list[str], list[str]]:
    """Two disjoint random sets of the model's training prompts (the held-out list stays for evaluation elsewhere)."""
    prompts = read_prompts(ASSETS / CONFIGS[config][0] / "train_prompts.txt")
    idx = np.random.default_rng(seed).choice(len(prompts), size=n_train + n_test, replace=False)
    return [prompts[i] for i in idx[:n_train]], [prompts[i] for i in idx[n_train:]]


def sample_set(trainer, prompts: list[str], group: int, per_call: int = 64) -> Rollout:
    """``group`` full stochastic trajectories of the frozen policy per prompt, in calls of ``per_call`` samples."""
    per = max(1, per_call // group)
    return Rollout.cat([trainer.rollout([p for p in prompts[i:i + per] for _ in range(group)], count=False)
                        for i in range(0, len(prompts), per)])


def reference_evs(test: Rollout, train: Rollout, group: int) -> dict:
    """EV of the final reward (head 0) by the two prompt-level predictors of the module docstring."""
    r = test.rewards[:, 0].double()
    g = r.reshape(-1, group)  # rows of one prompt are consecutive (sample_set)
    loo = ((g.sum(1, keepdim=True) - g) / (group - 1)).reshape(-1)
    arr_train: dict[str, list[float]] = {}
    for p, v in zip(train.prompts, train.rewards[:, 0].tolist()):
        arr_train.setdefault(parse_prompt(p).arrangement, []).append(v)
    means = {k: float(np.mean(v)) for k, v in arr_train.items()}
    arr = torch.tensor([means[parse_prompt(p).arrangement] for p in test.prompts], dtype=torch.float64)
    return {"prompt_loo": explained_variance(loo, r), "arrangement": explained_variance(arr, r),
            "arrangement_train_means": means}


@torch.no_grad()
def x0_reward_values(trainer, ro: Rollout, chunk: int = 256) -> torch.Tensor:
    """(B, T, K) r(decode(x̂0(x_t))) at every recorded state: the policy's x0 prediction at the state (one more
    denoiser call: these rollouts did not record it), decoded and scored by the trained rewards
    (:func:`critic_align.x0_reward.x0_prediction_rewards`, as ``critic_x0_reward`` does)."""
    b, t = ro.latents.shape[0], ro.num_steps
    x = ro.latents[:, :-1].reshape(b * t, *ro.latents.shape[2:])
    ts, tp = ro.timesteps.repeat(b), ro.prev_timesteps.repeat(b)
    nxt = ro.latents[:, 1:].reshape(b * t, *ro.latents.shape[2:])
    idx = torch.arange(b).repeat_interleave(t)
    x0 = []
    for i in range(0, b * t, chunk):
        sl = slice(i, i + chunk)
        out = trainer.policy_output(x[sl], ts[sl], ro.cond[idx[sl]])
        x0.append(trainer.step(out, x[sl], ts[sl], tp[sl], prev_sample=nxt[sl]).x0_pred)
    return x0_prediction_rewards(trainer.task, trainer.rewards, torch.cat(x0).view(b, t, *x.shape[1:]), ro.prompts,
                                 trainer.device, chunk)


def calibrate(train_x0r: torch.Tensor, train_ret: torch.Tensor, test_x0r: torch.Tensor) -> torch.Tensor:
    """Per step k and head: least-squares a_k, b_k of train_ret ≈ a_k·train_x0r + b_k, applied to test_x0r.
    Inputs (B, T, K)."""
    x, y = train_x0r.double(), train_ret.double()
    xm, ym = x.mean(0, keepdim=True), y.mean(0, keepdim=True)
    a = ((x - xm) * (y - ym)).mean(0, keepdim=True) / (x - xm).pow(2).mean(0, keepdim=True).clamp_min(1e-12)
    return (ym + a * (test_x0r.double() - xm)).float()


def report(trainer, ro: Rollout) -> dict:
    values = critic_values(trainer.models, ro)
    return value_report(values, mc_returns(ro, trainer.config.gamma), ~torch.isnan(ro.rewards.float()), trainer.rewards.names)




def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="t2i", choices=list(CONFIGS))
    p.add_argument("--train-prompts", type=int, default=256)
    p.add_argument("--test-prompts", type=int, default=64)
    p.add_argument("--group", type=int, default=4, help="samples per prompt")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--passes", type=int, default=2, help="passes over the training states per round")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="PPOConfig overrides")
    p.add_argument("--out", help="default benchmarks/results/<config>_critic_offline.json (with --set "
                   "critic_x0_reward=true: <config>_critic_offline_x0.json)")
    args = p.parse_args(argv)
    if args.group < 2:
        raise SystemExit("--group must be at least 2 (the prompt_loo reference needs another sample of the prompt)")
    import yaml

    t_start = time.time()
    user = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    stem = f"{args.config}_critic_offline" + ("_x0" if user.get("critic_x0_reward") else "")
    out = Path(args.out) if args.out else RESULTS / f"{stem}.json"
    workdir = RESULTS / "tmp" / stem
    if workdir.exists():
        shutil.rmtree(workdir)  # this script's scratch directory
    over = {"advantage": "gae", "gae_group_baseline": False, "sde_window_size": 0, "sde_window_range": None,
            "seed": args.seed, "output_dir": str(workdir), "progress": False, "grid_every": 0, "checkpoint_every": 0,
            "log_tensorboard": False, **user}
    trainer = build_trainer(load_run_config(args.config, over))
    train_prompts, test_prompts = draw_prompts(args.config, args.train_prompts, args.test_prompts, args.seed)
    t0 = time.time()
    train = sample_set(trainer, train_prompts, args.group)
    test = sample_set(trainer, test_prompts, args.group)
    sample_s = time.time() - t0
    print(f"sampled {train.batch_size} + {test.batch_size} trajectories of {train.num_steps} steps in {sample_s:.0f} s",
          flush=True)
    trainer.critic.head.set_output_scale(train.rewards)
    vb = trajectory_states(train.latents, train.timesteps, train.cond, mc_returns(train, trainer.config.gamma), train.rewards,
                           train.x0_rewards)  # x0_rewards: recorded under --set critic_x0_reward=true
    fit_part = train.select(torch.arange(min(test.batch_size, train.batch_size)))
    refs = reference_evs(test, train, args.group)
    t0 = time.time()
    test_x0r = x0_reward_values(trainer, test)
    refs["x0_reward_seconds_per_state"] = (time.time() - t0) / test_x0r[..., 0].numel()
    mask = ~torch.isnan(test.rewards.float())
    refs["x0_reward"] = value_report(test_x0r, mc_returns(test, trainer.config.gamma), mask, trainer.rewards.names)
    calibrated = calibrate(x0_reward_values(trainer, train), mc_returns(train, trainer.config.gamma), test_x0r)
    refs["x0_reward_calibrated"] = value_report(calibrated, mc_returns(test, trainer.config.gamma), mask, trainer.rewards.names)
    print(f"references: {json.dumps(refs, default=float)}", flush=True)
    rows = []
    for i in range(args.rounds + 1):
        t0 = time.time()
        stats = fit_values(trainer.context(trainer.config.batch_size), vb, args.passes) if i else {}
        row = {"round": i, "passes": i * args.passes, "fit_s": time.time() - t0,
               "test": report(trainer, test), "fit": report(trainer, fit_part),
               "value_loss": stats.get("value_loss")}
        rows.append(row)
        print(f"round {i}: test EV {row['test']['value_ev']:.3f} fit EV {row['fit']['value_ev']:.3f} "
              f"({row['fit_s']:.0f} s) " + " ".join(f"{k[9:]} {v:.2f}" for k, v in row["test"].items()
                                                     if k.startswith("value_ev_steps")), flush=True)
    r = test.rewards[:, 0].double()
    result = {"benchmark": "t2i_critic_offline", "config": args.config, "args": vars(args) | {"out": str(out)},
              "overrides": user, "train_samples": train.batch_size, "test_samples": test.batch_size,
              "num_steps": train.num_steps, "sample_seconds": sample_s,
              "test_reward_mean": float(r.mean()), "test_reward_std": float(r.std()),
              "reference_ev": refs, "rounds": rows,
              "final_test_value_ev": rows[-1]["test"]["value_ev"], "final_fit_value_ev": rows[-1]["fit"]["value_ev"],
              "machine": machine_info(), "time_s": time.time() - t_start}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=float))
    shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps({k: result[k] for k in ("final_test_value_ev", "final_fit_value_ev", "reference_ev")},
                     indent=1, default=float))
    return result


if __name__ == "__main__":
    main()
