"""The sample and score stages: trajectories of the current policy, their rewards, and critic values.

Rank-local: every process holds the same prompt list and generator, draws the same initial noise and per-chunk noise
seeds (so a trajectory's noise does not depend on the number of processes), and samples, encodes, decodes and scores
only its own contiguous shard of the batch, in whole ``sample_chunk_size`` chunks.  The returned :class:`Rollout`
holds that shard; nothing but rewards, values and statistics crosses processes (the trainer gathers those).

Each chunk is decoded and scored on its own as soon as it is sampled, in a background thread while the next chunk
samples when ``overlap_rewards`` is on (:class:`ChunkScorer`); the rewards are the same either way.  When the
value head reads r(decode(x̂0)) (an :class:`~critic_align.x0_reward.X0Readout` that reads) the scorer also decodes and
scores the policy's x0 prediction at every recorded state (the head's extra input); those rows are not reward queries
(the trainer counts them apart).  Which steps are recorded is the epoch's SDE window's
(:class:`~critic_align.sde_window.Window`).
"""

from __future__ import annotations

import math
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace

import torch

from .rollout import Rollout, sample
from .sde_window import EVERY_STEP, Window
from .x0_reward import LATENT_ONLY, X0Readout, head_input_rows


@torch.no_grad()
def collect(models, task, rewards, timesteps: torch.Tensor, prompts, shard: slice, generator: torch.Generator,
            chunk_size: int, overlap: bool = True, readout: X0Readout = LATENT_ONLY, x_T: torch.Tensor | None = None,
            window: Window = EVERY_STEP) -> Rollout:
    """Sample this process's ``shard`` of the trajectories for ``prompts`` (the whole batch's list) with the policy
    of ``models`` and score them with ``rewards`` (a :class:`~critic_align.rewards.base.MultiReward`).

    generator: the source of the whole batch's initial noise and per-chunk noise seeds (the same on every process);
    x_T: the whole batch's initial noise instead; window: the steps stochastic and recorded, the rest the ODE
    (:class:`~critic_align.sde_window.Window`; ``EVERY_STEP``: all).  readout: whether the value head reads
    r(decode(x̂0)): then the step's x0 prediction at every recorded state is scored too (``x0_rewards``)."""
    prompts = list(prompts)
    device = models.device
    if x_T is None:
        x_T = torch.randn((len(prompts), *task.latent_shape), generator=generator)
    # one noise seed per chunk, drawn by every process: a trajectory's noise does not depend on the number of
    # processes, and the processes' generators stay identical
    seeds = torch.randint(0, 2**62, (math.ceil(len(prompts) / chunk_size),), generator=generator).tolist()
    mine = list(prompts[shard])
    cond = task.encode(mine)  # only this process's prompts
    cond = cond.to(device) if cond is not None else None  # None: an unconditional task
    ts = timesteps.to(device)
    chunks = []
    with ChunkScorer(task, rewards, device, overlap, readout) as scorer:
        for i in range(shard.start, shard.stop, chunk_size):
            local = slice(i - shard.start, min(i + chunk_size, shard.stop) - shard.start)
            # a CPU generator on every device: the step noise is drawn on the CPU and moved (steps.step_noise), so a
            # seed gives the same trajectories on a CPU and a GPU
            g = torch.Generator().manual_seed(seeds[i // chunk_size])
            c_sl = None if cond is None else cond[local]
            x = x_T[i:i + (local.stop - local.start)].to(device)
            chunks.append(window.sample(models.policy_output, models.step, x, ts, c_sl, mine[local], generator=g,
                                        record_x0=readout.reads))
            scorer.submit(chunks[-1])
        ro = Rollout.cat(chunks)
        samples, scores, x0_rewards = scorer.results()
    # the predictions are scored: keep only their rewards
    return replace(ro, samples=samples, rewards=scores, x0_preds=None, x0_rewards=x0_rewards, cond=cond).validate()


class ChunkScorer:
    """Decodes and scores sampled chunks (``task.decode`` then ``rewards``), each on its own, in chunk order: in one
    background thread when ``overlap`` is on (the next chunk samples meanwhile), else at once in the caller's thread.
    A context manager: leaving it waits for the thread (an error in a chunk's scoring is raised by :meth:`results`).
    ``readout``: the x0 predictions a chunk recorded are scored too when the value head reads them."""

    def __init__(self, task, rewards, device, overlap: bool, readout: X0Readout = LATENT_ONLY):
        self.task, self.rewards, self.device, self.readout = task, rewards, device, readout
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="rewards") if overlap else None
        self.pending: list[Future] = []

    def _score(self, final: torch.Tensor, prompts: list, x0_preds: torch.Tensor | None):
        with torch.no_grad():  # grad mode is per thread: the worker does not inherit the caller's no_grad
            samples = self.task.decode(final)
            scores = self.rewards(samples, prompts).to(self.device)
            x0_rewards = self.readout.score(self.task, self.rewards, x0_preds, prompts, self.device)
            return samples, scores, x0_rewards

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


@torch.no_grad()
def critic_values(models, ro: Rollout, chunk: int = 512) -> torch.Tensor:
    """(B, T, K) critic values at every state of ``ro`` before a step, batched over (trajectory, step) pairs."""
    b, t = ro.batch_size, ro.num_steps
    device = models.device
    x = ro.latents[:, :-1].reshape(b * t, *ro.latents.shape[2:]).to(device)
    ts = ro.timesteps.to(device).repeat(b)
    cond = ro.cond.repeat_interleave(t, dim=0) if ro.cond is not None else None
    x0r = head_input_rows(ro.x0_rewards, device)  # None: the head reads the latent alone
    out = [models.values(x[i:i + chunk], ts[i:i + chunk], None if cond is None else cond[i:i + chunk],
                         None if x0r is None else x0r[i:i + chunk])
           for i in range(0, b * t, chunk)]
    return torch.cat(out).view(b, t, -1).float()


@torch.no_grad()
def sample_images(models, task, timesteps: torch.Tensor, prompts, seed: int = 1234,
                  use_policy: bool = True) -> torch.Tensor:
    """Decoded samples for ``prompts`` from a fixed noise seed (policy or base model), without recording log-probs."""
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn((len(prompts), *task.latent_shape), generator=g).to(models.device)
    cond = task.encode(prompts)
    cond = cond.to(models.device) if cond is not None else None
    den = models.policy_output if use_policy else models.reference_output
    return task.decode(sample(den, models.step, x_T, timesteps.to(models.device), cond, generator=g))

