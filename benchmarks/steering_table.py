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

ROOT = Path(__file__).resolve().parents[1]


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
    p.add_argument("--critic-body", choices=["head", "grafted"], default="head",
                   help="the critic pretrained: 'head' (the config's value head) or 'grafted' (critic_body: grafted, the "
                        "reward network's own later layers; critic_align/grafted.py); the outputs get a _grafted suffix")
    p.add_argument("--flops-matched", metavar="FLOPS_JSON",
                   help="instead of the equal-NFE table: FLOP-matched rows against FK's x0-reward SMC at each N of "
                        "--particles, priced by this file (benchmarks/results/flops_real_scale.json); writes "
                        "<name>_flops.json")
    p.add_argument("--flops-scales", nargs="+", default=["sd15_512", "sd35m_1024"],
                   help="the real scales of the FLOP table whose prices set the matched particle counts")
    p.add_argument("--flops-rounding", choices=list(MATCHINGS), nargs="+", default=["floor"],
                   help="N' = floor (never more FLOPs than FK) or nearest of N × FK's FLOPs per particle-step / the "
                        "method's; sample_floor: floor on the FLOPs of a whole sample (T steps + the final decode and "
                        "reward call); the first gives critic_vs_fk_equal_flops, another critic_vs_fk_equal_flops_<it>")
    p.add_argument("--later-matchings-lam", type=float, nargs="+",
                   help="critic SMC's λ values for the --flops-rounding matchings after the first (default: --lam)")
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


def load_critic(spec: TableSpec, args):
    """The table's trainer (policy, critic, rewards) and its SteeringRun: a trained run's (``--run``), the cached
    value-pretrained critic under ``<out>/tmp/<name>`` when its settings match this command's, else a fresh one.
    Returns (trainer, steering, name, critic_dir, run_dir or None, seconds spent building or loading it)."""
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    x0 = getattr(args, "critic_x0_reward", False)
    body = getattr(args, "critic_body", "head")
    if x0 and body == "grafted":
        raise ValueError("--critic-x0-reward and --critic-body grafted: the grafted critic reads decode(x̂0) through the "
                         "reward network itself; drop --critic-x0-reward")
    name = spec.name + ("_x0" if x0 else "") + ("_grafted" if body == "grafted" else "")
    critic_dir = out / "tmp" / name
    run_dir = args.run
    if run_dir is None and not args.fresh_critic and (critic_dir / "checkpoints").exists():
        stale = critic_cache_mismatch(critic_dir, spec.config, args.critic_epochs, x0, body)
        if stale:
            print(f"not reusing the cached critic under {critic_dir}: {stale}; pretraining a fresh one")
        else:
            run_dir = str(critic_dir)
    t0 = time.time()
    over = {**({"critic_x0_reward": True} if x0 else {}), **({"critic_body": "grafted"} if body == "grafted" else {})}
    trainer, _ = build_steering_trainer(None if run_dir else spec.config, run_dir, str(critic_dir),
                                        over if over and not run_dir else None,
                                        critic_epochs=None if run_dir else args.critic_epochs)
    if x0 and not reads_x0_reward(trainer.critic):
        raise ValueError(f"--critic-x0-reward: the critic of {run_dir} does not read r(decode(x0_pred))")
    steering = SteeringRun(trainer.models, trainer.task, trainer.timesteps, trainer.rewards, trainer.eval_rewards)
    return trainer, steering, name, critic_dir, run_dir, time.time() - t0


def run_table(spec: TableSpec, args) -> dict:
    """Build (or load) the critic, run every method, write ``<name>.json``, ``.png`` and the grids at N = 4
    under ``args.out``."""
    if getattr(args, "flops_matched", None):
        return run_flops_matched(spec, args)
    out = Path(args.out)
    t_start = time.time()
    trainer, steering, name, critic_dir, run_dir, critic_time = load_critic(spec, args)
    guided = not reads_x0_reward(trainer.critic)  # gradient guidance needs a critic of the latent alone
    x0 = getattr(args, "critic_x0_reward", False)
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


