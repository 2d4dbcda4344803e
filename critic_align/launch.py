"""Launch checks: what ``accelerate launch`` / ``torchrun`` asked for, read before any model loads.

A launcher tells its processes what it set up through environment variables (``WORLD_SIZE``, ``LOCAL_RANK``,
``ACCELERATE_MIXED_PRECISION``, ``ACCELERATE_USE_DEEPSPEED``, ``ACCELERATE_USE_FSDP``, ``FSDP_VERSION``, ...).
:func:`read_launch_state` reads them (or accelerate's own state, when an ``Accelerator`` exists already) without
creating a process group or a model, and :func:`check_launch` refuses, with one line naming the setting and the fix,
what the engine cannot honour:

* DeepSpeed and Megatron-LM (the engine runs DDP, or FSDP2);
* FSDP in a form the engine does not run (:func:`fsdp_errors`): FSDP1, a sharded state dict, accelerate's own
  activation checkpointing, CPU-RAM-efficient loading or parameter offload, a size-based or no-wrap policy, a bf16
  launch precision, 8-bit Adam, and FSDP on a CPU-only launch (accelerate turns FSDP on for GPU launches only; on
  CPU it would train with DDP, silently);
* ``mixed_precision: fp16`` / ``fp8`` (bf16 or no: fp16 would need a gradient scaler unscaling before the clip)
  and a launch precision the run config does not agree with (one mechanism: the run's ``mixed_precision``);
* ``accelerate launch --cpu --num_processes N`` (N > 1), which starts one process (see :func:`launch_errors`);
* a number of processes the batch does not split over (:func:`world_size_errors`: the batch, the sample chunks,
  the held-out batch, the minibatches and each rank's gradient accumulation);
* an optimiser whose optional package is missing (``optimizer: adamw_8bit`` without bitsandbytes).

:func:`rank_device` maps a config's ``device: cuda`` to this rank's GPU (``cuda:{LOCAL_RANK}``), so a model built
later, in any thread, lands on the rank's own device.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import torch

SUPPORTED = ("DDP (accelerate launch --multi_gpu, train/configs/accelerate/multi_gpu_ddp.yaml, or torchrun) or FSDP2 "
             "(train/configs/accelerate/fsdp.yaml)")
FSDP_RECIPE = "train/configs/accelerate/fsdp.yaml"


class LaunchError(ValueError):
    """A launch setting or process count the engine cannot honour (raised before any model loads)."""


def _flag(env, name: str) -> bool:
    return str(env.get(name, "")).strip().lower() in ("1", "true", "yes", "on")


def _int(env, names, default: int) -> int:
    for name in names:
        v = env.get(name)
        if v not in (None, ""):
            try:
                return int(v)
            except ValueError:
                raise LaunchError(f"environment variable {name}={v!r} is not an integer: the launcher sets it; "
                                  "unset it or launch with accelerate launch / torchrun") from None
    return default


@dataclass(frozen=True)
class LaunchState:
    """What the launcher set up for this process (all defaults: one plain process)."""

    num_processes: int = 1
    rank: int = 0
    local_rank: int = 0
    mixed_precision: str = "no"
    """accelerate's precision for the launch ('no' when none was asked for: the run config decides)."""
    deepspeed: bool = False
    fsdp: bool = False
    fsdp_version: int = 2
    fsdp_active: bool = False
    """accelerate's state in this process already runs FSDP (an ``Accelerator`` made with it exists)."""
    fsdp_state_dict_type: str = ""
    """FSDP_STATE_DICT_TYPE as the launch set it ('' when it did not)."""
    fsdp_auto_wrap_policy: str = ""
    fsdp_activation_checkpointing: bool = False
    fsdp_cpu_ram_efficient_loading: bool = False
    fsdp_offload_params: bool = False
    megatron_lm: bool = False
    use_cpu: bool = False
    """``accelerate launch --cpu`` (ACCELERATE_USE_CPU)."""
    cpu_launch_without_world: bool = False
    """accelerate's CPU launcher asked for several processes (it sets MASTER_ADDR / MASTER_PORT only then) but this
    process has no WORLD_SIZE: it is the only one."""

    @property
    def distributed_type(self) -> str:
        if self.deepspeed:
            return "DEEPSPEED"
        if self.megatron_lm:
            return "MEGATRON_LM"
        if self.fsdp:
            return "FSDP"
        return "MULTI_PROCESS" if self.num_processes > 1 else "NO"


