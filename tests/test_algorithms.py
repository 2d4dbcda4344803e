"""The forward-process algorithms (critic_align/algorithms/): DiffusionNFT and advantage-weighted matching.

Their losses against hand-computed values, NFT's ratio-free invariants, AWM's advantage weighting, the output
parameterisations, micro-batch accumulation, and 2-epoch runs on a tiny flow-matching DiT that change only the
trained weights and resume exactly."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

from critic_align.algorithms.awm import awm_loss, critic_advantages, matching_log_prob
from critic_align.algorithms.base import OutputParam
from critic_align.algorithms.nft import nft_loss, optimality
from critic_align.backbones import DiTAdapter
from critic_align.checkpoint import latest_checkpoint
from critic_align.config import PPOConfig, not_applicable
from critic_align.rewards import FunctionReward, MultiReward
from critic_align.steps import FlowMatchSchedule, NoiseSchedule
from critic_align.trainer import Trainer
from critic_align.value_data import ForwardProcess
from tests.test_dit import tiny_dit
from tests.test_trainer import TinyTask, brightness_matches_label, make_trainer, perturb_lora


# ---------------------------------------------------------------------------------------------------------------
# NFT
def test_nft_loss_matches_hand_computed_value():
    # one row, two dims; flow matching at σ = 0.5: x̂_0 = x_t − 0.5·v
    out, old = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0]])
    x_t, x0 = torch.tensor([[1.0, 1.0]]), torch.tensor([[0.0, 1.0]])
    a, b = torch.ones(1, 1), torch.full((1, 1), -0.5)
    loss, st = nft_loss(out, old, x_t, x0, a, b, torch.tensor([0.75]), beta=0.5, scale=2.0)
    # v+ = [0.5, 0], x̂0+ = [0.75, 1], err [0.75, 0], w = 0.375, L+ = (0.5625/2)/0.375 = 0.75
    # v- = [-0.5, 0], x̂0- = [1.25, 1], err [1.25, 0], w = 0.625, L- = (1.5625/2)/0.625 = 1.25
    # (0.75·0.75 + 0.25·1.25)/0.5 · 2 = 3.5
    assert st["nft_positive_loss"] == pytest.approx(0.75) and st["nft_negative_loss"] == pytest.approx(1.25)
    assert loss.item() == pytest.approx(3.5)


@pytest.mark.parametrize("beta", [1.0, 0.1, 1e-3])
def test_nft_at_the_old_policy_both_fields_are_the_old_one(beta):
    g = torch.Generator().manual_seed(0)
    old, x_t, x0 = (torch.randn(4, 1, 3, 3, generator=g) for _ in range(3))
    a, b = torch.ones(4, 1, 1, 1), -torch.rand(4, 1, 1, 1, generator=g)
    out = old.clone().requires_grad_(True)
    r = torch.tensor([0.0, 0.5, 1.0, 0.25])
    loss, st = nft_loss(out, old, x_t, x0, a, b, r, beta, 1.0)
    # v+ = v- = v_old when v_θ = v_old, for every β: the two losses coincide row by row
    assert st["nft_positive_loss"] == pytest.approx(st["nft_negative_loss"], rel=1e-6)
    assert st["old_deviate"] == 0.0
    loss.backward()
    # ratio-free: the gradient there is (2r − 1)·(the plain x̂0 loss's gradient), independent of β; zero at r = 1/2
    x = x0.clone()
    ref_out = old.clone().requires_grad_(True)
    x0_hat = a * x_t + b * ref_out
    w = (x0_hat - x).abs().mean(dim=(1, 2, 3), keepdim=True)
    plain = (((x0_hat - x) ** 2 / w.detach()).mean(dim=(1, 2, 3)) * (2 * r - 1)).mean()
    plain.backward()
    torch.testing.assert_close(out.grad, ref_out.grad, rtol=1e-5, atol=1e-7)
    assert out.grad[1].abs().max() < 1e-8 < out.grad[0].abs().max()


def test_optimality_maps_clipped_advantages_to_unit_interval():
    r = optimality(torch.tensor([0.0, 5.0, -5.0, 2.5, 9.0, -9.0]), 5.0)
    torch.testing.assert_close(r, torch.tensor([0.5, 1.0, 0.0, 0.75, 1.0, 0.0]))


# ---------------------------------------------------------------------------------------------------------------
# AWM
def test_awm_on_policy_gradient_is_the_advantage_weighted_matching_loss():
    g = torch.Generator().manual_seed(1)
    old, target = torch.randn(5, 2, 3, generator=g), torch.randn(5, 2, 3, generator=g)
    adv = torch.tensor([2.0, -1.0, 0.0, 0.5, -3.0])
    out = old.clone().requires_grad_(True)
    loss, st = awm_loss(out, old, target, adv, clip_range=1e-4)
    assert st["ratio_max"] == pytest.approx(1.0) and st["clip_fraction"] == 0.0
    # hand value: ratio 1, loss = −mean(A)
    assert loss.item() == pytest.approx(-adv.mean().item())
    loss.backward()
    ref = old.clone().requires_grad_(True)
    (adv * ((ref - target) ** 2).mean(dim=(1, 2))).mean().backward()
    torch.testing.assert_close(out.grad, ref.grad)
    assert out.grad[2].abs().max() == 0  # a zero advantage trains nothing


def test_matching_log_prob_and_critic_advantages_hand_values():
    out, target = torch.tensor([[1.0, 3.0]]), torch.tensor([[0.0, 1.0]])
    assert matching_log_prob(out, target).item() == pytest.approx(-2.5)  # −(1 + 4)/2
    v = torch.tensor([[0.5], [1.0], [2.0]])
    r = torch.tensor([[1.5], [1.0], [1.0]])
    adv = critic_advantages(v, r, torch.tensor([2.0]), clip=5.0)
    raw = torch.tensor([2.0, 0.0, -2.0])  # w·(R − V)
    torch.testing.assert_close(adv, raw / raw.std())
    # a NaN (absent) reward contributes nothing
    adv2 = critic_advantages(torch.zeros(2, 2), torch.tensor([[1.0, float("nan")], [-1.0, 2.0]]),
                             torch.ones(2), clip=100.0)
    raw2 = torch.tensor([1.0, 1.0])
    assert torch.isfinite(adv2).all() and adv2[0] == adv2[1] and raw2.std() == 0


# ---------------------------------------------------------------------------------------------------------------
# parameterisations
@pytest.mark.parametrize("kind", ["flow", "epsilon", "v_prediction", "sample"])
def test_output_param_target_recovers_x0_through_the_forward_process(kind):
    if kind == "flow":
        sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
        schedule = FlowMatchSchedule.from_scheduler(sched)
    else:
        sched = DDPMScheduler(num_train_timesteps=100, timestep_spacing="trailing", prediction_type=kind)
        schedule = NoiseSchedule.from_scheduler(sched)
    fp = ForwardProcess(schedule if kind == "flow" else sched, 4)
    t = (schedule.timesteps(4))[torch.tensor([0, 1, 2, 3])]
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 1, 2, 2, generator=g), torch.randn(4, 1, 2, 2, generator=g)
    x_t = fp(x0, noise, t)
    p = OutputParam(schedule)
    assert p.kind == kind
    a, b = p.x0_coefs(t, x0)
    torch.testing.assert_close(a * x_t + b * p.target(x0, noise, t), x0, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# trainer integration on a tiny flow-matching DiT
def dit_trainer(path, **overrides):
    cfg = dict(num_epochs=2, batch_size=8, group_size=4, num_inference_steps=4, minibatch_size=16,
               sde_noise_level=0.7, value_pretrain_epochs=1, value_pretrain_passes=1, output_dir=str(path / "run"),
               progress=False, log_tensorboard=False, grid_every=0, checkpoint_every=1, lora_rank=2,
               critic_lora_rank=2, value_head_hidden=16, value_head_heads=2, clip_range=0.2, learning_rate=1e-3,
               lora_target_modules=("to_q", "to_k", "to_v", "to_out.0"))
    cfg.update(overrides)
    cfg = {k: v for k, v in cfg.items() if k in overrides or k not in not_applicable(cfg)}
    rewards = MultiReward([FunctionReward(brightness_matches_label, name="bright", differentiable=True)])
    return Trainer(PPOConfig(**cfg), TinyTask(), DiTAdapter(tiny_dit()), FlowMatchEulerDiscreteScheduler(shift=3.0),
                   rewards)


ALGOS = {"nft": dict(algorithm="nft", advantage="grpo", nft_beta=0.5),
         "awm": dict(algorithm="awm", advantage="grpo"),
         "awm_critic": dict(algorithm="awm", advantage="gae", awm_advantage="critic"),
         "nft_critic": dict(algorithm="nft", advantage="gae", nft_advantage="critic", nft_beta=0.5)}


def _grads(path, algo, accumulation):
    tr = dit_trainer(path / f"acc{accumulation}", gradient_accumulation_steps=accumulation, minibatch_size=32,
                     **ALGOS[algo])
    perturb_lora(tr)
    torch.manual_seed(0)
    ro = tr.compute_advantages(tr.rollout(tr.prompt_iter.batch(2, 4)))
    perturb_lora(tr, seed=3)  # the trained policy differs from the sampling one: v_θ ≠ v_old, ratio ≠ 1
    rows, loss_fn = tr.algorithm.prepare(tr.context(ro.batch_size), ro)[:2]
    idx = torch.arange(len(rows))[:32]
    tr.optimizer.zero_grad()
    micro = 32 // accumulation
    for j in range(0, 32, micro):
        part = idx[j:j + micro]
        loss, _ = loss_fn(part)
        (loss * (len(part) / len(idx))).backward()
    return {n: p.grad.clone() for n, p in tr.adapter.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("algo", ["nft", "awm"])
def test_micro_batch_accumulation_equals_full_batch(tmp_path, algo):
    full, acc = _grads(tmp_path, algo, 1), _grads(tmp_path, algo, 4)
    assert full.keys() == acc.keys() and any(".policy." in k for k in full)
    for k in full:
        assert full[k].abs().max() > 0 or ".policy." not in k
        torch.testing.assert_close(acc[k], full[k], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("algo", sorted(ALGOS))
def test_two_epochs_change_only_the_trained_weights_and_resume_exactly(tmp_path, algo):
    straight = dit_trainer(tmp_path / "a", num_epochs=2, **ALGOS[algo])
    base = {k: v.clone() for k, v in straight.adapter.model.state_dict().items() if "lora" not in k}
    policy0 = [p.clone() for p in straight.adapters.parameters("policy")]
    critic0 = None if straight.critic is None else [p.clone() for p in straight.critic_params]
    hist_a = straight.train()
    assert len(hist_a) == 2 and all("policy_loss" in h for h in hist_a)
    assert "ratio_mean" not in hist_a[0] or algo != "nft"
    assert any(not torch.equal(a, b) for a, b in zip(policy0, straight.adapters.parameters("policy")))
    for k, v in straight.adapter.model.state_dict().items():
        if k in base:
            assert torch.equal(v, base[k]), k  # the base model never moves
    if algo.endswith("_critic"):
        assert any(not torch.equal(a, b) for a, b in zip(critic0, straight.critic_params))
        assert "value_loss" in hist_a[0]
    else:
        assert straight.critic is None

    first = dit_trainer(tmp_path / "b", num_epochs=2, **ALGOS[algo])
    hist_b = first.train(num_epochs=1)
    ckpt = latest_checkpoint(tmp_path / "b" / "run" / "checkpoints")
    del first
    torch.manual_seed(12345)
    resumed = dit_trainer(tmp_path / "b", num_epochs=2, **ALGOS[algo])
    resumed.load(ckpt)
    hist_b += resumed.train()
    drop = {"time_rollout_s", "time_update_s", "time_epoch_s"}
    assert [{k: v for k, v in r.items() if k not in drop} for r in hist_a] == \
        [{k: v for k, v in r.items() if k not in drop} for r in hist_b]
    for (na, pa), (nb, pb) in zip(straight.adapter.model.named_parameters(), resumed.adapter.model.named_parameters()):
        assert na == nb and torch.equal(pa, pb), na


def test_nft_on_an_epsilon_unet_trains(tmp_path):
    tr = make_trainer(tmp_path, algorithm="nft", advantage="grpo", num_epochs=1, learning_rate=1e-3)
    assert OutputParam(tr.schedule).kind == "epsilon"
    before = [p.clone() for p in tr.adapters.parameters("policy")]
    hist = tr.train()
    assert torch.isfinite(torch.tensor(hist[0]["policy_loss"]))
    assert any(not torch.equal(a, b) for a, b in zip(before, tr.adapters.parameters("policy")))


@pytest.mark.parametrize("overrides, match", [
    (dict(algorithm="dpo"), "algorithm"),
    (dict(algorithm="nft", advantage="gae"), "advantage: grpo"),
    (dict(algorithm="awm", advantage="gae"), "awm_advantage: grpo needs advantage: grpo or ddpo"),
    (dict(algorithm="awm", advantage="grpo", awm_advantage="critic"), "needs advantage: gae"),
    (dict(awm_advantage="value"), "awm_advantage"),
    (dict(algorithm="nft", advantage="grpo", nft_advantage="critic"), "nft_advantage: critic needs advantage: gae"),
    (dict(nft_advantage="value"), "nft_advantage='value': use 'grpo' or 'critic'"),
    (dict(nft_beta=0.0), "nft_beta"),
])
def test_algorithm_config_errors_name_the_field(overrides, match):
    with pytest.raises(ValueError, match=match):
        PPOConfig(**overrides)


@pytest.mark.parametrize("name, algorithm", [("digits_dit_nft", "nft"), ("digits_dit_awm", "awm")])
def test_shipped_configs_select_the_algorithm(name, algorithm):
    from critic_align.train.registry import load_run_config

    run = load_run_config(name, {})
    assert run["ppo"].algorithm == algorithm and run["task"] == "digits_dit"


def test_baselines_summary_finds_the_best_baseline_and_the_queries_to_reach_it():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from benchmarks.baselines import summarize

    def run(method, seed, final, rewards):
        curve = [{"reward_queries": 10 * (i + 1), "reward": r} for i, r in enumerate(rewards)]
        return {"task": "t", "method": method, "seed": seed, "final_reward": final, "base_reward": 0.0,
                "reward_queries": 10 * len(rewards), "curve": curve}

    runs = [run("grpo", 0, 0.5, [0.1, 0.2, 0.3, 0.4]), run("nft", 0, 0.7, [0.1, 0.4, 0.6, 0.8]),
            run("gae", 0, 0.9, [0.6, 0.6, 0.6, 0.9])]
    s = summarize(runs)["t"]
    assert s["best_baseline"]["method"] == "nft"
    # nft's last-3 training reward (0.4 + 0.6 + 0.8) / 3 = 0.6; gae's 3-epoch moving average reaches it at once
    assert s["best_baseline"]["final_train_reward"] == pytest.approx(0.6)
    assert s["gae"]["queries_to_reach_best_baseline"] == [10.0]
    assert s["gae"]["queries_fraction_of_best_baseline_budget"] == pytest.approx(0.25)
    assert s["grpo"]["queries_to_reach_best_baseline"] == [None]
    assert s["grpo"]["final_reward_mean"] == 0.5 and s["grpo"]["final_reward_std"] == 0.0

    # a diverged run has no final reward: its method's mean is over the others, the seed is listed, and a method
    # whose every seed diverged cannot be the best baseline
    awm = run("awm", 0, None, [0.9, 0.95])
    awm["diverged"] = {"epoch": 3, "reward_queries": 20, "error": "nan"}
    s = summarize(runs + [awm, {**run("grpo", 1, 0.7, [0.1, 0.2, 0.3, 0.4]), "diverged": {"epoch": 5}}])["t"]
    assert s["awm"]["final_reward_mean"] is None and s["awm"]["diverged_seeds"] == [0]
    assert s["best_baseline"]["method"] == "nft"
    assert s["grpo"]["final_reward_mean"] == 0.5 and s["grpo"]["diverged_seeds"] == [1]


def test_baselines_merge_combines_parts_and_refuses_other_settings(tmp_path):
    import argparse
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from benchmarks.baselines import _result, main

    def part(path, runs, budget_gmm=2560):
        args = argparse.Namespace(
            tasks=["gmm"], methods=["grpo", "gae"], seeds=[0], budget_digits=1920, budget_gmm=budget_gmm,
            digits_set=[], gmm_batch=64, gmm_value_pretrain=10, gmm_kl=2.0, gmm_kl_forward=1.0, n_eval=2000,
            out=str(path), resume=False, merge=None)
        path.write_text(json.dumps(_result(args, {}, runs)))

    def run(method, seed, final):
        return {"task": "gmm", "method": method, "seed": seed, "final_reward": final, "base_reward": 0.0,
                "reward_queries": 20, "seconds": 5.0, "curve": [{"reward_queries": 10, "reward": final},
                                                                 {"reward_queries": 20, "reward": final}]}

    part(tmp_path / "a.json", [run("grpo", 0, 0.5), run("gae", 0, 0.4)])
    part(tmp_path / "b.json", [run("grpo", 1, 0.7), run("gae", 1, 0.6)])
    merged = main(["--merge", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out", str(tmp_path / "m.json")])
    s = merged["summary"]["gmm"]
    assert s["grpo"]["seeds"] == [0, 1] and s["grpo"]["final_reward_mean"] == pytest.approx(0.6)
    assert merged["args"]["seeds"] == [0, 1] and merged["time_s"] == pytest.approx(20.0)
    assert json.loads((tmp_path / "m.json").read_text())["summary"] == json.loads(json.dumps(merged["summary"]))
    # a part run with another budget is not comparable: refused, naming the setting
    part(tmp_path / "c.json", [run("grpo", 2, 0.9)], budget_gmm=320)
    with pytest.raises(SystemExit, match="budget_gmm"):
        main(["--merge", str(tmp_path / "a.json"), str(tmp_path / "c.json"), "--out", str(tmp_path / "n.json")])
    # the same run twice is refused too
    with pytest.raises(SystemExit, match="two files"):
        main(["--merge", str(tmp_path / "a.json"), str(tmp_path / "a.json"), "--out", str(tmp_path / "n.json")])


@pytest.mark.parametrize("name", ["digits_dit_nft", "digits_dit_awm"])
def test_shipped_digits_dit_trains_with_the_new_algorithms(tmp_path, name):
    from critic_align.api import build_trainer
    from critic_align.train.registry import load_run_config

    run = load_run_config(name, dict(output_dir=str(tmp_path / "r"), num_epochs=1, batch_size=8, group_size=4,
                                     num_inference_steps=4, minibatch_size=16, progress=False, eval_every=0,
                                     grid_every=0, log_tensorboard=False))
    tr = build_trainer(run)
    assert OutputParam(tr.schedule).kind == "flow"  # the shipped DiT is a velocity-predicting rectified flow
    model = tr.adapter.model
    base = {k: v.clone() for k, v in model.state_dict().items() if "lora" not in k}
    before = [p.clone() for p in tr.adapters.parameters("policy")]
    hist = tr.train()
    assert len(hist) == 1 and torch.isfinite(torch.tensor(hist[0]["policy_loss"]))
    assert any(not torch.equal(a, b) for a, b in zip(before, tr.adapters.parameters("policy")))
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items() if k in base)


def test_nft_critic_weights_rows_by_the_critics_advantage_at_the_noised_state(tmp_path, monkeypatch):
    """nft_advantage: critic: each row's optimality r = optimality(A) with A = (R − V(x_t, t)) / std over rows, V the
    critic at that row's forward-noised state (a reference computed row by row)."""
    import critic_align.algorithms.nft as nft_module

    tr = dit_trainer(tmp_path, **ALGOS["nft_critic"])
    perturb_lora(tr, name="critic", seed=5)  # a critic whose values differ between states
    ro = tr.compute_advantages(tr.rollout(tr.prompt_iter.batch(2, 4)))
    captured = {}

    def spy(out, old, x_t, x0, a, b, r, beta, scale):
        captured["r"] = r
        return nft_loss(out, old, x_t, x0, a, b, r, beta, scale)

    monkeypatch.setattr(nft_module, "nft_loss", spy)
    rows, loss_fn = tr.algorithm.prepare(tr.context(ro.batch_size), ro)
    loss_fn(torch.arange(len(rows)))
    with torch.no_grad():
        v = torch.stack([tr.models.values(rows.x_t[i:i + 1], rows.t[i:i + 1],
                                          None if ro.cond is None else ro.cond[rows.traj[i:i + 1]])[0, 0]
                         for i in range(len(rows))])
    d = ro.rewards[rows.traj, 0].float() - v.float()
    clip = tr.config.adv_clip_max
    ref = optimality((d / (d.std() + 1e-8)).clamp(-clip, clip), clip)
    torch.testing.assert_close(captured["r"], ref, rtol=1e-4, atol=1e-5)
    same_traj = rows.traj == rows.traj[0]
    assert same_traj.sum() > 1 and ref[same_traj].std() > 0  # one trajectory's rows differ: a per-timestep weight
