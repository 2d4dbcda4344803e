"""Around the engine (issue 31): `sample --run` on any task, export-lora's model card and hub push, trackers,
HPSv2.1, prompt metadata.  One tiny t2i run (the shipped tiny SD1.5 pipeline, 2 epochs) serves the CLI tests."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from PIL import Image

from tests.test_t2i import tiny_train_argv


@pytest.fixture(scope="module")
def t2i_run(tmp_path_factory):
    from critic_align.train.cli import main

    run_dir = tmp_path_factory.mktemp("eco") / "run"
    assert main(tiny_train_argv("t2i", run_dir)) == 0
    return run_dir


def test_sample_run_draws_the_prompts_of_the_command_line_with_the_runs_sampler(t2i_run, tmp_path):
    """`critic-align sample --run RUN --prompt ... --n 3 --seed 5`: one labelled row per prompt, the pixels the run's
    trainer (rebuilt from the run directory, its checkpoint loaded) draws from that seed with its policy."""
    from critic_align.api import build_trainer, load_run_dir
    from critic_align.checkpoint import latest_checkpoint
    from critic_align.train.cli import main
    from critic_align.viz import make_grid

    prompts = ["a red 3 left of a blue 7", "two green 5s"]
    argv = ["sample", "--run", str(t2i_run), "--n", "3", "--seed", "5"]
    for p in prompts:
        argv += ["--prompt", p]
    assert main(argv) == 0
    grid = np.asarray(Image.open(t2i_run / "samples.png").convert("RGB"))

    trainer = build_trainer(load_run_dir(t2i_run))
    trainer.load(latest_checkpoint(t2i_run / "checkpoints"), resume=False)
    rows = [p for p in prompts for _ in range(3)]
    policy = make_grid(trainer.sample(rows, seed=5), nrow=3, scale=trainer.task.grid_scale)
    base = make_grid(trainer.sample(rows, seed=5, use_policy=False), nrow=3, scale=trainer.task.grid_scale)
    assert grid.shape[0] == policy.shape[0] and grid.shape[1] > policy.shape[1] + 60  # room for the prompts' labels
    cells = grid[:, -policy.shape[1]:]
    np.testing.assert_array_equal(cells, policy)
    assert np.abs(cells.astype(int) - base.astype(int)).max() > 0  # the trained policy, not the base model
    label = grid[:, : grid.shape[1] - policy.shape[1]]
    assert (label < 128).any(axis=-1).sum() > 50  # the prompts are written there (dark text on white)

    other = tmp_path / "other.png"  # another seed, another grid; --out puts it elsewhere
    assert main(["sample", "--run", str(t2i_run), "--prompt", prompts[0], "--n", "2", "--seed", "6",
                 "--out", str(other)]) == 0
    assert 0 < np.asarray(Image.open(other)).shape[0] < grid.shape[0]  # one row


def test_sample_run_refuses_bad_prompts_before_loading(t2i_run, tmp_path, capsys):
    from critic_align.train.cli import cli

    assert cli(["sample", "--run", str(t2i_run), "--prompt", "  "]) == 2
    assert "--prompt is empty" in capsys.readouterr().err
    assert cli(["sample", "--prompt", "a cat"]) == 2
    assert "--prompt needs --run" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------
# export-lora: the model card and the hub push
def test_export_lora_writes_a_model_card_whose_metrics_are_the_runs(t2i_run, tmp_path):
    """README.md beside the LoRA: base model, rewards and weights, algorithm, steps, reward queries, the run's
    before/after metrics (= summary.json) and its grids; the LoRA loads with load_lora_weights and changes the UNet."""
    from diffusers import StableDiffusionPipeline

    from critic_align.publish import read_card_metrics
    from critic_align.train.cli import main
    from tests.test_t2i import _asset

    out = tmp_path / "lora"
    assert main(["export-lora", "--run", str(t2i_run), "--out", str(out)]) == 0
    card = (out / "README.md").read_text()
    summary = json.loads((t2i_run / "summary.json").read_text())
    metrics = read_card_metrics(out / "README.md")
    for k in ("eval/reward/composition", "eval/reward/composition_correct"):
        before, after = metrics[k]
        assert before == pytest.approx(summary[f"{k}_base"], abs=5e-5)
        assert after == pytest.approx(summary[f"{k}_final"], abs=5e-5)
    assert metrics["train/composition"] == pytest.approx((summary["composition_first_epoch"],
                                                          summary["composition_last_epoch"]), abs=5e-5)
    assert "| composition | 1.0 |" in card and "`composition_correct`" in card  # rewards, weights, eval rewards
    assert "advantage `gae`" in card and "2 epochs, 24 reward queries" in card
    assert "tiny_t2i" in card and "task `sd15`" in card and card.startswith("---\nlibrary_name: diffusers")
    assert "![policy (after training)](grid_after.png)" in card and (out / "grid_after.png").exists()

    pipe = StableDiffusionPipeline.from_pretrained(_asset(), local_files_only=True)
    x = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    text = pipe.encode_prompt("two green 5s", "cpu", 1, False)[0]
    with torch.no_grad():
        before = pipe.unet(x, 500, text).sample
        pipe.load_lora_weights(out)
        after = pipe.unet(x, 500, text).sample
    assert (after - before).abs().max() > 1e-4  # the LoRA reached the UNet


def test_export_lora_push_to_hub_with_the_client_mocked(t2i_run, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    from critic_align.train.cli import cli

    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("init", token))

        def create_repo(self, repo_id, **kw):
            calls.append(("create_repo", repo_id, kw))
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, **kw):
            calls.append(("upload_folder", kw["repo_id"], sorted(p.name for p in __import__("pathlib").Path(
                kw["folder_path"]).iterdir())))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    out = tmp_path / "lora"
    # no token: one clear line, before anything is written
    assert cli(["export-lora", "--run", str(t2i_run), "--out", str(out), "--push-to-hub", "me/lora"]) == 2
    err = capsys.readouterr().err
    assert "no Hugging Face token" in err and "huggingface-cli login" in err and not out.exists() and not calls
    assert cli(["export-lora", "--run", str(t2i_run), "--out", str(out), "--push-to-hub", "not a repo"]) == 2
    assert "owner/name" in capsys.readouterr().err and not out.exists()

    monkeypatch.setenv("HF_TOKEN", "hf_test")
    assert cli(["export-lora", "--run", str(t2i_run), "--out", str(out), "--push-to-hub", "me/lora", "--private"]) == 0
    assert calls[0] == ("init", "hf_test")
    assert calls[1] == ("create_repo", "me/lora", {"repo_type": "model", "private": True, "exist_ok": True})
    assert calls[2][:2] == ("upload_folder", "me/lora")
    assert {"README.md", "pytorch_lora_weights.safetensors", "grid_after.png"} <= set(calls[2][2])


def test_export_lora_accepts_task_flux():
    from critic_align.train.cli import build_parser

    args = build_parser().parse_args(["export-lora", "--run", "r", "--out", "o", "--task", "flux"])
    assert args.task == "flux"


# ------------------------------------------------------------------------------------------------------
# trackers
def wandb_offline_records(path):
    """The records of a W&B transaction log (``run-*.wandb``: a 7-byte header, then LevelDB-log framed protobuf
    records in 32 KiB blocks: crc32 (4), length (2), type (1: full, 2: first, 3: middle, 4: last), data)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf, out = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += block - pos % block
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            out.append(record)
    return out