def read_launch_state(environ=None) -> LaunchState:
    """This process's :class:`LaunchState`, from the environment (``environ``, default ``os.environ``).

    When accelerate's state already exists in this process (an ``Accelerator`` or ``PartialState`` made before),
    its number of processes, rank and precision win over the environment (an ``Accelerator(mixed_precision=...)``
    overrides the launcher's), and a DeepSpeed / FSDP / Megatron-LM type in either counts.  Creates nothing."""
    env = os.environ if environ is None else environ
    n = _int(env, ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"), 1)
    rank = _int(env, ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK"), 0)
    local = _int(env, ("LOCAL_RANK", "MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_RANK"), 0)
    fields = dict(
        num_processes=n, rank=rank, local_rank=local,
        mixed_precision=str(env.get("ACCELERATE_MIXED_PRECISION", "no") or "no").lower(),
        deepspeed=_flag(env, "ACCELERATE_USE_DEEPSPEED"), fsdp=_flag(env, "ACCELERATE_USE_FSDP"),
        fsdp_version=_int(env, ("FSDP_VERSION",), 1 if _flag(env, "ACCELERATE_USE_FSDP") else 2),
        megatron_lm=_flag(env, "ACCELERATE_USE_MEGATRON_LM"), use_cpu=_flag(env, "ACCELERATE_USE_CPU"),
        fsdp_state_dict_type=str(env.get("FSDP_STATE_DICT_TYPE", "") or "").upper(),
        fsdp_auto_wrap_policy=str(env.get("FSDP_AUTO_WRAP_POLICY", "") or "").upper(),
        fsdp_activation_checkpointing=_flag(env, "FSDP_ACTIVATION_CHECKPOINTING"),
        fsdp_cpu_ram_efficient_loading=_flag(env, "FSDP_CPU_RAM_EFFICIENT_LOADING"),
        fsdp_offload_params=_flag(env, "FSDP_OFFLOAD_PARAMS"),
        cpu_launch_without_world=_flag(env, "ACCELERATE_USE_CPU") and "MASTER_PORT" in env
        and not any(k in env for k in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")))
    if environ is None:
        existing = _accelerate_state()
        for key in ("deepspeed", "fsdp", "megatron_lm"):  # either source asking for it is enough
            existing[key] = existing.get(key, False) or fields[key]
        fields.update(existing)
    return LaunchState(**fields)


def _accelerate_state() -> dict:
    """What an existing accelerate state says (empty when none was created in this process)."""
    try:
        from accelerate.state import AcceleratorState, PartialState
    except ImportError:  # pragma: no cover - accelerate is a dependency
        return {}
    out = {}
    if PartialState._shared_state:
        ps = PartialState()
        out.update(num_processes=ps.num_processes, rank=ps.process_index, local_rank=ps.local_process_index)
    if AcceleratorState._shared_state:
        st = AcceleratorState()
        kind = str(getattr(st.distributed_type, "value", st.distributed_type)).upper()
        out.update(mixed_precision=str(st.mixed_precision).lower(), deepspeed=kind == "DEEPSPEED",
                   fsdp=kind == "FSDP", megatron_lm=kind == "MEGATRON_LM")
        plugin = getattr(st, "fsdp_plugin", None)
        if kind == "FSDP" and plugin is not None and getattr(plugin, "fsdp_version", None) is not None:
            sdt = plugin.state_dict_type
            out.update(fsdp_version=int(plugin.fsdp_version), fsdp_active=True,
                       fsdp_state_dict_type=str(getattr(sdt, "name", sdt) or "").upper(),
                       fsdp_activation_checkpointing=bool(plugin.activation_checkpointing),
                       fsdp_cpu_ram_efficient_loading=bool(plugin.cpu_ram_efficient_loading),
                       # FSDP2 holds an OffloadPolicy either way (CPUOffloadPolicy when it offloads), FSDP1 a CPUOffload
                       fsdp_offload_params=type(plugin.cpu_offload).__name__ == "CPUOffloadPolicy"
                       or bool(getattr(plugin.cpu_offload, "offload_params", False)))
    return out


def world_size_errors(config, num_processes: int) -> list[str]:
    """Why ``config`` cannot run on ``num_processes`` processes (empty: it can).  Each message names the field and
    the fix."""
    n, cfg = int(num_processes), config
    if n <= 1:
        return []
    out = []
    if cfg.batch_size % n:
        out.append(f"config field batch_size={cfg.batch_size} does not split over {n} processes: use a multiple of "
                   f"{n} (or launch {_divisors_hint(cfg.batch_size)} processes)")
        return out  # the other checks divide the batch
    local = cfg.batch_size // n
    if local % cfg.sample_chunk_size:
        out.append(f"config field sample_chunk_size={cfg.sample_chunk_size}: with {n} processes each samples "
                   f"batch_size/{n} = {local} trajectories in whole chunks (each chunk has its own noise generator); "
                   f"set sample_chunk_size to a divisor of {local}, e.g. {_largest_divisor(local, cfg.sample_chunk_size)}")
    if cfg.eval_every:
        ev = cfg.eval_prompts * cfg.eval_per_prompt
        if ev % (n * cfg.sample_chunk_size):
            out.append(f"config fields eval_prompts x eval_per_prompt = {ev} held-out samples do not split into {n} "
                       f"processes' chunks of sample_chunk_size={cfg.sample_chunk_size}: make it a multiple of "
                       f"{n * cfg.sample_chunk_size}, or set eval_every: 0")
    return out


def _largest_divisor(n: int, at_most: int) -> int:
    return max(d for d in range(1, min(n, at_most) + 1) if n % d == 0)


def _divisors_hint(n: int) -> str:
    return "/".join(str(d) for d in (1, 2, 4, 8, 16) if n % d == 0)


def launch_errors(config, state: LaunchState) -> list[str]:
    """Why the launch ``state`` cannot run ``config`` (empty: it can); one line each, naming the setting and the fix."""
    out = []
    if state.deepspeed:
        out.append(f"accelerate launch with DeepSpeed (ACCELERATE_USE_DEEPSPEED) is not supported: the engine runs "
                   f"{SUPPORTED}; launch with train/configs/accelerate/multi_gpu_ddp.yaml")
    if state.megatron_lm:
        out.append(f"accelerate launch with Megatron-LM is not supported: the engine runs {SUPPORTED}")
    if state.fsdp:
        out += fsdp_errors(config, state)
    mp = state.mixed_precision
    if mp not in ("no", "bf16"):
        out.append(f"accelerate launch --mixed_precision {mp} is not supported: use bf16 (set optimization: "
                   "mixed_precision: bf16) or no; fp16 would need loss scaling undone before the gradient clip, "
                   "and the PPO ratio is too sensitive to fp16 rounding")
    elif mp == "bf16" and config.mixed_precision != "bf16":
        out.append(f"accelerate launch --mixed_precision bf16 but config field mixed_precision={config.mixed_precision!r}:"
                   " the run config decides the precision; set mixed_precision: bf16 (--set mixed_precision=bf16) or "
                   "launch with --mixed_precision no")
    if state.cpu_launch_without_world:
        out.append("accelerate launch --cpu --num_processes N started one process: accelerate's CPU launcher starts "
                   "several only through MPI (--mpirun_hostfile); launch with --multi_gpu --num_processes N instead "
                   "(torch's launcher; without CUDA the processes run on CPU with gloo), or torchrun, or "
                   "train/configs/accelerate/cpu_2proc.yaml (README: Scaling out)")
    out += world_size_errors(config, state.num_processes)
    out += dependency_errors(config)
    return out


def fsdp_errors(config, state: LaunchState) -> list[str]:
    """Why an FSDP launch ``state`` cannot run ``config`` (empty: it can).  The engine runs FSDP2 with the full
    state gathered to the main process for checkpoints (docs/distributed.md, "FSDP")."""
    out = []
    if state.fsdp_version != 2:
        return [f"accelerate launch with FSDP version {state.fsdp_version} is not supported: the engine shards with "
                f"FSDP2; set fsdp_version: 2 (launch with {FSDP_RECIPE})"]
    if not state.fsdp_active and (state.use_cpu or not torch.cuda.is_available()):
        out.append("accelerate launch with FSDP on CPU: accelerate turns FSDP on for GPU launches only, so the run would "
                   "train with DDP without saying so; on CPU launch with train/configs/accelerate/cpu_2proc.yaml (DDP), "
                   f"on GPUs with {FSDP_RECIPE}")
    if state.fsdp_state_dict_type == "SHARDED_STATE_DICT":
        out.append("accelerate launch with fsdp_state_dict_type: SHARDED_STATE_DICT: checkpoints here are full "
                   "safetensors gathered by the main process (a DDP or 1-process run loads them); set "
                   "fsdp_state_dict_type: FULL_STATE_DICT")
    if state.fsdp_auto_wrap_policy in ("SIZE_BASED_WRAP", "NO_WRAP"):
        out.append(f"accelerate launch with fsdp_auto_wrap_policy: {state.fsdp_auto_wrap_policy}: the engine shards "
                   "the backbone's blocks, the backbone and the critic's head as units (sampling calls them outside "
                   "the training forward); set fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP")
    if state.fsdp_activation_checkpointing:
        out.append("accelerate launch with fsdp_activation_checkpointing: true: use the run config's "
                   "gradient_checkpointing: true instead (it recomputes under the LoRA adapter of the forward); set "
                   "fsdp_activation_checkpointing: false")
    if state.fsdp_cpu_ram_efficient_loading:
        out.append("accelerate launch with fsdp_cpu_ram_efficient_loading: true: every process loads the pipeline "
                   "(VAE, text encoders, rewards) itself; set fsdp_cpu_ram_efficient_loading: false")
    if state.fsdp_offload_params:
        out.append("accelerate launch with fsdp_offload_params: true is not supported (the sampling forwards and the "
                   "optimiser step run on the GPU); set fsdp_offload_params: false")
    if state.mixed_precision not in ("no", "fp16", "fp8"):  # fp16 / fp8 have their own message
        out.append(f"accelerate launch with FSDP and --mixed_precision {state.mixed_precision}: under FSDP it would "
                   "cast the sharded parameters and reduce the gradients in bf16; the run config's "
                   "mixed_precision: bf16 is the autocast (weights, gradients and optimiser in fp32): launch with "
                   "mixed_precision: 'no'")
    if getattr(config, "optimizer", "adamw") == "adamw_8bit":
        out.append("config field optimizer='adamw_8bit' with FSDP: bitsandbytes' 8-bit state does not shard with the "
                   "parameters; set optimizer: adamw")
    return out


def dependency_errors(config) -> list[str]:
    """Optional packages the config needs and this environment lacks."""
    out = []
    if getattr(config, "optimizer", "adamw") == "adamw_8bit" and importlib.util.find_spec("bitsandbytes") is None:
        out.append("config field optimizer='adamw_8bit' needs bitsandbytes: pip install critic-align[bnb] (or pip "
                   "install bitsandbytes), or set optimizer: adamw")
    return out


def check_launch(config, state: LaunchState | None = None) -> LaunchState:
    """Raise :class:`LaunchError` (one line: the first problem) when ``config`` cannot run under this launch;
    return the launch state.  Reads the environment (and an existing accelerate state); loads nothing."""
    state = read_launch_state() if state is None else state
    errors = launch_errors(config, state)
    if errors:
        raise LaunchError(errors[0])
    return state


def rank_device(device, local_rank: int | None = None) -> torch.device:
    """``device`` as this rank's device: 'cuda' (no index) -> ``cuda:{local_rank}`` (default: LOCAL_RANK, or 0), so
    a model moved there later, in any thread, lands on the rank's own GPU (torch's current CUDA device is per thread:
    a background thread's default is cuda:0).  Any other device (an explicit index, 'cpu', 'mps') is returned as it
    is."""
    d = torch.device(device)
    if d.type == "cuda" and d.index is None:
        rank = read_launch_state().local_rank if local_rank is None else int(local_rank)
        return torch.device("cuda", rank)
    return d
