"""Held-out explained variance per bucket of steps: today's head, the x0-reward gate, the grafted critic, the oracle.

    python benchmarks/critic_grafted.py --task digits
    python benchmarks/critic_grafted.py --task t2i --heldout 48 --K 2 --pretrain-epochs 2    # merges into the JSON

On a held-out set of the base policy's full stochastic trajectories (fresh noise, never trained on), every state's
value is compared with the trajectory's reward R:

* ``head``: today's latent critic (the config's value head) after the config's value pretraining;
* ``x0_gate``: the same head with ``critic_x0_reward`` (it also reads r(decode(x̂0)) through a learned gate);
* ``grafted_init``: the grafted critic (:mod:`critic_align.grafted`) before any training: r(decode(x̂0_base));
* ``grafted``: the grafted critic after the same value pretraining (same rollouts' budget, its own seed stream);
* ``oracle``: the oracle value source (K continuations of the policy's sampler per state); its explained variance is
  corrected for its own Monte-Carlo noise (stderr² subtracted from the squared error): the ceiling.

EV = 1 − E[(R − V)²] / Var(R) per step, averaged per bucket of steps.  ``grafted_over_oracle_min_bucket``: the
smallest per-bucket ratio EV(grafted) / EV(oracle).  Writes ``benchmarks/results/critic_grafted.json``, merged: a
run replaces its own task's entry and keeps the other tasks' (each entry holds its own args, reduction, machine and
seconds; a file from before entries held them gets its top-level ones moved into its single task's entry).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from harness import load_tensor_cache, machine_info, save_tensor_cache

ROOT = Path(__file__).resolve().parents[1]

from critic_align.api import build_trainer  # noqa: E402
from critic_align.oracle import explained_variance, rollout_oracle_values  # noqa: E402
from critic_align.rollout import sample_trajectories  # noqa: E402
from critic_align.train.registry import load_run_config  # noqa: E402
from critic_align.x0_reward import x0_prediction_rewards  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def make_trainer(config: str, seed: int, name: str, **over):
    out = RESULTS / "tmp" / "critic_grafted" / name
    if out.exists():
        shutil.rmtree(out)
    o = dict(advantage="gae", seed=seed, output_dir=str(out), progress=False, grid_every=0, checkpoint_every=0,
             log_tensorboard=False, eval_every=0)
    o.update(over)
    return build_trainer(load_run_config(config, o))


@torch.no_grad()
def heldout_set(tr, n: int, K: int, seed: int = 4242) -> dict:
    """Full stochastic trajectories of ``tr``'s current policy on fresh noise, their rewards, the x0-prediction rewards
    at every state and the oracle's values (K continuations) at every state."""
    gen = torch.Generator().manual_seed(seed)
    names = list(tr.task.prompts)
    if len(names) >= n:  # a large prompt list (t2i: 5670, ordered by kind): a uniform draw, not its first n
        prompts = [names[i] for i in torch.randperm(len(names), generator=gen)[:n].tolist()]
    else:  # a few prompts (digits: the 10 classes): each in turn
        prompts = [names[i % len(names)] for i in range(n)]
    cond = tr.task.encode(prompts)
    x_T = torch.randn((n, *tr.task.latent_shape), generator=gen)
    ro = sample_trajectories(tr.policy_output, tr.step, x_T, tr.timesteps, cond, prompts, generator=gen,
                             record_x0=True)
    rf = (lambda final, p: tr.rewards(tr.task.decode(final), p).float())
    R = rf(ro.latents[:, -1], prompts)
    x0r = x0_prediction_rewards(tr.task, tr.rewards, ro.x0_preds, prompts, tr.device)
    t0 = time.time()
    ov = rollout_oracle_values(tr.policy_output, tr.step, ro.latents, 0, tr.timesteps, cond, rf, K, gen, prompts,
                               chunk=512)
    return {"latents": ro.latents, "cond": cond, "prompts": prompts, "R": R, "x0_rewards": x0r,
            "oracle": ov.values, "oracle_stderr": ov.stderr, "oracle_counts": ov.counts.as_dict(),
            "oracle_seconds": time.time() - t0}


@torch.no_grad()
def critic_values(tr, data: dict, x0_reward: bool = False, chunk: int = 400) -> torch.Tensor:
    lat, cond = data["latents"], data["cond"]
    b, t = lat.shape[0], lat.shape[1] - 1
    x = lat[:, :-1].reshape(b * t, *lat.shape[2:])
    ts = tr.timesteps.repeat(b)
    c = cond.repeat_interleave(t, dim=0)
    x0r = data["x0_rewards"].reshape(b * t, -1) if x0_reward else None
    out = [tr.critic(x[i:i + chunk], ts[i:i + chunk], c[i:i + chunk], None if x0r is None else x0r[i:i + chunk])
           for i in range(0, b * t, chunk)]
    return torch.cat(out).view(b, t, -1).float()


def ev_report(values: torch.Tensor, R: torch.Tensor, buckets: int, noise_var: torch.Tensor | None = None) -> dict:
    T = values.shape[1]
    per_step = [explained_variance(values[:, k, 0], R[:, 0], None if noise_var is None else noise_var[:, k, 0])
                for k in range(T)]
    edges = [round(i * T / buckets) for i in range(buckets + 1)]
    return {"ev_per_step": per_step, "ev_per_bucket": [float(np.mean(per_step[edges[i]:edges[i + 1]]))
                                                        for i in range(buckets)],
            "ev_overall": explained_variance(values[:, :, 0], R[:, :1].expand(-1, T),
                                             None if noise_var is None else noise_var[:, :, 0])}