def test_wandb_offline_run_holds_the_metrics_and_the_grids(tmp_path, monkeypatch):
    """log_with: [tensorboard, wandb] with WANDB_MODE=offline: the offline run directory (RUN/wandb/offline-run-*)
    holds every train row's metrics at step reward_queries and the before/after grids as images."""
    pytest.importorskip("wandb")
    from critic_align.train.cli import main

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    run_dir = tmp_path / "run"
    argv = tiny_train_argv("t2i", run_dir) + ["--set", "log_with=[tensorboard, wandb]", "--set", "log_tensorboard=true"]
    assert main(argv) == 0
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1
    logged = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in logged if r["phase"] == "train"]
    # W&B's service process writes the run file after finish() returns: read it until the last step is in (bounded)
    deadline = time.monotonic() + 60
    while True:
        records = wandb_offline_records(next(offline[0].glob("run-*.wandb")))
        history = [{(it.key or "/".join(it.nested_key)): json.loads(it.value_json) for it in r.history.item}
                   for r in records if r.WhichOneof("record_type") == "history"]
        by_step = {h["_step"]: h for h in history}
        if all(r["reward_queries"] in by_step for r in train) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert len(train) == 2
    for row in train:  # each train row's numbers, at its reward_queries
        h = by_step[row["reward_queries"]]
        for k in ("reward/composition/mean", "value_loss", "approx_kl"):
            assert h[f"train/{k}"] == pytest.approx(row[k], rel=1e-6, abs=1e-9)
    last_eval = [r for r in logged if r["phase"] == "eval"][-1]
    assert by_step[last_eval["reward_queries"]]["eval/reward/composition"] == pytest.approx(
        last_eval["eval/reward/composition"], rel=1e-6)
    config = [r for r in records if r.WhichOneof("record_type") == "config"]
    assert any(it.key == "num_epochs" and json.loads(it.value_json) in (2, {"value": 2})
               for r in config for it in r.config.update)
    # the grids: logged as images, their files in the offline run directory, equal to the PNGs of the run
    after = by_step[train[-1]["reward_queries"]]["grids/grid_after/filenames"]
    image = offline[0] / "files" / after[0]
    assert image.exists()
    np.testing.assert_array_equal(np.asarray(Image.open(image).convert("RGB")),
                                  np.asarray(Image.open(run_dir / "grid_after.png").convert("RGB")))
    assert any(h.get("grids/grid_before/_type") == "images/separated" for h in history)
    # TensorBoard got the grids too
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert {"grids/grid_before", "grids/grid_after"} <= set(events.Tags()["images"])


