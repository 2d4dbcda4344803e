"""Launch checks before any model loads (critic_align/launch.py), devices per rank, and the memory options
(critic_align/optim.py, the text-embedding cache).

Every refusal is checked with the model loaders replaced by ones that fail the test: the error must come first,
with nothing in the run directory."""

from __future__ import annotations

import sys
import threading
import types
from pathlib import Path

import pytest
import torch

from critic_align import launch
from critic_align.config import PPOConfig
from critic_align.launch import LaunchError, LaunchState, check_launch, rank_device, read_launch_state, world_size_errors

CONFIGS = Path(__file__).resolve().parents[1] / "train" / "configs"
LAUNCH_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "ACCELERATE_MIXED_PRECISION", "ACCELERATE_USE_DEEPSPEED",
              "ACCELERATE_USE_FSDP", "FSDP_VERSION", "ACCELERATE_USE_MEGATRON_LM", "ACCELERATE_USE_CPU", "MASTER_PORT",
              "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "FSDP_STATE_DICT_TYPE", "FSDP_AUTO_WRAP_POLICY",
              "FSDP_ACTIVATION_CHECKPOINTING", "FSDP_CPU_RAM_EFFICIENT_LOADING", "FSDP_OFFLOAD_PARAMS")


@pytest.fixture
def env(monkeypatch):
    """A clean launch environment (and no accelerate state made by an earlier test in this process)."""
    for k in LAUNCH_ENV:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(launch, "_accelerate_state", lambda: {})
    return monkeypatch


# ----------------------------------------------------------------------------------------------------
# reading the launch
def test_reads_accelerate_launch_environment():
    st = read_launch_state({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "ACCELERATE_MIXED_PRECISION": "BF16",
                            "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"})
    assert (st.num_processes, st.rank, st.local_rank, st.mixed_precision) == (4, 3, 1, "bf16")
    assert st.fsdp and not st.deepspeed and st.distributed_type == "FSDP"
    assert read_launch_state({}) == LaunchState()
    # accelerate's FSDP launcher without FSDP_VERSION means version 1 (its default)
    assert read_launch_state({"ACCELERATE_USE_FSDP": "true"}).fsdp_version == 1
    st = read_launch_state({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_STATE_DICT_TYPE": "sharded_state_dict",
                            "FSDP_AUTO_WRAP_POLICY": "SIZE_BASED_WRAP", "FSDP_OFFLOAD_PARAMS": "false",
                            "FSDP_ACTIVATION_CHECKPOINTING": "true", "FSDP_CPU_RAM_EFFICIENT_LOADING": "True"})
    assert (st.fsdp_state_dict_type, st.fsdp_auto_wrap_policy) == ("SHARDED_STATE_DICT", "SIZE_BASED_WRAP")
    assert st.fsdp_activation_checkpointing and st.fsdp_cpu_ram_efficient_loading and not st.fsdp_offload_params
    assert not st.fsdp_active  # only an accelerate state made with FSDP says that it runs


def test_existing_accelerate_state_wins_for_precision_and_counts(env):
    env.setattr(launch, "_accelerate_state", lambda: {"num_processes": 2, "mixed_precision": "fp16"})
    env.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    st = read_launch_state()
    assert (st.num_processes, st.mixed_precision, st.deepspeed) == (2, "fp16", True)


