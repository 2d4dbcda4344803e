"""Writes tests/data/composition_reference.pt with the composition reward code as of commit afce630 (before the
clause read-out was factored out for the grafted critic)."""
import numpy as np, torch
from critic_align.tasks.composition import parse_prompt, Renderer, load_digit_glyphs, all_compositions, prompt_split
from critic_align.rewards.composition import judge_compositions, ATTRIBUTES
from critic_align.rewards.digits import load_digit_classifier
glyphs, labels = load_digit_glyphs()
r = Renderer(glyphs, labels)
train, held = prompt_split()
prompts = train[:12:1] + train[100:3000:300] + held[:4]
rng = np.random.default_rng(0)
g = torch.Generator().manual_seed(0)
imgs = []
for i, p in enumerate(prompts):
    im = r.render(parse_prompt(p), rng)
    imgs.append(im)
imgs = torch.stack(imgs).float()
# half of them noisy (soft, off-manifold images as x̂0 is), two swapped to a wrong prompt
noise = torch.randn(imgs.shape, generator=g) * 0.3
imgs[::2] = (imgs[::2] + noise[::2]).clamp(-1, 1)
prompts = list(prompts); prompts[1], prompts[3] = prompts[3], prompts[1]
j = judge_compositions(imgs, prompts, load_digit_classifier(), temperature=1.0)
torch.save({"images": imgs, "prompts": prompts, "score": j.score, "all_correct": j.all_correct,
            "prob": j.prob, "correct": j.correct}, "tests/data/composition_reference.pt")
print(j.score, j.all_correct, {a: j.prob[a][:6] for a in ATTRIBUTES})
