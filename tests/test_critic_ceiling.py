"""benchmarks/critic_ceiling.py's oracle runs: the oracle's queries and NFE are counted apart from the policy's (or in
its budget for the counted Monte-Carlo method), and the oracle's continuations run the policy being trained."""

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import critic_ceiling as cc  # noqa: E402

ARGS = argparse.Namespace(gmm_epochs=2, gmm_kl=0.0, gmm_reward="box", K={"gmm": 3}, eval_per_class=2)


def _trainer(tmp_path, **over):
    return cc.gmm_trainer({"advantage": "grpo", "batch_size": 16, "group_size": 16, "sample_chunk_size": 16,
                           "num_inference_steps": 5, **over}, 0, 3e-3, tmp_path, ARGS)[0]


def test_oracle_gae_counts_apart(tmp_path):
    tr = _trainer(tmp_path / "a")
    ledger = {"oracle_queries": 0, "oracle_nfe": 0}
    cc.install_oracle_gae(tr, 3, 0.95, count=False, gen=torch.Generator().manual_seed(0), ledger=ledger)
    tr.train_epoch()
    assert tr.reward_queries == 16                      # the policy's own rollout only
    assert ledger["oracle_queries"] == 16 * 3 * 5       # K continuations at each of the 5 states
    assert ledger["oracle_nfe"] == 16 * 3 * (5 + 4 + 3 + 2 + 1)


def test_counted_mc_pays_for_its_oracle(tmp_path):
    tr = _trainer(tmp_path / "b")
    ledger = {"oracle_queries": 0, "oracle_nfe": 0}
    cc.install_oracle_gae(tr, 3, 0.0, count=True, gen=torch.Generator().manual_seed(0), ledger=ledger)
    tr.train_epoch()
    assert tr.reward_queries == 16 + 16 * 3 * 5


def test_awm_oracle_counts_apart_and_queries_to_reach(tmp_path):
    tr = _trainer(tmp_path / "c", algorithm="awm", awm_advantage="grpo")
    ledger = {"oracle_queries": 0, "oracle_nfe": 0}
    cc.install_awm_oracle(tr, 2, torch.Generator().manual_seed(0), ledger)
    tr.train_epoch()
    assert tr.reward_queries == 16 and ledger["oracle_queries"] == 16 * 5 * 2  # one row per (trajectory, step)
    curve = [{"policy_queries": q, "reward": r} for q, r in ((10, 0.1), (20, 0.5), (30, 0.9), (40, 0.9))]
    assert cc.queries_to_reach(curve, 0.75) == 40 and cc.queries_to_reach(curve, 0.5, smooth=1) == 20


def test_digits_dit_oracle_runs_on_the_flow_step(tmp_path, monkeypatch):
    # the flow-matching twin: each algorithm from its own shipped config, and the oracle's continuations on the
    # rectified-flow SDE step over full stochastic trajectories (digits_dit.yaml has no SDE window)
    from critic_align.steps import FlowMatchSDEStep
    from critic_align.train import registry

    loaded, load = [], registry.load_run_config
    monkeypatch.setattr(registry, "load_run_config", lambda name, over: loaded.append(name) or load(name, over))

    args = argparse.Namespace(awm_timestep_fraction=0.25, eval_per_class=2)
    small = {"batch_size": 8, "group_size": 4, "num_inference_steps": 4, "sample_chunk_size": 8, "minibatch_size": 8}
    tr, evaluate = cc.digits_dit_trainer({"advantage": "grpo", **small}, 0, 1e-3, tmp_path / "d", args)
    assert isinstance(tr.step, FlowMatchSDEStep) and tr.step.noise_level == 0.7
    ledger = {"oracle_queries": 0, "oracle_nfe": 0}
    cc.install_oracle_gae(tr, 2, 0.95, count=False, gen=torch.Generator().manual_seed(0), ledger=ledger)
    tr.train_epoch()
    assert tr.reward_queries == 8                       # the policy's own rollout only
    assert ledger["oracle_queries"] == 8 * 2 * 4        # K = 2 continuations at each of the 4 states
    assert ledger["oracle_nfe"] == 8 * 2 * (4 + 3 + 2 + 1)
    assert 0.0 <= evaluate()["reward"] <= 1.0           # digit_prob of the 10 prompts, two samples each
    nft, _ = cc.digits_dit_trainer({**cc.METHODS["nft"][0], **small}, 0, 1e-3, tmp_path / "n", args)
    awm, _ = cc.digits_dit_trainer({**cc.METHODS["awm"][0], **small}, 0, 1e-3, tmp_path / "a", args)
    assert loaded == ["digits_dit", "digits_dit_nft", "digits_dit_awm"]
    assert nft.config.algorithm == "nft" and awm.config.algorithm == "awm" and awm.config.timestep_fraction == 0.25
    assert isinstance(nft.step, FlowMatchSDEStep) and isinstance(awm.step, FlowMatchSDEStep)



