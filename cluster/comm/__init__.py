"""Communicators: one interface (base.Communicator), one implementation per backend.

local: world size 1. mpi: MPICommunicator (mpi4py buffers). ray: RayCommunicator over a shared-memory group
(shm.ShmGroup, one node) or a TCP group (tcp.TcpGroup, across nodes). mpi4py and ray are imported when an
MPI or Ray communicator is made, so importing this package never imports them."""
from .base import Communicator
from .local import LocalCommunicator
from .mpi import MPICommunicator
from .ray_comm import RayCommunicator

__all__ = ["Communicator", "LocalCommunicator", "MPICommunicator", "RayCommunicator"]
