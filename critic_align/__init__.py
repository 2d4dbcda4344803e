"""critic_align: align diffusion models to rewards with a learned critic on noisy latents."""

__version__ = "0.1.0"
