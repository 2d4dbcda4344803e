"""Stable Diffusion 1.5 / 3.5 pipelines as tasks for the :class:`~critic_align.trainer.Trainer`.

A thin adapter around a diffusers ``StableDiffusionPipeline`` or ``StableDiffusion3Pipeline`` (never a
forked pipeline): the pipeline's own ``encode_prompt`` makes the conditioning and its VAE decodes the
final latents for the rewards; the denoiser (``pipe.unet`` / ``pipe.transformer``) is what the trainer
wraps in a backbone adapter and puts the policy and critic LoRA adapters on.  Text encoders and VAE
are frozen and in eval mode.

    pipe = load_pipeline("path/to/stable-diffusion-v1-5", kind="sd15")
    task = StableDiffusionTask(pipe, prompts=["a photo of a cat", ...])
    trainer = Trainer(config, task, task.backbone(), task.scheduler, rewards)
    ...
    save_policy_lora(task, trainer.models, config, "runs/sd15/lora")   # pipe.load_lora_weights("runs/sd15/lora")

Conditioning: SD1.5 gives the text encoder's hidden states (B, 77, 768), a plain tensor; SD3 gives a
:class:`~critic_align.cond.TextCond` (prompt embeddings (B, 77 + T5 length, 4096) and pooled projections
(B, 2048)), which supports the batch operations the engine applies to a conditioning tensor.
``null_cond`` is the empty prompt's conditioning (what the pipelines use as the negative prompt), for
classifier-free guidance; training is CFG-free by default (``guidance_scale: 1.0``).

Samples given to the rewards are the VAE-decoded images as float32 (B, 3, H, W) in [-1, 1], the
package's reward convention (``critic_align.rewards.base``).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..cond import TextCond
from .base import BaseTask

PIPELINE_KINDS = ("sd15", "sd3", "flux")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pipeline_class(kind: str):
    """The diffusers pipeline class of a pipeline kind ('sd15', 'sd3' or 'flux')."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline

    classes = {"sd15": StableDiffusionPipeline, "sd3": StableDiffusion3Pipeline, "flux": FluxPipeline}
    if kind not in classes:
        raise ValueError(f"unknown pipeline kind {kind!r}; use one of {PIPELINE_KINDS}")
    return classes[kind]