def test_unknown_or_missing_tracker_is_refused_before_any_model_loads(tmp_path, monkeypatch, capsys):
    import importlib.util

    from critic_align.config import PPOConfig
    from critic_align.train.cli import cli

    with pytest.raises(ValueError, match=r"config field log_with=\['tensorboard', 'wandbb'\]: unknown tracker 'wandbb' "
                       r"\(did you mean 'wandb'\?\); known trackers: \[.*'tensorboard'.*'wandb'"):
        PPOConfig(log_with=["tensorboard", "wandbb"])
    with pytest.raises(ValueError, match="config field log_with='wandb': must be a list of tracker names"):
        PPOConfig(log_with="wandb")
    with pytest.raises(ValueError, match="names a tracker twice"):
        PPOConfig(log_with=["wandb", "wandb"])
    out = tmp_path / "run"
    assert cli(["train", "--config", "t2i", "--out", str(out), "--set", "log_with=[tensorboard, wandbb]"]) == 2
    assert "unknown tracker 'wandbb'" in capsys.readouterr().err and not out.exists()

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    import critic_align.api as api

    def no_model(run):
        raise AssertionError("a model was built")

    monkeypatch.setattr(api, "build_trainer", no_model)
    assert cli(["train", "--config", "t2i", "--out", str(out), "--set", "log_with=[wandb]"]) == 2
    err = capsys.readouterr().err
    assert "needs the wandb package" in err and "pip install 'critic-align[wandb]'" in err and not out.exists()


# ------------------------------------------------------------------------------------------------------
# prompt metadata (JSONL prompt files, GenEval style)
def geneval_metadata(comp) -> dict:
    """GenEval's evaluation_metadata.jsonl layout for one of our compositions."""
    if comp.relation is None:
        (d, c), = comp.objects
        return {"tag": "counting" if comp.count > 1 else "single_object",
                "include": [{"class": str(d), "count": comp.count, "color": c}]}
    (d0, c0), (d1, c1) = comp.objects
    return {"tag": "position", "include": [{"class": str(d1), "count": 1, "color": c1},
                                           {"class": str(d0), "count": 1, "color": c0, "position": [comp.relation, 0]}]}