def critic_cache_mismatch(critic_dir: Path, config: str, critic_epochs: int, x0: bool,
                          body: str = "head") -> str | None:
    """Why the critic cached under ``critic_dir`` is not the one this command would pretrain (None when it is): the
    cache key is its run.json (task, model, rewards, ...) and config.json (PPO settings) against ``config``'s
    today, plus the value-pretraining batches, the x0-reward switch and the critic body asked for."""
    from critic_align.api import RUN_SPEC_KEYS
    from critic_align.train.registry import load_run_config

    try:
        info = json.loads((critic_dir / "run.json").read_text())
        ppo = json.loads((critic_dir / "config.json").read_text())
    except (OSError, ValueError) as exc:
        return f"its run.json / config.json cannot be read ({exc})"
    if ppo.get("value_pretrain_epochs") != critic_epochs:
        return f"it was pretrained for {ppo.get('value_pretrain_epochs')} batches, --critic-epochs asks {critic_epochs}"
    if bool(ppo.get("critic_x0_reward")) != x0:
        return f"its critic_x0_reward is {ppo.get('critic_x0_reward')}, this command asks {x0}"
    if ppo.get("critic_body", "head") != body:
        return f"its critic_body is {ppo.get('critic_body', 'head')}, this command asks {body}"
    fresh = load_run_config(config, {})
    spec_now = json.loads(json.dumps({k: fresh.get(k) for k in RUN_SPEC_KEYS}, default=list))
    changed = [k for k in RUN_SPEC_KEYS if info.get(k) != spec_now[k]]
    ppo_now = json.loads(json.dumps(fresh["ppo"].to_dict(), default=list))
    # what build_steering_trainer sets for every fresh critic (or is checked above) is not compared with the YAML
    fixed = {"output_dir", "value_pretrain_epochs", "sde_window_size", "sde_window_range", "critic_x0_reward",
             "critic_body"}
    changed += sorted(k for k in ppo_now if k not in fixed and ppo.get(k) != ppo_now[k])
    return f"{', '.join(changed)} differ from train/configs/{config}'s today" if changed else None


# which row of flops_real_scale.json's per_particle_step_gflops prices one particle-step of each method
FLOP_PRICE_OF = {"smc_x0": "fk_x0_reward_smc", "smc": "critic_smc", "guidance+bon": "critic_guidance",
                 "bon": "plain_sampling"}
# the grafted critic (--critic-body grafted): its forward adds the decode and the reward network's later layers
GRAFTED_PRICE_OF = {**FLOP_PRICE_OF, "smc": "grafted_smc", "guidance+bon": "grafted_guidance"}


def price_of(body: str = "head") -> dict:
    """Which row of flops_real_scale.json prices one particle-step of each method, for the critic ``body``."""
    return GRAFTED_PRICE_OF if body == "grafted" else FLOP_PRICE_OF
MATCHED_METHODS = ("smc", "guidance+bon", "bon")  # the critic's two methods and the critic-free control
CRITIC_METHODS = ("smc", "guidance+bon")
# --flops-rounding: what is matched (FLOPs per particle-step, or per whole sample) and how N' is rounded
MATCHINGS = {"floor": ("step", "floor"), "nearest": ("step", "nearest"), "sample_floor": ("sample", "floor")}
# fewest particles a method runs with: SMC resamples only with ESS < κ·N, so at one particle it never does (the
# library refuses it) and is the base sampler plus wasted critic calls
MIN_PARTICLES = {"smc": 2, "guidance+bon": 1, "bon": 1}


def not_run_reason(method: str, k: int) -> str | None:
    """Why a FLOP-matched count of ``k`` particles is not run for ``method`` (None when it is)."""
    if k < 1:
        return "one particle costs more FLOPs than FK's whole budget"
    if k < MIN_PARTICLES[method]:
        return f"{method} needs at least {MIN_PARTICLES[method]} particles (at 1 it never resamples)"
    return None
TIES_OR_BEATS_RULE = ("difference = best critic method's mean reward − FK x0-reward SMC's (each at its best λ), over "
                      "the same prompts and noise seed; ± the standard error of the per-prompt paired difference; "
                      "ties_or_beats = difference >= −1 standard error")