def test_t2i_sd3_oracle_counts_apart_in_the_sde_window(tmp_path):
    # the SD3 twin: PPO's rollout holds only t2i_sd3.yaml's SDE window (fixed here at steps 2..5 of 8), the oracle
    # continues from each of those 4 states to the end (the window's SDE steps, then the Euler ODE), and its GAE
    # centres per prompt as the config's learned GAE does (gae_group_baseline, which the GRPO trainer itself refuses)
    from critic_align.advantages import group_ids
    from critic_align.steps import FlowMatchSDEStep

    args = argparse.Namespace(awm_timestep_fraction=0.25, t2i_eval_prompts=2)
    small = {"batch_size": 8, "group_size": 4, "num_inference_steps": 8, "sample_chunk_size": 8, "minibatch_size": 8,
             "sde_window_range": [2, 2]}
    tr, evaluate = cc.t2i_sd3_trainer({"advantage": "grpo", **small}, 0, 1e-3, tmp_path / "g", args)
    assert isinstance(tr.step, FlowMatchSDEStep) and tr.config.sde_window_size == 4 and tr.critic is None
    assert not tr.config.gae_group_baseline and cc.config_gae_group_baseline("t2i_sd3") is True
    ledger = {"oracle_queries": 0, "oracle_nfe": 0}
    cc.install_oracle_gae(tr, 2, 0.95, count=False, gen=torch.Generator().manual_seed(0), ledger=ledger,
                          group_baseline=cc.config_gae_group_baseline("t2i_sd3"))
    seen, compute = [], tr.compute_advantages
    tr.compute_advantages = lambda ro, prompts=None: seen.append(compute(ro, prompts)) or seen[-1]
    tr.train_epoch()
    assert tr.reward_queries == 8                       # the policy's own rollout only
    assert ledger["oracle_queries"] == 8 * 2 * 4        # K = 2 continuations at each of the window's 4 states
    assert ledger["oracle_nfe"] == 8 * 2 * (6 + 5 + 4 + 3)  # from steps 2, 3, 4, 5 of 8 to the end
    adv, groups = seen[0].advantages, group_ids(seen[0].prompts)  # (8, 4): 2 prompts x 4 samples, per step
    assert adv.shape == (8, 4) and len(groups.unique()) == 2 and adv.abs().max() > 0.1
    for g in groups.unique():                           # centred within each prompt's group at every step
        assert adv[groups == g].sum(0).abs().max() < 1e-5
    ev = evaluate()
    assert 0.0 <= ev["reward"] <= 1.0 and set(ev["train"]) == {"composition", "composition_correct"}
    for method in ("nft", "awm", "learned_gae"):  # each method's settings are admitted by the config
        own = {k: v for k, v in small.items() if k != "sde_window_range" or method == "learned_gae"}
        m, _ = cc.t2i_sd3_trainer({**cc.METHODS[method][0], **own}, 0, 1e-3, tmp_path / method, args)
        assert m.config.algorithm == cc.METHODS[method][0].get("algorithm", "ppo")
        assert m.config.sde_window_size == (4 if method == "learned_gae" else 0)
    assert m.config.gae_group_baseline and m.critic is not None  # learned_gae: the config's GAE as shipped