def test_jsonl_prompt_file_with_metadata_and_its_errors(tmp_path):
    from critic_align.prompts import read_prompt_file
    from critic_align.tasks.sd import read_prompts

    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "a red 3", "tag": "single_object"}\n\n{"prompt": " two blue 5s ", "n": 2}\n'
                 '{"prompt": "a red 3", "tag": "single_object"}\n')
    prompts, table = read_prompt_file(f)
    assert prompts == ["a red 3", "two blue 5s"] and read_prompts(f) == prompts
    assert table == {"a red 3": {"tag": "single_object"}, "two blue 5s": {"n": 2}}
    text = tmp_path / "p.txt"
    text.write_text("# c\na red 3\n\n")
    assert read_prompt_file(text) == (["a red 3"], None)  # plain lists keep working, without metadata
    for body, match in [('{"prompt": "a"}\n{"prompt": "b", }\n', r"p.jsonl:2: not valid JSON"),
                        ('{"prompt": "a"}\n\n["b"]\n', r"p.jsonl:3: each line needs a non-empty \"prompt\" string"),
                        ('{"text": "a"}\n', r"p.jsonl:1: each line needs"),
                        ('{"prompt": "a", "n": 1}\n{"prompt": "a", "n": 2}\n', r"p.jsonl:2: prompt 'a' is also on line 1"),
                        ("\n", "has no prompts")]:
        f.write_text(body)
        with pytest.raises(ValueError, match=match):
            read_prompt_file(f)


def test_composition_reads_geneval_metadata_instead_of_parsing():
    from critic_align.rewards import CompositionCorrect, CompositionScore
    from critic_align.tasks.composition import all_compositions, composition_from_metadata, parse_prompt

    comps = all_compositions()
    for comp in comps[::97]:  # count and relation prompts
        assert composition_from_metadata(geneval_metadata(comp)) == parse_prompt(comp.prompt()) == comp
    assert composition_from_metadata({"tag": "other"}) is None
    with pytest.raises(ValueError, match="position"):
        composition_from_metadata({"include": [{"class": "3", "color": "red"}, {"class": "4", "color": "red"}]})

    canonical = ["a red 3 left of a blue 7", "two green 5s"]
    free = ["a photo of a red three left of a blue seven", "2 green fives"]  # not our grammar: metadata says it
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    for cls in (CompositionScore, CompositionCorrect):
        plain, with_meta = cls(), cls()
        with_meta.set_prompt_metadata({f: geneval_metadata(parse_prompt(c)) for f, c in zip(free, canonical)})
        torch.testing.assert_close(with_meta(images, free), plain(images, canonical), rtol=0, atol=0)
        with pytest.raises(Exception, match="not a composition prompt"):
            plain(images, free)  # without metadata the free text is parsed, and refused


def test_remote_forwards_the_prompts_metadata(monkeypatch):
    from critic_align.rewards import MultiReward, RemoteReward

    sent = []

    def post(self, body):
        sent.append(json.loads(body))
        return json.dumps({"scores": [1.0] * len(sent[-1]["prompts"])}).encode()

    monkeypatch.setattr(RemoteReward, "_post", post)
    reward = RemoteReward("http://127.0.0.1:9/score")
    x = torch.zeros(2, 3, 4, 4)
    reward(x, ["a", "b"])
    assert "metadata" not in sent[-1]  # a text prompt file: the protocol is unchanged
    MultiReward([reward]).set_prompt_metadata({"a": {"tag": "counting", "include": [{"class": "cat", "count": 2}]}})
    reward(x, ["a", "b"])
    assert sent[-1]["metadata"] == [{"tag": "counting", "include": [{"class": "cat", "count": 2}]}, None]


