"""Scale: processes, precision, activation checkpointing, torch.compile and sharding, in one place.

`parallelize(model, training_cfg, dist)` prepares a model for training, in this order:

1. **Activation checkpointing**, per region (`training.activation_checkpointing`):
   `encoder_blocks` (the encoder's stem -- ray encoding, conv blocks, per-patch linear -- and
   each transformer block), `slot_attention`, and `decoder_ray_chunk` (the decoder runs over
   chunks of that many rays per scene, each recomputed in backward). The model sets these on
   its regions (`OSRT.set_checkpointing`); no wrapper modules, so parameter names and
   checkpoints are unchanged.
2. **torch.compile** of each region's function (`OSRT.regions`; `fullgraph=True`: a graph break in the hot path
   is an error, not a slowdown). The compiled function runs *inside* the checkpoint, so
   recomputation replays the compiled code; module hooks (FSDP's, DDP's) stay outside compiled
   code. The Triton kernels are `torch.library` custom ops and trace as single nodes.
3. **Sharding**, only with more than one process (torchrun): FSDP2 (`fully_shard`, the default)
   on each of `OSRT.fsdp_units` (each encoder transformer block, slot attention, the encoder
   (its stem), the decoder), and then the root; or DDP (`training.parallel: ddp`). Sharding comes last because it acts on the
   modules as they will run: FSDP2 gathers a unit's parameters in the unit's forward hook, which
   then precedes its checkpointed, compiled region, and a recomputation in backward finds them
   gathered again by the backward hook.

Precision: `training.precision: bf16` runs the forward pass under `torch.autocast(bf16)`; the
parameters, gradients and Adam's state stay fp32 (the master weights), and FSDP gathers and
reduces in fp32, so every strategy computes the same numbers.

The global batch (`training.batch_size`) is the number of scenes per optimizer step whatever
the process count: each process runs `grad_accum` micro-batches of
`batch_size / (world_size * grad_accum)` scenes, the loss is their mean, and gradients are
averaged over processes. `data.ResumableBatchSampler` hands process r, micro-batch m the same
scenes (and ray-sample seeds) that one process would see at the same place of its batch.

Checkpoints are always written unsharded, in the single-process format (rank 0 writes; the
state is gathered from all ranks), so a run saved by N processes resumes in M.
"""
from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from .config import ConfigError
from .errors import UserError


@dataclass
class DistInfo:
    """Where this process stands: rank, world size, local rank (the GPU on its node)."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"training.device is {name!r} but CUDA is not available; use 'cpu' or 'auto'")
    return device


def launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def init_distributed(device: torch.device, timeout_s: Optional[float] = None
                     ) -> tuple[DistInfo, torch.device]:
    """Joins the process group torchrun set up (NCCL on CUDA, gloo on CPU); without torchrun, a
    single process. `timeout_s`: how long a collective waits for the other processes (torch's
    default where None). Returns this process's DistInfo and device (cuda:LOCAL_RANK on GPUs)."""
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return DistInfo(), device
    info = DistInfo(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                    int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":
        if info.local_rank >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK {info.local_rank} but only {torch.cuda.device_count()} "
                              "GPU(s) on this node; start at most that many processes per node "
                              "(torchrun --nproc_per_node)")
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        from datetime import timedelta
        store = attempt_store(info)
        backend = "nccl" if device.type == "cuda" else "gloo"
        wait = {} if timeout_s is None else {"timeout": timedelta(seconds=timeout_s)}
        if store is None:
            dist.init_process_group(backend, **wait)
        else:
            dist.init_process_group(backend, store=store, rank=info.rank, world_size=info.world_size,
                                    **wait)
    return info, device


