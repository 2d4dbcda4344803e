"""The oracle value source: V(x_t) = E[R | x_t] estimated by K continuations of the policy's own sampler.

A pure function of a denoiser callable ``denoiser(x_t, t (B,), cond) -> model output``, the sampler's step
(:class:`~critic_align.steps.DDIMStep` / ``FlowMatchSDEStep``), the states, their conditioning, a reward function
``reward_fn(final_latents, prompts) -> (N, R)`` (decode + rewards), K and a generator: no trainer.

From a state at index ``j`` of the schedule's ``timesteps`` each of the K continuations runs the remaining steps
``j .. n-1`` with ``step`` (the stochastic sampler) up to ``stochastic_stop`` and its ODE form (``step.ode()``) after
it: with an SDE window (:func:`critic_align.sde_window.sample_window`) the policy's sampler is stochastic only inside the
window, so a state at or past the window's end has a deterministic future and needs one continuation, not K.  The
estimate is the mean of the K rewards; ``stderr`` is their standard deviation / √K (0 where the future is
deterministic).  The reward queries and the backbone calls (NFE) the continuations cost are returned in
:class:`OracleCounts`, apart from any run's own counters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["OracleCounts", "OracleValues", "continue_to_final", "oracle_values", "oracle_values_at",
           "rollout_oracle_values", "explained_variance"]


@dataclass
class OracleCounts:
    """What the oracle spent: reward queries (one per scored continuation) and backbone calls (one per row-step)."""

    reward_queries: int = 0
    nfe: int = 0

    def __iadd__(self, other: "OracleCounts") -> "OracleCounts":
        self.reward_queries += other.reward_queries
        self.nfe += other.nfe
        return self

    def as_dict(self) -> dict:
        return {"reward_queries": self.reward_queries, "nfe": self.nfe}


@dataclass
class OracleValues:
    values: torch.Tensor     # (N, R) mean reward of the continuations
    stderr: torch.Tensor     # (N, R) their std / √K (0 for a deterministic future)
    counts: OracleCounts


def _repeat_cond(cond, k: int):
    if cond is None or k == 1:
        return cond
    return cond.repeat_interleave(k, dim=0)  # a tensor or a TextCond


@torch.no_grad()
def continue_to_final(denoiser, step, x: torch.Tensor, index: int, timesteps: torch.Tensor, cond=None,
                      generator: torch.Generator | None = None, prev_timesteps: torch.Tensor | None = None,
                      stochastic_stop: int | None = None) -> tuple[torch.Tensor, int]:
    """Run the sampler from states ``x`` at ``timesteps[index]`` to the final sample: ``step`` for the steps before
    ``stochastic_stop`` (None: all), its ODE form after.  Returns (final (N, *S), backbone calls = N · steps run)."""
    if prev_timesteps is None:
        prev_timesteps = step.schedule.prev_timesteps(timesteps)
    n = len(timesteps)
    ode = step.ode() if step.is_stochastic else step
    for j in range(index, n):
        st = step if (stochastic_stop is None or j < stochastic_stop) else ode
        t = timesteps[j].expand(x.shape[0]).to(x.device)
        x = st(denoiser(x, t, cond), x, t, prev_timesteps[j].to(x.device), generator=generator).prev_sample
    return x, x.shape[0] * (n - index)


def _deterministic_future(step, index: int, stochastic_stop: int | None) -> bool:
    return (not step.is_stochastic) or (stochastic_stop is not None and index >= stochastic_stop)


@torch.no_grad()
def oracle_values(denoiser, step, states: torch.Tensor, index: int, timesteps: torch.Tensor, cond, reward_fn,
                  K: int, generator: torch.Generator | None = None, prompts=None,
                  prev_timesteps: torch.Tensor | None = None, stochastic_stop: int | None = None,
                  chunk: int = 1024) -> OracleValues:
    """E[R | x_t] for ``states`` (N, *S), all at ``timesteps[index]``, from K continuations each (one where the
    future is deterministic).  ``reward_fn(final (M, *S), prompts (M,)) -> (M, R)``; ``chunk``: rows per forward."""
    if K < 1:
        raise ValueError(f"K must be >= 1, got {K}")
    n_states = states.shape[0]
    k_eff = 1 if _deterministic_future(step, index, stochastic_stop) else K
    prompts = list(prompts) if prompts is not None else [""] * n_states
    x = states.repeat_interleave(k_eff, dim=0)
    rows_prompts = [p for p in prompts for _ in range(k_eff)]
    rows_cond = _repeat_cond(cond, k_eff)
    counts = OracleCounts()
    rewards = []
    for s in range(0, x.shape[0], chunk):
        sl = slice(s, s + chunk)
        c = None if rows_cond is None else rows_cond[sl]
        final, nfe = continue_to_final(denoiser, step, x[sl], index, timesteps, c, generator, prev_timesteps,
                                       stochastic_stop)
        r = torch.as_tensor(reward_fn(final, rows_prompts[sl])).float()
        rewards.append(r.reshape(final.shape[0], -1).to(states.device))
        counts.nfe += nfe
        counts.reward_queries += final.shape[0]
    r = torch.cat(rewards).view(n_states, k_eff, -1)
    mean = r.nanmean(1)
    if k_eff > 1:
        dev = torch.nan_to_num(r - mean[:, None])
        n_ok = (~torch.isnan(r)).sum(1).clamp(min=2)
        stderr = ((dev**2).sum(1) / (n_ok - 1)).sqrt() / n_ok.sqrt()
    else:
        stderr = torch.zeros_like(mean)
    return OracleValues(mean, stderr, counts)


@torch.no_grad()
def oracle_values_at(denoiser, step, x: torch.Tensor, t: torch.Tensor, timesteps: torch.Tensor, cond, reward_fn,
                     K: int, generator: torch.Generator | None = None, prompts=None,
                     stochastic_stop: int | None = None, chunk: int = 1024) -> OracleValues:
    """:func:`oracle_values` for rows at mixed timesteps: x (N, *S), t (N,) values from ``timesteps``; rows are
    grouped by their index in ``timesteps`` (a t not in it is an error)."""
    ts = timesteps.to(t.device)
    prompts = list(prompts) if prompts is not None else [""] * x.shape[0]
    values = stderr = None
    counts = OracleCounts()
    for tv in torch.unique(t):
        hits = (ts == tv).nonzero()
        if len(hits) == 0:
            raise ValueError(f"timestep {tv.item()} is not in the sampler's timesteps")
        rows = (t == tv).nonzero().flatten()
        c = None if cond is None else cond[rows.to(cond.device)]
        ov = oracle_values(denoiser, step, x[rows], int(hits[0]), timesteps, c, reward_fn, K, generator,
                           [prompts[i] for i in rows.tolist()], stochastic_stop=stochastic_stop, chunk=chunk)
        if values is None:
            values = ov.values.new_full((x.shape[0], ov.values.shape[1]), float("nan"))
            stderr = values.clone()
        values[rows.to(values.device)] = ov.values
        stderr[rows.to(values.device)] = ov.stderr
        counts += ov.counts
    return OracleValues(values, stderr, counts)


@torch.no_grad()
def rollout_oracle_values(denoiser, step, latents: torch.Tensor, start: int, timesteps: torch.Tensor, cond,
                          reward_fn, K: int, generator: torch.Generator | None = None, prompts=None,
                          stochastic_stop: int | None = None, chunk: int = 1024) -> OracleValues:
    """(B, T, R) oracle values at a rollout's T states before each step: latents (B, T+1, *S) with latents[:, k] at
    ``timesteps[start + k]`` (``start`` = an SDE window's start, 0 for full trajectories)."""
    t_steps = latents.shape[1] - 1
    counts = OracleCounts()
    vals, errs = [], []
    for k in range(t_steps):
        ov = oracle_values(denoiser, step, latents[:, k], start + k, timesteps, cond, reward_fn, K, generator,
                           prompts, stochastic_stop=stochastic_stop, chunk=chunk)
        vals.append(ov.values)
        errs.append(ov.stderr)
        counts += ov.counts
    return OracleValues(torch.stack(vals, 1), torch.stack(errs, 1), counts)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, noise_var: torch.Tensor | None = None) -> float:
    """1 − E[(R − V)²] / Var(R) over rows; ``noise_var`` (per row): the estimate's own Monte-Carlo variance
    (stderr²), subtracted from the squared error (an independent noise adds exactly its variance to it)."""
    v, r = values.double().flatten(), returns.double().flatten()
    mse = ((r - v) ** 2).mean()
    if noise_var is not None:
        mse = mse - noise_var.double().flatten().mean()
    var = r.var(unbiased=False)
    return float(1 - mse / var) if var > 0 else float("nan")
