"""What a perfect critic buys (issue #29): the oracle ceiling per task at an equal number of *policy* reward queries.

    python benchmarks/critic_ceiling.py --tasks gmm digits --seeds 0 1 2
    python benchmarks/critic_ceiling.py --tasks digits_dit --merge   # the flow-matching twin, added to the same file

Tasks: ``gmm`` (the 2-D mixture), ``digits`` (the shipped digits DDPM, train/configs/digits.yaml) and ``digits_dit``
(the shipped rectified-flow digits DiT with Flow-GRPO's SDE step: digits_dit.yaml for the PPO methods,
digits_dit_nft.yaml / digits_dit_awm.yaml for NFT / AWM; the oracle continues with that SDE step).

Methods (every one the same trainer, model, LoRA, rollout batch and update settings of its task; only the advantage
differs):

* ``grpo``, ``nft``, ``awm``: the critic-free baselines (NFT: DiffusionNFT on GRPO's group-normalised reward; AWM with
  GRPO's advantages, the control for ``awm_oracle``).
* ``learned_gae``: PPO with GAE from today's latent critic (value pretraining counted in its queries).
* ``oracle_gae`` (λ = the config's) and ``oracle_gae_lam1`` (λ = 1): GAE from the oracle value source
  (:mod:`critic_align.oracle`: K continuations of the current policy's own sampler, scored by the reward) instead of
  a critic.  The oracle's reward queries and NFE are counted apart (``oracle_queries``, ``oracle_nfe``); the x-axis is
  the policy's queries only: this is the ceiling a perfect critic would give.
* ``mc_counted``: the same oracle's step-level Monte-Carlo advantages V(s_{k+1}) − V(s_k) (GAE with λ = 0, as
  TreeGRPO / VGPO use per-step MC values) as a method of its own: its oracle queries *are* counted in its budget.
* ``awm_oracle``: AWM with the oracle's per-timestep advantage R − V(x_t, t) at the forward-noised states AWM trains
  on (the place ``awm_advantage: critic`` puts the critic), normalised as that mode does.

Per task: the final reward (held-out evaluation) mean ± std over seeds at each method's chosen learning rate (the
best mean over the sweep's values), the policy queries each seed needed to reach the best critic-free method's final
training reward, ``oracle_queries_ratio`` and ``learned_share_of_oracle_gain``; and a variance decomposition on the base
policy's full stochastic trajectories: the share of Var(R) the exact value resolves in each bucket of steps and each
estimator's per-step advantage variance.  Writes ``benchmarks/results/critic_ceiling.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from harness import load_tensor_cache, machine_info

ROOT = Path(__file__).resolve().parents[1]

from critic_align.advantages import gae, group_ids, grpo_advantages, terminal_rewards  # noqa: E402
from critic_align.algorithms.awm import critic_advantages  # noqa: E402
from critic_align.checkpoint import DivergenceError  # noqa: E402
from critic_align.estimators import ScoredBatch  # noqa: E402
from critic_align.estimators.gae import GAEEstimator  # noqa: E402
from critic_align.oracle import explained_variance, oracle_values_at, rollout_oracle_values  # noqa: E402
from critic_align.rollout import sample_trajectories  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
W_GMM = (1.0, 0.5)
BOX_LO, BOX_HI = (1.0, 0.5), (math.inf, math.inf)  # the quadrant beyond x = 1, y = 0.5: a 0/1 reward, base P ≈ 0.1
CRITIC_FREE = ("grpo", "nft", "awm")
# the methods whose training rewards come from the same sampler (digits: PPO's SDE window vs NFT / AWM's full
# stochastic trajectories), so that "queries to reach the baseline's final training reward" compares like with like
FAMILIES = (("grpo", "learned_gae", "grafted_gae", "oracle_gae", "oracle_gae_lam1", "mc_counted"),
            ("nft", "awm", "awm_oracle", "awm_grafted", "nft_grafted"))
# the methods whose advantages come from a learned critic (goal P1 asks one of them to reach the baseline with half
# its queries where the oracle shows room)
LEARNED = ("learned_gae", "grafted_gae", "awm_grafted", "nft_grafted")
GRAFTED = ("grafted_gae", "awm_grafted", "nft_grafted")
# digits_dit has no SDE window: PPO, NFT and AWM all sample full trajectories of the same SDE step (noise level 0.7),
# so its methods form one family and the baseline is the best critic-free method of all three
ONE_SAMPLER_TASKS = ("digits_dit",)


def families(task: str) -> tuple[tuple[str, ...], ...]:
    return (sum(FAMILIES, ()),) if task in ONE_SAMPLER_TASKS else FAMILIES

# method -> (config overrides, kind)
METHODS = {
    "grpo": ({"advantage": "grpo"}, "plain"),
    "nft": ({"algorithm": "nft", "advantage": "grpo", "sde_window_size": 0}, "plain"),
    "learned_gae": ({"advantage": "gae"}, "plain"),
    "oracle_gae": ({"advantage": "grpo"}, "oracle_gae"),
    "oracle_gae_lam1": ({"advantage": "grpo"}, "oracle_gae"),
    "mc_counted": ({"advantage": "grpo"}, "oracle_gae"),
    "awm": ({"algorithm": "awm", "advantage": "grpo", "awm_advantage": "grpo", "sde_window_size": 0}, "plain"),
    "awm_oracle": ({"algorithm": "awm", "advantage": "grpo", "awm_advantage": "grpo", "sde_window_size": 0},
                   "awm_oracle"),
    "grafted_gae": ({"advantage": "gae", "critic_body": "grafted"}, "plain"),
    # AWM / NFT weighting each forward-noised row by the grafted critic's advantage at that very state
    "awm_grafted": ({"algorithm": "awm", "advantage": "gae", "awm_advantage": "critic", "critic_body": "grafted",
                     "sde_window_size": 0}, "plain"),
    "nft_grafted": ({"algorithm": "nft", "advantage": "gae", "nft_advantage": "critic", "critic_body": "grafted",
                     "sde_window_size": 0}, "plain"),
}


# ---------------------------------------------------------------------------------------------------
# tasks


def gmm_reward(args):
    from critic_align.tasks.gmm import BoxReward, LinearReward

    return LinearReward(W_GMM) if args.gmm_reward == "linear" else BoxReward(BOX_LO, BOX_HI)


def gmm_trainer(overrides: dict, seed: int, lr: float, out: Path, args):
    from critic_align.backbones import MLP_LORA_TARGETS, MLPAdapter, MLPDenoiser, ResidualMLP
    from critic_align.config import PPOConfig, not_applicable
    from critic_align.rewards import FunctionReward, MultiReward
    from critic_align.tasks.gmm import GMMTask
    from critic_align.trainer import Trainer

    task = GMMTask()
    torch.manual_seed(seed)
    model = MLPDenoiser(ResidualMLP(hidden=64, num_layers=2), task.analytic_eps())
    kw = dict(seed=seed, num_epochs=args.gmm_epochs, num_inference_steps=20, batch_size=64, group_size=64,
              sample_chunk_size=64, minibatch_size=320, ppo_epochs=1, clip_range=0.2, learning_rate=lr,
              log_prob_reduction="sum", kl_coef=args.gmm_kl, lora_rank=8, lora_target_modules=MLP_LORA_TARGETS,
              critic_mode="full", critic_learning_rate=1e-3, value_head_hidden=128, value_pretrain_epochs=10,
              value_pretrain_passes=4, output_dir=str(out), log_tensorboard=False, progress=False, grid_every=0,
              checkpoint_every=0)
    kw.update(overrides)
    # one set of settings for every method: each method's config leaves out what its algorithm does not read
    cfg = PPOConfig(**{k: v for k, v in kw.items() if k not in not_applicable(kw)})
    lin = gmm_reward(args)
    tr = Trainer(cfg, task, MLPAdapter(model), task.scheduler, rewards=MultiReward([FunctionReward(lin, lin.name)]))

    def evaluate(tr=tr):
        x = tr.sample([""] * 2000, seed=1000 + seed)
        return {"reward": float(lin(x).mean())}

    return tr, evaluate


def digits_trainer(overrides: dict, seed: int, lr: float, out: Path, args, configs: dict | None = None):
    """The digits DDPM (``configs`` None: train/configs/digits.yaml for every method) or another shipped digits job:
    ``configs`` maps an algorithm ("ppo", "nft", "awm") to the run config it starts from."""
    from digits_advantages import evaluate_policy

    from critic_align.api import build_trainer
    from critic_align.train.registry import load_run_config

    over = dict(overrides)
    if over.get("algorithm") == "awm":  # the oracle at every (trajectory, step) row of full trajectories is too dear
        over["timestep_fraction"] = args.awm_timestep_fraction
    over.update(seed=seed, learning_rate=lr, output_dir=str(out), progress=False, grid_every=0, checkpoint_every=0,
                log_tensorboard=False, eval_every=0)
    run = load_run_config((configs or {}).get(over.get("algorithm", "ppo"), "digits"), over)
    tr = build_trainer(run)

    def evaluate(tr=tr):
        ev = evaluate_policy(tr, per_class=args.eval_per_class)
        return {"reward": ev["digit_prob"], "digit_correct": ev.get("digit_correct")}

    return tr, evaluate


# the flow-matching twin: the shipped digits DiT with its SDE step (Flow-GRPO's, noise level 0.7), each algorithm from
# its own shipped config (the overrides of METHODS still apply on top)
DIGITS_DIT_CONFIGS = {"ppo": "digits_dit", "nft": "digits_dit_nft", "awm": "digits_dit_awm"}


def digits_dit_trainer(overrides: dict, seed: int, lr: float, out: Path, args):
    return digits_trainer(overrides, seed, lr, out, args, configs=DIGITS_DIT_CONFIGS)


def t2i_sd3_trainer(overrides: dict, seed: int, lr: float, out: Path, args):
    """The SD3 twin: the shipped tiny SD3-style pipeline (critic_align/assets/tiny_t2i_sd3) through the SD3 path with
    train/configs/t2i_sd3.yaml for every method (PPO in its SDE window of 4 steps; NFT / AWM on full trajectories of the
    same flow SDE step), on the dense composition reward.  Final reward: ``composition`` on a fixed draw of held-out
    prompts (never trained on) with fixed noise, as benchmarks/t2i_advantages.py evaluates."""
    from t2i_advantages import eval_prompts, evaluate_policy

    from critic_align.api import build_trainer
    from critic_align.train.registry import load_run_config

    over = dict(overrides)
    if over.get("advantage", "gae") != "gae":  # the config's GAE-only setting: the other estimators refuse it
        over.setdefault("gae_group_baseline", False)
    if over.get("sde_window_size") == 0:  # NFT / AWM: no SDE window, so no range for its first step
        over.setdefault("sde_window_range", None)
    if over.get("algorithm") == "awm":  # as on digits: the oracle at every (trajectory, step) row is too dear
        over["timestep_fraction"] = args.awm_timestep_fraction
    over.update(seed=seed, learning_rate=lr, output_dir=str(out), progress=False, grid_every=0, checkpoint_every=0,
                log_tensorboard=False, eval_every=0)
    tr = build_trainer(load_run_config("t2i_sd3", over))
    prompts = eval_prompts(args.t2i_eval_prompts, "t2i_sd3")

    def evaluate(tr=tr):
        ev = evaluate_policy(tr, prompts)
        return {"reward": ev["heldout"]["composition"], "composition_correct": ev["heldout"]["composition_correct"],
                "train": ev["train"]}

    return tr, evaluate


def config_gae_group_baseline(task: str) -> bool | None:
    """The per-prompt GAE baseline of the task's learned GAE, for the oracle's GAE (the oracle runs on a GRPO
    trainer, whose config leaves GAE-only settings at their defaults); None: the trainer's own."""
    if task != "t2i_sd3":
        return None
    from critic_align.train.registry import load_run_config

    return load_run_config("t2i_sd3")["ppo"].gae_group_baseline