def attempt_store(info: DistInfo):
    """The process group's key-value store under torchrun: the rendezvous store that torchrun
    names (MASTER_ADDR, MASTER_PORT), its keys under a prefix of this attempt
    (TORCHELASTIC_RESTART_COUNT). torchrun's restarted workers share that store with the attempt
    before, and torch's default group writes the same keys in every attempt, so a new worker
    could read the address a killed one left there and fail to connect (gloo: 'connectFullMesh
    failed ... Connection refused') or wait for it. None outside torchrun: torch's env://."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None or "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        return None
    from datetime import timedelta
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                          info.world_size, is_master=not agent and info.rank == 0,
                          timeout=timedelta(minutes=30), multi_tenant=not agent)
    return dist.PrefixStore(f"osrt_fast/attempt_{attempt}", store)


def shutdown_distributed(clean: bool = True) -> None:
    """Leaves the process group while the interpreter is whole. First frees what still refers
    to it (a model's FSDP state, held in reference cycles until the collector runs, would
    otherwise be destroyed during interpreter finalisation, with gloo's threads); after a run
    that every process ended the same way (`clean`), waits for all before tearing down, so none
    closes its connections while another still uses them. After an error on one process the
    others may not come: no barrier then."""
    if dist.is_available() and dist.is_initialized():
        import gc
        gc.collect()
        if clean:
            dist.barrier()
        dist.destroy_process_group()


def current() -> DistInfo:
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return DistInfo()


STAGES = ("loading its batch", "in its forward pass", "in its backward pass", "done")


def note_progress(step: int, stage: str) -> None:
    """With several processes, records where this one is (training step `step`, one of STAGES)
    in the process group's store, so a wait that times out can say which process fell behind
    (`behind`)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        try:
            dist.distributed_c10d._get_default_store().set(
                f"osrt_fast/progress/{dist.get_rank()}", f"{step}:{STAGES.index(stage)}")
        except Exception:          # a store that is gone: the timeout's message says less
            pass


def behind() -> str:
    """' Behind the others: rank R (step S, in its forward pass).' from what `note_progress`
    recorded; '' where it tells nothing."""
    try:
        store, n = dist.distributed_c10d._get_default_store(), dist.get_world_size()
        keys = [f"osrt_fast/progress/{r}" for r in range(n)]
        if not store.check(keys):
            return ""
        where = [tuple(int(x) for x in v.decode().split(":")) for v in store.multi_get(keys)]
    except Exception:
        return ""
    lagging = [r for r, w in enumerate(where) if w < max(where)]
    if not lagging:
        return ""
    return (" Behind the others: " + ", ".join(f"rank {r} (step {where[r][0]}, "
                                                 f"{STAGES[where[r][1]]})" for r in lagging)
            + f"; the furthest at step {max(where)[0]}, {STAGES[max(where)[1]]}.")


class CollectiveTimeout(UserError):
    """A process waited longer than training.collective_timeout_s for the others."""


def collective_timeout(e: BaseException, timeout_s: float) -> Optional[CollectiveTimeout]:
    """The CollectiveTimeout that says what a timed-out wait (gloo, NCCL) means and what to do,
    or None for another error."""
    if "timed out" not in str(e).lower() and "timeout" not in type(e).__name__.lower():
        return None
    return CollectiveTimeout(
        f"rank {current().rank} waited {timeout_s:g} s (training.collective_timeout_s) for the "
        f"other processes at a collective operation and gave up: one stopped answering (stuck "
        f"in I/O or a slow loader, or gone).{behind()} model.pt holds the last good checkpoint; "
        f"run the same command to resume.")


# ----------------------------------------------------------------------------------------------
# parallelize

def apply_activation_checkpointing(model: nn.Module, regions) -> None:
    """The model's regions recompute in backward as `regions` (a config.CheckpointingConfig or a
    mapping of its keys) says: `OSRT.set_checkpointing`."""
    model.set_checkpointing(regions)


def apply_compile(model: nn.Module, **compile_kwargs) -> None:
    """torch.compile of each of the model's region functions (`OSRT.regions`), in place
    (instance attributes; the state dict and parameter names do not change). `fullgraph=True`
    unless given."""
    compile_kwargs.setdefault("fullgraph", True)
    for module, name in model.regions():
        fn = getattr(type(module), name).__get__(module)      # the uncompiled method
        setattr(module, name, torch.compile(fn, **compile_kwargs))


def apply_fsdp(model: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    """FSDP2 over all processes: each of the model's `fsdp_units` sharded on its own, then the
    root. In place."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh(device.type, (info.world_size,))
    for unit in model.fsdp_units():
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def apply_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """DDP: whole replicas, gradients averaged over processes. Returns the wrapper."""
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)


def parallelize(model: nn.Module, t, info: Optional[DistInfo] = None, device=None,
                compile_kwargs: Optional[dict] = None) -> nn.Module:
    """Applies activation checkpointing, torch.compile and sharding (FSDP2 or DDP), in that
    order, as `t` (the training config) asks. Returns the model to train: the same object under
    FSDP2 (sharded in place) or a single process, a DistributedDataParallel wrapper under DDP."""
    info = info or current()
    apply_activation_checkpointing(model, t.activation_checkpointing)
    if t.compile:
        apply_compile(model, **(compile_kwargs or {}))
    if not info.distributed:
        return model
    device = device or next(model.parameters()).device
    if t.parallel == "ddp":
        return apply_ddp(model, device)
    return apply_fsdp(model, info, device)


# ----------------------------------------------------------------------------------------------
# Steps

@functools.lru_cache(maxsize=None)
def native_bf16(device_type: str) -> bool:
    """Whether devices of this type compute bf16 products natively: a CUDA GPU that supports
    bf16, a CPU with AVX512-BF16 or AMX (elsewhere bf16 on the CPU is emulated, and slower)."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(torch.cpu, name, lambda: False)() for name in probes)
    return False


def resolve_precision(device: torch.device, precision: str) -> str:
    """'fp32' or 'bf16': training.precision, with 'auto' decided for `device` (native_bf16)."""
    if precision == "auto":
        return "bf16" if native_bf16(device.type) else "fp32"
    return precision


def autocast(device: torch.device, precision: str):
    """The forward pass's precision context: bf16 autocast, or nothing for fp32 ('auto': as
    resolve_precision decides for the device)."""
    if resolve_precision(device, precision) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool):
    """Reduce gradients over processes in this backward pass only if `enabled` (the last
    micro-batch of an accumulated step)."""
    if isinstance(model, nn.parallel.DistributedDataParallel) and not enabled:
        with model.no_sync():
            yield
        return
    if is_sharded(model):
        model.set_requires_gradient_sync(enabled)
    yield


def for_inference(model):
    """The module to run without gradients: DDP's inner module (no collectives needed); a
    sharded (FSDP) model as it is, since it must gather its parameters."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def is_sharded(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(model, FSDPModule)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole value (a collective); a plain tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def grad_norm_and_clip(params: list, max_norm: float = 0.0) -> torch.Tensor:
    """The global L2 norm of all gradients (over every process's shards), clipping them to
    `max_norm` when it is positive. Non-finite when any gradient is."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norm = torch.nn.utils.get_total_norm(grads, foreach=True)
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm, foreach=True)
    return full_tensor(norm)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over processes (t itself with one process)."""
    if not current().distributed:
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean over processes (a sum and a division: gloo has no AVG)."""
    return all_reduce_sum(t) / current().world_size


def all_agree(flag: bool, device) -> bool:
    """True on every process iff `flag` is true on every process."""
    t = all_reduce_sum(torch.tensor([0.0 if flag else 1.0], device=device))
    return bool(t.item() == 0)


def any_process(flag: bool, device) -> bool:
    """True on every process iff `flag` is true on any process."""
    return not all_agree(not flag, device) if current().distributed else flag


def first_process_first(fn, device, elsewhere: Exception) -> None:
    """fn() on the first process, then on the others (which may read what the first prepared).
    Every process learns of a failure, so all stop (none waits forever): the failing one raises
    its error, the others `elsewhere`. One process: fn() as it is."""
    info = current()
    if not info.distributed:
        return fn()
    for turn in (0, 1):
        error = None
        if (turn == 0) == info.is_main:
            try:
                fn()
            except Exception as e:          # every process must reach the agreement below
                error = e
        if not all_agree(error is None, device):
            raise error if error is not None else elsewhere


# ----------------------------------------------------------------------------------------------
# Unsharded state for checkpoints

def parameter_names(model: nn.Module) -> list:
    """Parameter names in `model.parameters()` order: the order an optimizer over
    `model.parameters()` (ours, and the reference's encoder-then-decoder list) numbers them."""
    return [name for name, _ in model.named_parameters()]


def gather_full_state(model: nn.Module, optimizer=None) -> tuple[Optional[dict], Optional[dict]]:
    """(model state dict, optimizer state dict in the single-process format), unsharded, on CPU,
    on rank 0 (None elsewhere). A collective under FSDP: every rank must call it."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd = get_model_state_dict(model, options=options)
    optim_sd = get_optimizer_state_dict(model, optimizer, options=options) if optimizer else None
    if dist.get_rank() != 0:
        return None, None
    if optim_sd is not None:
        optim_sd = optimizer_state_by_index(optim_sd, parameter_names(model))
    return model_sd, optim_sd


def load_full_state(model: nn.Module, model_sd: dict, optimizer=None, optim_sd=None,
                    strict: bool = True) -> None:
    """Loads an unsharded state (every rank holds it whole) into a sharded model / optimizer."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    set_model_state_dict(model, model_sd, options=StateDictOptions(full_state_dict=True, strict=strict))
    if optimizer is not None and optim_sd is not None:
        set_optimizer_state_dict(model, optimizer, optimizer_state_by_name(optim_sd, parameter_names(model)),
                                 options=StateDictOptions(full_state_dict=True))


def optimizer_state_by_index(sd: dict, names: list) -> dict:
    """An optimizer state keyed by parameter name (torch.distributed.checkpoint's form) ->
    keyed by index in `names` (torch.optim's own form, the one checkpoints hold)."""
    index = {n: i for i, n in enumerate(names)}
    return {"state": {index[k]: v for k, v in sd.get("state", {}).items()},
            "param_groups": [dict(g, params=[index[p] for p in g["params"]])
                             for g in sd["param_groups"]]}


def optimizer_state_by_name(sd: dict, names: list) -> dict:
    """The inverse of optimizer_state_by_index."""
    count = sum(len(g["params"]) for g in sd["param_groups"])
    if count != len(names):
        raise ValueError(f"the optimizer state has {count} parameters, the model {len(names)}")
    return {"state": {names[int(k)]: v for k, v in sd.get("state", {}).items()},
            "param_groups": [dict(g, params=[names[int(p)] for p in g["params"]])
                             for g in sd["param_groups"]]}