def flops_matched_plan(flops: dict, particles: list[int], scales: list[str], rounding: str = "floor",
                       steps: int | None = None, prices: dict = FLOP_PRICE_OF) -> dict:
    """{scale: {N: {method: {particles, flop_ratio_per_step}}}}: for FK's x0-reward SMC at N particles, each of
    MATCHED_METHODS gets the particle count whose FLOPs per step at that scale (``flops[scale]
    ["per_particle_step_gflops"]``, written by benchmarks/flops_real_scale.py) match FK's
    (:func:`critic_align.flops.matched_particles`, rounding ``floor`` or ``nearest``), or with ``sample_floor``
    whose FLOPs per whole sample of ``steps`` steps do (:func:`particle_sample_gflops`); and the ratio of the pair's
    FLOPs per step (method / FK).  ``prices``: method -> its row of the table (:func:`price_of`)."""
    from critic_align.flops import matched_particles

    if rounding not in MATCHINGS:
        raise ValueError(f"rounding must be one of {list(MATCHINGS)}, got {rounding!r}")
    basis, how = MATCHINGS[rounding]
    if basis == "sample" and not steps:
        raise ValueError(f"rounding {rounding!r} matches whole samples: pass steps (the sampler's T)")

    plan = {}
    for scale in scales:
        if scale not in flops or "per_particle_step_gflops" not in flops[scale]:
            have = [k for k, v in flops.items() if isinstance(v, dict) and "per_particle_step_gflops" in v]
            raise ValueError(f"--flops-scales: {scale!r} has no per_particle_step_gflops in the FLOP table (it has "
                             f"{have}); rerun benchmarks/flops_real_scale.py or pick one of those")
        price = flops[scale]["per_particle_step_gflops"]
        missing = [v for v in prices.values() if v not in price]
        if missing:
            raise ValueError(f"the FLOP table's {scale}.per_particle_step_gflops lacks {missing}")
        fk = price[prices["smc_x0"]]
        cost = {m: particle_sample_gflops(flops, scale, m, steps, prices) if basis == "sample" else price[prices[m]]
                for m in prices}
        plan[scale] = {}
        for n in particles:
            plan[scale][n] = {}
            for m in MATCHED_METHODS:
                k = matched_particles(n, cost["smc_x0"], cost[m], how)
                plan[scale][n][m] = {"particles": k, "flop_ratio_per_step": k * price[prices[m]] / (n * fk)}
    return plan


def particle_sample_gflops(flops: dict, scale: str, method: str, steps: int, prices: dict = FLOP_PRICE_OF) -> float:
    """GFLOPs of one particle over a whole sample of ``steps`` steps: every particle-step at its price, plus the final
    decode + reward call (best-of-N and SMC's argmax score their final particles; FK's potential also scores them:
    its N·(T+1)-th decodes)."""
    g = flops[scale]["gflops"]
    return steps * flops[scale]["per_particle_step_gflops"][prices[method]] + g["vae_decode"] + g["reward_model"]


def whole_sample_flop_ratio(flops: dict, scale: str, method: str, n_method: int, n_fk: int, steps: int,
                            prices: dict = FLOP_PRICE_OF) -> float:
    """A matched pair's FLOP ratio (method / FK) over a whole sample of ``steps`` steps."""
    return (n_method * particle_sample_gflops(flops, scale, method, steps, prices)
            / (n_fk * particle_sample_gflops(flops, scale, "smc_x0", steps, prices)))


