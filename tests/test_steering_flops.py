"""FLOP-matched steering rows (benchmarks/steering_table.py --flops-matched): the particle counts, the pair's FLOP
ratios and the verdict against FK's x0-reward SMC, from a hand-made FLOP table and hand-made per-prompt rewards."""

import json
import math

import pytest
from steering_table import equal_flops_verdict, flops_matched_plan, whole_sample_flop_ratio

FLOPS = {
    # FK 10 GFLOPs per particle-step, critic SMC 4, critic guidance 6, plain sampling 3; decode 5 + reward 1
    "cheap_critic": {"gflops": {"vae_decode": 5.0, "reward_model": 1.0},
                     "per_particle_step_gflops": {"fk_x0_reward_smc": 10.0, "critic_smc": 4.0, "critic_guidance": 6.0,
                                                  "plain_sampling": 3.0}},
    # a critic that costs more per step than FK's decode + reward: at N = 2 guidance does not fit at all
    "dear_critic": {"gflops": {"vae_decode": 5.0, "reward_model": 1.0},
                    "per_particle_step_gflops": {"fk_x0_reward_smc": 10.0, "critic_smc": 12.0, "critic_guidance": 25.0,
                                                 "plain_sampling": 3.0}},
}


def test_matched_counts_and_ratios_by_hand():
    plan = flops_matched_plan(FLOPS, [2, 4], ["cheap_critic", "dear_critic"])
    got = {s: {n: {m: v["particles"] for m, v in by_m.items()} for n, by_m in by_n.items()} for s, by_n in plan.items()}
    assert got == {"cheap_critic": {2: {"smc": 5, "guidance+bon": 3, "bon": 6}, 4: {"smc": 10, "guidance+bon": 6, "bon": 13}},
                   "dear_critic": {2: {"smc": 1, "guidance+bon": 0, "bon": 6}, 4: {"smc": 3, "guidance+bon": 1, "bon": 13}}}
    c = plan["cheap_critic"]
    assert c[2]["smc"]["flop_ratio_per_step"] == pytest.approx(20 / 20)
    assert c[2]["guidance+bon"]["flop_ratio_per_step"] == pytest.approx(18 / 20)
    assert c[4]["bon"]["flop_ratio_per_step"] == pytest.approx(39 / 40)
    assert plan["dear_critic"][4]["smc"]["flop_ratio_per_step"] == pytest.approx(36 / 40)
    near = flops_matched_plan(FLOPS, [4], ["cheap_critic"], rounding="nearest")["cheap_critic"][4]
    assert near["guidance+bon"]["particles"] == 7 and near["guidance+bon"]["flop_ratio_per_step"] == pytest.approx(42 / 40)
    # matched on whole samples of T = 10 steps: FK 4·(10·10 + 6) = 424 GFLOPs; SMC 46 a particle → 9, guidance 66
    # → 6, plain 36 → 11
    whole = flops_matched_plan(FLOPS, [4], ["cheap_critic"], rounding="sample_floor", steps=10)["cheap_critic"][4]
    assert {m: v["particles"] for m, v in whole.items()} == {"smc": 9, "guidance+bon": 6, "bon": 11}
    assert whole["smc"]["flop_ratio_per_step"] == pytest.approx(36 / 40)
    with pytest.raises(ValueError, match="steps"):
        flops_matched_plan(FLOPS, [4], ["cheap_critic"], rounding="sample_floor")
    # whole sample of T = 10 steps: 3 guided particles (10·6 + 6) against 2 FK particles (10·10 + 6)
    assert whole_sample_flop_ratio(FLOPS, "cheap_critic", "guidance+bon", 3, 2, 10) == pytest.approx(3 * 66 / (2 * 106))


def test_unknown_scale_is_named():
    with pytest.raises(ValueError, match="sd99"):
        flops_matched_plan(FLOPS, [2], ["sd99"])


