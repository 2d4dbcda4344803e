"""The one particle engine: log-weights, effective sample size, resampling and the final choice.

Used by :mod:`steering.samplers` (plain samplers) and :class:`steering.diffusers.SMCCallback` (any
diffusers pipeline); neither implements a weight update, a resampling scheme or a final choice of its own.

Layout: G groups (one per prompt) of N particles, flat batches **groups contiguous** (rows g·N … g·N+N−1
belong to group g).  Resampling never moves a particle across groups.

Weights (Feynman–Kac / twisted SMC).  A :class:`ParticleSystem` holds per-particle log-weights (G, N) and the
last log-potential G_t(x_t) (G·N,).  Twisting by a new potential multiplies the weight by G_new / G_old
(:meth:`ParticleSystem.twist`: the increments telescope, so potentials need only be evaluated where resampling
may happen); a proposal that is not the model's own transition adds log p − log q (:meth:`ParticleSystem.reweight`);
the final twist is λ·r(x0), after which the weighted particles target p(x0)·exp(λ·r(x0)).

Hard constraints: a log-potential or a reward may be −inf (weight 0: the particle is dead).  A dead particle
stays dead (its later increments are ignored, so −inf − (−inf) never makes a NaN), is never chosen as an
ancestor and never drawn as the output.  NaN and +inf are refused.  A group with every particle dead has
nothing to resample or draw from: that raises, naming the group.

Resampling schemes return ancestor indices (G, N) into the group's particles and are unbiased:
E[#copies of particle i] = N · w_i.  Variance (of the copy counts) decreases from multinomial to
stratified/residual to systematic (Douc, Cappé & Moulines 2005); systematic is the default.  All schemes are
vectorised over groups (no Python loop over G).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

RESAMPLING_SCHEMES = ("systematic", "stratified", "residual", "multinomial")
OUTPUTS = ("sample", "argmax")


def normalize_log_weights(log_w: torch.Tensor) -> torch.Tensor:
    """(G, N) log-weights -> (G, N) float64 normalised weights (each row sums to 1), computed stably."""
    _check_log_weights(log_w)
    return torch.softmax(log_w.double(), dim=-1)


def effective_sample_size(log_w: torch.Tensor) -> torch.Tensor:
    """(G, N) log-weights -> (G,) ESS = (Σ w)² / Σ w², in [1, N] (Kong 1992)."""
    _check_log_weights(log_w)
    w = torch.softmax(log_w.double(), dim=-1)
    return (1.0 / (w**2).sum(-1)).to(torch.float32)


def _check_log_weights(log_w: torch.Tensor) -> None:
    if log_w.ndim != 2:
        raise ValueError(f"log-weights must have shape (groups, particles), got {tuple(log_w.shape)}")
    if torch.isnan(log_w).any():
        raise ValueError("log-weights contain NaN (a NaN value or reward?); check the potential function")
    if torch.isposinf(log_w).any():
        raise ValueError("log-weights contain +inf; check the potential function and λ")
    dead = torch.isneginf(log_w).all(-1)
    if dead.any():
        raise ValueError(f"every particle of group(s) {dead.nonzero().flatten().tolist()[:8]} has weight 0 "
                         "(log-weight -inf: each violates a hard constraint); nothing to resample or draw from — "
                         "use more particles, a softer constraint, or output='argmax'")


def check_steering_numbers(num_particles=None, scale=None, lam=None, where: str = "steering") -> None:
    """The public steering entry points' argument checks (the command line checks the same in its argument types):
    a particle count is an integer >= 1, a guidance scale a finite number >= 0, λ a finite number.  None: not
    given (not checked)."""
    import math

    if num_particles is not None and (isinstance(num_particles, bool) or not isinstance(num_particles, int)
                                      or num_particles < 1):
        raise ValueError(f"{where}: num_particles must be an integer >= 1 (samples per prompt), got {num_particles!r}")
    for name, v, low in (("scale", scale, 0.0), ("lam", lam, None)):
        if v is None:
            continue
        ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) and (low is None or v >= low)
        if not ok:
            raise ValueError(f"{where}: the guidance {name} must be a finite number{' >= 0' if low is not None else ''},"
                             f" got {v!r} (an infinite or NaN {name} turns every guided step or weight into inf/NaN; "
                             f"{'0 = no guidance' if name == 'scale' else 'e.g. lam=10'})")


def check_can_resample(num_particles: int, ess_threshold: float) -> None:
    """ESS >= 1 always, so a group is resampled (ESS < κ·N) only if κ·N > 1.  κ = 0 is plain importance sampling
    (never resample) by choice; 0 < κ·N <= 1 would silently never resample, so it is refused."""
    if not 0.0 <= ess_threshold <= 1.0:
        raise ValueError(f"ess_threshold κ must be in [0, 1] (resample when ESS < κ·N), got {ess_threshold}")
    if ess_threshold > 0 and ess_threshold * num_particles <= 1:
        raise ValueError(f"with {num_particles} particle(s) and ess_threshold κ={ess_threshold}, SMC can never resample "
                         f"(ESS >= 1 >= κ·N): use κ·N > 1 (e.g. ess_threshold=0.9 with 2 particles, or more particles), "
                         "or ess_threshold=0 for importance sampling without resampling")


def _uniforms(g: int, n: int, generator, device, stratified: bool) -> torch.Tensor:
    """Sorted points in [0, 1): (k + u_k)/N with one shared u (systematic) or independent u_k (stratified)."""
    base = torch.arange(n, dtype=torch.float64, device=device).expand(g, n)
    shape = (g, n) if stratified else (g, 1)
    u = torch.rand(shape, generator=generator, dtype=torch.float64, device="cpu").to(device)
    return (base + u) / n


def _search(weights: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF lookup per row: the particle whose CDF interval holds each point."""
    cdf = weights.cumsum(-1)
    cdf = cdf / cdf[:, -1:]  # guard against round-off: the last edge is exactly 1
    return torch.searchsorted(cdf, points.contiguous(), right=True).clamp(max=weights.shape[-1] - 1)


