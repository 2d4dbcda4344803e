"""Reward vs NFE for test-time steering with a critic: the table shared by digits_steering.py and t2i_steering.py.

For N ∈ ``--particles`` particles per prompt (T denoising steps):

    bon             best-of-N by the reward                      NFE = N·T, no critic
    guidance+bon    critic gradient guidance (scale w), then BoN NFE = N·T, + N·T critic forward + backward
    smc             SMC, potentials λ·V_critic                   NFE = N·T, + N·T critic forwards
                    (``--critic-x0-reward``: a critic that also reads r(decode(x̂0)), + N·T decodes + reward calls;
                    no guidance rows then: its value has no gradient in x_t)
    smc_x0          SMC, FK steering's potential λ·r(x̂0)         NFE = N·T, + N·(T+1) decodes + reward calls
                    (both SMC kinds at every λ in ``--lam``)
and at N = 1: base and guidance at several scales (the best scale by the trained reward is used for
guidance+bon).  SMC's output per prompt is ``--smc-output``: argmax (default: this is a reward-vs-NFE
comparison with best-of-N, so SMC also keeps its best particle) or sample (a draw from its weighted particles,
the library's default, which samples p·exp(λ r) rather than maximising r).
"Equivalent NFE" counts a critic forward as one backbone call, a backward as two (the LoRA critic runs the
same backbone) and a decode + reward call as ``--reward-price`` backbone calls.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from critic_align.train.steer import SteeringRun, build_steering_trainer, evaluate_samples, steer_run
from critic_align.x0_reward import reads_x0_reward


@dataclass
class TableSpec:
    """What differs between the tasks' steering tables.

    name: the benchmark's name (``<name>.json`` / ``.png`` / ``<name>_<method>.png`` under ``--out``).
    config: the gae run config whose critic is value-pretrained on the base policy (e.g. "digits", "t2i").
    reward_key: the trained reward the table maximises and ranks guidance scales by.
    eval_keys: other reward names printed per row (all of the trainer's rewards are recorded in the JSON).
    splits: prompt sets evaluated separately as well (name -> prompts; their concatenation is ``prompts``).
    """

    name: str
    config: str
    reward_key: str
    prompts: list[str]
    eval_keys: tuple[str, ...] = ()
    splits: dict[str, list[str]] = field(default_factory=dict)
    grid_nrow: int = 8
    grid_labels: list[str] | None = None
    title: str = ""

    def __post_init__(self):
        if self.splits and [p for ps in self.splits.values() for p in ps] != self.prompts:
            raise ValueError(f"{self.name}: the splits' prompts, concatenated in order, must be the table's prompts")


def add_table_args(p, *, particles, scales, bon_only, lam, critic_epochs, threads, out) -> None:
    """The command-line arguments of every steering table (each task script picks its defaults)."""
    p.add_argument("--particles", type=int, nargs="+", default=particles)
    p.add_argument("--scales", type=float, nargs="+", default=scales, help="guidance scales w at N = 1")
    p.add_argument("--bon-only", type=int, nargs="*", default=bon_only,
                   help="extra N for best-of-N alone (a reference at the other methods' equivalent NFE)")
    p.add_argument("--lam", type=float, nargs="+", default=lam, help="SMC λ values")
    p.add_argument("--ess-threshold", type=float, default=0.9, help="SMC resamples when ESS < κ·N")
    p.add_argument("--smc-output", choices=["argmax", "sample"], default="argmax",
                   help="SMC's choice per prompt (see the module doc)")
    p.add_argument("--reward-price", type=float, default=1.0,
                   help="backbone-call price of one decode + reward call in the equivalent NFE")
    p.add_argument("--critic-epochs", type=int, default=critic_epochs)
    p.add_argument("--run", help="a trained run directory (policy + critic) instead of a fresh critic")
    p.add_argument("--fresh-critic", action="store_true")
    p.add_argument("--critic-x0-reward", action="store_true",
                   help="pretrain a critic with critic_x0_reward (its head also reads r(decode(x0_pred))): SMC can use "
                        "it, guidance cannot, so the guidance rows are left out; writes <name>_x0.json")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=out)
    p.add_argument("--threads", type=int, default=threads)


def pretrain_summary(critic_dir: Path) -> dict | None:
    """A fresh critic's value pretraining, from its metrics.jsonl: batches, seconds, reward queries, the last
    batch's ``pre_value_ev*`` (explained variance of V on a rollout batch the critic had not yet been fitted
    on, overall and per step bucket) and that EV's mean over the last 5 batches; None without a log."""
    log = critic_dir / "metrics.jsonl"
    if not log.exists():
        return None
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("phase") == "value_pretrain"]
    if not rows:
        return None
    last = rows[-5:]  # one batch holds few prompts: its EV is noisy
    return {"batches": len(rows), "seconds": sum(r["time_s"] for r in rows), "reward_queries": rows[-1]["reward_queries"],
            "pre_value_ev_last5_mean": sum(r["pre_value_ev"] for r in last) / len(last),
            **{k: v for k, v in rows[-1].items() if k.startswith("pre_value_ev")}}