def equal_flops_verdict(plan: dict, rows: list[dict], flops: dict, steps: int, prices: dict = FLOP_PRICE_OF) -> dict:
    """``critic_vs_fk_equal_flops``: per scale and FK's N, FK's reward (its best λ), each matched method's at its N'
    (its best λ), the best critic method, its paired difference with FK ± standard error over prompts, and
    ties_or_beats (TIES_OR_BEATS_RULE); the best-of-N control the same way. ``rows`` carry ``per_prompt``."""

    def best(method, n):
        cands = [r for r in rows if r["method"] == method and r["particles"] == n]
        return max(cands, key=lambda r: r["reward"]) if cands else None

    def versus(r, fk):
        d = torch.tensor(r["per_prompt"], dtype=torch.float64) - torch.tensor(fk["per_prompt"], dtype=torch.float64)
        diff, se = float(d.mean()), float(d.std() / len(d) ** 0.5)
        return {"difference": diff, "se": se, "ties_or_beats": diff >= -se}

    out = {}
    for scale, by_n in plan.items():
        out[scale] = {}
        for n, matched in by_n.items():
            fk = best("smc_x0", n)
            entry = {"fk_particles": n, "fk_lam": fk.get("lam"), "fk_reward": fk["reward"]}
            for m in MATCHED_METHODS:
                k = matched[m]["particles"]
                why = not_run_reason(m, k)
                r = best(m, k) if why is None else None
                entry[m] = {"particles": k, "not_run": why or "no row"} if r is None else {
                    "particles": k, **{p: r[p] for p in ("lam", "scale") if p in r}, "reward": r["reward"],
                    "flop_ratio_per_step": matched[m]["flop_ratio_per_step"],
                    "flop_ratio_whole_sample": whole_sample_flop_ratio(flops, scale, m, k, n, steps, prices),
                    **versus(r, fk)}
            entry["critic_smc_particles"] = matched["smc"]["particles"]
            entry["critic_smc_reward"] = entry["smc"].get("reward")
            fitted = [m for m in CRITIC_METHODS if "reward" in entry[m]]
            if fitted:
                top = max(fitted, key=lambda m: entry[m]["reward"])
                entry.update(best_critic_method=top, best_critic_particles=entry[top]["particles"],
                             best_critic_reward=entry[top]["reward"], difference=entry[top]["difference"],
                             se=entry[top]["se"], ties_or_beats=entry[top]["ties_or_beats"])
            else:  # no critic method fits FK's budget at this scale: it cannot tie
                entry.update(best_critic_method=None, best_critic_particles=0, best_critic_reward=None,
                             difference=None, se=None, ties_or_beats=False)
            out[scale][str(n)] = entry
    return out