# ----------------------------------------------------------------------------------------------------
# refusals, each one line naming the setting and the fix
@pytest.mark.parametrize("state,cfg,match", [
    (LaunchState(deepspeed=True), {}, r"DeepSpeed .* not supported: the engine runs DDP .*multi_gpu_ddp.yaml"),
    (LaunchState(megatron_lm=True), {}, r"Megatron-LM is not supported"),
    (LaunchState(fsdp=True, fsdp_version=1), {}, r"FSDP version 1 is not supported: the engine shards with FSDP2; set "
                                                 r"fsdp_version: 2 \(launch with train/configs/accelerate/fsdp.yaml\)"),
    (LaunchState(num_processes=2, fsdp=True, use_cpu=True), {"sample_chunk_size": 8},
     r"FSDP on CPU: accelerate turns FSDP on for GPU launches only.*cpu_2proc.yaml"),
    (LaunchState(fsdp=True, fsdp_active=True, fsdp_state_dict_type="SHARDED_STATE_DICT"), {},
     r"SHARDED_STATE_DICT: checkpoints here are full safetensors .*set fsdp_state_dict_type: FULL_STATE_DICT"),
    (LaunchState(fsdp=True, fsdp_active=True, fsdp_auto_wrap_policy="NO_WRAP"), {},
     r"fsdp_auto_wrap_policy: NO_WRAP.*set fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP"),
    (LaunchState(fsdp=True, fsdp_active=True, fsdp_activation_checkpointing=True), {},
     r"fsdp_activation_checkpointing: true: use the run config's gradient_checkpointing: true"),
    (LaunchState(fsdp=True, fsdp_active=True, fsdp_cpu_ram_efficient_loading=True), {},
     r"set fsdp_cpu_ram_efficient_loading: false"),
    (LaunchState(fsdp=True, fsdp_active=True, fsdp_offload_params=True), {}, r"set fsdp_offload_params: false"),
    (LaunchState(fsdp=True, fsdp_active=True, mixed_precision="bf16"), {"mixed_precision": "bf16"},
     r"FSDP and --mixed_precision bf16: .*launch with mixed_precision: 'no'"),
    (LaunchState(fsdp=True, fsdp_active=True), {"optimizer": "adamw_8bit"}, r"adamw_8bit' with FSDP.*optimizer: adamw"),
    (LaunchState(mixed_precision="fp16"), {}, r"--mixed_precision fp16 is not supported: use bf16 .* or no"),
    (LaunchState(mixed_precision="fp8"), {"mixed_precision": "bf16"}, r"--mixed_precision fp8 is not supported"),
    (LaunchState(mixed_precision="bf16"), {}, r"--mixed_precision bf16 but config field mixed_precision='no'.*"
                                              r"set mixed_precision: bf16"),
    (LaunchState(cpu_launch_without_world=True), {}, r"--cpu --num_processes N started one process.*--multi_gpu"),
])
def test_unsupported_launch_settings_are_refused(state, cfg, match):
    with pytest.raises(LaunchError, match=match) as err:
        check_launch(PPOConfig(**cfg), state)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("state,cfg", [
    (LaunchState(), {}),
    (LaunchState(mixed_precision="bf16"), {"mixed_precision": "bf16"}),
    (LaunchState(mixed_precision="no"), {"mixed_precision": "bf16"}),  # accelerate's default: the run config decides
    (LaunchState(num_processes=2), {"sample_chunk_size": 8}),
    (LaunchState(num_processes=2, fsdp=True, fsdp_active=True, fsdp_state_dict_type="FULL_STATE_DICT"),
     {"sample_chunk_size": 8, "mixed_precision": "bf16"}),
])
def test_supported_launches_pass(state, cfg):
    assert check_launch(PPOConfig(**cfg), state) is state


@pytest.mark.parametrize("n,cfg,match", [
    (3, {}, r"config field batch_size=64 does not split over 3 processes: use a multiple of 3"),
    (2, {}, r"config field sample_chunk_size=64: with 2 processes each samples batch_size/2 = 32 .* e\.g\. 32"),
    (4, {"sample_chunk_size": 16}, r"config fields eval_prompts x eval_per_prompt = 80 held-out samples do not split "
                                   r"into 4 processes' chunks of sample_chunk_size=16: make it a multiple of 64"),
])
def test_process_counts_that_do_not_divide_are_refused(n, cfg, match):
    with pytest.raises(LaunchError, match=match):
        check_launch(PPOConfig(**cfg), LaunchState(num_processes=n))


def test_check_run_uses_the_same_process_checks():
    cfg = PPOConfig(sample_chunk_size=64)
    cfg.check_run(["r"], 1)
    with pytest.raises(LaunchError, match=r"sample_chunk_size=64: with 2 processes"):
        cfg.check_run(["r"], 2)


def test_missing_bitsandbytes_is_refused_before_models_load(env):
    env.setattr(launch.importlib.util, "find_spec", lambda name: None if name == "bitsandbytes" else object())
    with pytest.raises(LaunchError, match=r"optimizer='adamw_8bit' needs bitsandbytes: pip install critic-align\[bnb\]"):
        check_launch(PPOConfig(optimizer="adamw_8bit"), LaunchState())
    env.setattr(launch.importlib.util, "find_spec", lambda name: object())
    check_launch(PPOConfig(optimizer="adamw_8bit"), LaunchState())


