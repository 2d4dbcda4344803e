"""FLUX.1 (diffusers ``FluxPipeline``) as a task for the :class:`~critic_align.trainer.Trainer`.

Like the Stable Diffusion tasks (``tasks/sd.py``, whose class this extends) a thin adapter around the
pipeline, never a forked one: ``FluxPipeline.encode_prompt`` makes the conditioning (a
:class:`~critic_align.cond.TextCond` of the T5 token embeddings and the pooled CLIP embedding), its VAE decodes
the final latents (``latents / scaling_factor + shift_factor``, as the pipeline does), and the transformer is
wrapped in :class:`~critic_align.backbones.FluxAdapter`, which packs and unpacks latents itself, so the engine's
latents are the unpacked (B, 16, H/8, W/8) ones.

    pipe = load_pipeline("path/to/FLUX.1-dev", kind="flux", torch_dtype="bfloat16")
    task = FluxTask(pipe, prompts, resolution=512, max_sequence_length=128)
    trainer = Trainer(config, task, task.backbone(), task.scheduler, rewards)
    ...
    save_policy_lora(task, trainer.models, config, "runs/flux/lora")   # FluxPipeline.load_lora_weights("runs/flux/lora")

The sampler's sigmas
--------------------
``FluxPipeline.__call__`` does not call ``scheduler.set_timesteps(n)``: it passes ``sigmas = np.linspace(1, 1/n, n)``
and, for FLUX.1-dev's scheduler (``use_dynamic_shifting=True``), the resolution-dependent shift
``mu = calculate_shift(image tokens, base_image_seq_len, max_image_seq_len, base_shift, max_shift)``.  A bare
scheduler config does not know the resolution, so ``task.scheduler`` is a ready
:class:`~critic_align.steps.FlowMatchSchedule` with that grid and mu (the trainer, ``make_step`` and the forward
process take it as they take a scheduler); its timesteps equal what the pipeline's scheduler gets.

To reproduce a trained policy's samples with the pipeline, load the exported LoRA and call
``pipe(prompts, height=task.resolution, width=task.resolution, num_inference_steps=n,
guidance_scale=task.guidance, max_sequence_length=task.max_sequence_length, latents=task.pack(x_T))``
(``guidance_scale`` there is FLUX's embedded guidance; the trainer's CFG ``guidance_scale`` is FluxPipeline's
``true_cfg_scale`` with the empty negative prompt).
"""

from __future__ import annotations

import math

import torch

from ..cond import TextCond
from ..steps import FlowMatchSchedule
from .sd import StableDiffusionTask

DEFAULT_GUIDANCE = 3.5  # FluxPipeline.__call__'s guidance_scale default (FLUX.1-dev's embedded guidance)
MAX_SEQUENCE_LENGTH = 512  # FluxPipeline refuses longer T5 prompts