def run_flops_matched(spec: TableSpec, args, reduction: str | None = None) -> dict:
    """FLOP-matched rows: FK's x0-reward SMC at each N of ``--particles`` (every λ), and critic SMC (every λ),
    guidance + best-of-N and plain best-of-N at the particle counts whose FLOPs per step at each real scale of
    ``--flops-scales`` match FK's (``--flops-matched``: benchmarks/flops_real_scale.py's JSON; rounding
    ``--flops-rounding``: the first one gives ``critic_vs_fk_equal_flops``, any other ``critic_vs_fk_equal_flops_
    <rounding>``); guidance's scale is the best of ``--scales`` at N = 1.  The tiny task stands in for the real
    model: only the particle counts come from the real-scale prices.  Each finished row is kept under
    ``<out>/tmp/<name>_flops_rows.json`` and reused by a later run with the same prompts, seed, SMC settings and
    critic (so a run cut short, or one adding a rounding, resumes).  Writes ``<name>_flops.json``."""

    flops_path = Path(args.flops_matched)
    if not flops_path.exists():
        raise FileNotFoundError(f"--flops-matched {flops_path}: no such file; write it with "
                                "`python benchmarks/flops_real_scale.py`")
    flops = json.loads(flops_path.read_text())
    prices = price_of(getattr(args, "critic_body", "head"))
    for r in args.flops_rounding:  # a bad scale or table fails here, before the critic is built
        flops_matched_plan(flops, args.particles, args.flops_scales, r, steps=1, prices=prices)
    if getattr(args, "critic_x0_reward", False):
        raise ValueError("--flops-matched runs the latent critic (guidance needs its gradient): drop --critic-x0-reward")
    out = Path(args.out)
    t_start = time.time()
    trainer, steering, name, critic_dir, run_dir, critic_time = load_critic(spec, args)
    steps = len(trainer.timesteps)
    plans = {r: flops_matched_plan(flops, args.particles, args.flops_scales, r, steps, prices) for r in args.flops_rounding}
    col = trainer.rewards.names.index(spec.reward_key)
    prompts = spec.prompts
    cache = out / "tmp" / f"{name}_flops_rows.json"
    cache_key = {"prompts": prompts, "seed": args.seed, "smc_output": args.smc_output,
                 "ess_threshold": args.ess_threshold, "reward_price": args.reward_price, "critic_source": run_dir,
                 "critic_value_pretrain": pretrain_summary(critic_dir) if run_dir == str(critic_dir) else None}
    rows = []
    if run_dir is not None and cache.exists():  # a fresh critic is a new critic: nothing earlier is reused
        kept = json.loads(cache.read_text())
        if kept.get("key") == json.loads(json.dumps(cache_key)):
            rows = kept["rows"]
            print(f"reusing {len(rows)} rows of {cache}")
    reused = len(rows)

    def row_key(method, n, kw):
        return method, n, tuple(sorted((k, float(v)) for k, v in kw.items()))

    def record(method, n, **kw):
        key = row_key(method, n, kw)
        earlier = next((r for r in rows if row_key(r["method"], r["particles"], r["settings"]) == key), None)
        if earlier is not None:  # a matched count shared by two scales or roundings (or an earlier run's) runs once
            return earlier
        res, evals = steer_run(steering, method, prompts, particles=n, seed=args.seed, output=args.smc_output,
                               reward_price=args.reward_price, **kw)
        with torch.no_grad():
            per_prompt = trainer.rewards(res.decoded, prompts)[:, col].double()
        row = {"method": method, "particles": n, **{k: v for k, v in kw.items() if k in ("scale", "lam")},
               "settings": kw, "reward": float(per_prompt.mean()), "rewards": evals, **res.cost.to_dict(),
               "resample_rate": float(res.resampled.float().mean()) if res.resampled.numel() else 0.0,
               "per_prompt": [round(float(v), 6) for v in per_prompt]}
        if spec.splits:
            row["rewards_by_split"] = split_evals(trainer, res.decoded, spec.splits)
        rows.append(row)
        cache.write_text(json.dumps({"key": cache_key, "rows": rows}))
        print(f"{method:13s} N={n} {kw}  {spec.reward_key}={row['reward']:.4f}  {row['wall_time_s']:.1f}s", flush=True)
        return row

    record("base", 1)
    best_scale, best = None, -1.0
    for w in args.scales:  # the scale guidance + best-of-N uses, chosen as in the equal-NFE table
        row = record("guidance", 1, scale=w)
        if row["reward"] > best:
            best, best_scale = row["reward"], w
    for n in args.particles:
        for lam in args.lam:
            record("smc_x0", n, lam=lam, ess_threshold=args.ess_threshold)
    first = args.flops_rounding[0]
    later_lam = args.later_matchings_lam or args.lam
    for rounding, plan in plans.items():
        for scale in plan:
            for n in args.particles:
                k = plan[scale][n]
                if not_run_reason("smc", k["smc"]["particles"]) is None:
                    for lam in args.lam if rounding == first else later_lam:
                        record("smc", k["smc"]["particles"], lam=lam, ess_threshold=args.ess_threshold)
                if not_run_reason("guidance+bon", k["guidance+bon"]["particles"]) is None:
                    record("guidance+bon", k["guidance+bon"]["particles"], scale=best_scale)
                if not_run_reason("bon", k["bon"]["particles"]) is None:
                    record("bon", k["bon"]["particles"])
        # written after each matching: a run cut short keeps the matchings it finished
        result = _flops_result(spec, args, rows, plans, list(plans)[:list(plans).index(rounding) + 1], flops, steps,
                               best_scale, reduction, flops_path, run_dir, critic_dir, critic_time, reused, name)
        result["time_s"] = time.time() - t_start
        (out / f"{name}_flops.json").write_text(json.dumps(result, indent=2))
    for scale, by_n in result["critic_vs_fk_equal_flops"].items():
        for n, e in by_n.items():
            print(f"{scale} N={n}: FK {e['fk_reward']:.4f}; best critic {e['best_critic_method']} "
                  f"N'={e['best_critic_particles']} {e['best_critic_reward']}; diff {e['difference']} ± {e['se']} "
                  f"ties_or_beats={e['ties_or_beats']}")
    print(f"wrote {out / f'{name}_flops.json'} ({result['time_s']:.0f} s)")
    return result