def test_run_with_a_jsonl_prompt_file_hands_metadata_to_the_rewards(tmp_path, monkeypatch):
    import yaml

    import critic_align.tasks.sd
    from critic_align.api import build_trainer
    from critic_align.config_sections import ORDER, flat_fields, sectioned
    from critic_align.tasks.composition import parse_prompt
    from critic_align.train.registry import CONFIG_DIR, load_run_config

    canonical = ["a red 3 left of a blue 7", "two green 5s", "a blue 1"]
    free = ["red three, left of a blue seven", "two green fives", "one blue one"]
    prompts = tmp_path / "geneval.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f, **geneval_metadata(parse_prompt(c))}) + "\n"
                               for f, c in zip(free, canonical)))
    config = yaml.safe_load((CONFIG_DIR / "t2i.yaml").read_text())
    config.update(model_path=str((CONFIG_DIR / config["model_path"]).resolve()), prompts=str(prompts))
    flat = flat_fields({s: config.pop(s) for s in ORDER if s in config})
    flat.update(output_dir=str(tmp_path / "run"), batch_size=8, group_size=2, num_inference_steps=4,
                sde_window_size=2, sde_window_range=[0, 2], progress=False, eval_prompts=2, eval_per_prompt=2)
    config.update(sectioned(flat))
    cfg_file = tmp_path / "geneval.yaml"
    cfg_file.write_text(yaml.safe_dump(config))
    trainer = build_trainer(load_run_config(str(cfg_file)))
    assert list(trainer.task.prompts) == free
    for r in list(trainer.rewards.rewards) + list(trainer.eval_rewards.rewards):
        assert r.metadata(free[:2]) == [{k: v for k, v in json.loads(line).items() if k != "prompt"}
                                         for line in prompts.read_text().splitlines()[:2]]
    rewards = trainer.rewards(trainer.sample(free, seed=0), free)  # the free-text prompts are judged by metadata
    assert rewards.shape == (3, 1) and torch.isfinite(rewards).all()

    # a malformed line: one error naming the file and line, before the pipeline loads
    prompts.write_text(prompts.read_text() + '{"prompt": "a red 3", "include": [}\n')

    def no_pipeline(*a, **k):
        raise AssertionError("the pipeline was loaded")

    monkeypatch.setattr(critic_align.tasks.sd, "load_pipeline", no_pipeline)
    with pytest.raises(ValueError, match=r"geneval.jsonl:4: not valid JSON"):
        build_trainer(load_run_config(str(cfg_file)))


@pytest.mark.parametrize("config", ["digits", "digits_dit"])
def test_sample_run_on_digits_runs_with_digit_prompts(config, tmp_path, capsys):
    """The digits UNet and DiT runs: `sample --run --prompt 3 --prompt 7` draws those digits with the run's
    sampler (the pixels its rebuilt trainer draws); a prompt that is not a digit is refused before loading."""
    from critic_align.api import build_trainer, load_run_dir
    from critic_align.checkpoint import latest_checkpoint
    from critic_align.train.cli import cli, main
    from critic_align.viz import make_grid

    run_dir = tmp_path / "run"
    sets = dict(num_epochs=1, batch_size=8, group_size=4, num_inference_steps=4, minibatch_size=16,
                value_pretrain_epochs=1, value_pretrain_passes=1, progress="false", log_tensorboard="false",
                grid_every=0, eval_every=0, lora_rank=2, critic_lora_rank=2, value_head_hidden=16)
    argv = ["train", "--config", config, "--out", str(run_dir)]
    for k, v in sets.items():
        argv += ["--set", f"{k}={v}"]
    assert main(argv) == 0
    assert main(["sample", "--run", str(run_dir), "--prompt", "3", "--prompt", "7", "--n", "2", "--seed", "4"]) == 0
    grid = np.asarray(Image.open(run_dir / "samples.png"))
    trainer = build_trainer(load_run_dir(run_dir))
    trainer.load(latest_checkpoint(run_dir / "checkpoints"), resume=False)
    cells = make_grid(trainer.sample(["3", "3", "7", "7"], seed=4), nrow=2, scale=trainer.task.grid_scale)
    np.testing.assert_array_equal(grid[:, -cells.shape[1]:], cells[..., 0] if grid.ndim == 2 else cells)
    assert cli(["sample", "--run", str(run_dir), "--prompt", "a cat"]) == 2
    assert "is not a digit" in capsys.readouterr().err
