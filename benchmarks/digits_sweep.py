"""Quick hyper-parameter probes on the digits task: the reward per epoch for a list of PPOConfig overrides.

    python benchmarks/digits_sweep.py '[{"advantage": "grpo", "learning_rate": 1e-3, "clip_range": 1e-3}]' 15

Each entry of the JSON list is a set of PPOConfig overrides (plus "_rewards": a reward list to replace the
config's); prints one line per entry with the training-batch mean of the first reward after every epoch.
The logs of the probes that chose the defaults are in benchmarks/results/digits_sweep_*.log.
"""

import json
import sys
import time

from critic_align.api import build_trainer  # noqa: E402
from critic_align.train.registry import load_run_config  # noqa: E402

settings = json.loads(sys.argv[1])
n = int(sys.argv[2])
for s in settings:
    over = dict(num_epochs=n, output_dir="/tmp/digits_sweep", progress=False, log_tensorboard=False, grid_every=0,
                checkpoint_every=0)
    s = dict(s)
    rw = s.pop("_rewards", None)
    over.update(s)
    run = load_run_config("digits", over)
    if rw:
        run["rewards"] = rw
    tr = build_trainer(run)
    t = time.time()
    if tr.critic is not None:
        tr.pretrain_value()
    rs = []
    for _ in range(n):
        m = tr.train_epoch().metrics
        rs.append(round(m["reward/%s/mean" % tr.rewards.names[0]], 3))
    print(s, "time %.0f" % (time.time() - t), "rewards", rs, "kl", m.get("approx_kl"), "clip", m.get("clip_fraction"),
          "ev", m.get("value_ev"), flush=True)