def _run(task, method, train, final, base=0.5):
    curve = [{"policy_queries": 64 * (i + 1), "reward_queries": 64 * (i + 1), "reward": r, "epoch_s": 1.0}
             for i, r in enumerate(train)]
    return {"task": task, "method": method, "seed": 0, "lr": 1e-3, "final": {"reward": final}, "base": {"reward": base},
            "curve": curve, "reward_queries": 256, "oracle_queries": 0, "oracle_nfe": 0, "diverged": None}


def _four_runs(task):
    return [_run(task, "grpo", [0.5, 0.5, 0.6, 0.6], 0.60), _run(task, "awm", [0.5, 0.6, 0.7, 0.7], 0.70),
            _run(task, "oracle_gae", [0.6, 0.7, 0.8, 0.8], 0.80), _run(task, "learned_gae", [0.5, 0.5, 0.6, 0.7], 0.65)]


def test_digits_dit_queries_ratio_is_against_the_best_critic_free_method_of_all():
    # digits_dit's PPO, NFT and AWM sample the same full SDE trajectories: the baseline is the best of all three (AWM
    # here, final training reward (0.6 + 0.7 + 0.7) / 3), where digits' split measures PPO methods against GRPO's
    dit = cc.summarize(_four_runs("digits_dit"))["digits_dit"]
    assert dit["best_critic_free"] == "awm" and abs(dit["best_critic_free_final_train_reward"] - 2.0 / 3) < 1e-12
    assert dit["oracle_queries_ratio"] == 192 / 256     # the 3-epoch mean first reaches 2/3 at 192 queries (0.7)
    assert abs(dit["learned_share_of_oracle_gain"] - (0.65 - 0.5) / (0.80 - 0.5)) < 1e-12
    digits = cc.summarize(_four_runs("digits"))["digits"]
    assert digits["best_critic_free"] == "grpo" and digits["oracle_queries_ratio"] == 64 / 256  # 0.6 >= 1.7 / 3


def test_report_renders_digits_dit(tmp_path):
    import json

    from report_ceiling import answer, section_ceiling

    runs = _four_runs("digits_dit") + _four_runs("digits")
    d = {"machine": {"cpu_count": 2, "torch": "x", "torch_threads": 1, "note": "n"}, "variance_decomposition": {},
         "budget_policy_queries": {"digits_dit": 256, "digits": 256}, "runs": runs, "summary": cc.summarize(runs),
         "invocations": [{"tasks": ["digits_dit"], "reduction_vs_issue": "one core"}]}
    (tmp_path / "critic_ceiling.json").write_text(json.dumps(d))
    text = section_ceiling(tmp_path / "critic_ceiling.json")
    assert "### digits_dit (256 policy reward queries per run)" in text
    assert "Reduced versus the issue (digits_dit): one core" in text
    dit = text.split("### digits_dit")[1]
    assert "of all (PPO, NFT and AWM all sample full trajectories of the same SDE step here). Baseline: awm" in dit
    assert "**`oracle_queries_ratio` = 0.75**, `learned_share_of_oracle_gain` = 0.50" in dit
    assert "| oracle_gae | 0.800 ± 0.000 (1 seeds) |" in dit
    assert "PPO family's baseline: grpo" in text.split("### digits_dit")[0]  # digits keeps its two families
    assert "- **digits_dit**: against awm (same sampler), a perfect critic (oracle GAE, its queries not counted) needs 0.75" \
        in answer(tmp_path)


