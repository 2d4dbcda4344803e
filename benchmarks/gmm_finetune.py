"""Fine-tuning on the Gaussian-mixture task: gae vs grpo vs ddpo against the exact tilted target (issue #4).

    .venv/bin/python benchmarks/gmm_finetune.py                  # 3 modes x 3 seeds, a few min on 2 CPU cores
    .venv/bin/python benchmarks/gmm_finetune.py --epochs 10 --seeds 0   # smoke run

Policy = exact analytic ε of the mixture + a zero-initialised residual MLP carrying the LoRA adapters,
so the starting policy is the exact model.  Reward r(x) = w·x (linear), KL-regularised PPO
(``kl_coef`` = β, closed-form per-step Gaussian KL to the reference, ``log_prob_reduction='sum'``).

What the objective converges to — stated honestly, the match is approximate:

* The KL-regularised *trajectory* objective E[r(x_final)] − α·KL(path_θ ‖ path_ref) has the optimum
  path_ref·e^{r/α}/Z, whose final marginal is the tilted target p*(x) ∝ p_ref(x)·e^{r(x)/α}.
* The trainer optimises per (trajectory, step) pair  −A_k·ρ_k + β·KL_k  with *whitened* advantages
  (GAE: normalize_advantages; GRPO: group std; DDPO: per-prompt std).  Whitening divides the reward by
  its current batch std σ_R, so the effective temperature is α ≈ β·σ_R, with σ_R the reward std under
  the policy at convergence.  We take the self-consistent α solving α = β·σ_R(p*_α) (exact for the
  linear reward: σ_R of a mixture) and compare with the tilted target at that α.
* The per-step KL enters as a loss at the visited states, not as a reward, so its gradient through the
  state distribution is dropped; PPO's clipping and finite training also stop short.  Hence the
  tilted target is the reference point, not a proven fixed point.  ``p_ref`` itself is the T-step
  sampler's law, which differs from the exact mixture by a discretisation error (reported as
  ``base_vs_reference``).

Every distance (sliced W2 and MMD, n samples) is reported next to its noise floor (exact vs exact at
the same n).  Writes benchmarks/results/gmm_finetune.{json,png}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

from critic_align.backbones import MLP_LORA_TARGETS, MLPAdapter, MLPDenoiser, ResidualMLP  # noqa: E402
from critic_align.config import PPOConfig  # noqa: E402
from critic_align.distances import mmd, noise_floor, sliced_wasserstein  # noqa: E402
from critic_align.rewards import FunctionReward, MultiReward  # noqa: E402
from critic_align.tasks.gmm import GaussianMixture, GMMTask, LinearReward  # noqa: E402
from critic_align.trainer import Trainer  # noqa: E402

W = (1.0, 0.5)


def reward_std(mix: GaussianMixture, w) -> float:
    w = torch.as_tensor(w, dtype=torch.float64)
    mk = mix.means @ w
    second = (mix.weights * (mk**2 + mix.stds**2 * (w @ w))).sum()
    return float((second - (mix.weights * mk).sum() ** 2).sqrt())


def self_consistent_alpha(mix: GaussianMixture, w, beta: float, iters: int = 200) -> float:
    alpha = beta * reward_std(mix, w)
    for _ in range(iters):
        alpha = 0.5 * alpha + 0.5 * beta * reward_std(mix.tilt_linear(w, alpha), w)
    return alpha


def make_trainer(mode, seed, args, task, out_dir):
    torch.manual_seed(seed)
    model = MLPDenoiser(ResidualMLP(hidden=args.hidden, num_layers=2), task.analytic_eps())
    cfg = PPOConfig(
        advantage=mode, seed=seed, num_epochs=args.epochs, num_inference_steps=args.steps,
        batch_size=args.batch, group_size=args.batch, sample_chunk_size=args.batch,
        minibatch_size=args.minibatch, ppo_epochs=1, clip_range=args.clip, learning_rate=args.lr,
        log_prob_reduction="sum", kl_coef=args.kl, lora_rank=8, lora_target_modules=MLP_LORA_TARGETS,
        critic_mode="full", critic_learning_rate=1e-3, value_head_hidden=128, value_pretrain_epochs=args.value_pretrain,
        value_pretrain_passes=4, stat_buffer_size=args.batch, stat_min_count=args.batch // 2,
        output_dir=str(out_dir), log_tensorboard=False, progress=False, grid_every=0, checkpoint_every=0,
    )
    lin = LinearReward(W)
    return Trainer(cfg, task, MLPAdapter(model), task.scheduler, rewards=MultiReward([FunctionReward(lin, "linear")]))


def distances(x, target):
    return {"sliced_w2": sliced_wasserstein(x, target), "mmd": mmd(x, target)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", nargs="+", default=["gae", "grpo", "ddpo"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--minibatch", type=int, default=320)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--clip", type=float, default=0.2)
    p.add_argument("--kl", type=float, default=2.0, help="kl_coef β")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--value-pretrain", type=int, default=10)
    p.add_argument("--n-eval", type=int, default=2000)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    task = GMMTask()
    lin = LinearReward(W)
    alpha = self_consistent_alpha(task.final_mixture, W, args.kl)
    target = lin.tilt(task.final_mixture, alpha)
    g = torch.Generator().manual_seed(777)
    target_x = target.sample(args.n_eval, g)
    target_reward = float((target.weights * (target.means @ lin.w)).sum())
    floors = {name: noise_floor(target.sample, args.n_eval, fn, repeats=5)
              for name, fn in (("sliced_w2", sliced_wasserstein), ("mmd", mmd))}
    ref_x = task.sample_reference(args.n_eval, g)
    header = {"alpha": alpha, "kl_coef": args.kl, "w": W, "target_mean_reward": target_reward,
              "reference_mean_reward": float((task.final_mixture.weights * (task.final_mixture.means @ lin.w)).sum()),
              "noise_floor": floors, "reference_vs_target": distances(ref_x, target_x)}
    runs = {}
    for mode in args.modes:
        for seed in args.seeds:
            tr = make_trainer(mode, seed, args, task, out / "tmp" / "gmm_finetune" / f"{mode}_seed{seed}")
            tr.out.mkdir(parents=True, exist_ok=True)
            if tr.critic is not None:
                tr.pretrain_value()
            curve = []

            def evaluate(epoch, tr=tr, seed=seed, curve=curve):
                x = tr.sample([""] * args.n_eval, seed=1000 + seed)
                row = {"epoch": epoch, "reward_queries": tr.reward_queries,
                       "mean_reward": float(lin(x).mean()), **distances(x, target_x)}
                curve.append(row)
                return row

            evaluate(0)
            if seed == args.seeds[0] and mode == args.modes[0]:
                x = tr.sample([""] * args.n_eval, seed=99, use_policy=False)
                header["base_vs_reference"] = distances(x, task.sample_reference(args.n_eval, g))
                header["base_vs_reference_floor"] = {
                    name: noise_floor(task.sample_reference, args.n_eval, fn, repeats=5)
                    for name, fn in (("sliced_w2", sliced_wasserstein), ("mmd", mmd))}
            for ep in range(1, args.epochs + 1):
                res = tr.train_epoch()
                if ep % args.eval_every == 0 or ep == args.epochs:
                    row = evaluate(ep)
                    row["kl_to_ref"] = res.metrics.get("kl_to_ref")
                    row["clip_fraction"] = res.metrics.get("clip_fraction")
            runs[f"{mode}/seed{seed}"] = curve
            last = curve[-1]
            print(f"{mode} seed {seed}: reward {last['mean_reward']:.3f} (target {target_reward:.3f}) "
                  f"SW2 {last['sliced_w2']:.3f} (floor {floors['sliced_w2']['mean']:.3f}) "
                  f"MMD {last['mmd']:.4f} (floor {floors['mmd']['mean']:.4f})  [{time.time() - t0:.0f} s]", flush=True)

    summary = {}
    for mode in args.modes:
        finals = [runs[f"{mode}/seed{s}"][-1] for s in args.seeds]
        summary[mode] = {k: {"mean": float(torch.tensor([f[k] for f in finals]).mean()),
                             "std": float(torch.tensor([f[k] for f in finals]).std(unbiased=False))}
                         for k in ("mean_reward", "sliced_w2", "mmd")}
        summary[mode]["noise_floor"] = {k: floors[k]["mean"] for k in floors}
    result = {"benchmark": "gmm_finetune", "args": vars(args), "time_s": time.time() - t0, **header,
              "summary": summary, "runs": runs}
    (out / "gmm_finetune.json").write_text(json.dumps(result, indent=2))
    plot(result, args, out / "gmm_finetune.png", target_x)
    print(json.dumps(summary, indent=2))
    print(f"wrote {out / 'gmm_finetune.json'} ({time.time() - t0:.0f} s)")


def plot(result, args, path, target_x):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    colors = {"gae": "C0", "grpo": "C1", "ddpo": "C2"}
    for key, curve in result["runs"].items():
        mode = key.split("/")[0]
        q = [r["reward_queries"] for r in curve]
        kw = dict(color=colors.get(mode), alpha=0.7, label=mode if key.endswith(f"seed{args.seeds[0]}") else None)
        axes[0].plot(q, [r["sliced_w2"] for r in curve], "o-", ms=3, **kw)
        axes[1].plot(q, [r["mmd"] for r in curve], "o-", ms=3, **kw)
        axes[2].plot(q, [r["mean_reward"] for r in curve], "o-", ms=3, **kw)
    for ax, name in ((axes[0], "sliced_w2"), (axes[1], "mmd")):
        fl = result["noise_floor"][name]
        ax.axhspan(0, fl["mean"] + fl["std"], color="gray", alpha=0.3, label=f"noise floor (n={args.n_eval})")
        ax.set_ylabel(f"{name} to exact tilted target")
        ax.set_yscale("log")
    axes[2].axhline(result["target_mean_reward"], color="k", ls="--", label="exact tilted target")
    axes[2].axhline(result["reference_mean_reward"], color="gray", ls=":", label="reference")
    axes[2].set_ylabel("mean reward w·x")
    for ax in axes:
        ax.set_xlabel("reward queries")
        ax.legend(fontsize=7)
    fig.suptitle(f"GMM fine-tuning, r = w·x, kl_coef β={result['kl_coef']}, target α={result['alpha']:.3f}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
