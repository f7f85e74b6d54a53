"""One collective for the whole package: rank, barrier, broadcast and gather over a Lightning
``Strategy`` or a ``Fabric``, or a single process.

Every piece of work that is shared out over DDP ranks (purification caches, friendly noise, evaluation
trials, certification models) talks to the other ranks through :class:`Collective`, never through
``torch.distributed`` directly: global rank 0 writes, the others wait at a barrier.
"""

from __future__ import annotations

from typing import Any, Optional

import torch


class Collective:
    """Rank information and collectives of a Lightning ``Strategy`` or ``Fabric``; one process when None.

    Args:
        backend: A ``lightning.pytorch.strategies.Strategy``, a ``lightning.fabric.Fabric``, or None.

    Example::

        collective = Collective.of(trainer)
        if collective.rank == 0:
            write(path)
        collective.barrier("written")
    """

    def __init__(self, backend: Any = None) -> None:
        self.backend = backend

    @classmethod
    def of(cls, owner: Any) -> "Collective":
        """The collective of a ``Trainer`` (its strategy), a ``Strategy``, a ``Fabric``, or None (one process)."""
        if owner is None or isinstance(owner, Collective):
            return owner if owner is not None else cls()
        strategy = getattr(owner, "strategy", None)
        if strategy is not None and hasattr(owner, "fit_loop"):  # a Trainer
            return cls(strategy)
        return cls(owner)

    @property
    def rank(self) -> int:
        return int(getattr(self.backend, "global_rank", 0)) if self.backend is not None else 0

    @property
    def world_size(self) -> int:
        return int(getattr(self.backend, "world_size", 1)) if self.backend is not None else 1

    @property
    def is_distributed(self) -> bool:
        """More than one process, with the process group up (a launcher's children before ``setup`` are not)."""
        return self.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()

    @property
    def device(self) -> torch.device:
        """The device this rank computes on (CPU without a backend)."""
        if self.backend is None:
            return torch.device("cpu")
        root = getattr(self.backend, "root_device", None) or getattr(self.backend, "device", None)
        return torch.device(root) if root is not None else torch.device("cpu")

    def barrier(self, name: Optional[str] = None) -> None:
        if self.is_distributed:
            self.backend.barrier(name)

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """``obj`` as rank ``src`` holds it, on every rank."""
        return self.backend.broadcast(obj, src=src) if self.is_distributed else obj

    def gather(self, obj: Any) -> Optional[list]:
        """Every rank's ``obj`` in rank order on global rank 0 (None on the others)."""
        if not self.is_distributed:
            return [obj]
        gathered = [self.backend.broadcast(obj if r == self.rank else None, src=r) for r in range(self.world_size)]
        return gathered if self.rank == 0 else None

    def share_rank_zero_weights(self, module: torch.nn.Module) -> None:
        """Copy rank 0's parameters and buffers to every rank.

        BatchNorm's running statistics drift apart per rank between DDP's buffer broadcasts; copying rank
        0's makes whatever follows (generation, scoring) one model's.
        """
        if not self.is_distributed:
            return
        state = self.broadcast({k: v.detach().cpu() for k, v in module.state_dict().items()}, src=0)
        with torch.no_grad():
            for name, tensor in module.state_dict().items():
                tensor.copy_(state[name].to(tensor.device))


def release_process_group() -> None:
    """Destroy the default process group a DDP run leaves behind (Lightning keeps it for reuse), so each
    process shuts its gloo/NCCL threads down before the interpreter exits instead of racing them at exit
    (seen as "terminate called without an active exception"). A no-op without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