def load_merged(out: Path) -> dict:
    """The results file as far as it exists, with the per-task layout (see the module docstring)."""
    if not out.exists():
        return {"benchmark": "critic_grafted", "tasks": {}, "grafted_over_oracle_min_bucket": {}}
    old = json.loads(out.read_text())
    legacy = {k: old.pop(k) for k in ("args", "reduction_vs_issue", "machine", "seconds") if k in old}
    if legacy and len(old["tasks"]) == 1:  # written by a one-task run before entries held their own run details
        (only,) = old["tasks"].values()
        for k, v in legacy.items():
            only.setdefault(k, v)
    old.setdefault("grafted_over_oracle_min_bucket", {})
    return old


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="digits", help="run config (digits, t2i, t2i_sd3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--heldout", type=int, default=80, help="held-out trajectories")
    p.add_argument("--K", type=int, default=4, help="oracle continuations per state")
    p.add_argument("--pretrain-epochs", type=int, default=None,
                   help="value-pretraining epochs of every critic (default: the config's value_pretrain_epochs)")
    p.add_argument("--buckets", type=int, default=4)
    p.add_argument("--reduction", default="")
    p.add_argument("--reuse-heldout", action="store_true", help="load the held-out oracle set an earlier run saved")
    p.add_argument("--out", default=str(RESULTS / "critic_grafted.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.time()
    out = Path(args.out)
    over = {} if args.pretrain_epochs is None else {"value_pretrain_epochs": args.pretrain_epochs}
    res = {"args": vars(args), "reduction_vs_issue": args.reduction,
           "machine": machine_info(note="shared machine, 2 cores, contended by other agents; pinned to one core"),
           "critics": {}}

    def save():
        res["seconds"] = time.time() - t0
        result = load_merged(out)  # re-read: another task's run may have written it meanwhile
        result["tasks"][args.task] = res
        if "grafted_over_oracle_min_bucket" in res:
            result["grafted_over_oracle_min_bucket"][args.task] = res["grafted_over_oracle_min_bucket"]
        out.write_text(json.dumps(result, indent=1, default=float))

    tr = make_trainer(args.task, args.seed, "head", **over)
    res["value_pretraining"] = {"epochs": tr.config.value_pretrain_epochs, "passes": tr.config.value_pretrain_passes,
                                "batch_size": tr.config.batch_size}
    cache = RESULTS / "tmp" / "critic_grafted" / f"{args.task}_heldout.safetensors"
    if args.reuse_heldout and cache.exists():  # the same base policy's held-out set, drawn by an earlier run
        data = load_tensor_cache(cache)
        data["cond"] = tr.task.encode(data["prompts"])  # not cached: a record, and the encoders are deterministic
        args.heldout, args.K = data["latents"].shape[0], data["K"]
        res["heldout_source"] = f"reused {cache.relative_to(ROOT)} (drawn by an earlier run of this script)"
    else:
        data = heldout_set(tr, args.heldout, args.K)
        save_tensor_cache(cache, {k: v for k, v in data.items() if k != "cond"} | {"K": args.K})
    R = data["R"]
    res["heldout"] = {"n_trajectories": args.heldout, "K": args.K, "var_R": float(R[:, 0].var(unbiased=False)),
                      "mean_R": float(R[:, 0].mean()), "oracle_counts": data["oracle_counts"],
                      "oracle_seconds": data["oracle_seconds"], "oracle_mean_stderr": float(data["oracle_stderr"].mean())}
    res["critics"]["oracle"] = ev_report(data["oracle"], R, args.buckets, data["oracle_stderr"] ** 2)
    res["critics"]["oracle_uncorrected"] = ev_report(data["oracle"], R, args.buckets)
    res["critics"]["x0_reward_raw"] = ev_report(data["x0_rewards"], R, args.buckets)
    print("oracle", res["critics"]["oracle"]["ev_per_bucket"], f"({time.time() - t0:.0f} s)", flush=True)
    save()

    def fit(name, tr, x0_reward=False):
        t1 = time.time()
        q0 = tr.reward_queries
        tr.pretrain_value()
        t2 = time.time()
        v = critic_values(tr, data, x0_reward)
        res["critics"][name] = ev_report(v, R, args.buckets) | {"pretrain_queries": tr.reward_queries - q0,
                                                                "seconds": time.time() - t1,
                                                                "pretrain_seconds": t2 - t1}
        print(name, res["critics"][name]["ev_per_bucket"], f"({time.time() - t1:.0f} s)", flush=True)
        save()

    fit("head", tr)
    fit("x0_gate", make_trainer(args.task, args.seed, "x0_gate", critic_x0_reward=True, **over), x0_reward=True)
    trg = make_trainer(args.task, args.seed, "grafted", critic_body="grafted", **over)
    t1 = time.time()
    res["critics"]["grafted_init"] = ev_report(critic_values(trg, data), R, args.buckets) | {"seconds": time.time() - t1}
    print("grafted_init", res["critics"]["grafted_init"]["ev_per_bucket"], flush=True)
    fit("grafted", trg)
    orc = res["critics"]["oracle"]["ev_per_bucket"]
    for name in ("grafted", "grafted_init", "head", "x0_gate"):
        ratios = [g / o if o > 0 else None for g, o in zip(res["critics"][name]["ev_per_bucket"], orc)]
        res[f"{name}_over_oracle_per_bucket"] = ratios
    res["grafted_over_oracle_min_bucket"] = min(r for r in res["grafted_over_oracle_per_bucket"] if r is not None)
    save()
    print(json.dumps({k: v for k, v in res.items() if k.endswith("bucket")}, indent=1, default=float))


if __name__ == "__main__":
    main()
