"""Several processes (`accelerate launch`, `torchrun`): who writes, who waits, who does what.

cai runs the same command in every process. Under a launcher (WORLD_SIZE > 1) the
processes join one process group through accelerate's `PartialState` (gloo on CPU,
nccl on GPUs); alone, none of this does anything. The rules:

- Only the main process writes: manifests, datasets, models, the report, progress
  markers (`cai.rundir`'s writers are no-ops elsewhere) and prints progress.
- Data stages split their chunks across the processes (chunk i to process i mod N in
  rounds of N), the main process gathers the rows and commits them in chunk order, so N
  processes write exactly what one writes.
- Training stages run TRL's own distributed path (the Trainer's accelerate state).
- The others wait at `barrier()`s where the main process writes something they read.
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Any


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_world_size() -> int:
    """Processes of this run on this machine (torchrun / accelerate set LOCAL_WORLD_SIZE)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))


def distributed() -> bool:
    return world_size() > 1


@lru_cache(maxsize=1)
def state():
    """accelerate's process state, created once (gloo on CPU, nccl on CUDA)."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def rank() -> int:
    return state().process_index if distributed() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if distributed():
        state().wait_for_everyone()


def broadcast(value: Any) -> Any:
    """The main process's `value`, in every process."""
    if not distributed():
        return value
    from accelerate.utils import broadcast_object_list

    box = [value if is_main() else None]
    broadcast_object_list(box, from_process=0)
    return box[0]


def gather(value: Any) -> list:
    """Every process's `value`, in process order (in every process)."""
    if not distributed():
        return [value]
    import torch.distributed as dist

    out: list = [None] * world_size()
    dist.all_gather_object(out, value)
    return out


def finish() -> None:
    """Leave the process group together: a process that exits while another still talks
    to it over gloo can abort that one."""
    if distributed():
        import torch.distributed as dist

        barrier()
        if dist.is_initialized():
            dist.destroy_process_group()