def systematic(weights: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    return _search(weights.double(), _uniforms(*weights.shape, generator, weights.device, stratified=False))


def stratified(weights: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    return _search(weights.double(), _uniforms(*weights.shape, generator, weights.device, stratified=True))


def multinomial(weights: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    w = weights.double().cpu()
    idx = torch.multinomial(w, weights.shape[-1], replacement=True, generator=generator)
    return idx.sort(-1).values.to(weights.device)


def residual(weights: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """floor(N·w_i) deterministic copies, the remaining R_g slots drawn multinomially from the residuals.

    Vectorised over groups: slot j < Σ floor(N·w) of a row takes the deterministic ancestor (inverse CDF of the
    integer counts); the other slots take iid draws from the row's normalised residuals (N draws per row,
    the first R_g used — any R_g of iid draws are iid)."""
    g, n = weights.shape
    w = weights.double().cpu()
    counts = torch.floor(n * w)
    resid = n * w - counts
    num_det = counts.sum(-1, keepdim=True)                      # (G, 1)
    slots = torch.arange(n, dtype=torch.float64).expand(g, n)
    det = torch.searchsorted(counts.cumsum(-1), slots.contiguous(), right=True).clamp(max=n - 1)
    # rows with no residual mass (N·w all integers) draw nothing; give them a placeholder distribution
    has_resid = resid.sum(-1, keepdim=True) > 0
    probs = torch.where(has_resid, resid, torch.ones_like(resid))
    extra = torch.multinomial(probs / probs.sum(-1, keepdim=True), n, replacement=True, generator=generator)
    idx = torch.where(slots < num_det, det, extra)
    return idx.sort(-1).values.to(weights.device)


_SCHEMES = {"systematic": systematic, "stratified": stratified, "residual": residual, "multinomial": multinomial}


def resample(log_w: torch.Tensor, scheme: str = "systematic", generator: torch.Generator | None = None) -> torch.Tensor:
    """Ancestor indices (G, N) for (G, N) log-weights, drawn within each group by ``scheme``."""
    if scheme not in _SCHEMES:
        raise ValueError(f"unknown resampling scheme {scheme!r}; use one of {RESAMPLING_SCHEMES}")
    return _SCHEMES[scheme](normalize_log_weights(log_w).double(), generator)


def flat_ancestors(ancestors: torch.Tensor) -> torch.Tensor:
    """(G, N) within-group ancestor indices -> (G·N,) indices into the flat particle batch (groups contiguous)."""
    g, n = ancestors.shape
    return (ancestors + n * torch.arange(g, device=ancestors.device).unsqueeze(1)).reshape(-1)


def check_log_potential(v: torch.Tensor, n: int, what: str, allow_neg_inf: bool = True) -> torch.Tensor:
    """A (n,) tensor of values / rewards / log-potentials: NaN and +inf refused; −inf (a hard constraint)
    allowed unless ``allow_neg_inf`` is False (e.g. a value whose gradient guides sampling)."""
    if not isinstance(v, torch.Tensor) or v.shape != (n,):
        shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
        raise ValueError(f"{what} must return a (batch,) tensor, got {shape} for a batch of {n}")
    bad = torch.isnan(v) | torch.isposinf(v)
    if not allow_neg_inf:
        bad = bad | torch.isneginf(v)
    if bad.any():
        rows = bad.nonzero().flatten().tolist()[:8]
        allowed = "finite values or -inf (a hard constraint)" if allow_neg_inf else "finite values"
        raise ValueError(f"{what} returned non-finite values at rows {rows}; steering needs {allowed}")
    return v


@dataclass
class ParticleSystem:
    """The weights of G groups of N particles (see the module doc).  Mutable; one per steering run.

    log_w:       (G, N) float64 log-weights since each group's last resampling
    potential:   (G·N,) float64 the last log-potential G_t(x_t) each particle was twisted by (0 before any)
    ess_history / resampled_history: one (G,) entry per :meth:`maybe_resample` call (ESS before the decision,
                 whether the group was resampled), plus the final ESS from :meth:`finish`
    """

    num_groups: int
    num_particles: int
    ess_threshold: float = 0.5
    scheme: str = "systematic"
    generator: torch.Generator | None = None
    device: torch.device | str = "cpu"
    log_w: torch.Tensor = field(init=False)
    potential: torch.Tensor = field(init=False)
    ess_history: list = field(init=False, default_factory=list)
    resampled_history: list = field(init=False, default_factory=list)
    final_ess: torch.Tensor | None = field(init=False, default=None)

    def __post_init__(self):
        if not isinstance(self.num_particles, int) or self.num_particles < 1:
            raise ValueError(f"num_particles must be a positive int, got {self.num_particles!r}")
        if self.scheme not in RESAMPLING_SCHEMES:
            raise ValueError(f"unknown resampling scheme {self.scheme!r}; use one of {RESAMPLING_SCHEMES}")
        check_can_resample(self.num_particles, self.ess_threshold)
        g, n = self.num_groups, self.num_particles
        self.log_w = torch.zeros(g, n, dtype=torch.float64, device=self.device)
        self.potential = torch.zeros(g * n, dtype=torch.float64, device=self.device)

    @property
    def size(self) -> int:
        return self.num_groups * self.num_particles

    def _add(self, increment: torch.Tensor) -> None:
        dead = torch.isneginf(self.log_w)
        self.log_w = torch.where(dead, self.log_w, self.log_w + increment.view(self.num_groups, self.num_particles))

    def twist(self, log_potential: torch.Tensor) -> None:
        """Multiply each weight by G_new(x)/G_old(x) for a (G·N,) new log-potential (e.g. λ·V(x_t))."""
        new = log_potential.to(self.log_w.device, torch.float64)
        # a dead particle's increment is ignored in _add (its old potential may be −inf: −inf − −inf is NaN)
        inc = torch.where(torch.isneginf(self.potential), torch.zeros_like(new), new - self.potential)
        self._add(inc)
        self.potential = new

    def reweight(self, log_increment: torch.Tensor) -> None:
        """Multiply each weight by exp(increment), (G·N,): e.g. log p(x'|x) − log q(x'|x) for a guided proposal."""
        self._add(log_increment.to(self.log_w.device, torch.float64))

    def ess(self) -> torch.Tensor:
        """(G,) effective sample size of the current weights."""
        return effective_sample_size(self.log_w)

    def maybe_resample(self, allowed: bool = True) -> torch.Tensor | None:
        """Record the ESS; resample the groups with ESS < κ·N (if ``allowed``).  Returns (G·N,) flat ancestor
        indices to re-index every per-particle tensor with (identity rows for groups not resampled), or None if
        no group was resampled.  A resampled group's log-weights are reset to 0; the potentials follow."""
        g, n = self.num_groups, self.num_particles
        ess = self.ess()
        do = (ess < self.ess_threshold * n) if allowed else torch.zeros_like(ess, dtype=torch.bool)
        self.ess_history.append(ess.cpu())
        self.resampled_history.append(do.cpu())
        if not bool(do.any()):
            return None
        anc = resample(self.log_w, self.scheme, self.generator)
        keep = torch.arange(n, device=anc.device).expand(g, n)
        idx = flat_ancestors(torch.where(do.to(anc.device).unsqueeze(1), anc, keep)).to(self.log_w.device)
        self.log_w = torch.where(do.unsqueeze(1), torch.zeros_like(self.log_w), self.log_w)
        self.potential = self.potential[idx]
        return idx

    def finish(self, final_log_potential: torch.Tensor) -> torch.Tensor:
        """Twist by the final potential (λ·r(x0), replacing the last value potential) and return the final (G,)
        ESS: the effective number of particles the output is drawn from (a collapse shows here)."""
        self.twist(final_log_potential)
        self.final_ess = self.ess()
        return self.final_ess

    def choose(self, rewards: torch.Tensor, output: str = "sample") -> torch.Tensor:
        """(G,) flat row indices, one particle per group.

        "sample": drawn ∝ the final weights — a draw from the SMC approximation of p·exp(λ r) (the target);
        "argmax": the particle with the highest reward — a best-of-N-style choice that maximises the reward
                  (it overshoots the target)."""
        return choose(rewards, self.num_particles, output, self.log_w, self.generator)


def choose(rewards: torch.Tensor, num_particles: int, output: str, log_w: torch.Tensor | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """The final choice, (G,) flat rows: see :meth:`ParticleSystem.choose`; "sample" needs ``log_w`` (G, N)."""
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    n = num_particles
    g = rewards.shape[0] // n
    if output == "argmax":
        choice = rewards.view(g, n).argmax(-1).cpu()
    else:
        if log_w is None:
            raise ValueError("output='sample' draws ∝ SMC weights; without weights (best-of-N) use output='argmax'")
        choice = torch.multinomial(normalize_log_weights(log_w).cpu(), 1, generator=generator).squeeze(1)
    return (choice + n * torch.arange(g)).to(rewards.device)