@pytest.mark.parametrize("name", ["sd15_pickscore", "sd15_jpeg", "sd35m_pickscore", "sd35m_jpeg", "flux_pickscore"])
@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_shipped_gpu_configs_start_on_1_2_4_and_8_processes(name, n):
    from critic_align.train.registry import load_run_config

    cfg = load_run_config(name)["ppo"]
    assert world_size_errors(cfg, n) == []


# ----------------------------------------------------------------------------------------------------
# refused before any model loads: the loaders fail the test if they are reached
def _no_loading(monkeypatch):
    import critic_align.tasks.sd as sd
    import critic_align.train.registry as registry

    def boom(*a, **k):
        raise AssertionError("a model was loaded before the launch check")

    monkeypatch.setattr(sd, "load_pipeline", boom)
    monkeypatch.setattr(registry, "digits_task", boom)


@pytest.mark.parametrize("config", ["digits", "t2i", "sd35m_pickscore", "flux_pickscore"])
@pytest.mark.parametrize("launch_env,match", [
    ({"ACCELERATE_USE_DEEPSPEED": "true"}, "DeepSpeed"),
    ({"ACCELERATE_MIXED_PRECISION": "fp16"}, "fp16 is not supported"),
    ({"WORLD_SIZE": "5"}, "batch_size=(64|48) does not split over 5 processes"),
    ({"ACCELERATE_USE_FSDP": "true"}, "FSDP version 1 is not supported"),
])
def test_build_trainer_refuses_before_the_loader(env, config, launch_env, match):
    from critic_align.api import build_trainer
    from critic_align.train.registry import load_run_config

    _no_loading(env)
    for k, v in launch_env.items():
        env.setenv(k, v)
    run = load_run_config(config)
    with pytest.raises(LaunchError, match=match):
        build_trainer(run)


