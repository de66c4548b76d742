"""Communicators: one interface (base.Communicator), one implementation per backend.

local: world size 1. mpi: MPICommunicator (mpi4py buffers). ray: RayCommunicator over a shared-memory group
(shm.ShmGroup, one node) or a TCP group (tcp.TcpGroup, across nodes). The MPI and Ray ones load lazily, so
importing this package never imports mpi4py or ray."""
from .base import Communicator
from .local import LocalCommunicator

__all__ = ["Communicator", "LocalCommunicator", "MPICommunicator", "RayCommunicator"]


def __getattr__(name):
    if name == "MPICommunicator":
        from .mpi import MPICommunicator
        return MPICommunicator
    if name == "RayCommunicator":
        from .ray_comm import RayCommunicator
        return RayCommunicator
    raise AttributeError(name)
