"""Writes tests/data/clip_reference.pt with the CLIP-family reward code as of commit 10bfeb5 (before the score from
image embeddings and prompts was factored out for the grafted critic): the tiny models' tensors, the images, the
prompts and each reward's values.  Run from the repository root: PYTHONPATH=$PWD python tests/data/make_clip_reference.py"""
import math
import tempfile
from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPModel

from critic_align.rewards import CLIPScore, HPSv2, LaionAesthetic, PickScore
from tests.test_hpsv2 import open_clip_state_dict
from tests.test_hpsv2 import tiny_tokenizer as hps_tokenizer
from tests.test_real_rewards import IMAGE_SIZE, PROJ_DIM, tiny_processor, tiny_tokenizer, write_head

tmp = Path(tempfile.mkdtemp())
tok = tiny_tokenizer()
config = CLIPConfig(
    text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1),
    vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                       image_size=IMAGE_SIZE, patch_size=8),
    projection_dim=PROJ_DIM,
)
torch.manual_seed(0)
model = CLIPModel(config)
with torch.no_grad():
    model.logit_scale.fill_(math.log(37.0))
clip_state = {k: v.clone() for k, v in model.state_dict().items()}
model.save_pretrained(tmp / "clip")
tok.save_pretrained(tmp / "clip")
tiny_processor().save_pretrained(tmp / "clip")
head_state = write_head(tmp / "head.safetensors")

htok = hps_tokenizer()
hps_state = open_clip_state_dict(len(htok))
torch.save(hps_state, tmp / "hps.pt")
htok.save_pretrained(tmp / "hps_processor")
tiny_processor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}).save_pretrained(tmp / "hps_processor")

g = torch.Generator().manual_seed(0)
prompts = ["cat", "a cat", "dog", "cat", "xyz", "the cat sat", "b", "cat"]
images = {  # the reward input in [-1, 1], at the models' size and larger (the resize path), RGB and grayscale
    "rgb24": (torch.randn(8, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g) * 0.6).clamp(-1, 1),
    "rgb32": (torch.randn(8, 3, 32, 32, generator=g) * 0.6).clamp(-1, 1),
    "gray24": (torch.randn(8, 1, IMAGE_SIZE, IMAGE_SIZE, generator=g) * 0.6).clamp(-1, 1),
}
rewards = {
    "clip_score": CLIPScore(tmp / "clip"),
    "clip_score_100_clipped": CLIPScore(tmp / "clip", scale=100, clip_at_zero=True),
    "pickscore": PickScore(tmp / "clip"),
    "aesthetic": LaionAesthetic(tmp / "head.safetensors", model=tmp / "clip"),
    "hpsv2": HPSv2(tmp / "hps.pt", processor=tmp / "hps_processor", head_width=16),
}
values = {name: {k: r(x, prompts) for k, x in images.items()} for name, r in rewards.items()}
# the aesthetic head and HPSv2's open_clip tensors come from seeded generators (write_head, open_clip_state_dict: the
# test rebuilds them); the CLIP model's from torch's default init, whose draws may change across versions: kept here
torch.save({"clip_config": config.to_dict(), "clip_state": clip_state, "images": images, "prompts": prompts,
            "values": values},
           "tests/data/clip_reference.pt")
for name, v in values.items():
    print(name, {k: [round(float(a), 4) for a in t[:4]] for k, t in v.items()})
