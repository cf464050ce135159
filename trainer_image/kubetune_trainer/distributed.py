"""The process group of a run under torchrun, or a single process without it; the model's data
parallelism across the group: replicated (DDP) or sharded (FSDP2), and the sharded model's state
gathered whole for checkpoints and outputs, and scattered back on resume.

torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` for
each process it starts; without them the trainer is one process and nothing here communicates.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from kubetune_contract.config import Strategy

from .errors import EXIT_FAILED, RunFailed, TrainerError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# The ranks wait for each other while one prepares (downloads), checkpoints or publishes (a merged
# model's upload can take hours): they do so on their own gloo group, whose timeout is this, not
# the training group's.
FINISH_TIMEOUT = timedelta(hours=24)
_finish_group: Any = None


@dataclass(frozen=True)
class World:
    """This process's place among the processes of the run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 reports progress, writes checkpoints and publishes the outputs."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def device(self) -> torch.device:
        """``cuda:LOCAL_RANK`` when CUDA is available, else the CPU."""
        import torch

        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank % torch.cuda.device_count())
        return torch.device("cpu")

    @contextlib.contextmanager
    def fail_together(self) -> Iterator[None]:
        """Run the block (on the ranks that do the work), then go on together or fail together.

        The ranks that skip the block call :meth:`agree` with ``None`` at the same point. When the
        block raises on one process the error goes on as it is.
        """
        try:
            yield
        except Exception as err:
            self.agree(err)
            raise
        self.agree(None)

    def agree(self, error: BaseException | None) -> None:
        """Every rank says whether it failed (``error``); when one did, every rank raises
        :class:`RunFailed` with the first failed rank's message and exit code. Without it, a rank
        waiting for a failed one sees only a closed connection, exits 1, and may be the process the
        launcher sees end first, so the run's exit code would be 1 whatever the trainer meant.

        It is a barrier too, on the gloo group whose timeout is a day: the rank the others wait
        for may be downloading a large model or publishing a merged one. A rank that dies without
        saying why (killed) makes it raise on the others: they stop with it.
        """
        if not self.distributed:
            return
        import torch

        mine: tuple[str, int] | None = None
        if error is not None:
            if not isinstance(error, TrainerError):
                log.error("%s: %s", type(error).__name__, error, exc_info=error)
            mine = (str(error) if isinstance(error, TrainerError) else f"{type(error).__name__}: {error}",
                    getattr(error, "exit_code", EXIT_FAILED))
        try:
            said = all_gather_json(mine, self.world_size, torch.device("cpu"), group=_finish_group)
        except RuntimeError as err:
            raise RuntimeError(f"another rank stopped ({err}); this rank stops with it") from err
        failed = [(rank, outcome) for rank, outcome in enumerate(said) if outcome is not None]
        if not failed:
            return
        rank, (message, code) = failed[0]
        raise RunFailed(message if rank == self.rank else f"rank {rank} failed: {message}", code) from error

    def leave_together(self) -> None:
        """After a failure every rank agreed on: return once every rank has reported it, so that no
        process exits (and has torchrun stop the others) before rank 0 has written its termination
        message. Errors are ignored: the run has failed already."""
        if not self.distributed:
            return
        import torch

        with contextlib.suppress(RuntimeError):
            torch.distributed.barrier(group=_finish_group)

    def all_reduce_sum(self, values: list[float], dev: torch.device) -> list[float]:
        """Element-wise sum of ``values`` over every rank (the values themselves on one process)."""
        if not self.distributed:
            return list(values)
        import torch

        tensor = torch.tensor(values, dtype=torch.float64, device=dev)
        torch.distributed.all_reduce(tensor)
        return [float(v) for v in tensor.tolist()]

    def any(self, flag: bool, dev: torch.device) -> bool:
        """Whether ``flag`` is true on any rank."""
        return self.all_reduce_sum([1.0 if flag else 0.0], dev)[0] > 0

    def all_gather(self, value: Any, dev: torch.device) -> list[Any]:
        """Every rank's JSON-serializable ``value``, in rank order (all_gather_json)."""
        if not self.distributed:
            return [value]
        return all_gather_json(value, self.world_size, dev)

    def broadcast_int(self, value: int, dev: torch.device) -> int:
        """Rank 0's ``value`` on every rank."""
        if not self.distributed:
            return value
        import torch

        tensor = torch.tensor([value], dtype=torch.int64, device=dev)
        torch.distributed.broadcast(tensor, src=0)
        return int(tensor.item())


