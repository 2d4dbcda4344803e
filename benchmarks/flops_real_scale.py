"""FLOPs per particle-step at real scale (issue #29): the backbone, the VAE decode, the reward model and the critic.

    python benchmarks/flops_real_scale.py

Random-weight SD1.5 (512², UNet + VAE) and SD3.5-medium (1024², transformer + VAE) built on the meta device from the
published configs (``benchmarks/gpu_throughput.py``), one row each, counted with ``torch.utils.flop_counter.
FlopCounterMode`` (:mod:`critic_align.flops`: matmuls and convolutions, 2 FLOPs per multiply-add).  The reward model
is CLIP ViT-L/14's image tower at 224² (the PickScore / CLIP-score family).  Today's critic is the backbone's feature
forward up to its 'mid' level (its LoRA'd encoder; the small value head is not counted); the grafted critic runs the
whole backbone (its own LoRA), the decode and the reward network.  A backward is priced at 2 forwards (not counted).
Per particle-step costs of the steering methods are sums of these rows (CFG would double every backbone row).
Writes ``benchmarks/results/flops_real_scale.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from harness import machine_info

ROOT = Path(__file__).resolve().parents[1]

from gpu_throughput import SD3_VAE, SD15_UNET, SD35M_TRANSFORMER, SD_VAE  # noqa: E402

from critic_align.flops import count_flops  # noqa: E402

CLIP_L_VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                     image_size=224, patch_size=14, projection_dim=768)  # openai/clip-vit-large-patch14 vision_config


@torch.no_grad()
def measure() -> dict:
    from diffusers import AutoencoderKL, SD3Transformer2DModel, UNet2DConditionModel
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from critic_align.backbones import DiTAdapter, UNetAdapter
    from critic_align.cond import TextCond

    out = {}
    with torch.device("meta"):
        clip = CLIPVisionModelWithProjection(CLIPVisionConfig(**CLIP_L_VISION))
        pix = torch.empty(1, 3, 224, 224)
    reward = count_flops(clip, pixel_values=pix)

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
        vae = AutoencoderKL(**SD_VAE)
        x, t, c = torch.empty(1, 4, 64, 64), torch.tensor([500]), torch.empty(1, 77, 768)
        z = torch.empty(1, 4, 64, 64)
    backbone = count_flops(unet, x, t, encoder_hidden_states=c)
    decode = count_flops(vae.decode, z)
    critic = count_flops(lambda: UNetAdapter(unet).features(x, t, c, which="mid"))
    out["sd15_512"] = _rows(backbone, decode, reward, critic)

    with torch.device("meta"):
        tr = SD3Transformer2DModel(**SD35M_TRANSFORMER)
        vae3 = AutoencoderKL(**SD3_VAE)
        x3, t3 = torch.empty(1, 16, 128, 128), torch.tensor([500.0])
        cond = TextCond(torch.empty(1, 333, 4096), torch.empty(1, 2048))
        z3 = torch.empty(1, 16, 128, 128)
    backbone3 = count_flops(tr, hidden_states=x3, encoder_hidden_states=cond.embeds, pooled_projections=cond.pooled,
                            timestep=t3)
    decode3 = count_flops(vae3.decode, z3)
    critic3 = count_flops(lambda: DiTAdapter(tr).features(x3, t3, cond, which="mid"))
    out["sd35m_1024"] = _rows(backbone3, decode3, reward, critic3)
    return out


def _rows(backbone, decode, reward, critic) -> dict:
    g = 1e9
    grafted = backbone + decode + reward
    return {
        "gflops": {"backbone_step": backbone / g, "vae_decode": decode / g, "reward_model": reward / g,
                   "critic_head_forward": critic / g, "grafted_critic_forward": grafted / g},
        "per_particle_step_gflops": {
            "plain_sampling": backbone / g,
            "fk_x0_reward_smc": (backbone + decode + reward) / g,
            "critic_smc": (backbone + critic) / g,
            "critic_guidance": (backbone + 3 * critic) / g,
            "grafted_smc": (backbone + grafted) / g,
            "grafted_guidance": (backbone + 3 * grafted) / g},
        "decode_plus_reward_over_backbone": (decode + reward) / backbone,
        "critic_over_backbone": critic / backbone,
    }


def main():
    res = {"benchmark": "flops_real_scale", "counted_with": "torch.utils.flop_counter.FlopCounterMode, meta device, "
           "batch 1, no CFG; backward priced at 2 forwards",
           "machine": machine_info(note="shared machine, 2 cores, contended; counts do not depend on it"),
           **measure()}
    path = ROOT / "benchmarks" / "results" / "flops_real_scale.json"
    path.write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