def _flops_result(spec, args, rows, plans, finished, flops, steps, best_scale, reduction, flops_path, run_dir,
                  critic_dir, critic_time, reused, name) -> dict:
    """run_flops_matched's JSON, with the verdicts of the matchings in ``finished`` (the first one's always)."""
    from harness import machine_info

    rows = [r for r in rows if r["method"] != "guidance+bon" or r["scale"] == best_scale]
    prices = price_of(getattr(args, "critic_body", "head"))
    verdicts = {r: equal_flops_verdict(plans[r], rows, flops, steps, prices) for r in finished}
    first = args.flops_rounding[0]
    verdict = verdicts[first]
    later = [r for r in args.flops_rounding[1:] if r in finished]
    return {
        "benchmark": f"{name}_flops", "args": vars(args),
        "stand_in": "the tiny t2i pipeline stands in for the real models: only the particle counts come from the "
                    "real-scale FLOP prices (flops_real_scale.json); the rewards are the tiny task's",
        "reduction_vs_issue": reduction,
        "critic_body": getattr(args, "critic_body", "head"),
        "flops_source": str(flops_path.resolve().relative_to(ROOT) if flops_path.resolve().is_relative_to(ROOT)
                            else flops_path),
        "per_particle_step_gflops": {s: {m: flops[s]["per_particle_step_gflops"][prices[m]]
                                         for m in prices} for s in args.flops_scales},
        "rounding": f"{first}: N' = {MATCHINGS[first][1]}(N × FK's FLOPs per "
                    f"{'particle-step' if MATCHINGS[first][0] == 'step' else 'particle over a whole sample'} / the "
                    "method's)"
                    + (" — the method never gets more FLOPs per step than FK; N' = 0 means one particle already costs "
                       "more than FK's budget (row not run, cannot tie)" if first == "floor" else "")
                    + "; SMC at N' = 1 is not run (it cannot resample: the base sampler plus critic calls)"
                    + "".join(f"; critic_vs_fk_equal_flops_{r}: the same with N' = {MATCHINGS[r][1]}(...) of the "
                              f"FLOPs per {'particle-step' if MATCHINGS[r][0] == 'step' else 'whole sample'}"
                              for r in later)
                    + (f" (critic SMC there at λ in {args.later_matchings_lam} only)"
                       if later and args.later_matchings_lam else ""),
        "matched_on": "FLOPs per particle-step: backbone, critic forward (a backward priced at 2 forwards), decode + "
                      "reward model for FK; a whole sample (flop_ratio_whole_sample, and sample_floor's matching) adds "
                      f"each particle's final decode + reward call, over the tiny task's T = {steps} steps",
        "steps": steps, "plan": {r: {s: {str(n): v for n, v in by_n.items()} for s, by_n in plan.items()}
                                 for r, plan in plans.items()},
        "best_guidance_scale": best_scale, "critic_source": run_dir or "fresh", "critic_pretrain_s": critic_time,
        "config": spec.config, "reward_key": spec.reward_key, "splits": spec.splits,
        "critic_value_pretrain": pretrain_summary(critic_dir) if run_dir in (None, str(critic_dir)) else None,
        "ties_or_beats_rule": TIES_OR_BEATS_RULE, "critic_vs_fk_equal_flops": verdict,
        **{f"critic_vs_fk_equal_flops_{r}": verdicts[r] for r in later},
        "matchings_not_finished": [r for r in args.flops_rounding if r not in finished],
        "rows_reused_from_an_earlier_run": reused, "rows_wall_time_s": sum(r["wall_time_s"] for r in rows),
        "rows": rows,
        "machine": machine_info(note="shared machine, one core of 2 (taskset), others' jobs on the other core; wall "
                                     "times are indicative only"),
    }