def all_gather_json(value: Any, world_size: int, dev: torch.device, group: Any = None) -> list[Any]:
    """Every rank's JSON-serializable ``value``, in rank order: exchanged as UTF-8 bytes in tensors
    and parsed as JSON, so a peer's data is never unpickled (torch's *_object collectives would).
    JSON turns tuples into lists."""
    import torch

    payload = torch.tensor(list(json.dumps(value).encode()), dtype=torch.uint8, device=dev)
    sizes = [torch.zeros(1, dtype=torch.int64, device=dev) for _ in range(world_size)]
    torch.distributed.all_gather(sizes, torch.tensor([payload.numel()], dtype=torch.int64, device=dev), group=group)
    longest = max(int(size.item()) for size in sizes)
    padded = torch.zeros(longest, dtype=torch.uint8, device=dev)
    padded[: payload.numel()] = payload
    gathered = [torch.zeros(longest, dtype=torch.uint8, device=dev) for _ in range(world_size)]
    torch.distributed.all_gather(gathered, padded, group=group)
    return [json.loads(bytes(g[: int(n.item())].tolist()).decode()) for g, n in zip(gathered, sizes, strict=True)]


def world_from_env(env: dict[str, str] | None = None) -> World:
    """The world torchrun describes in the environment; one process when it says nothing."""
    env = dict(os.environ) if env is None else env
    if "WORLD_SIZE" not in env:
        return World()
    world = World(int(env.get("RANK", "0")), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0")))
    if not 0 <= world.rank < world.world_size:
        raise ValueError(f"RANK={world.rank} is outside 0..WORLD_SIZE-1={world.world_size - 1}")
    return world


def init(world: World) -> None:
    """Join the process group: NCCL on CUDA (one device per local rank), gloo on the CPU."""
    import torch

    if not world.distributed or torch.distributed.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(world.device())
        backend = "nccl"
    else:
        backend = "gloo"
    torch.distributed.init_process_group(backend=backend, rank=world.rank, world_size=world.world_size)
    global _finish_group
    _finish_group = torch.distributed.new_group(backend="gloo", timeout=FINISH_TIMEOUT)
    log.info("process group: rank %d of %d (local rank %d), backend %s",
             world.rank, world.world_size, world.local_rank, backend)


def shutdown() -> None:
    """Leave the process group, when this process joined one."""
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def wrap(model: Any, world: World, dev: torch.device, strategy: Strategy = "ddp") -> Any:
    """The model to run forward and backward passes through (``model`` itself on one process).

    ddp: ``model`` inside DistributedDataParallel over its trainable parameters. The frozen weights
    (quantized ones included) and the buffers are loaded identically on every rank, so DDP neither
    broadcasts them at start nor syncs buffers per forward; only the trained parameters are
    broadcast from rank 0 and have their gradients averaged.

    fsdp: ``model`` itself, sharded in place (:func:`shard`); its parameters are new objects, so
    an optimizer must be made after this.
    """
    if not world.distributed:
        return model
    if strategy == "fsdp":
        return shard(model, world, dev)
    from torch.nn.parallel import DistributedDataParallel

    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    frozen += [name for name, _ in model.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen)  # type: ignore[no-untyped-call]
    return DistributedDataParallel(
        model,
        device_ids=[dev.index] if dev.type == "cuda" else None,
        broadcast_buffers=False,
    )


def shard(model: Any, world: World, dev: torch.device) -> Any:
    """Shard ``model`` in place over the ranks with PyTorch's FSDP2 (``fully_shard``).

    Each decoder layer (the classes the backbone names in ``_no_split_modules``) is one unit: its
    weights, frozen and trained, are split in dim 0 across the ranks and all-gathered for its
    forward and backward pass only. The backbone itself is the root unit (embeddings, final norm,
    head). The root is the transformers model, not the peft wrapper around it, so that
    ``generate()``, which calls the transformers model directly, runs through FSDP's hooks too.
    Gradients are reduce-scattered (averaged over the ranks) after every backward pass, so they
    stay sharded; the optimizer then updates each rank's shards only.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(dev.type, (world.world_size,))
    backbone = model.get_base_model() if hasattr(model, "get_base_model") else model
    layer_classes = set(getattr(backbone, "_no_split_modules", None) or ())
    layers = [m for m in backbone.modules() if type(m).__name__ in layer_classes]
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(backbone, mesh=mesh)
    log.info("fsdp: %d decoder layers and the rest of the backbone sharded over %d ranks",
             len(layers), world.world_size)
    return model


def _full_options() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # Whole tensors, gathered into rank 0's CPU memory (the other ranks get an empty dict).
    return StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)


def gather_model_state(model: Any) -> dict[str, torch.Tensor]:
    """The trained parameters (and persistent buffers) of a sharded model, whole, on rank 0's CPU;
    ``{}`` on the other ranks. Collective: every rank must call it."""
    import torch
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model, options=_full_options())
    return {name: value for name, value in state.items() if isinstance(value, torch.Tensor)}


def gather_trainable_state(model: Any) -> dict[str, torch.Tensor]:
    """For a sharded model what ``model.trainable_state`` (kubetune_trainer.model) returns for an
    unsharded one: the trained parameters by name, whole, on rank 0's CPU; ``{}`` on the other
    ranks. Collective."""
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    return {name: t.contiguous() for name, t in gather_model_state(model).items() if name in trained}


def _parameter_names(model: Any, optimizer: Any) -> list[str]:
    """The names of the optimizer's parameters, in the optimizer's order (its state dict's numbering)."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def gather_optimizer_state(model: Any, optimizer: Any) -> dict[str, Any]:
    """The optimizer state of a sharded model, whole, on rank 0's CPU (``{}`` on the other ranks),
    in the layout of an unsharded optimizer's ``state_dict()``: parameters numbered in the
    optimizer's order. So a checkpoint has one format whatever the strategy. Collective."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state: dict[str, Any] = get_optimizer_state_dict(model, optimizer, options=_full_options())
    if not state:
        return {}
    index = {name: i for i, name in enumerate(_parameter_names(model, optimizer))}
    return {
        "state": {index[name]: value for name, value in state["state"].items()},
        "param_groups": [{**group, "params": [index[name] for name in group["params"]]}
                         for group in state["param_groups"]],
    }


def load_sharded_state(model: Any, optimizer: Any, trainable: dict[str, torch.Tensor],
                        optimizer_state: dict[str, Any]) -> None:
    """Load whole trained weights and an optimizer state dict (as :func:`gather_trainable_state`
    and :func:`gather_optimizer_state` return them) into a sharded model and its optimizer: each
    rank, given the whole state, keeps its own shards. Collective."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    names = _parameter_names(model, optimizer)
    groups = optimizer_state["param_groups"]
    sizes = [len(group["params"]) for group in optimizer.param_groups]
    numbered = sorted(i for group in groups for i in group["params"])
    if ([len(group["params"]) for group in groups] != sizes or numbered != list(range(len(names)))
            or not set(optimizer_state["state"]) <= set(numbered)):
        raise ValueError(f"the optimizer state does not match the optimizer's parameter groups {sizes}")
    by_name: dict[str, Any] = {
        "state": {names[i]: value for i, value in optimizer_state["state"].items()},
        "param_groups": [{**group, "params": [names[i] for i in group["params"]]} for group in groups],
    }
    # Only the trained weights are in ``trainable``: the frozen ones stay as loaded.
    weights: dict[str, Any] = dict(trainable)
    options = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, weights, options=options)
    set_optimizer_state_dict(model, optimizer, by_name, options=options)