def run_table(spec: TableSpec, args) -> dict:
    """Build (or load) the critic, run every method, write ``<name>.json``, ``.png`` and the grids at N = 4
    under ``args.out``."""
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    x0 = getattr(args, "critic_x0_reward", False)
    name = spec.name + ("_x0" if x0 else "")
    critic_dir = out / "tmp" / name
    run_dir = args.run
    if run_dir is None and not args.fresh_critic and (critic_dir / "checkpoints").exists():
        run_dir = str(critic_dir)
    t0 = time.time()
    trainer, run = build_steering_trainer(None if run_dir else spec.config, run_dir, str(critic_dir),
                                          {"critic_x0_reward": True} if x0 and not run_dir else None,
                                          critic_epochs=None if run_dir else args.critic_epochs)
    if x0 and not reads_x0_reward(trainer.critic):
        raise ValueError(f"--critic-x0-reward: the critic of {run_dir} does not read r(decode(x0_pred))")
    guided = not reads_x0_reward(trainer.critic)  # gradient guidance needs a critic of the latent alone
    critic_time = time.time() - t0
    steering = SteeringRun(trainer.models, trainer.task, trainer.timesteps, trainer.rewards, trainer.eval_rewards)
    prompts = spec.prompts
    rows = []

    def record(method, n, **kw):
        res, evals = steer_run(steering, method, prompts, particles=n, seed=args.seed,
                               output=args.smc_output, reward_price=args.reward_price, **kw)
        row = {"method": method, "particles": n, **{k: v for k, v in kw.items() if k in ("scale", "lam")},
               "rewards": evals, **res.cost.to_dict(),
               "resample_rate": float(res.resampled.float().mean()) if res.resampled.numel() else 0.0,
               "final_ess_per_particle": float(res.final_ess.nanmean()) / n}
        if spec.splits:
            row["rewards_by_split"] = split_evals(trainer, res.decoded, spec.splits)
        rows.append(row)
        shown = "  ".join(f"{k}={evals.get(k)}" for k in spec.eval_keys)
        print(f"{method:13s} N={n} {kw}  {spec.reward_key}={evals[spec.reward_key]:.4f}  {shown}"
              f"  eqNFE={row['equivalent_nfe']:.0f}  {row['wall_time_s']:.1f}s", flush=True)
        return res, row

    base_res, _ = record("base", 1)
    best_scale, best = None, -1.0
    for w in args.scales if guided else []:
        _, row = record("guidance", 1, scale=w)
        if row["rewards"][spec.reward_key] > best:
            best, best_scale = row["rewards"][spec.reward_key], w
    grids = {}
    for n in args.particles:
        res, _ = record("bon", n)
        grids.setdefault("bon", res) if n == 4 else None
        if guided:
            res, _ = record("guidance+bon", n, scale=best_scale)
            grids.setdefault("guidance+bon", res) if n == 4 else None
        for lam in args.lam:
            res, _ = record("smc", n, lam=lam, ess_threshold=args.ess_threshold)
            grids.setdefault("smc", res) if n == 4 else None
        for lam in args.lam:  # every λ, as the critic's SMC: the verdicts take each method's best λ
            res, _ = record("smc_x0", n, lam=lam, ess_threshold=args.ess_threshold)
            grids.setdefault("smc_x0", res) if n == 4 else None
    for n in args.bon_only:
        record("bon", n)
    result = {"benchmark": name, "args": vars(args), "critic_source": run_dir or "fresh",
              "critic_pretrain_s": critic_time, "best_guidance_scale": best_scale, "rows": rows}
    if spec.splits:  # the generic keys (the digits JSON keeps its original ones)
        result.update(config=spec.config, reward_key=spec.reward_key, eval_keys=list(spec.eval_keys),
                      splits=spec.splits, critic_value_pretrain=pretrain_summary(critic_dir)
                      if run_dir in (None, str(critic_dir)) else None)
    result["time_s"] = time.time() - t_start
    (out / f"{name}.json").write_text(json.dumps(result, indent=2))
    plot(result, out / f"{name}.png", spec.reward_key, spec.title + (" (critic reading r(decode(x̂0)))" if x0 else ""))
    from critic_align.viz import save_grid

    for method, res in [("base", base_res), *grids.items()]:
        save_grid(res.decoded.clamp(-1, 1), out / f"{name}_{method.replace('+', '_')}.png",
                  nrow=spec.grid_nrow, labels=spec.grid_labels)
    print(f"wrote {out / f'{name}.json'} ({result['time_s']:.0f} s)")
    return result


def split_evals(trainer, decoded: torch.Tensor, splits: dict[str, list[str]]) -> dict[str, dict]:
    """The rewards of each prompt split's chosen samples (decoded holds one sample per prompt, splits in order)."""
    out, start = {}, 0
    for name, ps in splits.items():
        out[name] = evaluate_samples(trainer.rewards, trainer.eval_rewards, decoded[start:start + len(ps)], ps)
        start += len(ps)
    return out


def plot(result, path, reward_key: str, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    series = {}
    for r in result["rows"]:
        key = r["method"] + (f" λ={r['lam']:g}" if "lam" in r else "") + (f" w={r['scale']:g}" if "scale" in r and
                                                                           r["method"] != "guidance" else "")
        if r["method"] == "guidance":
            key = "guidance (N=1, scales)"
        series.setdefault(key, []).append(r)
    for ax, x_key, label in ((axes[0], "nfe", "backbone NFE per sample"),
                             (axes[1], "equivalent_nfe", "equivalent NFE (critic fwd = 1, bwd = 2)")):
        for key, rs in series.items():
            pts = sorted((r[x_key], r["rewards"][reward_key]) for r in rs)
            xs, ys = zip(*pts)
            ax.plot(xs, ys, "o-" if len(xs) > 1 else "s", label=key)
        ax.set_xscale("log", base=2)
        ax.set_xlabel(label)
        ax.set_ylabel(f"{reward_key} of the chosen sample")
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