# task -> (trainer, learning-rate sweep; its middle value is the one unswept methods run at: the configs' own 1e-3)
TASKS = {"gmm": (gmm_trainer, (1e-3, 3e-3, 1e-2)), "digits": (digits_trainer, (3e-4, 1e-3, 3e-3)),
         "digits_dit": (digits_dit_trainer, (3e-4, 1e-3, 3e-3)), "t2i_sd3": (t2i_sd3_trainer, (3e-4, 1e-3, 3e-3))}


# ---------------------------------------------------------------------------------------------------
# the oracle inside a run (instance-level replacements of two stages; the library is unchanged)


def reward_fn(tr):
    return lambda final, prompts: tr.rewards(tr.task.decode(final), prompts).float()


def window_of(tr, ro) -> tuple[int, int | None]:
    """(start index of the rollout's first state in the sampler's timesteps, stochastic stop or None)."""
    start = int((tr.timesteps == ro.timesteps[0].to(tr.timesteps.device)).nonzero()[0])
    return start, (start + ro.num_steps if ro.x0 is not None else None)


def install_oracle_gae(tr, K: int, lam: float, count: bool, gen: torch.Generator, ledger: dict,
                       group_baseline: bool | None = None) -> None:
    """``group_baseline`` None: the trainer's gae_group_baseline (see :func:`config_gae_group_baseline`)."""
    est = GAEEstimator(tr.config.gamma, lam, tr.config.advantage_aggregation, tr.config.normalize_advantages,
                       tr.config.advantage_scale == "rewards",
                       tr.config.gae_group_baseline if group_baseline is None else group_baseline)

    def compute_advantages(ro, prompts=None):  # one process: ro is the whole batch
        from dataclasses import replace

        start, stop = window_of(tr, ro)
        ov = rollout_oracle_values(tr.policy_output, tr.step, ro.latents, start, tr.timesteps.to(tr.device), ro.cond,
                                   reward_fn(tr), K, gen, ro.prompts, stochastic_stop=stop, chunk=512)
        ledger["oracle_queries"] += ov.counts.reward_queries
        ledger["oracle_nfe"] += ov.counts.nfe
        if count:
            tr.reward_queries += ov.counts.reward_queries
        scored = ScoredBatch(ro.rewards.float(), tr.reward_weights, tuple(ro.prompts), ro.num_steps)
        adv, returns = est.compute(scored, ov.values.to(ro.rewards.device))
        clip = tr.config.adv_clip_max
        return replace(ro, advantages=adv.clamp(-clip, clip))

    tr.compute_advantages = compute_advantages


