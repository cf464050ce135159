"""The process group of a run under torchrun (DDP), or a single process without it.

torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` for
each process it starts; without them the trainer is one process and nothing here communicates.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# The wait at the end of a run lasts as long as rank 0 publishes (a merged model's upload can take
# hours): it runs on its own gloo group, whose timeout is this, not the training group's.
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

    def barrier(self) -> None:
        import torch

        if self.distributed:
            torch.distributed.barrier()

    def finish_together(self) -> None:
        """Return once every rank is done: rank 0 once it has published.

        Over several pods, a pod whose processes exit 0 completes its index of the Indexed Job for
        good, so no rank may end before rank 0 has published. If rank 0 fails instead, its process
        group goes away and this raises: the other ranks fail with it and the Job restarts the group.
        """
        if not self.distributed:
            return
        import torch

        try:
            torch.distributed.barrier(group=_finish_group)
        except RuntimeError as err:
            raise RuntimeError(f"rank 0 did not finish the run ({err}); this rank stops with it") from err

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

    def broadcast_int(self, value: int, dev: torch.device) -> int:
        """Rank 0's ``value`` on every rank."""
        if not self.distributed:
            return value
        import torch

        tensor = torch.tensor([value], dtype=torch.int64, device=dev)
        torch.distributed.broadcast(tensor, src=0)
        return int(tensor.item())


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


def wrap(model: Any, world: World, dev: torch.device) -> Any:
    """``model`` inside DistributedDataParallel over its trainable parameters (itself on one process).

    The frozen weights (quantized ones included) and the buffers are loaded identically on every
    rank, so DDP neither broadcasts them at start nor syncs buffers per forward; only the trained
    parameters are broadcast from rank 0 and have their gradients averaged.
    """
    if not world.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    frozen += [name for name, _ in model.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen)  # type: ignore[no-untyped-call]
    return DistributedDataParallel(
        model,
        device_ids=[dev.index] if dev.type == "cuda" else None,
        broadcast_buffers=False,
    )
