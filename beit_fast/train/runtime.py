"""Where a run executes: device, precision, torchrun process group, DDP / FSDP wrapping.

Under torchrun (WORLD_SIZE > 1) the process group uses NCCL on GPUs and gloo on CPU; rank 0 logs and
saves; every rank computes. A plain `python` run is a world of one and never touches torch.distributed.
"""
from __future__ import annotations

import atexit
import contextlib
import datetime
import inspect
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False     # we created the process group (and so destroy it at the end)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """auto / cpu / cuda / cuda:N. `cuda` is this process's GPU: cuda:LOCAL_RANK, or cuda:0 when the process
    sees a single GPU (a launcher giving each task its own CUDA_VISIBLE_DEVICES) and torchrun did not start
    more processes on this node than that (LOCAL_WORLD_SIZE)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"device={name!r} but CUDA is not available; use device=cpu or auto")
        count = torch.cuda.device_count()
        if name == "cuda":
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
            if local_rank >= count and (count != 1 or local_world > count):
                raise RuntimeError(f"local rank {local_rank} has no GPU of its own: this process sees {count} "
                                   f"GPUs (cuda:0 .. cuda:{count - 1}); start at most {count} processes per node")
            name = f"cuda:{local_rank if local_rank < count else 0}"
    return torch.device(name)


def setup(device: str = "auto") -> Runtime:
    """Read torchrun's environment, join the process group when WORLD_SIZE > 1, pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    dev = pick_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    owns = False
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(minutes=30),
                                device_id=dev if dev.type == "cuda" else None)
        owns = True
        atexit.register(leave_group)
    return Runtime(dev, rank, world, local_rank, owns)


_LEAVE_AT_EXIT = [True]   # False once a failed rank must not shut its NCCL group down (see teardown)


def leave_group() -> None:
    """Destroy the process group this process is in (at exit, and from the CLI before its os._exit), unless
    a failed rank left an NCCL group that must not be shut down."""
    if _LEAVE_AT_EXIT[0] and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def teardown(rt: Runtime, failed: bool = False) -> None:
    """End a run: a barrier, unless this rank failed (then the others may never arrive). The process group
    this module created stays for the rest of the process (destroyed at exit): a second run in the same
    process (pretrain() then finetune() from one script under torchrun) reuses it, where creating it again
    from torchrun's store read the first group's stale addresses (gloo: connection refused, or a hang). A
    failed rank leaves a gloo group at once; an NCCL group it leaves undestroyed: NCCL's shutdown waits for
    the rank's in-flight collectives, which peers that never issue theirs would never complete, so the
    failure would hang until the group's timeout instead of reaching torchrun (which then stops the other
    ranks)."""
    if rt.distributed and dist.is_initialized():
        if not failed:
            dist.barrier()
        elif rt.owns_group and dist.get_backend() != "nccl":
            dist.destroy_process_group()
        elif rt.owns_group:
            _LEAVE_AT_EXIT[0] = False   # not at exit either: the failure must reach torchrun


def run(device: str, body, *args):
    """setup(device), body(*args, rt), teardown: the process group is left also when body fails."""
    rt = setup(device)
    try:
        result = body(*args, rt)
    except BaseException:
        teardown(rt, failed=True)
        raise
    teardown(rt)
    return result


def barrier(rt: Runtime) -> None:
    if rt.distributed:
        dist.barrier()


def all_reduce(t: torch.Tensor, rt: Runtime, op: str = "mean") -> torch.Tensor:
    """Sum, mean or max over ranks (a no-op in a world of one); returns the reduced tensor."""
    if op not in ("mean", "sum", "max"):
        raise ValueError(f"op must be 'mean', 'sum' or 'max', got {op!r}")
    if not rt.distributed:
        return t
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t / rt.world if op == "mean" else t


def gather_objects(obj, rt: Runtime) -> list:
    if not rt.distributed:
        return [obj]
    out = [None] * rt.world
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, rt: Runtime, src: int = 0):
    if not rt.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str):
    """bf16 / fp16 autocast, or nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision])