def flux_mu(scheduler_config, image_seq_len: int) -> float | None:
    """The resolution-dependent shift mu that ``FluxPipeline.__call__`` passes to ``set_timesteps`` for
    ``image_seq_len`` packed latent tokens (its own ``calculate_shift`` with the scheduler config's values and the
    pipeline's defaults), or None when the config has no dynamic shifting (diffusers ignores mu then)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    config = dict(getattr(scheduler_config, "config", scheduler_config))
    if not config.get("use_dynamic_shifting", False):
        return None
    return float(calculate_shift(image_seq_len, config.get("base_image_seq_len", 256),
                                 config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                                 config.get("max_shift", 1.15)))


class FluxTask(StableDiffusionTask):
    """A diffusers ``FluxPipeline`` as a trainer task (see the module doc).

    resolution: image side in pixels (default: the pipeline's, 1024; Flow-GRPO trains at 512); a multiple of
        2 × the VAE factor (16 for FLUX.1: latents are packed in 2x2 patches).
    max_sequence_length: T5 tokens (the pipeline's default 512; Flow-GRPO encodes with 128); ``pipe(...)`` must be
        called with the same value to reproduce the policy's samples.
    guidance: the embedded guidance scale of a guidance-distilled transformer (``guidance_embeds``, FLUX.1-dev);
        default 3.5, the pipeline's.  Must stay None for a model without guidance embedding (FLUX.1-schnell).
    decode_chunk_size: images per VAE decode call.
    """

    kinds = ("flux",)
    name = "flux"

    def __init__(self, pipe, prompts, resolution: int | None = None, max_sequence_length: int = MAX_SEQUENCE_LENGTH,
                 decode_chunk_size: int = 8, guidance: float | None = None, text_embedding_cache: bool = False):
        super().__init__(pipe, prompts, resolution=resolution, max_sequence_length=max_sequence_length,
                         decode_chunk_size=decode_chunk_size, text_embedding_cache=text_embedding_cache)
        if max_sequence_length > MAX_SEQUENCE_LENGTH:
            raise ValueError(f"max_sequence_length {max_sequence_length} > {MAX_SEQUENCE_LENGTH}, the most "
                             "FluxPipeline takes")
        if pipe.transformer.config.guidance_embeds:
            guidance = DEFAULT_GUIDANCE if guidance is None else guidance
            if isinstance(guidance, bool) or not (isinstance(guidance, (int, float)) and math.isfinite(guidance)):
                raise ValueError(f"guidance must be a finite number (the embedded guidance scale), got {guidance!r}")
            guidance = float(guidance)
        elif guidance is not None:
            raise ValueError(f"guidance={guidance!r}, but this FLUX transformer has no guidance embedding "
                             "(guidance_embeds=False, e.g. FLUX.1-schnell): leave guidance unset")
        self.guidance = guidance
        _, h, w = self.latent_shape
        self.mu = flux_mu(pipe.scheduler, (h // 2) * (w // 2))
        self.schedule = FlowMatchSchedule.from_scheduler(pipe.scheduler, mu=self.mu, sigma_grid="linspace")

    # -- components ----------------------------------------------------------------------------------
    @property
    def latent_patch(self) -> int:
        """FluxPipeline packs 2x2 latent patches into one token, so latent sides must be even."""
        return 2

    @property
    def latent_channels(self) -> int:
        """VAE latent channels (16 for FLUX.1): the transformer's in_channels are 4 of them per packed token."""
        return int(self.pipe.transformer.config.in_channels) // 4

    @property
    def scheduler(self) -> FlowMatchSchedule:
        """The sampler's schedule, what the Trainer takes as its ``scheduler``: FluxPipeline's sigma grid
        (linspace(1, 1/n, n)) shifted at this resolution's mu (see the module doc)."""
        return self.schedule

    def backbone(self):
        """:class:`~critic_align.backbones.FluxAdapter` around ``pipe.transformer`` with this task's guidance."""
        from ..backbones.flux import FluxAdapter

        return FluxAdapter(self.pipe.transformer, guidance=self.guidance)

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) latents -> FluxPipeline's packed (B, H/2 · W/2, 4C) form, e.g. for ``pipe(latents=...)``."""
        from diffusers import FluxPipeline

        b, c, h, w = latents.shape
        return FluxPipeline._pack_latents(latents, b, c, h, w)

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """FluxPipeline's packed latents (``output_type='latent'``) -> (B, C, H, W) at this task's resolution."""
        from diffusers import FluxPipeline

        return FluxPipeline._unpack_latents(packed, self.resolution, self.resolution, self.pipe.vae_scale_factor)

    # -- the task protocol -----------------------------------------------------------------------------
    def _encode_batch(self, prompts: list[str]) -> TextCond:
        """A :class:`TextCond`: T5 token embeddings (B, max_sequence_length, 4096) and pooled CLIP (B, 768)
        (``encode``, inherited, adds the checks and the text-embedding cache)."""
        embeds, pooled, _ = self.pipe.encode_prompt(list(prompts), None, device=self.device, num_images_per_prompt=1,
                                                    max_sequence_length=self.max_sequence_length)
        dtype = self.denoiser.dtype
        return TextCond(embeds.to(dtype), pooled.to(dtype))