def install_awm_oracle(tr, K: int, gen: torch.Generator, ledger: dict) -> None:
    algo = tr.algorithm

    def row_advantages(_ctx, ro, rows, chunk: int = 256):  # AWM calls it with its UpdateContext; one process
        trainer = tr
        start, stop = window_of(trainer, ro)
        dev = trainer.device
        cond = None if ro.cond is None else ro.cond[rows.traj.to(dev)]
        ov = oracle_values_at(trainer.policy_output, trainer.step, rows.x_t, rows.t, trainer.timesteps.to(dev), cond,
                              reward_fn(trainer), K, gen, [ro.prompts[i] for i in rows.traj.tolist()],
                              stochastic_stop=stop, chunk=512)
        ledger["oracle_queries"] += ov.counts.reward_queries
        ledger["oracle_nfe"] += ov.counts.nfe
        return critic_advantages(ov.values.to(dev), ro.rewards[rows.traj.to(ro.rewards.device)].to(dev),
                                 trainer.reward_weights, trainer.config.adv_clip_max)

    algo._row_advantages = row_advantages


# ---------------------------------------------------------------------------------------------------
# one run


def run_one(task: str, method: str, seed: int, lr: float, budget: int, args) -> dict:
    overrides, kind = METHODS[method]
    out = RESULTS / "tmp" / "critic_ceiling" / f"{task}_{method}_lr{lr:g}_seed{seed}"
    if out.exists():
        shutil.rmtree(out)
    t0 = time.time()
    tr, evaluate = TASKS[task][0](overrides, seed, lr, out, args)
    tr.out.mkdir(parents=True, exist_ok=True)
    ledger = {"oracle_queries": 0, "oracle_nfe": 0}
    gen = torch.Generator().manual_seed(10_000 + seed)
    K = args.K[task]
    if kind == "oracle_gae":
        lam = {"oracle_gae": tr.config.gae_lambda, "oracle_gae_lam1": 1.0, "mc_counted": 0.0}[method]
        install_oracle_gae(tr, K, lam, count=method == "mc_counted", gen=gen, ledger=ledger,
                           group_baseline=config_gae_group_baseline(task))
    elif kind == "awm_oracle":
        install_awm_oracle(tr, K, gen, ledger)
    base = evaluate()
    if tr.critic is not None:
        tr.pretrain_value()
    curve = []
    counted = ledger if method == "mc_counted" else {"oracle_queries": 0}

    def policy_queries():
        return tr.reward_queries - counted["oracle_queries"]

    diverged = None
    while policy_queries() + tr.config.batch_size <= budget:
        try:
            m = tr.train_epoch().metrics
        except DivergenceError as e:  # a step size too large for this method: recorded, never chosen
            diverged = str(e).split(". ")[0]
            break
        curve.append({"policy_queries": policy_queries(), "reward_queries": m["reward_queries"],
                      "oracle_queries": ledger["oracle_queries"], "reward": m[f"reward/{tr.rewards.names[0]}/mean"],
                      "epoch_s": m["time_epoch_s"]})
    final = evaluate() if diverged is None else {"reward": float("nan")}
    row = {"diverged": diverged, "task": task, "method": method, "seed": seed, "lr": lr, "K": K if kind != "plain" else None,
           "base": base, "final": final, "reward_queries": tr.reward_queries, "epochs": len(curve),
           "seconds": time.time() - t0, "curve": curve, **ledger}
    print(f"{task} {method} lr {lr:g} seed {seed}: base {base['reward']:.4f} final {final['reward']:.4f} "
          f"queries {tr.reward_queries} oracle {ledger['oracle_queries']} epochs {len(curve)} "
          f"({row['seconds']:.0f} s)", flush=True)
    return row