def grad_scaler(device: torch.device, precision: str):
    """Dynamic loss scaling for fp16 (steps whose gradients overflow are skipped); disabled otherwise."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def wrap(model: torch.nn.Module, rt: Runtime, mode: str = "ddp"):
    """DDP (default) or FSDP when running distributed. Build the optimizer after this call (FSDP replaces
    the parameters by their shards).

    FSDP shards each block as its own unit and the rest (embedding, shared table, heads) as the root unit.
    The fused model calls such a block as a module (`block(x, fused=True)`, see Beit.forward_features), so
    FSDP gathers its parameters around its fused kernels too."""
    if not rt.distributed:
        return model
    if mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        # the mesh names the run's device: without one FSDP shards onto the accelerator whenever there is
        # one, also for a CPU (gloo) run on a GPU machine
        mesh = init_device_mesh(rt.device.type, (rt.world,))
        # Parameters are gathered and gradients reduced in fp32, whatever the precision: autocast then casts
        # the GEMM weights as in a DDP or one-GPU run. FSDP's param_dtype=bf16/fp16 would halve the gather
        # traffic but also cast what autocast keeps in fp32 (layer-scale gammas, cls/mask tokens, the
        # position tables, the norms) and, through cast_forward_inputs, the residual stream between blocks,
        # where BEiT-L's 1e-5 layer-scaled updates are below one bf16/fp16 ulp.
        kw = dict(mesh=mesh)
        for blk in model.blocks:
            fully_shard(blk, **kw)
        fully_shard(model, **kw)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP
    ids = [rt.device.index] if rt.device.type == "cuda" else None
    # every parameter takes part in every step (unilm's find_unused_parameters=True only costs time); the
    # model's buffers are constants (index tables), so no per-forward broadcast
    # (torch 2.13 renamed the switch: forward_sync_buffers; broadcast_buffers warns from then on)
    renamed = "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
    return DDP(model, device_ids=ids, find_unused_parameters=False,
               **({"forward_sync_buffers": False} if renamed else {"broadcast_buffers": False}))


def is_sharded(model: torch.nn.Module) -> bool:
    """True for a model wrapped by `wrap(..., mode="fsdp")` (its parameters are shards)."""
    model = unwrap(model)
    if not (dist.is_available() and dist.is_initialized()):
        return False
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def no_sync(model: torch.nn.Module, rt: Runtime, active: bool = True):
    """Skip the gradient all-reduce / reduce-scatter for this backward (gradient accumulation)."""
    if not (active and rt.distributed):
        yield
        return
    if is_sharded(model):
        inner = unwrap(model)
        inner.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            inner.set_requires_gradient_sync(True)
        return
    with model.no_sync():
        yield


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The user's model inside DDP / FSDP / torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None or inner is model:
            return model
        model = inner


def _full_state_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=True, **kw)


def model_state_dict(model: torch.nn.Module) -> dict:
    """Full (unsharded) state dict on CPU. Collective under FSDP (every rank calls it; rank 0 gets the tensors,
    the others an empty dict)."""
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import get_model_state_dict
        return get_model_state_dict(unwrap(model), options=_full_state_options(cpu_offload=True))
    return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}


def load_model_state(model: torch.nn.Module, state: dict) -> None:
    """Load a full state dict (every rank passes the same one); strict."""
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import set_model_state_dict
        set_model_state_dict(unwrap(model), state, options=_full_state_options(strict=True))
    else:
        unwrap(model).load_state_dict(state)


def optimizer_state_dict(model, optimizer) -> dict:
    """The optimizer's state; under FSDP the full state keyed by parameter name (collective, rank 0 gets it)."""
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
        return get_optimizer_state_dict(unwrap(model), optimizer, options=_full_state_options(cpu_offload=True))
    return optimizer.state_dict()


def load_optimizer_state(model, optimizer, state: dict) -> None:
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict
        set_optimizer_state_dict(unwrap(model), optimizer, state, options=_full_state_options())
    else:
        optimizer.load_state_dict(state)
