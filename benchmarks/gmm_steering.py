"""Steering on the exact Gaussian-mixture task (issues #4, #5, #16): every SMC potential against the exact tilted target.

    python benchmarks/gmm_steering.py          # ≈ 13 min on one shared CPU core (time_s in the JSON)

The sampler is the exact model (analytic ε of the mixture), T-step stochastic DDIM (eta = 1).  Two rewards, each
with its own λ; the target is p*(x) ∝ p(x)·exp(λ·r(x)):

    linear   r = w·x,                 λ = 2   (target: a mixture in closed form)
    box      r = 1[x in a box] (0/1), λ = 10  (a sharp reward; target sampled exactly by rejection)

SMC potentials (steering.smc's ``potential``), each from the exact references of critic_align/tasks/gmm.py
and from a learned critic (one value head per target, value-pretrained on Monte-Carlo returns):

    smc/value/{exact,critic}       λ·E[r | x_t]                      (the critic as trained)
    smc/soft_value/{exact,critic}  log E[exp(λ·r) | x_t]             (the optimal twist).  Critic: for the 0/1 box
                                   the closed form log(1 + (e^λ − 1)·P(r=1|x_t)) from the box head (which learns
                                   P(r=1|x_t)); for the linear reward a head trained on exp(λ(r − c)), c = 3 (above
                                   every reward the mixture reaches), potential log max(V, e^{λ(−3 − c)}) + λ·c
    smc/x0_reward                  λ·r(x̂0(x_t))                      (FK steering; a reward call per step)

SMC's final weights carry exp(λ·r) whatever the potential, so every variant targets p* as N → ∞; the potential
decides how fast.  Output: one particle per group drawn ∝ its final weight (SMC's default).  For N in
--particles: sliced W2 to exact target samples with the noise floor (exact vs exact at the same n), mean
reward, final ESS / N (after the final reweighting), resampling rate and the cost per output sample.  Also:
base, best-of-N, guidance (N = 1), guided-proposal SMC with and without the per-step KL cap (its final ESS),
and SMC with the exact soft value as the sampler is refined (--convergence).

"Converges" (``converges`` per method, ``soft_value_converges`` at the top level: the exact soft value on every
reward) means, over the N sweep: (1) the distance does not grow with N — each doubling raises it by at most
2 noise-floor stds — and ends below where it started, and (2) at the largest N it lies within the reachable
band: noise floor mean + 3 std, plus the T-step sampler's own discretisation excess (its distance to the
*untilted* exact reference minus that distance's noise floor), which SMC's weights cannot remove.
Writes benchmarks/results/gmm_steering.{json,png}.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

from gmm_critic import build  # noqa: E402

from critic_align.distances import noise_floor, sliced_wasserstein  # noqa: E402
from critic_align.steering import (  # noqa: E402
    Resampling,
    base,
    binary_soft_value,
    critic_value_fn,
    exp_reward_target,
    exp_soft_value,
    steer,
)
from critic_align.steering.potentials import SoftValueFn  # noqa: E402

SMC_METHODS = ("smc/value/exact", "smc/value/critic", "smc/soft_value/exact", "smc/soft_value/critic",
               "smc/x0_reward")


def converges(ws: list[float], floor: dict, discretisation: float) -> dict:
    """The criterion of the module doc on a distance-vs-N sweep (N increasing)."""
    tol = 2 * floor["std"]
    monotone = all(b <= a + tol for a, b in zip(ws, ws[1:])) and ws[-1] < ws[0]
    band = floor["mean"] + 3 * floor["std"] + discretisation
    return {"non_increasing": monotone, "band": band, "final_within_band": ws[-1] <= band,
            "converges": bool(monotone and ws[-1] <= band)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20, help="denoising steps T of the sweep")
    p.add_argument("--groups", type=int, default=2000, help="output samples per method (the distance's n)")
    p.add_argument("--particles", type=int, nargs="+", default=[4, 8, 16, 32, 64], help="N of the sweep")
    p.add_argument("--lam-linear", type=float, default=2.0, help="λ for the linear reward")
    p.add_argument("--lam-box", type=float, default=10.0, help="λ for the 0/1 box reward")
    p.add_argument("--exp-c", type=float, default=3.0, help="c of the linear soft-value head's target exp(λ(r − c))")
    p.add_argument("--critic-epochs", type=int, default=30, help="value-pretraining rollout batches for the critic")
    p.add_argument("--guided-particles", type=int, default=16, help="N for guided-proposal SMC (capped vs uncapped)")
    p.add_argument("--convergence", nargs="*", default=["100:32"],
                   help="STEPS:PARTICLES pairs for SMC with the exact soft value as the sampler is refined")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    lams = {"linear": args.lam_linear, "box": args.lam_box}

    # the critic: gmm_critic's setup (full-copy MLP critic, one head per target): linear, box, and the linear
    # reward's soft-value target exp(λ(r − c))
    ns = argparse.Namespace(seed=args.seed, hidden=64, steps=args.steps, batch=256, minibatch=512,
                            epochs=args.critic_epochs, passes=4, critic_mode="full", lr=1e-3, target="mc",
                            gae_lambda=0.95, lr_decay=False)
    from critic_align.tasks.gmm import LinearReward

    lin_target = exp_reward_target(LinearReward([1.0, 0.5]), args.lam_linear, args.exp_c)
    task, trainer, rewards = build(ns, out / "tmp" / "gmm_steering", extra_targets={"linear_exp": lin_target})
    trainer.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    trainer.pretrain_value()
    critic_time = time.time() - t0
    num_heads = len(rewards) + 1
    den = trainer.reference_output
    step = trainer.step
    ts = trainer.timesteps
    g = args.groups

    def head(k):
        return critic_value_fn(trainer.critic, weights=[1.0 if i == k else 0.0 for i in range(num_heads)])

    result = {"benchmark": "gmm_steering", "args": vars(args), "critic_pretrain_s": critic_time,
              "critic_reward_queries": trainer.reward_queries, "rewards": {}}
    for j, (name, reward) in enumerate(rewards.items()):
        lam = lams[name]
        alpha = 1.0 / lam
        gen = torch.Generator().manual_seed(args.seed + 100 * j)
        target_sampler = lambda n, gg, r=reward, a=alpha: task.sample_tilted(r, a, n, gg).double()  # noqa: E731
        target = target_sampler(g, torch.Generator().manual_seed(7))
        floor = noise_floor(target_sampler, g, sliced_wasserstein, repeats=5)
        exact_value = lambda x, t, c, r=reward: task.value(r, x.double(), t).float()  # noqa: E731
        exact_soft = SoftValueFn(lambda x, t, c, r=reward, a=alpha, lm=lam: lm * task.soft_value(r, x.double(), t, a),
                                 lam, "exact")
        critic_value = head(j)
        if name == "box":
            critic_soft = binary_soft_value(critic_value, lam)
        else:
            # floor V at exp(λ(r_min − c)), r_min = -3 (below every reward the mixture reaches): the regression head
            # can undershoot to V <= 0 where the value is tiny, which would otherwise kill whole groups
            critic_soft = exp_soft_value(head(len(rewards)), lam, args.exp_c, v_min=math.exp(lam * (-3.0 - args.exp_c)))
        reward_fn = lambda s, prompts, r=reward: r(s)  # noqa: E731
        sources = {"value/exact": exact_value, "value/critic": critic_value, "soft_value/exact": exact_soft,
                   "soft_value/critic": critic_soft}

        def run(method, n, steps=None, **extra):
            # method: this benchmark's row label; steering: the steering method (a key of steering.METHODS) it runs
            if method.startswith("smc/"):
                potential = method.split("/")[1]
                kw = dict(num_particles=n, lam=lam, output="sample", resampling=Resampling(ess_threshold=0.5))
                if potential == "x0_reward":
                    steering = "smc_x0"
                else:
                    steering = "smc"
                    kw.update(potential=potential, value_fn=sources[method[len("smc/"):]])
            elif method == "guidance/exact":  # ∇ log E[exp(λr)|x_t]: the tilted score
                steering, kw = "guidance", dict(value_fn=exact_soft, scale=1.0)
            elif method == "guidance/critic":
                steering, kw = "guidance", dict(value_fn=critic_value, scale=lam)
            else:
                steering, kw = method, ({} if method == "base" else dict(num_particles=n))
            kw.update(extra)
            x_T = torch.randn(g * n, *task.latent_shape, generator=gen)
            timesteps = ts if steps is None else step.schedule.timesteps(steps)
            res = steer(steering, den, step, x_T, timesteps, reward_fn=reward_fn, generator=gen, **kw)
            d = sliced_wasserstein(res.samples.double(), target)
            row = {"method": method, "particles": n, "steps": len(timesteps), "sliced_w2": d,
                   "mean_reward": float(res.rewards.double().mean()),
                   "final_ess_per_particle": float(res.final_ess.nanmean()) / n,
                   "resample_rate": float(res.resampled.float().mean()), **res.cost.to_dict()}
            print(f"{name:6s} {method:24s} N={n:2d} T={row['steps']:3d}  W2={d:.3f}  r={row['mean_reward']:.3f}  "
                  f"ESS/N={row['final_ess_per_particle']:.2f}  eqNFE={row['equivalent_nfe']:.0f}  "
                  f"{row['wall_time_s']:.1f}s", flush=True)
            return row

        rows = [run("base", 1), run("guidance/exact", 1), run("guidance/critic", 1)]
        for n in args.particles:
            rows.append(run("bon", n))
            for method in SMC_METHODS:
                rows.append(run(method, n))
        # guided-proposal SMC (value potential, guidance by λ·∇E[r|x_t]): uncapped it collapses at the last steps
        guided = []
        for cap in (None, 1.0):
            row = run("smc/value/exact", args.guided_particles, guidance_scale=lam, guidance_max_kl=cap)
            row["method"] = "smc+guidance/value/exact" + (f" (KL cap {cap:g})" if cap else " (uncapped)")
            guided.append(row)
        # the T-step sampler is not the exact model's law: SMC's weights target the *sampler's* final law tilted by
        # exp(λr), so its distance to the exact target cannot go below the sampler's own discretisation error
        plain = base(den, step, torch.randn(g, *task.latent_shape, generator=gen), ts, reward_fn=reward_fn,
                     generator=gen).samples.double()
        reference = task.sample_reference(g, torch.Generator().manual_seed(8)).double()
        sampler_bias = sliced_wasserstein(plain, reference)
        reference_floor = noise_floor(lambda n, gg: task.sample_reference(n, gg).double(), g, sliced_wasserstein,
                                      repeats=5)
        discretisation = max(0.0, sampler_bias - reference_floor["mean"])
        verdicts = {}
        for method in SMC_METHODS + ("bon",):
            ws = [r["sliced_w2"] for n in args.particles for r in rows if r["method"] == method and r["particles"] == n]
            verdicts[method] = {"sliced_w2": ws, **converges(ws, floor, discretisation)}
        convergence = []
        for spec in args.convergence:
            steps_c, n_c = (int(v) for v in spec.split(":"))
            row = run("smc/soft_value/exact", n_c, steps=steps_c)
            convergence.append(row)
        result["rewards"][name] = {
            "lam": lam,
            "sampler_vs_untilted_reference_w2": sampler_bias,
            "untilted_reference_noise_floor": reference_floor,
            "discretisation_excess": discretisation,
            "target_mean_reward": float(reward(target.float()).double().mean()),
            "noise_floor": floor, "rows": rows, "guided": guided, "convergence": convergence,
            "converges": verdicts,
        }
    result["soft_value_converges"] = all(r["converges"]["smc/soft_value/exact"]["converges"]
                                         for r in result["rewards"].values())
    result["soft_value_converges_critic"] = all(r["converges"]["smc/soft_value/critic"]["converges"]
                                                for r in result["rewards"].values())
    result["time_s"] = time.time() - t_start
    (out / "gmm_steering.json").write_text(json.dumps(result, indent=2))
    plot(result, out / "gmm_steering.png")
    print(f"soft_value_converges={result['soft_value_converges']} (critic: {result['soft_value_converges_critic']})")
    print(f"wrote {out / 'gmm_steering.json'} ({result['time_s']:.0f} s)")


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["rewards"])
    fig, axes = plt.subplots(2, len(names), figsize=(6.5 * len(names), 8.5), squeeze=False)
    for j, name in enumerate(names):
        res = result["rewards"][name]
        steps = result["args"]["steps"]
        for row_ax, key, ylabel in ((0, "sliced_w2", "sliced W2 to the exact tilted target"),
                                    (1, "final_ess_per_particle", "final ESS / N")):
            ax = axes[row_ax][j]
            for c, m in enumerate(("bon",) + SMC_METHODS):
                pts = sorted((r["particles"], r[key]) for r in res["rows"] if r["method"] == m and r["steps"] == steps)
                if key == "final_ess_per_particle" and m == "bon":
                    continue  # best-of-N has no weights
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o", color=f"C{c}", label=m, ls="--" if m.endswith("critic") else "-")
            if key == "sliced_w2":
                fl = res["noise_floor"]
                ax.axhspan(0, fl["mean"] + fl["std"], color="gray", alpha=0.3, label="noise floor (mean + std)")
                band = res["converges"]["smc/soft_value/exact"]["band"]
                ax.axhline(band, color="k", ls=":", label="reachable band (floor + 3σ + discretisation)")
                ax.set_yscale("log")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("particles N per output sample")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{name} reward, λ = {res['lam']:g}, T = {steps}")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