def test_a_training_reward_that_ends_below_its_start_makes_queries_to_reach_uninformative(tmp_path):
    # t2i_sd3's training reward swings with the 8 prompts each epoch draws more than a run gains: GRPO's last three
    # epochs here (0.6, 0.5, 0.4) average below its first three (0.7, 0.8, 0.6), so everything "reaches" it at once
    import json

    from report_ceiling import answer, section_ceiling

    runs = [_run("t2i_sd3", "grpo", [0.7, 0.8, 0.6, 0.6, 0.5, 0.4], 0.62),
            _run("t2i_sd3", "oracle_gae", [0.7, 0.8, 0.6, 0.6, 0.5, 0.5], 0.61)]
    s = cc.summarize(runs)["t2i_sd3"]
    assert abs(s["best_critic_free_final_train_reward"] - 0.5) < 1e-12
    assert abs(s["best_critic_free_first3_train_reward"] - 0.7) < 1e-12 and s["queries_to_reach_informative"] is False
    # by hand: gain 0.5 − 0.7; successive differences 0.1, −0.2, 0, −0.1, −0.1 have std √0.0104, so the swing is
    # √0.0104 / √2 and one run's standard error of a difference of two 3-epoch means swing·√(2/3)
    swing = 0.0104 ** 0.5 / 2 ** 0.5
    assert abs(s["best_critic_free_train_gain"] + 0.2) < 1e-12 and abs(s["train_reward_epoch_swing"] - swing) < 1e-12
    assert abs(s["train_gain_z"] - (-0.2 / (swing * (2 / 3) ** 0.5))) < 1e-9
    assert s["oracle_queries_ratio"] == 64 / 384        # computed as on every task, and flagged
    d = {"machine": {"cpu_count": 2, "torch": "x", "torch_threads": 1, "note": "n"}, "variance_decomposition": {},
         "budget_policy_queries": {"t2i_sd3": 384}, "runs": runs, "summary": cc.summarize(runs), "invocations": []}
    (tmp_path / "critic_ceiling.json").write_text(json.dumps(d))
    assert "**Here queries to reach say nothing**: grpo's training reward changes by -0.200 from its first three " \
           "epochs' (0.700) to its last three's" in section_ceiling(tmp_path / "critic_ceiling.json")
    assert "queries to reach not measurable" in answer(tmp_path) and "room for a critic" not in answer(tmp_path)


def test_a_gain_within_the_epoch_swing_is_uninformative_and_a_clear_one_is_not():
    # final above the start, but by less than 2 standard errors of the swing: 0.5, 0.7, ... gains 0.0667 against a
    # swing of 0.139 (z ≈ 0.59); a steady climb is informative
    zigzag = cc.summarize([_run("t2i_sd3", "grpo", [0.5, 0.7, 0.5, 0.7, 0.5, 0.7], 0.6)])["t2i_sd3"]
    assert zigzag["best_critic_free_train_gain"] > 0 and zigzag["queries_to_reach_informative"] is False
    assert abs(zigzag["train_gain_z"] - (0.2 / 3) / (0.0384 ** 0.5 / 2 ** 0.5 * (2 / 3) ** 0.5)) < 1e-9
    climb = cc.summarize([_run("t2i_sd3", "grpo", [0.50, 0.52, 0.55, 0.56, 0.60, 0.61, 0.65, 0.66], 0.7)])["t2i_sd3"]
    assert climb["queries_to_reach_informative"] is True and climb["train_gain_z"] > 2


def test_without_any_swing_only_a_rise_is_informative():
    # successive differences all equal: the swing is 0, so the gain's sign alone decides (a steady fall once read
    # z = +inf, i.e. "informative")
    def z(curve):
        s = cc.summarize([_run("t2i_sd3", "grpo", curve, 0.6)])["t2i_sd3"]
        assert s["train_reward_epoch_swing"] == 0
        return s["train_gain_z"], s["queries_to_reach_informative"]

    assert z([0.75, 0.625, 0.5, 0.375, 0.25, 0.125]) == (float("-inf"), False)  # binary fractions: exact
    assert z([0.5] * 6) == (0.0, False)
    assert z([0.125, 0.25, 0.375, 0.5, 0.625, 0.75]) == (float("inf"), True)
