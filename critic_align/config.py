"""The trainer's one config dataclass: every field documented, checked in ``__post_init__``."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from .critic import CRITIC_MODES
from .registry import ALGORITHMS, ESTIMATORS

AGGREGATIONS = ("normalize_then_sum", "sum_then_normalize")
OPTIMIZERS = ("adamw", "adamw_8bit")


def _err(name, value, what, number=True):
    got = ""
    if isinstance(value, str) and number and _numeric_text(value):  # a number that arrived quoted (e.g. YAML's 1e-3)
        got = f" (got the string {value!r}: write a number, not a quoted string"
        if "e" in value.lower() and any(c.isdigit() for c in value):
            got += "; in YAML write 1.0e-3, with a dot: PyYAML reads 1e-3 as a string"
        got += ")"
    elif isinstance(value, str) and number:
        got = f" (got the string {value!r})"
    elif value is not None and not isinstance(value, (int, float, str)):  # a string shows as one in the repr
        got = f" (got a {type(value).__name__})"
    raise ValueError(f"config field {name}={value!r}: {what}{got}")


def _numeric_text(v: str) -> bool:
    try:
        float(v)
    except ValueError:
        return False
    return True


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _positive_number(v) -> bool:
    return _number(v) and v > 0


def _foreign_arguments(algorithm: str, advantage: str) -> list[tuple[str, str, list[str]]]:
    """(selector, field, the algorithms or estimators that read it) for each field that only algorithms or estimators
    other than ``algorithm`` / ``advantage`` read (each class's ``arguments``, in its own file)."""
    from .registry import resolve

    out = []
    for selector, table, chosen in (("algorithm", ALGORITHMS, algorithm), ("advantage", ESTIMATORS, advantage)):
        owners: dict[str, list[str]] = {}
        for name, target in table.items():
            for arg in getattr(resolve(target), "arguments", ()):  # a class without the attribute reads none
                owners.setdefault(arg, []).append(name)
        out += [(selector, arg, names) for arg, names in owners.items() if chosen not in names]
    return out


def not_applicable(fields: dict) -> set[str]:
    """The names among ``fields`` (PPOConfig fields) that the algorithm and estimator they choose do not read: for a
    caller that builds one set of settings for several methods and drops, explicitly, what a method would refuse."""
    algorithm = fields.get("algorithm", PPOConfig.algorithm)
    advantage = fields.get("advantage", PPOConfig.advantage)
    return {arg for _, arg, _ in _foreign_arguments(algorithm, advantage)} & set(fields)


@dataclass
class PPOConfig:
    """Latent actor-critic PPO (and its GRPO / DDPO baselines) over the denoising MDP.

    Defaults follow DDPO (Black et al. 2023: LoRA, per-dimension-averaged log-probs, advantage clip 5,
    eta 1; a larger clip range and learning rate, see ``clip_range``) and the core seed (CFG-free
    training, value pretraining, GAE with reward only at the final step), sized so the digits job
    finishes in minutes on 2 CPU cores.
    """

    # --- run ---------------------------------------------------------------------------------------
    seed: int = 0
    """Seeds torch, numpy and python RNGs and the prompt order."""
    num_epochs: int = 40
    """Epochs of (rollout -> rewards -> advantages -> PPO update), after value pretraining."""
    output_dir: str = "runs/digits"
    """Run directory: metrics.jsonl, tensorboard/, checkpoints/, grids and plots."""

    # --- sampling (the policy) ------------------------------------------------------------------------
    num_inference_steps: int = 20
    """T, the denoising steps per trajectory (the MDP's horizon)."""
    eta: float = 1.0
    """DDIM's η, the noise level of the stochastic step on DDPM/DDIM-style (VP) schedulers; must be > 0 (the policy
    must be stochastic to have log-probs); 1.0 is DDPM-like.  Unused with flow matching (``sde_noise_level``)."""
    sde_noise_level: float = 0.7
    """Flow-matching schedulers (``FlowMatchEulerDiscreteScheduler``) only: the noise level a of the rectified-flow
    SDE, σ_t = a·sqrt(σ/(1−σ)) (Flow-GRPO uses 0.7); must be > 0.  Unused with VP schedulers (``eta``)."""
    guidance_scale: float = 1.0
    """Classifier-free guidance during rollouts; 1.0 = CFG-free (the core seed's choice)."""
    batch_size: int = 64
    """Trajectories sampled per epoch (= reward queries per epoch)."""
    group_size: int = 8
    """Trajectories per prompt in an epoch; batch_size / group_size distinct prompts per epoch (>= 2 for 'grpo')."""
    sample_chunk_size: int = 64
    """Trajectories per sampling forward (bounds memory).  Each chunk draws its noise from its own generator
    (seeded from the run's), so a trajectory's noise does not depend on the number of processes; changing
    the chunk size changes the noise draws (not their distribution).  With N processes it must divide
    batch_size / N."""
    overlap_rewards: bool = True
    """Decode and score each sampled chunk in a background thread while the next chunk samples (ddpo-pytorch's and
    Flow-GRPO's async rewards): a slow reward (a large model, a remote server) no longer idles the sampler.  The
    rewards are the same as without it (each chunk is scored on its own either way, in chunk order); with one chunk
    per epoch there is nothing to overlap.  False: score each chunk in the sampling thread."""

    # --- algorithm ------------------------------------------------------------------------------------
    algorithm: str = "ppo"
    """The policy update (critic_align/algorithms/, one file each; rollout, rewards, advantages, checkpoints and
    processes are shared): 'ppo' (clipped ratio of the SDE step's log-probs), 'nft' (DiffusionNFT: implicit
    positive / negative policies fitted with the flow-matching loss on forward-noised samples), 'awm'
    (advantage-weighted matching: the denoising loss weighted by the advantage).  nft and awm train on the final
    samples noised by the scheduler's forward process; they use ppo_epochs, minibatch_size, timestep_fraction,
    adv_clip_max and kl_coef (awm also clip_range)."""
    nft_beta: float = 1.0
    """nft: the mixing β of the implicit policies v± (v⁺ = β·v_θ + (1−β)·v_old); DiffusionNFT's ``config.beta``
    (1.0 in their base config, 0.1 in their SD3 runs).  Must be > 0 (the loss divides by it)."""
    nft_advantage: str = "grpo"
    """nft: 'grpo' (the estimator's advantage of the trajectory, the paper's; needs advantage: grpo or ddpo) or 'critic'
    (per-timestep A = R − V(x_t, t) on the forward-noised state; needs advantage: gae, which builds and trains the
    critic)."""
    awm_advantage: str = "grpo"
    """awm: 'grpo' (the estimator's advantage of the trajectory; needs advantage: grpo or ddpo) or 'critic'
    (per-timestep A = R − V(x_t, t) on the forward-noised state; needs advantage: gae, which builds and trains the
    critic)."""

    # --- rewards and advantages -----------------------------------------------------------------------
    advantage: str = "gae"
    """'gae' (critic, per-step credit), 'grpo' (group-normalised per prompt), 'ddpo' (per-prompt tracker)."""
    reward_weights: tuple[float, ...] | None = None
    """One weight per trained reward, in the order of the run's ``rewards`` list; replaces the weights given
    there (default None: keep them, i.e. the YAML ``weight:`` entries, 1 when absent)."""
    advantage_aggregation: str = "normalize_then_sum"
    """How K rewards' advantages combine (K = 1: the modes differ only by the weight's scale).
    'normalize_then_sum': GAE per reward head; each reward's advantages are whitened over the samples where
    it is available (GRPO: group-normalised per prompt), then A = Σ_k w_k Â_k — the weights alone set each
    reward's pull, whatever the scale of its values.  'sum_then_normalize': GAE: A = Σ_k w_k A_k, then
    whitened (if ``normalize_advantages``); GRPO/DDPO: rewards combined as Σ_k w_k r_k, then normalised per
    prompt — a reward with a larger spread dominates.  One rule for a NaN reward (not applicable) in every
    mode: it adds 0 to a sample's (centred) advantage and the other weights are not rescaled (GRPO/DDPO fill
    it with the mean of that reward over the prompt's available samples in the batch, which centring turns
    into 0); its head's value loss skips it.  DDPO with K > 1 needs 'sum_then_normalize'."""
    gamma: float = 1.0
    """Discount over denoising steps (1.0: the final reward counts fully at every step)."""
    gae_lambda: float = 0.95
    """GAE's λ: 1.0 = Monte-Carlo returns minus the value baseline, 0.0 = one-step TD."""
    gae_group_baseline: bool = False
    """GAE mode: centre each step's advantages within the prompt's group (A_t − mean over the group's samples of
    A_t, per reward head, before combining) — the prompt's own samples set the prompt-level baseline, as in GRPO,
    and the critic supplies the within-prompt, per-step credit (its values need not rank prompts).  A critic that
    only knows the prompt then gives GRPO's centred advantage at every step (λ = γ = 1); a group of one sample
    gets advantage 0.  For many-prompt tasks where the critic cannot learn prompt difficulty from the samples it
    sees (``benchmarks/NOTES.md``, "Reading the t2i task").  Value targets are unchanged.  Needs group_size >= 2."""
    normalize_advantages: bool = True
    """Whiten the summed advantages over the batch (GAE mode with 'sum_then_normalize'; 'normalize_then_sum'
    always whitens each reward's advantages, and GRPO/DDPO are normalised by construction)."""
    advantage_scale: str = "advantages"
    """GAE mode: what the centred advantages are divided by.  'advantages': their own std over the batch's
    (trajectory, step) pairs (PPO's whitening).  'rewards': the std of the batch's rewards (GRPO's unit), so a
    reward deviation of one σ_R gives an advantage of about 1 in both modes.  Whitening divides by the std of
    R − V, which shrinks as the critic improves (benchmarks/results/training.md measures it on the mixture), so at
    an equal learning rate it pushes the policy harder than GRPO does; 'rewards' compares the estimators at the same
    step size."""
    adv_clip_max: float = 5.0
    """Clip advantages to [-adv_clip_max, adv_clip_max] (DDPO)."""
    stat_buffer_size: int = 32
    """DDPO mode: rewards kept per prompt."""
    stat_min_count: int = 16
    """DDPO mode: below this many stored rewards a prompt uses the batch's statistics."""

    # --- PPO update ---------------------------------------------------------------------------------
    ppo_epochs: int = 1
    """Inner epochs over each rollout batch."""
    minibatch_size: int = 160
    """(trajectory, step) pairs per optimiser step."""
    gradient_accumulation_steps: int = 1
    """Per rank: each process splits its share of a minibatch (the pairs of its own trajectories, about
    minibatch_size / N with N processes) into at least this many micro-batches (and micro-batches of at most
    ``micro_batch_size`` pairs); the engine syncs the gradients once per minibatch.  The gradient is the same whatever
    the split (each micro-batch's loss is weighted by its share of the minibatch).  To bound memory the same way on
    any number of processes set ``micro_batch_size`` instead (it does not depend on N)."""
    micro_batch_size: int | str = "auto"
    """The most (trajectory, step) pairs (or value-fit rows) the update forwards and back-propagates at once;
    memory, not the maths: the gradient is the minibatch mean's whatever the split.  'auto': as many as fit in
    ``micro_batch_memory_mb`` of saved activations, measured on the run's first micro-batch of each loss
    (``critic_align/update.py``, ``MicroBatcher``).  On the TRL comparison's tiny SD1.5 pipeline with CFG a pair
    saves ~24 MB and the whole 32-pair minibatch at once doubled the peak RSS (``benchmarks/results/trl_compare.json``);
    'auto' forwards 5 pairs there.  Smaller micro-batches cost time where a pair is cheap: on digits (~3-4 MB a
    pair) 'auto' forwards 34-45 of the 160 pairs at once, at ~300-400 MB less peak RSS than all 160 and somewhat
    slower updates (``benchmarks/results/speed_defaults.json``); set an integer to choose speed over memory."""
    micro_batch_memory_mb: float | None = None
    """With ``micro_batch_size: auto``, the budget for the activations one micro-batch saves for its backward pass
    (MB; the model, optimiser and rollout come on top).  None: per device, 128 MB on a CPU (as lean as TRL's
    DDPOTrainer in ``benchmarks/results/trl_compare.json``), half the GPU's free memory on CUDA (where
    ``gradient_accumulation_steps`` then usually sets the micro-batch)."""
    timestep_fraction: float = 1.0
    """Fraction of each trajectory's steps trained on (DDPO's option), chosen at random per trajectory."""
    sde_window_size: int = 0
    """ppo only.  0 = every denoising step is stochastic and trained (the full MDP).  W >= 1 = an SDE window
    (Flow-GRPO-Fast / MixGRPO): each epoch draws one window of W consecutive steps (the same for the whole batch);
    the steps before it and after it are the deterministic ODE step of the same sampler (DDIM with eta=0, the Euler
    flow step), so only the window's W transitions are stochastic, have log-probabilities and are trained on
    (and, for GAE, only the window's states get critic values and returns).  What it does to the MDP: the episode
    becomes the window's W transitions, starting from the deterministic x at the window's start; the reward is
    a deterministic function of the window's last state (the ODE finishes the sample).  The critic is not told
    where the window is: its target at a window state is the return under the remaining stochastic steps of the
    window it was seen in.  Held-out evaluation (eval_every) samples full stochastic trajectories, so its numbers
    compare across settings.  Costs per epoch: the same backbone calls in sampling; W/T of the update's."""
    sde_window_range: tuple[int, int] | None = None
    """The window's first step is drawn uniformly from [lo, hi] (inclusive, 0 = the noisiest step) by the run's
    generator each epoch; null = [0, num_inference_steps − sde_window_size] (anywhere).  lo = hi fixes it."""
    clip_range: float = 1e-3
    """PPO ratio clip ε (on per-dimension-averaged log-probs when log_prob_reduction='mean').  DDPO and
    Flow-GRPO use 1e-4 over hundreds of epochs; on digits (grpo, lr 1e-3) 1e-4 clipped 30 % of the pairs,
    1e-3 clipped 5 % and raised digit_prob from 0.67 to 0.76 in 60 epochs
    (benchmarks/results/digits_sweep_*.log, written by benchmarks/digits_sweep.py)."""
    log_prob_reduction: str = "mean"
    """'mean' (DDPO/Flow-GRPO: averaged over latent dims) or 'sum' (the exact Gaussian log-density)."""
    learning_rate: float = 1e-3
    """Policy LoRA learning rate (AdamW)."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    weight_decay: float = 1e-4
    max_grad_norm: float = 1.0
    """Gradient-norm clip, applied separately to the policy's and the critic's parameters."""
    kl_coef: float = 0.0
    """Coefficient of the per-step KL to the reference (base) policy, in closed form for Gaussians.  Its scale
    follows ``log_prob_reduction``: with 'mean' the KL is averaged over the D = C·H·W latent dimensions (a
    per-dimension KL, like the PPO ratio), with 'sum' it is the exact KL, summed, D times larger for the same
    policies.  So a kl_coef tuned under 'mean' pulls as hard as kl_coef / D under 'sum' (D = 256 on the 16×16
    digits, 16384 for SD1.5's 4×64×64 latents; Flow-GRPO's KL 0.01 is per dimension, i.e. 'mean')."""

    # --- policy LoRA --------------------------------------------------------------------------------
    policy: str = "lora"
    """What the policy trains: 'lora' (a LoRA adapter on the frozen base: lora_rank, lora_alpha,
    lora_target_modules) or 'full' (every weight of the backbone; the memory case FSDP shards).  'full' keeps no
    frozen copy of the base, so it needs kl_coef: 0, and a critic of its own backbone (critic_mode: full) when the
    estimator has one: a 'lora' or 'shared' critic would read the base the policy trains (docs/distributed.md)."""
    lora_rank: int = 8
    lora_alpha: float | None = None
    """LoRA scale numerator (default: = rank)."""
    lora_target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2")
    fused_lora: bool = True
    """Compute each LoRA layer (policy and critic) as one conv / matmul with the weight W + s·B·A: the same
    function as peft's base(x) + s·B(A(x)), to float32 rounding, and faster on a CPU (``benchmarks/results/perf.json``;
    ``critic_align/backbones/lora.py``; falls back to peft's forward under autocast and for layers it does not
    cover).  False: peft's own forward."""

    channels_last: bool = True
    """Store the backbone's 4-D (convolution) weights in the channels-last memory format, which oneDNN's CPU
    convolutions run faster (``benchmarks/results/speed_defaults.json``); the same function, only the layout of
    the weights changes (a model without convolutions is unaffected)."""
    gradient_checkpointing: bool = False
    """Recompute the backbone's blocks during the backward instead of keeping their activations (diffusers'
    ``enable_gradient_checkpointing``, torch's non-reentrant checkpoint): less activation memory for about one more
    forward per backward; the same gradients.  Adapter-aware (``LoraAdapters.checkpoint`` in
    ``critic_align/backbones/lora.py``): each block is recomputed under the adapter state of its forward (the
    policy's or the critic's LoRA, or adapters off), which diffusers' plain switch gets wrong when one backward
    spans the policy's and a 'lora' critic's forwards.  With critic_mode 'full' the critic's own copy is
    checkpointed too.  Needs a diffusers model with gradient checkpointing (UNets, DiT / SD3 / FLUX
    transformers; not the MLP denoiser)."""
    cudnn_attention: bool = False
    """Let PyTorch's scaled-dot-product attention use cuDNN's kernels on a CUDA device.  Off by default: on an H200
    with PyTorch 2.11 the backward of a FLUX.1-dev-size training step stopped on a CUDA illegal memory access with
    cuDNN's attention on and ran with it off (flash / memory-efficient attention instead;
    ``benchmarks/results/gpu_check.json``, part ``flux``).  A process-wide switch, set when the run's models are
    built on CUDA; no effect on a CPU."""

    # --- critic -------------------------------------------------------------------------------------
    critic_mode: str = "lora"
    """'lora' (own adapter on the shared frozen base), 'full' (trainable copy) or 'shared' (policy trunk)."""
    critic_body: str = "head"
    """'head' (the value head on the trunk's features) or 'grafted' (the reward network's own later layers read the
    trunk's x0 prediction and a stitch of its features: critic_align/grafted.py; digit_prob, composition and the
    CLIP-family rewards (critic_align/grafted_clip.py); mode 'lora')."""
    value_source: str = "critic"
    """Where GAE's values V(x_t) come from: 'critic' (the learned critic) or 'oracle' (E[R | x_t] estimated at every
    recorded state by ``oracle_continuations`` continuations of the current policy's own sampler, scored by the
    rewards: :mod:`critic_align.oracle`).  The oracle is a research ceiling, not a method: no critic is built or
    trained, and its reward queries and backbone calls are logged apart (``oracle_reward_queries``, ``oracle_nfe``)
    and left out of ``reward_queries`` unless ``oracle_counted``.  PPO with ``advantage: gae`` only."""
    oracle_continuations: int = 4
    """K, the continuations per state of ``value_source: oracle`` (a state whose future is deterministic, past an SDE
    window's end, needs one)."""
    oracle_counted: bool = False
    """Count the oracle's reward queries in ``reward_queries`` (step-level Monte-Carlo advantages as a method of its
    own, as TreeGRPO / VGPO do), instead of apart."""
    critic_lora_rank: int = 8
    critic_learning_rate: float = 1e-3
    """Learning rate of the value head and the critic's backbone weights."""
    vf_coef: float = 1.0
    """Weight of the value loss in the joint loss (matters for the 'shared' critic)."""
    value_clip_range: float | None = None
    """PPO-style value clipping around the rollout's values (None = off)."""
    value_head_hidden: int = 256
    value_head_heads: int = 4
    critic_features: str | tuple[str, ...] = "mid"
    """What the value head reads: 'mid' (the deepest level only: a UNet's mid block, a DiT's last block),
    'multi' (a UNet's down blocks + mid block, a DiT's hidden states at three depths; each patchified to at most
    8x8 tokens and projected to one width) or a list of module names of the backbone.  On digits 'multi' did not
    beat 'mid' after value pretraining (``benchmarks/results/critic_quality.json``: within the seed-to-seed spread,
    at ~1.4x the critic's cost), so 'mid' stays the default."""
    critic_cond: bool = False
    """Feed the backbone's conditioning embedding (class label, or pooled text) to the head's AdaLN, next to the
    timestep embedding (False: the timestep only; the features still see the conditioning through the trunk)."""
    critic_x0_reward: bool = False
    """The value head also reads r(decode(x̂0(x_t))): the trained rewards of the policy's one-step prediction at each
    state, recorded while sampling (the step's own x0 prediction, no extra backbone call) and scored with the
    samples, weighted by a learned per-noise-level gate (``critic_align/critic.py``).  Costs a VAE decode and a
    reward call per recorded state (counted as ``x0_reward_rows``, not in ``reward_queries``): worth it for cheap
    programmatic rewards, not for a paid or human one.  On the tiny text-to-image task the latent head alone explains
    none of the return's variance on new prompts, r̂_0 calibrated per step half of it
    (``benchmarks/results/t2i_critic_offline.json``).  Needs advantage: gae, algorithm: ppo, and no perturbed value
    states (they have no x0 prediction of the policy's).  At test time such a critic is an SMC potential
    (``steering.values.X0CriticValueFn``) but not a guidance value: r̂_0 has no gradient in x_t here."""
    critic_width: int | None = None
    """Token width of the value head (default: the channels of the backbone's deepest feature level)."""
    value_loss_standardized: bool = True
    """Take the value loss on standardised values and targets, (V − m)/s against (R − m)/s, with the head's
    output mean m and scale s (set from the first rewards seen): the loss is the raw one divided by s², so heads of
    rewards of different scales weigh the same and ``vf_coef`` and ``value_clip_range`` are unit-free (in reward
    standard deviations).  False: the raw squared error in reward units."""
    value_perturbed_per_sample: int = 0
    """Forward-perturbed value states per finished sample (DiffAC): each x_0 is noised to a random timestep of the
    sampler with the scheduler's forward process and V(x_t) is regressed on R(x_0) (no extra reward query; see
    ``critic_align/value_data.py`` for what these states teach).  Used in value pretraining, and during PPO when
    ``value_perturbed_coef`` > 0.  0 = off."""
    value_perturbed_coef: float = 0.0
    """Weight of the perturbed-state value loss during PPO (an extra value-only pass over the epoch's perturbed
    states after the PPO update).  0 = pretraining only."""
    value_pretrain_epochs: int = 6
    """Rollout batches of the frozen initial policy used to fit the critic before joint training
    (GAE mode only; their reward queries are counted)."""
    value_pretrain_passes: int = 4
    """Optimiser passes over each pretraining batch."""
    value_pretrain_lr_decay: bool = False
    """Decay the critic's learning rate linearly over the value-pretraining iterations (to 1/value_pretrain_epochs of
    it in the last one), then restore it for joint training.  At a constant rate the critic chases each fresh
    batch: where the state says little about the return (the noisiest steps) its prediction follows the last
    batch's mean reward; the decay averages over all batches."""
    value_pretrain_target: str = "td_lambda"
    """Value pretraining's regression targets: 'mc' (the Monte-Carlo return γ^(T−1−k)·R at every step) or
    'td_lambda' (the λ-return of the current critic, GAE's returns with ``gae_lambda``: an early state's target
    leans on the critic's value of later states, which varies far less than R does, at the price of the critic's
    own bias).  Joint PPO training always uses the λ-returns.  On digits λ-returns raised the pretrained critic's
    held-out explained variance in three of the four cells of ``benchmarks/results/critic_quality.json`` where both
    were measured and tied in the fourth."""

    # --- logging and checkpoints --------------------------------------------------------------------
    log_tensorboard: bool = True
    log_with: list | None = None
    """Trackers, e.g. [tensorboard, wandb] (accelerate's names: wandb, comet_ml, aim, mlflow, clearml, dvclive,
    swanlab, trackio): metrics rows and sample grids go to each (critic_align/trackers.py).  None = TensorBoard as
    log_tensorboard says; a list = exactly these (TensorBoard only if listed, and log_tensorboard still true)."""
    grid_every: int = 10
    """Save a sample grid every this many epochs (0 = only before/after)."""
    checkpoint_every: int = 10
    """Save a checkpoint every this many epochs (0 = only at the end)."""
    keep_last: int = 2
    """Checkpoints kept on disk."""
    progress: bool = True
    """tqdm progress bars."""
    eval_every: int = 10
    """Every this many epochs (and before the first), evaluate on a fixed held-out batch (its own noise seed, not
    trained on, not counted in ``reward_queries``): the rewards, within-prompt diversity, and — with a critic —
    its explained variance and calibration per timestep bucket (``eval/*`` metrics, ``critic_eval.png``).
    0 = off."""
    eval_prompts: int = 10
    """Distinct prompts in the held-out batch (the task's first ones)."""
    eval_per_prompt: int = 8
    """Samples per held-out prompt (within-prompt diversity is measured among them)."""
    best_metric: str | None = None
    """The held-out metric (an ``eval/*`` key of the evaluation rows, higher is better) that picks the best
    checkpoint and that the collapse guard watches, e.g. 'eval/reward/digit_correct'; None = the held-out mean of
    the first trained reward ('eval/reward/<first reward>').  Every evaluation that beats the best so far writes
    ``output_dir/best/epoch_XXXXXX`` (one checkpoint, replaced only by a better one, never rotated away by
    ``keep_last``); continue from it with ``critic-align train --out RUN --resume-from RUN/best/epoch_XXXXXX``."""
    collapse_margin: float = 0.5
    """The collapse guard: an evaluation whose ``best_metric`` falls more than collapse_margin·|best| below the
    best so far is a collapse, reported on the console and in ``summary.json`` (``collapse`` entry); 0 = off.
    A fraction of the best value's magnitude, so set ``best_metric`` to a positive metric (a probability, an
    accuracy) for it to mean "lost half of it" at 0.5."""
    stop_on_collapse: bool = False
    """Stop the run (an error naming ``best/`` and how to resume from it) at the first collapse instead of only
    reporting it; nothing saved is removed."""
    mixed_precision: str = "no"
    """'no' or 'bf16' (forwards under accelerate's autocast; weights, optimiser and log-probs stay fp32).
    fp16 is refused: it needs loss scaling, and the PPO ratio is too sensitive to fp16 rounding.  The run config
    decides: ``accelerate launch --mixed_precision bf16`` needs bf16 here, and a launch with fp16 is refused
    before any model loads (``critic_align/launch.py``)."""

    # --- memory options -----------------------------------------------------------------------------
    optimizer: str = "adamw"
    """'adamw' (torch's AdamW) or 'adamw_8bit' (bitsandbytes' AdamW8bit: the two Adam moments in 8 bits, about a
    quarter of the optimiser state's memory; an optional extra: ``pip install critic-align[bnb]``, checked before
    any model loads).  Both take learning_rate / critic_learning_rate, adam_betas, adam_eps and weight_decay
    (``critic_align/optim.py``)."""
    text_embedding_cache: bool = False
    """Stable Diffusion / FLUX tasks: encode each distinct prompt once and keep its text embedding (on the CPU; moved
    to the device per batch), so a fixed prompt list costs the text encoders one pass per prompt instead of one per
    epoch and group member.  The same embeddings as encoding every batch, to float rounding (the encoder runs on
    batches of other sizes).
    Costs host memory per distinct prompt (SD1.5: 77 x 768 values; SD3: (77 + T5 length) x 4096 + 2048)."""

    extra: dict = field(default_factory=dict)
    """Free-form notes carried into the run's config.json (not used by the trainer)."""

    def __post_init__(self):
        for name in ("num_epochs", "num_inference_steps", "batch_size", "group_size", "sample_chunk_size",
                     "ppo_epochs", "minibatch_size", "gradient_accumulation_steps", "lora_rank",
                     "critic_lora_rank", "value_head_hidden", "value_head_heads", "stat_buffer_size",
                     "stat_min_count", "keep_last"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                _err(name, v, "must be an integer >= 1")
        for name in ("value_pretrain_epochs", "value_pretrain_passes", "grid_every", "checkpoint_every", "seed",
                     "value_perturbed_per_sample", "eval_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                _err(name, v, "must be an integer >= 0")
        for name in ("eta", "sde_noise_level", "guidance_scale", "clip_range", "learning_rate", "critic_learning_rate",
                     "max_grad_norm", "adv_clip_max", "vf_coef", "adam_eps"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
                _err(name, v, "must be a finite number > 0" + (
                    {"eta": " (eta=0 is a deterministic ODE sampler: PPO needs eta > 0, e.g. 1.0)",
                     "sde_noise_level": " (0 is the deterministic Euler ODE: PPO needs a stochastic policy, e.g. 0.7)"}
                    .get(name, "")))
        for name in ("eval_prompts", "eval_per_prompt"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                _err(name, v, "must be an integer >= 1")
        if self.eval_per_prompt < 2 and self.eval_every:
            _err("eval_per_prompt", self.eval_per_prompt, "must be >= 2 to measure within-prompt diversity")
        if isinstance(self.critic_features, str):
            if self.critic_features not in ("mid", "multi"):
                _err("critic_features", self.critic_features, "use 'mid', 'multi' or a list of module names", number=False)
        else:
            if not isinstance(self.critic_features, (list, tuple)):
                _err("critic_features", self.critic_features, "use 'mid', 'multi' or a list of module names",
                     number=False)
            self.critic_features = tuple(self.critic_features)
            if not self.critic_features or not all(isinstance(n, str) for n in self.critic_features):
                _err("critic_features", self.critic_features, "a list of module names must be non-empty strings",
                     number=False)
        if self.critic_width is not None and (not isinstance(self.critic_width, int) or self.critic_width < 1
                                              or self.critic_width % self.value_head_heads):
            _err("critic_width", self.critic_width, f"must be None or an integer >= 1 divisible by value_head_heads="
                                                    f"{self.value_head_heads}")
        for name in ("kl_coef", "weight_decay", "value_perturbed_coef"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
                _err(name, v, "must be a finite number >= 0")
        if self.value_perturbed_coef > 0 and self.value_perturbed_per_sample == 0:
            _err("value_perturbed_coef", self.value_perturbed_coef,
                 "needs value_perturbed_per_sample >= 1 (the perturbed states it weighs)")
        for name in ("gamma", "gae_lambda", "timestep_fraction"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v <= 1:
                _err(name, v, "must be in [0, 1]")
        for name in ("fused_lora", "channels_last", "overlap_rewards", "gradient_checkpointing", "cudnn_attention",
                     "oracle_counted"):
            if not isinstance(getattr(self, name), bool):
                _err(name, getattr(self, name), "must be true or false (unquoted in YAML)", number=False)
        if self.timestep_fraction == 0:
            _err("timestep_fraction", 0, "must be > 0")
        for name in ("normalize_advantages", "log_tensorboard", "progress", "critic_cond", "value_loss_standardized",
                     "value_pretrain_lr_decay", "gae_group_baseline", "critic_x0_reward"):
            v = getattr(self, name)
            if not isinstance(v, bool):
                _err(name, v, "must be true or false (unquoted in YAML)", number=False)
        w = self.sde_window_size
        if not isinstance(w, int) or isinstance(w, bool) or not 0 <= w <= self.num_inference_steps:
            _err("sde_window_size", w, f"must be an integer in [0, num_inference_steps={self.num_inference_steps}] "
                                       "(0 = no window: every step stochastic); with fewer steps set a smaller window "
                                       "or sde_window_size: 0")
        if self.sde_window_range is not None:
            r = self.sde_window_range
            if w == 0:
                _err("sde_window_range", r, "is only used with sde_window_size >= 1; remove it or set a window size",
                     number=False)
            if isinstance(r, (str, bytes)) or not isinstance(r, (list, tuple)) or len(r) != 2 or \
                    not all(isinstance(x, int) and not isinstance(x, bool) for x in r) or \
                    not 0 <= r[0] <= r[1] <= self.num_inference_steps - w:
                _err("sde_window_range", r, f"must be two integers [lo, hi] with 0 <= lo <= hi <= num_inference_steps"
                                            f" - sde_window_size = {self.num_inference_steps - w} (the window's first "
                                            "step)", number=False)
            self.sde_window_range = (int(r[0]), int(r[1]))
        if w and self.algorithm != "ppo":
            _err("sde_window_size", w, f"is for algorithm: ppo (it makes only the window's steps stochastic and "
                                       f"trained); {self.algorithm} samples without log-probabilities and trains on "
                                       "forward-noised samples: set sde_window_size: 0", number=False)
        if self.algorithm not in ALGORITHMS:
            _err("algorithm", self.algorithm, f"use one of {tuple(ALGORITHMS)}", number=False)
        if not _positive_number(self.nft_beta):
            _err("nft_beta", self.nft_beta, "must be a finite number > 0 (the NFT loss divides by it)")
        if self.awm_advantage not in ("grpo", "critic"):
            _err("awm_advantage", self.awm_advantage, "use 'grpo' or 'critic'", number=False)
        if self.nft_advantage not in ("grpo", "critic"):
            _err("nft_advantage", self.nft_advantage, "use 'grpo' or 'critic'", number=False)
        if self.algorithm == "nft" and self.nft_advantage == "grpo" and self.advantage not in ("grpo", "ddpo"):
            _err("advantage", self.advantage, "algorithm: nft turns each trajectory's reward into one optimality "
                 "probability: use advantage: grpo (the paper's group-normalised reward) or ddpo, or nft_advantage: "
                 "critic with advantage: gae (a per-timestep advantage from the critic)", number=False)
        if self.algorithm == "nft" and self.nft_advantage == "critic" and self.advantage != "gae":
            _err("advantage", self.advantage, "nft_advantage: critic needs advantage: gae (the estimator that builds "
                 "and trains the critic)", number=False)
        if self.algorithm == "awm":
            need = ("grpo", "ddpo") if self.awm_advantage == "grpo" else ("gae",)
            if self.advantage not in need:
                _err("advantage", self.advantage, f"awm_advantage: {self.awm_advantage} needs advantage: "
                     + (" or ".join(need)) + (" (the estimator that builds and trains the critic)"
                                              if self.awm_advantage == "critic" else ""), number=False)
        if self.advantage not in ESTIMATORS:
            _err("advantage", self.advantage, f"use one of {tuple(ESTIMATORS)}", number=False)
        if self.critic_mode not in CRITIC_MODES:
            _err("critic_mode", self.critic_mode, f"use one of {CRITIC_MODES}", number=False)
        if self.policy not in ("lora", "full"):
            _err("policy", self.policy, "use 'lora' (a LoRA adapter on the frozen base) or 'full' (every weight of the "
                 "backbone)", number=False)
        if self.policy == "full":
            if self.kl_coef > 0:
                _err("kl_coef", self.kl_coef, "policy: full trains the base weights, and the KL reference is the frozen "
                     "base, of which no copy is kept: set kl_coef: 0 (or policy: lora)")
            from .registry import resolve

            if resolve(ESTIMATORS[self.advantage]).needs_values and self.critic_mode != "full":
                _err("critic_mode", self.critic_mode, f"policy: full trains the base weights that a '{self.critic_mode}' "
                     "critic reads (its features would move with the policy, and its value loss would train the "
                     "policy's weights): use critic_mode: full (the critic's own copy of the base) or an advantage "
                     f"without a critic (grpo, ddpo) instead of {self.advantage}", number=False)
        if self.value_source not in ("critic", "oracle"):
            _err("value_source", self.value_source, "use 'critic' or 'oracle'", number=False)
        from .registry import resolve

        if self.value_source == "oracle" and (self.algorithm != "ppo"
                                              or not resolve(ESTIMATORS[self.advantage]).needs_values):
            _err("value_source", self.value_source, "the oracle feeds GAE's values: use algorithm: ppo with advantage: "
                 f"gae (got algorithm: {self.algorithm}, advantage: {self.advantage})", number=False)
        if isinstance(self.oracle_continuations, bool) or not isinstance(self.oracle_continuations, int) or \
                self.oracle_continuations < 1:
            _err("oracle_continuations", self.oracle_continuations, "must be an integer >= 1")
        if self.critic_body not in ("head", "grafted"):
            _err("critic_body", self.critic_body, "use 'head' or 'grafted'", number=False)
        if self.critic_body == "grafted" and (self.critic_mode != "lora" or self.critic_x0_reward):
            _err("critic_body", self.critic_body, "grafted needs critic_mode: lora and critic_x0_reward: false",
                 number=False)
        if self.value_pretrain_target not in ("mc", "td_lambda"):
            _err("value_pretrain_target", self.value_pretrain_target, "use 'mc' or 'td_lambda'", number=False)
        if self.advantage_scale not in ("advantages", "rewards"):
            _err("advantage_scale", self.advantage_scale, "use 'advantages' or 'rewards'", number=False)
        if self.advantage_aggregation not in AGGREGATIONS:
            _err("advantage_aggregation", self.advantage_aggregation, f"use one of {AGGREGATIONS}", number=False)
        if self.optimizer not in OPTIMIZERS:
            _err("optimizer", self.optimizer, f"use one of {OPTIMIZERS} (adamw_8bit needs pip install critic-align[bnb])",
                 number=False)
        if not isinstance(self.text_embedding_cache, bool):
            _err("text_embedding_cache", self.text_embedding_cache, "must be true or false (unquoted in YAML)",
                 number=False)
        if self.log_prob_reduction not in ("mean", "sum"):
            _err("log_prob_reduction", self.log_prob_reduction, "use 'mean' or 'sum'", number=False)
        if self.mixed_precision not in ("no", "bf16"):
            _err("mixed_precision", self.mixed_precision, "use 'no' or 'bf16' (fp16 needs loss scaling; use bf16)",
                 number=False)
        if self.advantage == "grpo" and self.group_size < 2:
            _err("group_size", self.group_size, "must be >= 2 with advantage: grpo (its advantage is the reward "
                 "minus the mean of the prompt's group: a group of one has advantage 0 and trains nothing); "
                 "set group_size: 2 or more, or use advantage: ddpo / gae")
        if self.gae_group_baseline and (self.advantage != "gae" or self.group_size < 2):
            _err("gae_group_baseline", True, "centres GAE advantages within each prompt's group: it needs advantage: "
                 f"gae (got {self.advantage!r}) and group_size >= 2 (got {self.group_size}); set it to false or "
                 "change those", number=False)
        if self.critic_x0_reward and (self.advantage != "gae" or self.algorithm != "ppo"
                                      or self.value_perturbed_per_sample):
            _err("critic_x0_reward", True, "feeds the value head r(decode(x0_pred)) of the states PPO recorded: it "
                 f"needs advantage: gae (got {self.advantage!r}), algorithm: ppo (got {self.algorithm!r}) and "
                 f"value_perturbed_per_sample: 0 (got {self.value_perturbed_per_sample}); set it to false or change "
                 "those", number=False)
        if self.seed >= 2**32:
            _err("seed", self.seed, "must be < 2**32 (numpy's seed range)")
        if self.batch_size % self.group_size:
            _err("batch_size", self.batch_size, f"must be a multiple of group_size={self.group_size}")
        mbs = self.micro_batch_size
        if mbs != "auto" and (not isinstance(mbs, int) or isinstance(mbs, bool) or mbs < 1):
            _err("micro_batch_size", mbs, "must be 'auto' or an integer >= 1 (pairs forwarded at once)",
                 number=not isinstance(mbs, str))
        if self.micro_batch_memory_mb is not None and not _positive_number(self.micro_batch_memory_mb):
            _err("micro_batch_memory_mb", self.micro_batch_memory_mb,
                 "must be a finite number > 0 (MB), or null (None) for the per-device default")
        if self.minibatch_size % self.gradient_accumulation_steps:
            _err("minibatch_size", self.minibatch_size,
                 f"must be divisible by gradient_accumulation_steps={self.gradient_accumulation_steps}")
        for name in ("value_clip_range", "lora_alpha"):  # optional positive numbers
            v = getattr(self, name)
            if v is not None and not _positive_number(v):
                _err(name, v, "must be a finite number > 0, or null (None) for the default" + (
                    " (LoRA's scale is lora_alpha / lora_rank: 0 or a negative alpha would switch the adapter off "
                    "or flip its sign)" if name == "lora_alpha" else ""))
        if self.reward_weights is not None:
            w = self.reward_weights
            if isinstance(w, (str, bytes)) or not isinstance(w, (list, tuple)) or not w or not all(_number(x) for x in w):
                _err("reward_weights", w, "must be a non-empty list of finite numbers, one per reward (e.g. [1.0, "
                     "0.5]), or null to keep the rewards' own weights", number=False)
            self.reward_weights = tuple(float(x) for x in w)
        b = self.adam_betas
        if isinstance(b, (str, bytes)) or not isinstance(b, (list, tuple)) or len(b) != 2 or \
                not all(_number(x) and 0 <= x < 1 for x in b):
            _err("adam_betas", b, "must be two numbers in [0, 1), e.g. [0.9, 0.999]", number=False)
        self.adam_betas = (float(b[0]), float(b[1]))
        m = self.lora_target_modules
        if isinstance(m, str) or not isinstance(m, (list, tuple)) or not m or \
                not all(isinstance(x, str) and x for x in m):
            _err("lora_target_modules", m, "must be a non-empty list of module names, e.g. [to_q, to_k, to_v] (a "
                 "single name still goes in a list)", number=False)
        self.lora_target_modules = tuple(m)
        if not isinstance(self.output_dir, str) or not self.output_dir:
            _err("output_dir", self.output_dir, "must be a non-empty path string", number=False)
        if self.best_metric is not None and (not isinstance(self.best_metric, str)
                                             or not self.best_metric.startswith("eval/")):
            _err("best_metric", self.best_metric, "must be an eval/* key of the held-out evaluation rows, e.g. "
                 "'eval/reward/digit_correct', or null for the first trained reward's", number=False)
        m = self.collapse_margin
        if not _number(m) or m < 0:
            _err("collapse_margin", m, "must be a finite number >= 0 (a fraction of the best value; 0 = off)")
        if not isinstance(self.stop_on_collapse, bool):
            _err("stop_on_collapse", self.stop_on_collapse, "must be true or false (unquoted in YAML)", number=False)
        from .trackers import check_tracker_names

        try:
            check_tracker_names(self.log_with)  # an unknown tracker, before any model loads
        except ValueError as exc:
            raise ValueError(f"config field log_with={self.log_with!r}: {exc}") from None
        if self.log_with is not None:
            self.log_with = list(self.log_with)
        if not isinstance(self.extra, dict):
            _err("extra", self.extra, "must be a mapping (free-form notes)", number=False)
        self._check_arguments()

    def _check_arguments(self) -> None:
        """A field that only another algorithm or estimator reads (its class's ``arguments``), set away from its
        default, is an error: it would be silently ignored."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for selector, arg, names in _foreign_arguments(self.algorithm, self.advantage):
            value = getattr(self, arg)
            if value != defaults[arg]:
                raise ValueError(f"config field {arg}={value!r} applies to {selector}: {' / '.join(names)}, not "
                                 f"{selector}: {getattr(self, selector)}, which would ignore it; remove it from the "
                                 "config")

    def check_run(self, reward_names, num_processes: int = 1, base_dtype: str = "float32", model=None) -> None:
        """The checks that need the run besides the config: its rewards, its number of processes, the base
        model's dtype and the model itself (when given).  With ``__post_init__`` (the config alone) the only place
        a config is checked."""
        if model is not None and self.gradient_checkpointing:
            from .backbones.lora import supports_gradient_checkpointing

            if not supports_gradient_checkpointing(model):
                raise ValueError(
                    f"config field gradient_checkpointing=True: {type(model).__name__} has no diffusers gradient "
                    "checkpointing (enable_gradient_checkpointing and blocks with a gradient_checkpointing flag, as "
                    "diffusers' UNets and DiT / SD3 / FLUX transformers have); set gradient_checkpointing: false")
        if model is not None and not self.gradient_checkpointing and \
                any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules()):
            raise ValueError(
                f"{type(model).__name__} has gradient checkpointing switched on already (enable_gradient_checkpointing) "
                "but config field gradient_checkpointing=False: diffusers' own checkpoint function recomputes blocks "
                "under whatever LoRA adapter is active during the backward (wrong critic gradients in GAE mode, without "
                "an error); call model.disable_gradient_checkpointing() and set gradient_checkpointing: true (the "
                "adapter-aware switch)")
        k = len(reward_names)
        if self.reward_weights is not None and len(self.reward_weights) != k:
            raise ValueError(f"config.reward_weights has {len(self.reward_weights)} weights for {k} rewards "
                             f"{list(reward_names)}")
        if self.advantage == "ddpo" and k > 1 and self.advantage_aggregation != "sum_then_normalize":
            raise ValueError(
                f"advantage 'ddpo' with {k} rewards: DDPO's per-prompt tracker normalises one combined reward, so "
                "set advantage_aggregation: sum_then_normalize (or use 'gae' / 'grpo', which also support "
                "normalize_then_sum)")
        if base_dtype != "float32" and self.mixed_precision != "bf16":
            raise ValueError(f"sd.torch_dtype={base_dtype!r} needs optimization: mixed_precision: bf16 (a half-precision base "
                             "is run under autocast; LoRA weights, optimiser and log-probs stay float32)")
        from .launch import LaunchError, world_size_errors  # the process-count checks live with the launch checks

        errors = world_size_errors(self, num_processes)
        if errors:
            raise LaunchError(errors[0])

    @property
    def prompts_per_epoch(self) -> int:
        return self.batch_size // self.group_size

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "PPOConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            import difflib

            hints = {k: difflib.get_close_matches(k, known, n=1) for k in unknown}
            msg = ", ".join(f"{k!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for k, h in hints.items())
            raise ValueError(f"unknown PPOConfig field(s): {msg}")
        return cls(**data)