# ---------------------------------------------------------------------------------------------------
# the variance decomposition on the base policy


@torch.no_grad()
def variance_decomposition(task: str, args, n_traj: int, K: int, buckets: int = 4) -> dict:
    t0 = time.time()
    tr, _ = TASKS[task][0]({"advantage": "grpo"}, 0, 1e-3, RESULTS / "tmp" / "critic_ceiling" / f"{task}_vd", args)
    cache = (ROOT / args.vd_cache[task]).resolve() if args.vd_cache.get(task) else None
    if cache is not None and cache.exists():  # the held-out set benchmarks/critic_grafted.py drew (same base policy)
        d = load_tensor_cache(cache)
        prompts, R = d["prompts"], d["R"][:, 0].double()
        V, se = d["oracle"][:, :, 0].double(), d["oracle_stderr"][:, :, 0].double()
        counts, ro, K = d["oracle_counts"], None, d["K"]
        source = f"loaded from {cache.relative_to(ROOT)} (written by benchmarks/critic_grafted.py)"
    else:
        gen = torch.Generator().manual_seed(4242)
        prompts = tr.prompt_iter.batch(n_traj // tr.config.group_size, tr.config.group_size)
        cond = tr.task.encode(prompts)
        x_T = torch.randn((len(prompts), *tr.task.latent_shape), generator=gen)
        ro = sample_trajectories(tr.policy_output, tr.step, x_T, tr.timesteps, cond, prompts, generator=gen)
        R = reward_fn(tr)(ro.latents[:, -1], prompts)[:, 0].double()
        ov = rollout_oracle_values(tr.policy_output, tr.step, ro.latents, 0, tr.timesteps, cond, reward_fn(tr), K,
                                   gen, prompts, chunk=512)
        V, se = ov.values[:, :, 0].double(), ov.stderr[:, :, 0].double()
        counts, source = ov.counts.as_dict(), "drawn here"
    T = V.shape[1]
    ev = [explained_variance(V[:, k], R, se[:, k] ** 2) for k in range(T)] + [1.0]
    edges = [round(i * T / buckets) for i in range(buckets + 1)]
    share = [ev[edges[i + 1]] - ev[edges[i]] for i in range(buckets)]
    ev_bucket = [float(np.mean(ev[edges[i]:edges[i + 1]])) for i in range(buckets)]
    # per-step advantage variance, raw (reward units)
    step_r = terminal_rewards(R, T)
    groups = group_ids(prompts)
    adv = {"grpo_centred": (R - _group_mean(R, groups))[:, None].expand(-1, T),
           "grpo_normalised": grpo_advantages(R, groups)[:, None].expand(-1, T)}
    for name, lam in (("oracle_gae_lam0_mc_step", 0.0), ("oracle_gae_lam0.95", 0.95), ("oracle_gae_lam1", 1.0)):
        adv[name] = gae(step_r[:, :, None], V[:, :, None], 1.0, lam)[0][:, :, 0]
    adv_var = {k: [float(v) for v in a.var(0)] for k, a in adv.items()}
    adv_var_bucket = {k: [float(np.mean(v[edges[i]:edges[i + 1]])) for i in range(buckets)] for k, v in adv_var.items()}
    # the MC step's variance is the share of Var(R) that step resolves (a martingale's increments), plus MC noise
    mc_noise = [float((se[:, k] ** 2).mean() + (se[:, k + 1] ** 2).mean() if k + 1 < T else (se[:, k] ** 2).mean())
                for k in range(T)]
    return {"n_trajectories": len(prompts), "K": K, "sampler": "full stochastic trajectories of the base policy",
            "source": source,
            "var_R": float(R.var(unbiased=False)), "ev_per_step": ev[:T], "bucket_edges": edges,
            "ev_per_bucket": ev_bucket, "share_of_var_R_resolved_per_bucket": share,
            "advantage_variance_per_step": adv_var, "advantage_variance_per_bucket": adv_var_bucket,
            "mc_noise_variance_per_step_lam0": mc_noise, "oracle_counts": counts,
            "mean_stderr": float(se.mean()), "seconds": time.time() - t0,
            **({"closed_form_check": _gmm_closed_form(tr, ro, V, se, args)} if task == "gmm" and ro is not None
               else {})}


def _group_mean(x, groups):
    out = torch.zeros_like(x)
    for g in groups.unique():
        out[groups == g] = x[groups == g].mean()
    return out


def _gmm_closed_form(tr, ro, V, se, args) -> dict:
    """The base policy on the mixture is the exact ε: its oracle against the closed-form value (a discretisation gap
    at 20 steps remains: the closed form is the exact process's, the oracle the 20-step sampler's)."""
    lin = gmm_reward(args)
    exact = torch.stack([tr.task.value(lin, ro.latents[:, k].double(), tr.timesteps[k]) for k in range(V.shape[1])], 1)
    z = (V - exact) / se.clamp(min=1e-12)
    return {"mean_abs_diff": float((V - exact).abs().mean()), "mean_stderr": float(se.mean()),
            "fraction_within_3se": float((z.abs() < 3).double().mean())}


# ---------------------------------------------------------------------------------------------------
# summary


def queries_to_reach(curve, target: float, smooth: int = 3, key: str = "policy_queries") -> float:
    ys = np.array([c["reward"] for c in curve])
    xs = np.array([c[key] for c in curve])
    for i in range(len(ys)):
        if ys[max(0, i - smooth + 1): i + 1].mean() >= target:
            return float(xs[i])
    return math.inf


def _at_budget(curve, budget):
    """The last training reward (3-epoch mean) whose total queries are within ``budget``; None if even the first
    epoch spent more."""
    idx = [i for i, c in enumerate(curve) if c["reward_queries"] <= budget]
    if not idx:
        return None
    i = idx[-1]
    return float(np.mean([c["reward"] for c in curve[max(0, i - 2): i + 1]]))


def _method_summary(m: str, rm: list[dict], target: float | None = None, tie: float = 2e-3) -> dict:
    """One method's row at its chosen learning rate: the best final mean over the sweep (a diverged seed makes its
    value's mean NaN, never chosen); with ``target``, values within ``tie`` of the best are tie-broken by the fewest
    median policy queries to reach ``target`` (a saturated reward leaves several values at the same final)."""
    by_lr = {}
    for lr in sorted({r["lr"] for r in rm}):
        fin = [r["final"]["reward"] for r in rm if r["lr"] == lr]
        by_lr[lr] = (float(np.mean(fin)), float(np.std(fin)), len(fin))  # NaN if any seed diverged
    ok = [k for k in by_lr if math.isfinite(by_lr[k][0])] or list(by_lr)
    best = max(ok, key=lambda k: by_lr[k][0] if math.isfinite(by_lr[k][0]) else -math.inf)
    if target is not None and math.isfinite(by_lr[best][0]):
        near = [k for k in ok if by_lr[k][0] >= by_lr[best][0] - tie]
        key = "reward_queries" if m == "mc_counted" else "policy_queries"
        best = min(near, key=lambda k: (float(np.median([queries_to_reach(r["curve"], target, key=key)
                                                           for r in rm if r["lr"] == k])), -by_lr[k][0]))
    chosen = [r for r in rm if r["lr"] == best]
    return {"final_reward_mean": by_lr[best][0], "final_reward_std": by_lr[best][1],
            "seeds": [r["seed"] for r in chosen], "chosen_lr": best,
            "sweep": {f"{k:g}": {"mean": v[0], "std": v[1], "seeds": v[2]} for k, v in by_lr.items()},
            "base_reward_mean": float(np.mean([r["base"]["reward"] for r in chosen])),
            "policy_queries": int(np.median([r["curve"][-1]["policy_queries"] if r["curve"]
                                             else r["reward_queries"] for r in chosen])),
            "total_queries": int(np.median([r["reward_queries"] + (0 if m == "mc_counted"
                                            else r["oracle_queries"]) for r in chosen])),
            "oracle_queries": int(np.median([r["oracle_queries"] for r in chosen])),
            "oracle_nfe": int(np.median([r["oracle_nfe"] for r in chosen])),
            "diverged_seeds": sum(r.get("diverged") is not None for r in chosen),
            "last3_train_reward_mean": float(np.mean([np.mean([c["reward"] for c in r["curve"][-3:]])
                                                      for r in chosen if r["curve"]])),
            "mean_epoch_seconds": float(np.mean([c["epoch_s"] for r in chosen for c in r["curve"]])),
            "_runs": chosen}


def summarize(runs: list[dict]) -> dict:
    out = {}
    for task in sorted({r["task"] for r in runs}):
        rt = [r for r in runs if r["task"] == task]
        methods = {m: _method_summary(m, [r for r in rt if r["method"] == m]) for m in METHODS
                   if any(r["method"] == m for r in rt)}
        summ = {"methods": methods, "sampler_families": [[m for m in f if m in methods] for f in families(task)]}
        free_all = [m for m in CRITIC_FREE if m in methods]
        if free_all:
            summ["best_critic_free_final_reward"] = max(free_all, key=lambda m: methods[m]["final_reward_mean"])
        for family in families(task):  # queries to reach: against the best critic-free method sampling the same way
            free = [m for m in family if m in CRITIC_FREE and m in methods]
            if not free:
                continue
            best_free = max(free, key=lambda m: methods[m]["final_reward_mean"])
            target = methods[best_free]["last3_train_reward_mean"]
            base_q = methods[best_free]["policy_queries"]
            for m in family:  # the critic methods' step sizes, tie-broken by their speed to that final
                if m in methods and m not in CRITIC_FREE:
                    methods[m] = _method_summary(m, [r for r in rt if r["method"] == m], target)
            if "grpo" in family:
                summ["best_critic_free"] = best_free
                summ["best_critic_free_final_train_reward"] = target
                # the same method's first 3 epochs (about the base policy) against its last 3: where the runs' gain is
                # within the epoch-to-epoch swing of the training reward (which prompts and noise an epoch drew),
                # "queries to reach it" (and oracle_queries_ratio) read that swing, not speed.  The swing: the std of
                # an epoch's training reward about its neighbours (successive differences / √2); a gain counts when
                # it is at least 2 standard errors of a difference of two 3-epoch means, averaged over the runs
                curves = [np.array([c["reward"] for c in r["curve"]]) for r in methods[best_free]["_runs"]
                          if len(r["curve"]) >= 6]
                first3 = float(np.mean([c[:3].mean() for c in curves]))
                gain = float(np.mean([c[-3:].mean() - c[:3].mean() for c in curves]))
                swing = float(np.mean([np.std(np.diff(c)) / math.sqrt(2) for c in curves]))
                # no swing at all (every epoch read the same): any gain is certain, a fall or a flat line is not one
                z = (gain / (swing * math.sqrt(2 / (3 * len(curves)))) if swing > 0
                     else math.copysign(math.inf, gain) if gain != 0 else 0.0)
                summ["best_critic_free_first3_train_reward"] = first3
                summ["best_critic_free_train_gain"] = gain
                summ["train_reward_epoch_swing"] = swing
                summ["train_gain_z"] = z
                summ["queries_to_reach_informative"] = bool(z >= 2)
            for m in family:
                if m not in methods:
                    continue
                s = methods[m]
                s["baseline_for_queries"] = best_free
                reach = [queries_to_reach(r["curve"], target) for r in s["_runs"]]
                s["policy_queries_to_reach_best_baseline"] = [q if math.isfinite(q) else None for q in reach]
                med = float(np.median(reach))
                s["queries_ratio_median"] = med / base_q if math.isfinite(med) else None
                if m == "mc_counted":  # its x-axis with its oracle queries counted, at the others' budget
                    reach_t = [queries_to_reach(r["curve"], target, key="reward_queries") for r in s["_runs"]]
                    s["total_queries_to_reach_best_baseline"] = [q if math.isfinite(q) else None for q in reach_t]
                    s["train_reward_at_equal_total_budget"] = [_at_budget(r["curve"], base_q) for r in s["_runs"]]
                    s["total_queries_first_epoch"] = [r["curve"][0]["reward_queries"] for r in s["_runs"]]
                    med_t = float(np.median(reach_t))  # its budget is all its queries: the ratio counts them
                    s["queries_ratio_median"] = med_t / base_q if math.isfinite(med_t) else None
                    s["queries_ratio_median_policy_only"] = med / base_q if math.isfinite(med) else None
        if methods:
            if "oracle_gae" in methods:
                summ["oracle_queries_ratio"] = methods["oracle_gae"]["queries_ratio_median"]
                base = methods["oracle_gae"]["base_reward_mean"]
                gain_o = methods["oracle_gae"]["final_reward_mean"] - base
                learned = [m for m in LEARNED if m in methods]
                if learned:
                    best_l = max(learned, key=lambda m: methods[m]["final_reward_mean"])
                    summ["best_learned_critic"] = best_l
                    summ["learned_share_of_oracle_gain"] = ((methods[best_l]["final_reward_mean"] - base) / gain_o
                                                            if abs(gain_o) > 1e-12 else None)
                    # goal P1: where the oracle shows room (ratio <= 0.5), a learned critic with half the queries
                    ratios = [methods[m]["queries_ratio_median"] for m in learned
                              if methods[m].get("queries_ratio_median") is not None]
                    room = summ["oracle_queries_ratio"] is not None and summ["oracle_queries_ratio"] <= 0.5
                    summ["learned_queries_ratio"] = min(ratios) if ratios else None
                    summ["oracle_shows_room"] = room and bool(summ.get("queries_to_reach_informative", True))
                    summ["goal_p1_met"] = (None if not summ["oracle_shows_room"] else
                                           summ["learned_queries_ratio"] is not None
                                           and summ["learned_queries_ratio"] <= 0.5)
        for s in methods.values():
            s.pop("_runs")
        out[task] = summ
    return out


def plot(runs, summary, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted(summary)
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for i, (m, s) in enumerate(summary[task]["methods"].items()):
            rs = [r for r in runs if r["task"] == task and r["method"] == m and r["lr"] == s["chosen_lr"]]
            n = min(len(r["curve"]) for r in rs)
            key = "reward_queries" if m == "mc_counted" else "policy_queries"
            xs = np.array([c[key] for c in rs[0]["curve"][:n]])
            ys = np.array([[c["reward"] for c in r["curve"][:n]] for r in rs])
            ax.plot(xs, ys.mean(0), color=f"C{i}", label=f"{m} (lr {s['chosen_lr']:g}, {len(rs)} seeds)")
            ax.fill_between(xs, ys.mean(0) - ys.std(0), ys.mean(0) + ys.std(0), color=f"C{i}", alpha=0.15)
        ax.set_title(f"{task}: training reward vs policy reward queries (mc_counted: all queries)", fontsize=9)
        ax.set_xlabel("reward queries (log)")
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=["gmm", "digits"], choices=list(TASKS))
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--lrs", nargs="+", type=float, default=None, help="the sweep (default: 3 values per task)")
    p.add_argument("--sweep-methods", nargs="+", default=None,
                   help="methods swept over --lrs; the others run only at the task's middle value")
    p.add_argument("--budget", type=int, nargs="+", default=None, help="policy reward queries per run, per task")
    p.add_argument("--gmm-epochs", type=int, default=40)
    p.add_argument("--gmm-kl", type=float, default=0.0, help="kl_coef on the mixture")
    p.add_argument("--gmm-reward", choices=["box", "linear"], default="box",
                   help="box: a bounded 0/1 reward (without a KL an unbounded linear reward runs away)")
    p.add_argument("--K-gmm", type=int, default=8)
    p.add_argument("--K-digits", type=int, default=2)
    p.add_argument("--K-digits-dit", type=int, default=2)
    p.add_argument("--K-t2i-sd3", type=int, default=2)
    p.add_argument("--awm-timestep-fraction", type=float, default=0.25,
                   help="digits: AWM trains on this fraction of each trajectory's steps (its oracle rows)")
    p.add_argument("--eval-per-class", type=int, default=20)
    p.add_argument("--t2i-eval-prompts", type=int, default=64,
                   help="t2i_sd3: held-out (and training) prompts evaluated, as benchmarks/t2i_advantages.py")
    p.add_argument("--vd-trajectories", type=int, nargs="+", default=None)
    p.add_argument("--vd-K", type=int, nargs="+", default=None)
    p.add_argument("--vd-cache", nargs="*", default=[], metavar="TASK=PATH",
                   help="load a task's held-out oracle set (benchmarks/critic_grafted.py writes one) for the decomposition")
    p.add_argument("--reduction", default="", help="a note on what was reduced versus the issue, stored in the JSON")
    p.add_argument("--out", default=str(RESULTS / "critic_ceiling.json"))
    p.add_argument("--merge-from", default=None, metavar="JSON",
                   help="run nothing: add to --out the runs (of --tasks) and the invocation records of another JSON "
                        "this script wrote (runs made in parallel into a copy; a run already in --out, same task, "
                        "method, seed and lr, is kept as it is), then summarise again")
    p.add_argument("--resummarize", action="store_true",
                   help="recompute the summary and the plot of --out from its stored runs (no training); with "
                   "--reduction, add that note for --tasks")
    p.add_argument("--merge", action="store_true", help="keep the other tasks' results already in --out")
    p.add_argument("--add-runs", action="store_true",
                   help="with --merge: keep this task's runs and decomposition too (e.g. to extend a sweep)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    args.K = {"gmm": args.K_gmm, "digits": args.K_digits, "digits_dit": args.K_digits_dit, "t2i_sd3": args.K_t2i_sd3}
    args.vd_cache = dict(item.split("=", 1) for item in args.vd_cache)
    budgets = dict(zip(args.tasks, args.budget or [{"gmm": 2560, "digits": 960, "digits_dit": 960, "t2i_sd3": 1920}[t]
                                                     for t in args.tasks]))
    vd_n = dict(zip(args.tasks, args.vd_trajectories or [{"gmm": 512, "digits": 80, "digits_dit": 80, "t2i_sd3": 80}[t]
                                                                    for t in args.tasks]))
    vd_k = dict(zip(args.tasks, args.vd_K or [{"gmm": 32, "digits": 4, "digits_dit": 4, "t2i_sd3": 4}[t]
                                              for t in args.tasks]))
    out = Path(args.out)
    if args.merge_from:
        result, other = json.loads(out.read_text()), json.loads(Path(args.merge_from).read_text())
        key = (lambda r: (r["task"], r["method"], r["seed"], r["lr"]))
        have = {key(r) for r in result["runs"]}
        new = [r for r in other["runs"] if r["task"] in args.tasks and key(r) not in have]
        result["runs"] += new
        seen = [json.dumps(i, sort_keys=True) for i in result.get("invocations", [])]
        result.setdefault("invocations", []).extend(
            i for i in other.get("invocations", []) if set(i["tasks"]) & set(args.tasks)
            and json.dumps(i, sort_keys=True) not in seen)
        result["summary"] = summarize(result["runs"])
        out.write_text(json.dumps(result, indent=1, default=float))
        plot(result["runs"], result["summary"], out.with_suffix(".png"))
        print(f"added {len(new)} runs from {args.merge_from}")
        return
    if args.resummarize:
        result = json.loads(out.read_text())
        if args.reduction:  # a note on runs already stored (e.g. the seeds each method ended with), no training
            result.setdefault("invocations", []).append({"tasks": args.tasks, "argv": sys.argv[1:] if argv is None
                                                         else argv, "reduction_vs_issue": args.reduction})
            result["reduction_vs_issue"] = args.reduction
        result["summary"] = summarize(result["runs"])
        out.write_text(json.dumps(result, indent=1, default=float))
        plot(result["runs"], result["summary"], out.with_suffix(".png"))
        return
    t0 = time.time()
    result = {"benchmark": "critic_ceiling", "args": {k: v for k, v in vars(args).items() if k != "K"}, "K": args.K,
              "budget_policy_queries": budgets, "reduction_vs_issue": args.reduction,
              "machine": machine_info(note="shared machine, 2 cores, contended by other agents; pinned to one core"),
              "variance_decomposition": {}, "runs": []}

    if args.merge and out.exists():  # keep the other tasks' runs (each task is run by its own invocation)
        old = json.loads(out.read_text())
        result["runs"] = [r for r in old["runs"] if r["task"] not in args.tasks or args.add_runs]
        result["budget_policy_queries"] = {**old.get("budget_policy_queries", {}), **budgets}
        result["K"] = {**old.get("K", {}), **{t: args.K[t] for t in args.tasks}}
        result["variance_decomposition"] = {k: v for k, v in old["variance_decomposition"].items()
                                            if k not in args.tasks or args.add_runs}
        result["invocations"] = [i for i in old.get("invocations", [])
                                 if args.add_runs or not set(i["tasks"]) & set(args.tasks)]
    result.setdefault("invocations", []).append({"tasks": args.tasks, "argv": sys.argv[1:] if argv is None else argv,
                                                 "reduction_vs_issue": args.reduction})

    def save():
        result["summary"] = summarize(result["runs"])
        result["seconds"] = time.time() - t0
        out.write_text(json.dumps(result, indent=1, default=float))

    for task in args.tasks:
        if task not in result["variance_decomposition"]:
            result["variance_decomposition"][task] = variance_decomposition(task, args, vd_n[task], vd_k[task])
        print(task, "variance decomposition", json.dumps(result["variance_decomposition"][task]["ev_per_bucket"]),
              flush=True)
        save()
        lrs = args.lrs or TASKS[task][1]
        mid = TASKS[task][1][1]
        for seed in args.seeds:
            for m in args.methods:
                if task == "gmm" and m in GRAFTED:  # the mixture's reward is a formula: no network to graft
                    continue
                swept = args.sweep_methods is None or m in args.sweep_methods
                for lr in (lrs if swept else [mid]):
                    result["runs"].append(run_one(task, m, seed, lr, budgets[task], args))
                    save()
    plot(result["runs"], result["summary"], out.with_suffix(".png"))
    print(json.dumps({t: {k: v for k, v in s.items() if k != "methods"} for t, s in result["summary"].items()},
                     indent=1, default=float))


if __name__ == "__main__":
    main()
