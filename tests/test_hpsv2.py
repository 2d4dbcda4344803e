"""HPSv2.1 without open_clip: a tiny open_clip-format CLIP state dict made here, converted into transformers'
CLIPModel by critic_align.rewards.hpsv2, scores what a reference implementation of open_clip's forward scores."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from critic_align.rewards.hpsv2 import (
    HPSv2,
    clip_config_from_open_clip,
    convert_open_clip_state_dict,
    load_open_clip_state_dict,
)

transformers = pytest.importorskip("transformers")

# the tiny config (open_clip's ViT layout at toy size): heads = width // HEAD_WIDTH
TEXT_W, VIS_W, EMBED, HEAD_WIDTH, LAYERS, CTX, PATCH, IMAGE = 32, 48, 16, 16, 2, 12, 4, 16
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def tiny_tokenizer():
    """A CLIP BPE tokenizer whose start / end tokens are the last two ids, as in CLIP's real vocabulary
    (open_clip pools the text at argmax(token id) = the end token)."""
    from transformers import CLIPTokenizer

    vocab = {}
    for token in [*LETTERS, *(c + "</w>" for c in LETTERS), "ca", "cat</w>", "<|startoftext|>", "<|endoftext|>"]:
        vocab.setdefault(token, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[("c", "a"), ("ca", "t</w>")], model_max_length=CTX)


def open_clip_state_dict(vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors with open_clip's CLIP (ViT) key names and shapes."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, s=0.1):
        return torch.randn(*shape, generator=g) * s

    sd = {}

    def blocks(prefix, w):
        for i in range(LAYERS):
            p = f"{prefix}{i}."
            sd[p + "ln_1.weight"], sd[p + "ln_1.bias"] = 1 + r(w), r(w)
            sd[p + "attn.in_proj_weight"], sd[p + "attn.in_proj_bias"] = r(3 * w, w, s=0.3), r(3 * w)
            sd[p + "attn.out_proj.weight"], sd[p + "attn.out_proj.bias"] = r(w, w, s=0.3), r(w)
            sd[p + "ln_2.weight"], sd[p + "ln_2.bias"] = 1 + r(w), r(w)
            sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"] = r(4 * w, w, s=0.3), r(4 * w)
            sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"] = r(w, 4 * w, s=0.3), r(w)

    grid = IMAGE // PATCH
    sd["visual.class_embedding"] = r(VIS_W, s=0.5)
    sd["visual.positional_embedding"] = r(grid * grid + 1, VIS_W, s=0.5)
    sd["visual.proj"] = r(VIS_W, EMBED, s=0.3)
    sd["visual.conv1.weight"] = r(VIS_W, 3, PATCH, PATCH, s=0.3)
    sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"] = 1 + r(VIS_W), r(VIS_W)
    sd["visual.ln_post.weight"], sd["visual.ln_post.bias"] = 1 + r(VIS_W), r(VIS_W)
    blocks("visual.transformer.resblocks.", VIS_W)
    sd["token_embedding.weight"] = r(vocab, TEXT_W, s=0.5)
    sd["positional_embedding"] = r(CTX, TEXT_W, s=0.5)
    sd["ln_final.weight"], sd["ln_final.bias"] = 1 + r(TEXT_W), r(TEXT_W)
    sd["text_projection"] = r(TEXT_W, EMBED, s=0.3)
    sd["logit_scale"] = torch.tensor(math.log(1 / 0.07))
    sd["attn_mask"] = torch.full((CTX, CTX), float("-inf")).triu(1)  # open_clip's buffer
    blocks("transformer.resblocks.", TEXT_W)
    return sd


# ---------------------------------------------------------------------------------------------
# the reference: open_clip's forward for this config (nn.MultiheadAttention with its in_proj, as open_clip does)
def _resblocks(x, sd, prefix, width, mask=None):
    heads = width // HEAD_WIDTH
    for i in range(LAYERS):
        p = f"{prefix}{i}."
        attn = torch.nn.MultiheadAttention(width, heads, batch_first=True)
        attn.load_state_dict({"in_proj_weight": sd[p + "attn.in_proj_weight"], "in_proj_bias": sd[p + "attn.in_proj_bias"],
                              "out_proj.weight": sd[p + "attn.out_proj.weight"],
                              "out_proj.bias": sd[p + "attn.out_proj.bias"]})
        h = F.layer_norm(x, (width,), sd[p + "ln_1.weight"], sd[p + "ln_1.bias"], 1e-5)
        x = x + attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        h = F.layer_norm(x, (width,), sd[p + "ln_2.weight"], sd[p + "ln_2.bias"], 1e-5)
        h = F.linear(F.gelu(F.linear(h, sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"])),
                     sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"])
        x = x + h
    return x


def reference_image_features(sd, pixels):
    x = F.conv2d(pixels, sd["visual.conv1.weight"], stride=PATCH)  # (B, W, g, g)
    x = x.flatten(2).permute(0, 2, 1)
    cls = sd["visual.class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + sd["visual.positional_embedding"]
    x = F.layer_norm(x, (VIS_W,), sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"], 1e-5)
    x = _resblocks(x, sd, "visual.transformer.resblocks.", VIS_W)
    pooled = F.layer_norm(x[:, 0], (VIS_W,), sd["visual.ln_post.weight"], sd["visual.ln_post.bias"], 1e-5)
    return F.normalize(pooled @ sd["visual.proj"], dim=-1)


def reference_text_features(sd, tokens):
    """``tokens``: (B, CTX) ids, zero-padded after the end token, as open_clip's tokenizer returns them."""
    x = F.embedding(tokens, sd["token_embedding.weight"]) + sd["positional_embedding"]
    x = _resblocks(x, sd, "transformer.resblocks.", TEXT_W, mask=sd["attn_mask"])
    x = F.layer_norm(x, (TEXT_W,), sd["ln_final.weight"], sd["ln_final.bias"], 1e-5)
    pooled = x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)]
    return F.normalize(pooled @ sd["text_projection"], dim=-1)