def test_verdict_pairs_prompts_and_takes_each_methods_best_lambda():
    plan = flops_matched_plan(FLOPS, [2], ["cheap_critic", "dear_critic"])

    def row(method, n, per_prompt, **kw):
        return {"method": method, "particles": n, **kw, "reward": sum(per_prompt) / len(per_prompt),
                "per_prompt": per_prompt}

    rows = [row("smc_x0", 2, [0.5, 0.6, 0.7], lam=10.0), row("smc_x0", 2, [0.6, 0.7, 0.8], lam=30.0),  # FK: λ=30, 0.7
            row("smc", 5, [0.6, 0.8, 0.7], lam=10.0), row("smc", 5, [0.1, 0.1, 0.1], lam=30.0),
            row("guidance+bon", 3, [0.5, 0.6, 0.7], scale=30.0), row("bon", 6, [0.9, 0.9, 0.9]),
            row("smc", 1, [0.4, 0.5, 0.6], lam=10.0)]
    v = equal_flops_verdict(plan, rows, FLOPS, steps=10)
    e = v["cheap_critic"]["2"]
    assert e["fk_reward"] == pytest.approx(0.7) and e["fk_lam"] == 30.0
    assert e["best_critic_method"] == "smc" and e["best_critic_particles"] == 5 and e["smc"]["lam"] == 10.0
    # paired differences 0, +0.1, −0.1: mean 0, sample std 0.1, s.e. 0.1/√3
    assert e["difference"] == pytest.approx(0.0, abs=1e-12) and e["se"] == pytest.approx(0.1 / math.sqrt(3))
    assert e["ties_or_beats"] is True
    assert e["guidance+bon"]["difference"] == pytest.approx(-0.1) and e["guidance+bon"]["ties_or_beats"] is False
    assert e["bon"]["difference"] == pytest.approx(0.2) and e["bon"]["flop_ratio_per_step"] == pytest.approx(0.9)
    d = v["dear_critic"]["2"]  # guidance does not fit (N' = 0), SMC cannot resample at N' = 1: no critic row
    assert "costs more" in d["guidance+bon"]["not_run"] and "at least 2" in d["smc"]["not_run"]
    assert d["best_critic_method"] is None and d["ties_or_beats"] is False and d["critic_smc_reward"] is None
    assert d["bon"]["particles"] == 6 and d["bon"]["difference"] == pytest.approx(0.2)
    rows.append(row("guidance+bon", 1, [0.6, 0.8, 0.9], scale=30.0))  # at N = 4 guidance fits with 1 particle
    rows += [row("smc_x0", 4, [0.7, 0.8, 0.9], lam=30.0), row("smc", 3, [0.75, 0.7, 0.9], lam=10.0),
             row("bon", 13, [0.9, 0.9, 0.9]), row("smc", 10, [0.9, 0.9, 0.9], lam=10.0),
             row("guidance+bon", 6, [0.9, 0.9, 0.9], scale=30.0)]
    d4 = equal_flops_verdict(flops_matched_plan(FLOPS, [4], ["dear_critic"]), rows, FLOPS, steps=10)["dear_critic"]["4"]
    assert d4["best_critic_method"] == "smc" and d4["critic_smc_particles"] == 3
    # paired differences (+0.05, −0.1, 0): mean −0.05/3, sample std √(Σ(d − mean)²/2), s.e. that over √3
    m = -0.05 / 3
    se = math.sqrt(((0.05 - m) ** 2 + (-0.1 - m) ** 2 + m ** 2) / 2) / math.sqrt(3)
    assert d4["difference"] == pytest.approx(m) and d4["se"] == pytest.approx(se) and se > 0.04
    assert d4["ties_or_beats"] is True and d4["smc"]["flop_ratio_per_step"] == pytest.approx(36 / 40)


def test_critic_cache_key(tmp_path):
    from steering_table import critic_cache_mismatch

    from critic_align.api import write_run_dir
    from critic_align.train.registry import load_run_config

    # what build_steering_trainer writes for a fresh critic of the t2i config, pretrained for 20 batches
    write_run_dir(tmp_path, load_run_config("t2i", {"value_pretrain_epochs": 20, "sde_window_size": 0,
                                                    "sde_window_range": None, "critic_x0_reward": False,
                                                    "output_dir": str(tmp_path)}))
    assert critic_cache_mismatch(tmp_path, "t2i", 20, False) is None
    assert "20 batches" in critic_cache_mismatch(tmp_path, "t2i", 5, False)
    assert "critic_x0_reward" in critic_cache_mismatch(tmp_path, "t2i", 20, True)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(cfg | {"critic_learning_rate": cfg["critic_learning_rate"] * 2}))
    assert "critic_learning_rate" in critic_cache_mismatch(tmp_path, "t2i", 20, False)
    assert "digits" in critic_cache_mismatch(tmp_path, "digits", 20, False)


def test_the_grafted_critic_is_priced_by_its_own_rows():
    """--critic-body grafted: critic SMC and guidance are priced by the table's grafted rows (its forward adds a
    decode and the reward network's later layers), FK and best-of-N as before; a table without them is refused."""
    from steering_table import price_of

    grafted = {"gflops": {"vae_decode": 5.0, "reward_model": 1.0},
               "per_particle_step_gflops": {**FLOPS["cheap_critic"]["per_particle_step_gflops"], "grafted_smc": 20.0,
                                            "grafted_guidance": 45.0}}
    plan = flops_matched_plan({"s": grafted}, [4], ["s"], prices=price_of("grafted"))["s"][4]
    # FK 4 × 10 = 40 GFLOPs a step: grafted SMC 20 → 2 particles, grafted guidance 45 → 0, plain 3 → 13
    assert {m: v["particles"] for m, v in plan.items()} == {"smc": 2, "guidance+bon": 0, "bon": 13}
    assert plan["smc"]["flop_ratio_per_step"] == pytest.approx(40 / 40)
    assert price_of("head")["smc"] == "critic_smc"
    with pytest.raises(ValueError, match="grafted_smc"):
        flops_matched_plan(FLOPS, [4], ["cheap_critic"], prices=price_of("grafted"))
