"""The sample and score stages: trajectories of the current policy, their rewards, and critic values.

Multi-process: every process draws the same initial noise and per-chunk noise seeds (from the same generator), samples
and scores its own contiguous 1/N of the batch in whole ``sample_chunk_size`` chunks (each with its own noise
generator, so a trajectory's noise does not depend on N), then the rollout is all-gathered.

Each chunk is decoded and scored on its own as soon as it is sampled, in a background thread while the next chunk
samples when ``overlap_rewards`` is on (:class:`ChunkScorer`); the rewards are the same either way.  With
``critic_x0_reward`` the scorer also decodes and scores the policy's x0 prediction at every recorded state (the value
head's extra input); those rows are counted in ``trainer.x0_reward_rows``, not in ``reward_queries``.
"""

from __future__ import annotations

import math
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from .guard import check_reward_magnitude
from .rollout import Rollout, sample, sample_trajectories, sample_window


@torch.no_grad()
def collect(trainer, prompts, x_T: torch.Tensor | None = None, generator: torch.Generator | None = None,
            window: tuple[int, int] | None = None) -> Rollout:
    """Sample trajectories for ``prompts`` with the current policy and score them with the trained rewards.

    generator: the source of the initial noise and the per-chunk noise seeds (default: the run's own).
    window: (start, stop) = only those steps stochastic and recorded, the rest the ODE (:func:`sample_window`);
    None = every step stochastic."""
    cfg, task, procs = trainer.config, trainer.task, trainer.processes
    prompts = list(prompts)
    gen = trainer.generator if generator is None else generator
    if x_T is None:
        x_T = torch.randn((len(prompts), *task.latent_shape), generator=gen).to(trainer.device)
    cond = task.encode(prompts)
    cond = cond.to(trainer.device) if cond is not None else None  # None: an unconditional task
    c = cfg.sample_chunk_size
    record_x0 = cfg.critic_x0_reward
    # one noise seed per chunk, drawn by every process: a trajectory's noise does not depend on the
    # number of processes, and the processes' generators stay identical
    seeds = torch.randint(0, 2**62, (math.ceil(len(prompts) / c),), generator=gen).tolist()
    mine = procs.shard(len(prompts))
    chunks = []
    with ChunkScorer(trainer, cfg.overlap_rewards) as scorer:
        for j, i in enumerate(range(mine.start, mine.stop, c), start=mine.start // c):
            sl = slice(i, min(i + c, mine.stop))
            g = torch.Generator(device=trainer.device).manual_seed(seeds[j])
            c_sl = None if cond is None else cond[sl]
            ts = trainer.timesteps.to(trainer.device)
            chunks.append(sample_trajectories(trainer.policy_output, trainer.step, x_T[sl], ts, c_sl, prompts[sl],
                                              generator=g, record_x0=record_x0) if window is None else
                          sample_window(trainer.policy_output, trainer.step, x_T[sl], ts, window, c_sl, prompts[sl],
                                        generator=g, record_x0=record_x0))
            scorer.submit(chunks[-1])
        ro = Rollout.cat(chunks)
        ro.samples, ro.rewards, x0_rewards = scorer.results()
        if record_x0:  # the predictions are scored: keep only their rewards
            ro.x0_preds, ro.x0_rewards = None, x0_rewards
            trainer.x0_reward_rows += x0_rewards.shape[0] * x0_rewards.shape[1] * procs.num_processes
    check_reward_magnitude(ro.rewards, trainer.rewards.names)
    if procs.num_processes > 1:  # every process gets the whole batch
        ro.latents, ro.log_probs = procs.gather(ro.latents), procs.gather(ro.log_probs)
        ro.x0 = procs.gather(ro.x0) if ro.x0 is not None else None
        ro.samples, ro.rewards = procs.gather(ro.samples), procs.gather(ro.rewards)
        ro.x0_rewards = procs.gather(ro.x0_rewards) if ro.x0_rewards is not None else None
        ro.cond, ro.prompts = cond, prompts
        ro.validate()
    return ro


class ChunkScorer:
    """Decodes and scores sampled chunks (``task.decode`` then the trained rewards), each on its own, in chunk order:
    in one background thread when ``overlap`` is on (the next chunk samples meanwhile), else at once in the caller's
    thread.  A context manager: leaving it waits for the thread (an error in a chunk's scoring is raised by
    :meth:`results`)."""

    def __init__(self, trainer, overlap: bool):
        self.trainer = trainer
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="rewards") if overlap else None
        self.pending: list[Future] = []

    def _score(self, final: torch.Tensor, prompts: list, x0_preds: torch.Tensor | None):
        with torch.no_grad():  # grad mode is per thread: the worker does not inherit the caller's no_grad
            samples = self.trainer.task.decode(final)
            rewards = self.trainer.rewards(samples, prompts).to(self.trainer.device)
            x0_rewards = None if x0_preds is None else x0_prediction_rewards(self.trainer, x0_preds, prompts)
            return samples, rewards, x0_rewards

    def submit(self, chunk: Rollout) -> None:
        args = (chunk.final, list(chunk.prompts), chunk.x0_preds)
        if self.pool is not None:
            self.pending.append(self.pool.submit(self._score, *args))
        else:
            done: Future = Future()
            done.set_result(self._score(*args))
            self.pending.append(done)

    def results(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(samples, rewards (B, K), x0_rewards (B, T, K) or None) of every submitted chunk, concatenated in
        submission order."""
        out = [f.result() for f in self.pending]
        x0r = None if out[0][2] is None else torch.cat([o[2] for o in out])
        return torch.cat([o[0] for o in out]), torch.cat([o[1] for o in out]), x0r

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
        return False


def x0_prediction_rewards(trainer, x0_preds: torch.Tensor, prompts: list, chunk: int = 256) -> torch.Tensor:
    """(B, T, K) the trained rewards of decode(x̂0) for x0_preds (B, T, *S), each trajectory's prompt repeated over
    its steps, in chunks of ``chunk`` rows."""
    b, t = x0_preds.shape[:2]
    flat = x0_preds.reshape(b * t, *x0_preds.shape[2:])
    rows = [p for p in prompts for _ in range(t)]
    out = [trainer.rewards(trainer.task.decode(flat[i:i + chunk]), rows[i:i + chunk]).to(trainer.device).float()
           for i in range(0, b * t, chunk)]
    return torch.cat(out).view(b, t, -1)


@torch.no_grad()
def critic_values(trainer, ro: Rollout, chunk: int = 512) -> torch.Tensor:
    """(B, T, K) critic values at every state before a step, batched over (trajectory, step) pairs."""
    mine = trainer.processes.shard(ro.batch_size)  # each process scores its share of the trajectories
    b, t = mine.stop - mine.start, ro.num_steps
    x = ro.latents[mine, :-1].reshape(b * t, *ro.latents.shape[2:])
    ts = ro.timesteps.to(trainer.device).repeat(b)
    cond = ro.cond[mine].repeat_interleave(t, dim=0) if ro.cond is not None else None
    x0r = ro.x0_rewards[mine].reshape(b * t, -1).to(trainer.device) if ro.x0_rewards is not None else None
    with trainer.autocast():
        out = [trainer.critic(x[i:i + chunk], ts[i:i + chunk], None if cond is None else cond[i:i + chunk],
                              None if x0r is None else x0r[i:i + chunk])
               for i in range(0, b * t, chunk)]
    return trainer.processes.gather(torch.cat(out).view(b, t, -1).float())


def eval_reward_matrix(trainer, ro: Rollout) -> torch.Tensor:
    """(B, K') the eval rewards of a rollout's samples, each process scoring its share."""
    mine = trainer.processes.shard(ro.batch_size)
    return trainer.processes.gather(trainer.eval_rewards(ro.samples[mine], ro.prompts[mine]).to(trainer.device))


@torch.no_grad()
def sample_images(trainer, prompts, seed: int = 1234, use_policy: bool = True) -> torch.Tensor:
    """Decoded samples for ``prompts`` from a fixed noise seed (policy or base model), without recording log-probs."""
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn((len(prompts), *trainer.task.latent_shape), generator=g).to(trainer.device)
    cond = trainer.task.encode(prompts)
    cond = cond.to(trainer.device) if cond is not None else None
    den = trainer.policy_output if use_policy else trainer.reference_output
    return trainer.task.decode(sample(den, trainer.step, x_T, trainer.timesteps.to(trainer.device), cond, generator=g))