def pipeline_kind(pipe) -> str:
    """'sd15' for a ``StableDiffusionPipeline``, 'sd3' for a ``StableDiffusion3Pipeline``, 'flux' for a
    ``FluxPipeline``."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline

    if isinstance(pipe, StableDiffusion3Pipeline):
        return "sd3"
    if isinstance(pipe, StableDiffusionPipeline):
        return "sd15"
    if isinstance(pipe, FluxPipeline):
        return "flux"
    raise TypeError("expected a diffusers StableDiffusionPipeline, StableDiffusion3Pipeline or FluxPipeline, got "
                    f"{type(pipe).__name__}")


def load_pipeline(model_path: str | os.PathLike, kind: str, torch_dtype: str = "float32", drop_t5: bool = False):
    """Load a pipeline of ``kind`` from a local directory or a hub name.

    torch_dtype: 'float32' (default), 'bfloat16' or 'float16' for every component (LoRA weights stay
        float32; train a half-precision base with ``mixed_precision: bf16``).
    drop_t5: SD3 only: load without the T5 text encoder (``text_encoder_3=None``); its embeddings are
        then zeros, as the pipeline does itself.  Saves ~9.5 GB in bf16 but changes the model's inputs.

    A local path is loaded with ``local_files_only=True``; a hub name needs network access (or the
    hub cache), and failing that the error says to download the model and pass its local path.
    """
    cls = pipeline_class(kind)
    if torch_dtype not in DTYPES:
        raise ValueError(f"torch_dtype {torch_dtype!r}: use one of {sorted(DTYPES)}")
    if drop_t5 and kind != "sd3":
        raise ValueError("drop_t5 applies to SD3 pipelines (kind='sd3') only")
    from diffusers.pipelines import pipeline_utils

    # diffusers renamed from_pretrained's torch_dtype to dtype (the old name warns); use what this version takes
    kwargs = {"dtype" if hasattr(pipeline_utils, "_resolve_dtype") else "torch_dtype": DTYPES[torch_dtype]}
    if drop_t5:
        kwargs.update(text_encoder_3=None, tokenizer_3=None)
    path = Path(os.fspath(model_path)).expanduser()
    if path.exists():
        if not (path / "model_index.json").exists():
            raise FileNotFoundError(
                f"{path} is not a diffusers pipeline directory (no model_index.json); pass the directory that "
                f"`{cls.__name__}.save_pretrained` or `huggingface-cli download <name> --local-dir DIR` wrote"
            )
        if kind == "sd3" and not drop_t5:
            import json

            index = json.loads((path / "model_index.json").read_text())
            if [None, None] in (index.get("text_encoder_3"), index.get("tokenizer_3")):
                raise ValueError(
                    f"{path} was saved without the T5 text encoder (text_encoder_3 is null in model_index.json); "
                    "load it with drop_t5=True (its T5 embeddings are then zeros) or use a directory that has T5"
                )
        return cls.from_pretrained(str(path), local_files_only=True, **kwargs)
    looks_local = str(model_path).startswith((".", "/", "~")) or str(model_path).count("/") > 1
    if looks_local:
        raise FileNotFoundError(f"model_path {str(model_path)!r} does not exist (and is not a hub name like 'org/model')")
    try:
        return cls.from_pretrained(str(model_path), **kwargs)
    except OSError as exc:  # hub errors (offline, unknown repo, gated) are OSError subclasses in diffusers
        raise OSError(
            f"could not load {str(model_path)!r} from the Hugging Face hub ({type(exc).__name__}: {exc}). "
            f"If this machine is offline or the model is gated, download it elsewhere "
            f"(`huggingface-cli download {model_path} --local-dir DIR`) and pass the local path as model_path"
        ) from exc


class StableDiffusionTask(BaseTask):
    """A Stable Diffusion 1.5 or 3.x pipeline as a trainer task.

    pipe: a ``StableDiffusionPipeline`` or ``StableDiffusion3Pipeline`` (see :func:`load_pipeline`).
    prompts: the training prompts (the trainer draws ``batch_size / group_size`` of them per epoch).
    resolution: image side in pixels (default: the pipeline's default, 512 for SD1.5, 1024 for SD3.5;
        the papers train at 512).  Must be a multiple of the VAE's downsampling factor (8).
    max_sequence_length: SD3's T5 token count (the pipeline's default 256; ``pipe(...)`` must be called
        with the same value to reproduce a trained policy's samples).
    decode_chunk_size: images per VAE decode call (bounds memory; does not change results).
    text_embedding_cache: encode each distinct prompt once and keep its conditioning (on the CPU; moved to the
        task's device per batch): a fixed prompt list then runs the text encoders once per prompt, not once per
        epoch and group member (``PPOConfig.text_embedding_cache``).  ``encoder_calls`` counts the prompts encoded.
    """

    kinds = ("sd15", "sd3")  # the pipeline kinds this class trains (FluxTask: 'flux')

    def __init__(self, pipe, prompts, resolution: int | None = None, max_sequence_length: int = 256,
                 decode_chunk_size: int = 8, text_embedding_cache: bool = False):
        self.kind = pipeline_kind(pipe)
        if self.kind not in self.kinds:
            owner = "critic_align.tasks.flux.FluxTask" if self.kind == "flux" else "critic_align.tasks.sd.StableDiffusionTask"
            raise TypeError(f"a {type(pipe).__name__} is trained with {owner}, not {type(self).__name__}")
        self.pipe = pipe
        prompts = tuple(prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompts must be a non-empty list of strings")
        self.prompts = prompts
        if not isinstance(decode_chunk_size, int) or decode_chunk_size < 1:
            raise ValueError(f"decode_chunk_size must be an integer >= 1, got {decode_chunk_size!r}")
        if not isinstance(max_sequence_length, int) or max_sequence_length < 1:
            raise ValueError(f"max_sequence_length must be an integer >= 1, got {max_sequence_length!r}")
        self.decode_chunk_size = decode_chunk_size
        self.max_sequence_length = max_sequence_length
        vsf = pipe.vae_scale_factor
        if resolution is None:
            resolution = (pipe.unet.config.sample_size if self.kind == "sd15" else pipe.default_sample_size) * vsf
        if not isinstance(resolution, int) or resolution < vsf or resolution % vsf:
            raise ValueError(f"resolution {resolution!r} must be a positive multiple of the VAE factor {vsf}")
        patch = self.latent_patch
        if (resolution // vsf) % patch:
            raise ValueError(f"resolution {resolution} gives {resolution // vsf} latent pixels, not a multiple "
                             f"of the transformer's patch size {patch}; use a multiple of {vsf * patch}")
        self.resolution = resolution
        self.latent_shape = (self.latent_channels, resolution // vsf, resolution // vsf)
        for module in self.frozen_modules():
            module.eval().requires_grad_(False)
        self._null = None
        if not isinstance(text_embedding_cache, bool):
            raise ValueError(f"text_embedding_cache must be true or false, got {text_embedding_cache!r}")
        self._text_cache: dict | None = {} if text_embedding_cache else None
        self.encoder_calls = 0  # prompts run through the text encoders (with the cache: each distinct prompt once)

    name = "stable_diffusion"
    grid_scale = 1  # sample grids (Trainer.save_grid) at the images' own size ...

    @property
    def grid_prompts(self) -> tuple[str, ...]:
        """... for the first four prompts only."""
        return self.prompts[:4]

    # -- components ----------------------------------------------------------------------------------
    @property
    def latent_patch(self) -> int:
        """Latent pixels per token side (the resolution's latent size must be a multiple; 1 for the UNet)."""
        return 1 if self.kind == "sd15" else int(self.pipe.transformer.config.patch_size)

    @property
    def latent_channels(self) -> int:
        return int(self.denoiser.config.in_channels)

    @property
    def denoiser(self) -> torch.nn.Module:
        """The trained network: ``pipe.unet`` (SD1.5) or ``pipe.transformer`` (SD3)."""
        return self.pipe.unet if self.kind == "sd15" else self.pipe.transformer

    @property
    def scheduler(self):
        return self.pipe.scheduler

    def frozen_modules(self) -> list[torch.nn.Module]:
        """VAE and text encoders (whichever the pipeline has)."""
        names = ("vae", "text_encoder", "text_encoder_2", "text_encoder_3")
        return [m for m in (getattr(self.pipe, n, None) for n in names) if m is not None]

    def backbone(self):
        """The backbone adapter around the denoiser (``UNetAdapter`` for SD1.5, the DiT adapter for SD3)."""
        if self.kind == "sd15":
            from ..backbones.unet import UNetAdapter

            return UNetAdapter(self.pipe.unet)
        from ..backbones.dit import DiTAdapter

        return DiTAdapter(self.pipe.transformer)

    def to(self, device) -> "StableDiffusionTask":
        """Move the frozen encoders and VAE (the trainer moves the denoiser with its adapter)."""
        for module in self.frozen_modules():
            module.to(device)
        self._null = None
        return self

    @property
    def device(self) -> torch.device:
        return self.pipe.vae.device

    # -- the task protocol -----------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, prompts):
        """Conditioning for ``prompts``: SD1.5 (B, L, D) hidden states; SD3 / FLUX a :class:`TextCond`.  With the
        text-embedding cache, prompts not seen before are encoded (once each, in one batch) and the rest are read
        from the cache."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompts must be a list of strings, got {type(prompts).__name__}")
        prompts = list(prompts)
        if self._text_cache is None:
            self.encoder_calls += len(prompts)
            return self._encode_batch(prompts)
        cache = self._text_cache
        new = [p for p in dict.fromkeys(prompts) if p not in cache]
        if new:
            self.encoder_calls += len(new)
            rows = self._encode_batch(new)
            for i, p in enumerate(new):
                cache[p] = rows[i:i + 1].to("cpu")
        from ..cond import cat_cond

        return cat_cond([cache[p] for p in prompts]).to(self.device)

    def _encode_batch(self, prompts: list[str]):
        """The pipeline's ``encode_prompt`` on ``prompts`` (no cache)."""
        dtype = self.denoiser.dtype
        if self.kind == "sd15":
            embeds, _ = self.pipe.encode_prompt(prompts, self.device, 1, False)
            return embeds.to(dtype)
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompts, None, None, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length)
        return TextCond(embeds.to(dtype), pooled.to(dtype))

    def null_cond(self, n: int):
        """The empty prompt's conditioning repeated ``n`` times (the unconditional branch of CFG)."""
        if self._null is None:
            self._null = self.encode([""])
        return self._null.repeat_interleave(n, dim=0)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE-decode final latents to float32 images (B, 3, H, W) in [-1, 1] (float64 from a float64 VAE)."""
        return self.decode_differentiable(latents)

    def decode_differentiable(self, latents: torch.Tensor) -> torch.Tensor:
        """:meth:`decode` with autograd on (the grafted critic's path from x_t to the reward network)."""
        vae = self.pipe.vae
        scale = vae.config.scaling_factor
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        out = []
        for i in range(0, latents.shape[0], self.decode_chunk_size):
            z = latents[i:i + self.decode_chunk_size].to(device=vae.device, dtype=vae.dtype)
            img = vae.decode(z / scale + shift, return_dict=False)[0]
            out.append(img.to(torch.promote_types(img.dtype, torch.float32)).clamp(-1, 1))  # float64 VAE: float64
        return torch.cat(out).to(latents.device)


# ------------------------------------------------------------------------------------------------------
# LoRA export in diffusers' format
def lora_metadata(rank: int, alpha: float | None, target_modules) -> dict:
    """The peft ``LoraConfig`` of the policy adapter as a dict, saved with the weights so that
    ``load_lora_weights`` rebuilds the same rank, scale (alpha / rank) and target modules."""
    from peft import LoraConfig

    cfg = LoraConfig(r=int(rank), lora_alpha=alpha if alpha is not None else rank, target_modules=list(target_modules))
    meta = cfg.to_dict()
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in meta.items()}


def save_lora(state_dict: dict[str, torch.Tensor], kind: str, out_dir, rank: int, alpha: float | None,
              target_modules) -> Path:
    """Write a policy LoRA (peft state dict of the denoiser, adapter name stripped, as
    ``LoraAdapters.state_dict('policy')`` returns it) with the pipeline class's own ``save_lora_weights``.

    The result is ``out_dir/pytorch_lora_weights.safetensors``, loadable with
    ``pipe.load_lora_weights(out_dir)`` on a pipeline of the same class.
    """
    cls = pipeline_class(kind)
    if not state_dict:
        raise ValueError("the LoRA state dict is empty: nothing to export")
    bad = [k for k in state_dict if "lora_" not in k]
    if bad:
        raise ValueError(f"not a LoRA state dict: keys without 'lora_' such as {bad[:3]}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    meta = lora_metadata(rank, alpha, target_modules)
    if kind == "sd15":
        from diffusers.utils import convert_state_dict_to_diffusers

        cls.save_lora_weights(out, unet_lora_layers=convert_state_dict_to_diffusers(tensors),
                              unet_lora_adapter_metadata=meta, safe_serialization=True)
    else:  # SD3 and FLUX: the transformer's peft keys as they are
        cls.save_lora_weights(out, transformer_lora_layers=tensors, transformer_lora_adapter_metadata=meta,
                              safe_serialization=True)
    return out


def save_policy_lora(task, models, config, out_dir) -> Path:
    """Export a run's policy LoRA (the 'policy' adapter of ``models``, a :class:`~critic_align.models.Models`; rank,
    alpha and target modules from ``config``) for its Stable Diffusion (or FLUX) ``task`` (see :func:`save_lora`):
    ``save_policy_lora(trainer.task, trainer.models, trainer.config, out_dir)``."""
    policy = models.policy_lora()  # policy: full has no adapter (refused first, whatever the task)
    if not isinstance(task, StableDiffusionTask):
        raise TypeError(f"save_policy_lora exports Stable Diffusion runs; this run's task is {type(task).__name__}")
    return save_lora(policy, task.kind, out_dir, config.lora_rank, config.lora_alpha,
                     config.lora_target_modules)


def read_prompts(path) -> list[str]:
    """One prompt per line of a UTF-8 text file (blank lines and lines starting with '#' skipped), or the
    ``"prompt"`` of each line of a ``.jsonl`` file (its metadata: :func:`critic_align.prompts.read_prompt_file`)."""
    from critic_align.prompts import read_prompt_file

    return read_prompt_file(path)[0]