def open_clip_tokens(tok, prompts):
    rows = []
    for p in prompts:
        ids = tok(p, truncation=True, max_length=CTX).input_ids
        rows.append(ids + [0] * (CTX - len(ids)))
    return torch.tensor(rows)


@pytest.fixture(scope="module")
def hps(tmp_path_factory):
    try:
        from transformers import CLIPImageProcessorPil as Processor  # transformers 5 without torchvision
    except ImportError:  # transformers 4
        from transformers import CLIPImageProcessor as Processor
    root = tmp_path_factory.mktemp("hps")
    tok = tiny_tokenizer()
    tok.save_pretrained(root / "processor")
    Processor(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE}).save_pretrained(
        root / "processor")
    sd = open_clip_state_dict(len(tok))
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 10}, root / "HPS_v2.1_compressed.pt")
    return root, sd, tok


def test_config_is_read_from_the_tensors(hps):
    _, sd, tok = hps
    cfg = clip_config_from_open_clip(sd, head_width=HEAD_WIDTH)
    t, v = cfg.text_config, cfg.vision_config
    assert (t.vocab_size, t.hidden_size, t.num_attention_heads, t.num_hidden_layers, t.intermediate_size) == (
        len(tok), TEXT_W, TEXT_W // HEAD_WIDTH, LAYERS, 4 * TEXT_W)
    assert (t.max_position_embeddings, t.eos_token_id, t.hidden_act) == (CTX, len(tok) - 1, "gelu")
    assert (v.hidden_size, v.num_attention_heads, v.image_size, v.patch_size, v.num_hidden_layers) == (
        VIS_W, VIS_W // HEAD_WIDTH, IMAGE, PATCH, LAYERS)
    assert cfg.projection_dim == EMBED
    converted = convert_open_clip_state_dict(sd)
    q = converted["text_model.encoder.layers.1.self_attn.q_proj.weight"]
    torch.testing.assert_close(q, sd["transformer.resblocks.1.attn.in_proj_weight"][:TEXT_W], rtol=0, atol=0)
    torch.testing.assert_close(converted["visual_projection.weight"], sd["visual.proj"].t(), rtol=0, atol=0)


def test_hpsv2_score_equals_open_clips_forward(hps):
    root, sd, tok = hps
    reward = HPSv2(root / "HPS_v2.1_compressed.pt", processor=root / "processor", head_width=HEAD_WIDTH)
    assert not reward.is_loaded  # lazy, like the other CLIP rewards
    g = torch.Generator().manual_seed(1)
    samples = torch.rand(4, 3, IMAGE, IMAGE, generator=g) * 2 - 1
    prompts = ["cat", "a cat", "abc", "cat"]
    got = reward(samples, prompts)

    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)  # OpenAI CLIP's, open_clip's default
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    with torch.no_grad():
        img = reference_image_features(sd, (((samples + 1) / 2).clamp(0, 1) - mean) / std)
        txt = reference_text_features(sd, open_clip_tokens(tok, prompts))
    expected = (img * txt).sum(-1)  # HPSv2: the diagonal of image_features @ text_features.T
    assert got.shape == (4,) and expected.abs().min() > 1e-3
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(reward.model.logit_scale.detach(), sd["logit_scale"], rtol=0, atol=0)

    # differentiable: gradients reach the samples through the torch preprocessing (here a 2x downsampling)
    diff = HPSv2(root / "HPS_v2.1_compressed.pt", processor=root / "processor", head_width=HEAD_WIDTH,
                 differentiable=True)
    x = (torch.rand(2, 3, 2 * IMAGE, 2 * IMAGE, generator=g) * 2 - 1).requires_grad_(True)
    diff(x, ["cat", "abc"]).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_registry_safetensors_and_clear_errors(hps, tmp_path):
    from safetensors.torch import save_file

    from critic_align.registry import build_rewards

    root, sd, _ = hps
    st = tmp_path / "hps.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(st))
    assert load_open_clip_state_dict(st).keys() == sd.keys()
    rewards = build_rewards([{"name": "hpsv2", "checkpoint": str(st), "processor": str(root / "processor"),
                              "head_width": HEAD_WIDTH}])
    assert list(rewards.names) == ["hpsv2"]
    with pytest.raises(FileNotFoundError, match="HPS_v2.1_compressed.pt"):
        HPSv2(tmp_path / "missing.pt", processor=root / "processor").load()
    with pytest.raises(ValueError, match="no CLIPModel counterpart.*visual.transformer.resblocks.0.ls_1.gamma"):
        convert_open_clip_state_dict({**sd, "visual.transformer.resblocks.0.ls_1.gamma": torch.ones(VIS_W)})
    with pytest.raises(ValueError, match="not an open_clip CLIP state dict"):
        clip_config_from_open_clip({"layers.0.weight": torch.ones(2)})
