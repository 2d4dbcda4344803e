"""Writes tests/data/composition_reference.pt: the composition reward's per-clause values, computed (once) by the code
of commit afce630, before judge_cells and pixel_features were factored out of judge_compositions for the grafted
critic; tests/test_grafted.py checks the refactored code against them.  Images: rendered compositions of training and
held-out prompts, every other one with Gaussian noise (std 0.3, the soft off-manifold images x̂0 is), two prompts
swapped so that their images fail a clause."""

import numpy as np
import torch

from critic_align.rewards.composition import ATTRIBUTES, judge_compositions
from critic_align.rewards.digits import load_digit_classifier
from critic_align.tasks.composition import Renderer, load_digit_glyphs, parse_prompt, prompt_split

glyphs, labels = load_digit_glyphs()
renderer = Renderer(glyphs, labels)
train, held = prompt_split()
prompts = train[:12] + train[100:3000:300] + held[:4]
rng = np.random.default_rng(0)
g = torch.Generator().manual_seed(0)
imgs = torch.stack([renderer.render(parse_prompt(p), rng) for p in prompts]).float()
noise = torch.randn(imgs.shape, generator=g) * 0.3
imgs[::2] = (imgs[::2] + noise[::2]).clamp(-1, 1)
prompts = list(prompts)
prompts[1], prompts[3] = prompts[3], prompts[1]
j = judge_compositions(imgs, prompts, load_digit_classifier(), temperature=1.0)
torch.save({"images": imgs, "prompts": prompts, "score": j.score, "all_correct": j.all_correct,
            "prob": j.prob, "correct": j.correct}, "tests/data/composition_reference.pt")
print(j.score, j.all_correct, {a: j.prob[a][:6] for a in ATTRIBUTES})