def test_cli_train_refuses_with_nothing_in_the_run_directory(env, tmp_path, capsys):
    from critic_align.train.cli import cli

    _no_loading(env)
    env.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    out = tmp_path / "run"
    assert cli(["train", "--config", "digits", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("critic-align: error: accelerate launch with DeepSpeed") and "\n" not in err
    assert not out.exists()


def test_cli_train_refuses_a_single_process_cpu_launch_asked_for_two(env, tmp_path, capsys):
    """What `accelerate launch --cpu --num_processes 2` hands its only process: ACCELERATE_USE_CPU and a
    MASTER_PORT, no WORLD_SIZE."""
    from critic_align.train.cli import cli

    _no_loading(env)
    env.setenv("ACCELERATE_USE_CPU", "True")
    env.setenv("MASTER_PORT", "29500")
    assert cli(["train", "--config", "digits", "--out", str(tmp_path / "run")]) == 2
    assert "started one process" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------------
# the launch recipes
RECIPES = {"single_gpu": ("NO", 1), "multi_gpu_ddp": ("MULTI_GPU", 8), "multi_node": ("MULTI_GPU", 16),
           "cpu_2proc": ("MULTI_GPU", 2)}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_accelerate_recipes_load_with_accelerates_parser_and_pass_the_checks(name):
    from accelerate.commands.config.config_args import load_config_from_file

    c = load_config_from_file(str(CONFIGS / "accelerate" / f"{name}.yaml"))
    assert (str(c.distributed_type.value), c.num_processes) == RECIPES[name]
    assert c.mixed_precision == "no"  # the run config decides the precision
    state = LaunchState(num_processes=c.num_processes)
    assert launch.launch_errors(PPOConfig(sample_chunk_size=4, eval_prompts=8, minibatch_size=64), state) == []


def test_the_fsdp_recipe_launches_fsdp2_and_passes_the_checks(env):
    """train/configs/accelerate/fsdp.yaml through accelerate's own launcher code (the environment `accelerate launch`
    hands each process), read by the launch checks: FSDP2, a full state dict, nothing the engine refuses (on a GPU
    machine: here CUDA is reported present, as it would be there)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / "accelerate" / "fsdp.yaml"), "x.py"])
    args, _, _ = _validate_launch_command(args)
    launched = {**prepare_multi_gpu_env(args), "WORLD_SIZE": "8"}
    st = read_launch_state(launched)
    assert (st.fsdp, st.fsdp_version, st.fsdp_state_dict_type, st.num_processes) == (True, 2, "FULL_STATE_DICT", 8)
    cfg = PPOConfig(sample_chunk_size=4, eval_prompts=8, minibatch_size=64)
    env.setattr(launch.torch.cuda, "is_available", lambda: True)
    assert launch.launch_errors(cfg, st) == []
    env.setattr(launch.torch.cuda, "is_available", lambda: False)  # a CPU-only machine: refused, not DDP in silence
    assert "FSDP on CPU" in launch.launch_errors(cfg, st)[0]


# ----------------------------------------------------------------------------------------------------
# devices: 'cuda' is this rank's GPU, also for a model loaded in the reward thread
def test_rank_device(env):
    env.setenv("LOCAL_RANK", "3")
    assert rank_device("cuda") == torch.device("cuda", 3)
    assert rank_device("cuda", local_rank=1) == torch.device("cuda", 1)
    assert rank_device("cuda:0") == torch.device("cuda", 0)  # an explicit index is the user's choice
    assert rank_device("cpu") == torch.device("cpu")


class _FakeCLIP:
    """Stands for a CLIPModel: records where it is moved."""

    def __init__(self):
        self.moved_to, self.thread = [], None

    def eval(self):
        return self

    def requires_grad_(self, flag):
        return self

    def to(self, device):
        self.moved_to.append(torch.device(device))
        self.thread = threading.current_thread().name
        return self


def test_reward_loaded_lazily_in_the_reward_thread_lands_on_the_rank_device(env):
    from concurrent.futures import ThreadPoolExecutor

    import critic_align.rewards.clip as clip

    model = _FakeCLIP()

    def fake_from_pretrained(cls, source, what, owner, local_files_only, **kw):
        return model if what == "CLIP model" else object()

    env.setattr(clip, "_from_pretrained", fake_from_pretrained)
    env.setattr(clip.CLIPImageTransform, "from_processor", classmethod(lambda cls, p: None))
    env.setenv("LOCAL_RANK", "1")
    reward = clip.PickScore(model="/models/PickScore_v1", processor="/models/clip", device="cuda")  # main thread
    env.setenv("LOCAL_RANK", "0")  # what the worker thread would see as its default has no say
    with ThreadPoolExecutor(1, thread_name_prefix="rewards") as pool:
        pool.submit(reward.load).result()
    assert model.moved_to == [torch.device("cuda", 1)]
    assert model.thread.startswith("rewards")


def test_reward_without_a_device_follows_the_samples_from_the_reward_thread(env):
    """device None: the model goes where the samples are (the rank's device, where the VAE decoded them), also when
    the first call comes from the background thread."""
    from concurrent.futures import ThreadPoolExecutor

    import critic_align.rewards.clip as clip

    model = _FakeCLIP()
    model.parameters = lambda: iter([torch.zeros(1)])
    reward = clip.PickScore(model="/models/PickScore_v1", processor="/models/clip")
    reward._model = model  # loaded: only the move is under test
    samples = torch.empty(2, 3, 8, 8, device="meta")  # a device tag other than the thread's default
    with ThreadPoolExecutor(1, thread_name_prefix="rewards") as pool:
        _, device = pool.submit(reward._model_on, samples).result()
    assert device == torch.device("meta") and model.moved_to == [torch.device("meta")]


# ----------------------------------------------------------------------------------------------------
# memory options
def _groups():
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    return [{"params": [a], "lr": 1e-3}, {"params": [b], "lr": 5e-4}]


def test_build_optimizer_adamw():
    from critic_align.optim import build_optimizer

    cfg = PPOConfig(adam_betas=(0.8, 0.99), adam_eps=1e-6, weight_decay=0.01)
    opt = build_optimizer(_groups(), cfg)
    assert type(opt) is torch.optim.AdamW
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 5e-4]
    g = opt.param_groups[0]
    assert (g["betas"], g["eps"], g["weight_decay"]) == ((0.8, 0.99), 1e-6, 0.01)


def test_build_optimizer_adamw_8bit_uses_bitsandbytes(monkeypatch):
    from critic_align.optim import build_optimizer

    made = {}

    class AdamW8bit(torch.optim.AdamW):
        def __init__(self, groups, **kw):
            made.update(kw)
            super().__init__(groups, **kw)

    fake = types.ModuleType("bitsandbytes")
    fake.optim = types.SimpleNamespace(AdamW8bit=AdamW8bit)
    monkeypatch.setitem(sys.modules, "bitsandbytes", fake)
    opt = build_optimizer(_groups(), PPOConfig(optimizer="adamw_8bit", weight_decay=0.0))
    assert type(opt) is AdamW8bit
    assert made == {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}


def test_build_optimizer_adamw_8bit_without_bitsandbytes(monkeypatch):
    from critic_align.optim import build_optimizer

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import raises ImportError
    with pytest.raises(ValueError, match=r"needs bitsandbytes: pip install critic-align\[bnb\]"):
        build_optimizer(_groups(), PPOConfig(optimizer="adamw_8bit"))


@pytest.mark.parametrize("kw,match", [
    ({"optimizer": "sgd"}, r"config field optimizer='sgd': use one of \('adamw', 'adamw_8bit'\)"),
    ({"text_embedding_cache": "yes"}, r"text_embedding_cache='yes': must be true or false"),
])
def test_memory_option_fields_are_checked(kw, match):
    with pytest.raises(ValueError, match=match):
        PPOConfig(**kw)


@pytest.mark.parametrize("asset", ["tiny_t2i", "tiny_t2i_sd3"])
def test_text_embedding_cache_equals_encoding_and_encodes_each_prompt_once(asset):
    from critic_align.cond import TextCond
    from critic_align.tasks.sd import StableDiffusionTask, load_pipeline

    root = Path(__file__).resolve().parents[1] / "critic_align" / "assets" / asset
    pipe = load_pipeline(root, "sd15" if asset == "tiny_t2i" else "sd3", drop_t5=asset == "tiny_t2i_sd3")
    prompts = [p for p in (root / "train_prompts.txt").read_text().splitlines() if p.strip()][:6]
    plain = StableDiffusionTask(pipe, prompts, resolution=32)
    cached = StableDiffusionTask(pipe, prompts, resolution=32, text_embedding_cache=True)
    calls = []
    orig = pipe.encode_prompt

    def counting(p, *a, **k):
        calls.append(list(p))
        return orig(p, *a, **k)

    pipe.encode_prompt = counting
    batch1 = [p for p in prompts[:3] for _ in range(4)]  # 3 prompts x a group of 4
    batch2 = [p for p in prompts[2:5] for _ in range(4)]  # one prompt seen before
    for batch in (batch1, batch2):
        a, b = plain.encode(batch), cached.encode(batch)
        pairs = [(a.embeds, b.embeds), (a.pooled, b.pooled)] if isinstance(a, TextCond) else [(a, b)]
        for x, y in pairs:
            assert x.shape == y.shape and x.dtype == y.dtype and x.device == y.device
            # SD1.5 here: bit for bit; SD3: the batched GEMMs of a different batch size round differently
            torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-5)
            if asset == "tiny_t2i":
                assert torch.equal(y, x)
    cached_calls = calls[1::2]  # plain, cached, plain, cached
    assert cached_calls == [prompts[:3], prompts[3:5]]
    assert cached.encoder_calls == 5 and plain.encoder_calls == 24


def test_text_embedding_cache_field_reaches_the_task(env):
    """ppo.text_embedding_cache in a run config -> the Stable Diffusion task caches (build_sd_task)."""
    from critic_align.api import build_sd_task
    from critic_align.train.registry import load_run_config

    for flag in (False, True):
        task = build_sd_task(load_run_config("t2i", {"text_embedding_cache": flag}))
        assert (task._text_cache is not None) is flag


def test_a_checkpoint_from_before_the_memory_options_resumes(tmp_path):
    """Checkpoints written before optimizer / text_embedding_cache existed hold no such fields: they had the defaults,
    so a resume with the defaults is accepted (and one with another optimizer is refused by name)."""
    import json

    from test_trainer import make_trainer

    from critic_align.checkpoint import MANIFEST, CheckpointError, _file_digest, latest_checkpoint

    tr = make_trainer(tmp_path, num_epochs=1)
    tr.train()
    ckpt = latest_checkpoint(tmp_path / "run" / "checkpoints")
    state = json.loads((ckpt / "state.json").read_text())
    for k in ("optimizer", "text_embedding_cache"):
        del state["config"][k]
    (ckpt / "state.json").write_text(json.dumps(state))
    manifest = json.loads((ckpt / MANIFEST).read_text())
    manifest["files"]["state.json"] = _file_digest(ckpt / "state.json")
    (ckpt / MANIFEST).write_text(json.dumps(manifest))
    fresh = make_trainer(tmp_path, num_epochs=1)
    fresh.load(ckpt)
    assert fresh.epoch == 1
    other = make_trainer(tmp_path / "other", num_epochs=1, text_embedding_cache=True)
    with pytest.raises(CheckpointError, match=r"text_embedding_cache=False in the checkpoint vs True now"):
        other.load(ckpt)
