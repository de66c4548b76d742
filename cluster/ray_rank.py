"""A Ray rank: the actor class one training process runs in (Ray places it and restarts nothing: when a rank dies
the launcher tears the whole group down and starts a new one from the last checkpoint, launch/launch_ray.py).
The driver creates W of them, joins them into a group (cluster.comm.ray_comm.form_group), then calls
`run(target, args)` on all at once.

An elastic run (launch/elastic.py) creates the actors with max_concurrency > 1, so the driver's control calls
(abort_group, request, is_waiting, assign + form_group's joins, release) reach a rank while its run() trains or
waits for the next group in another thread (cluster/elastic_rank.py)."""
from __future__ import annotations

import os
import socket

from .comm.auth import derive_key
from .comm.mesh import PURPOSE
from .comm.netif import interface_address
from .comm.ray_comm import RayCommunicator
from .comm.shm import ShmGroup
from .comm.tcp import TcpGroup
from .elastic_rank import GroupBroken, Membership
from .metrics_channel import ENV_TOKEN
from .rank_entry import reported, start_rank
from .worker_process import pin_threads


class RankActor:
    def __init__(self, rank: int, world_size: int, env: dict, threads: int, elastic: bool = False,
                 member: int | None = None, joining: bool = False):
        """elastic: the rank may regroup (its Membership); member: its id at the coordinator (default: rank);
        joining: it joins a running elastic group (rank, world_size are placeholders until assign)."""
        os.environ.update({k: str(v) for k, v in env.items()})
        pin_threads(threads)
        self.rank, self.world_size, self.threads = rank, world_size, threads
        self.member = rank if member is None else member
        self.membership = Membership(joining, self.member) if elastic else None
        self.group = None
        self._shm = None

    def node_info(self) -> dict:
        import ray  # the actor runs inside Ray; this module is importable without it
        ctx = ray.get_runtime_context()
        return {"rank": self.rank, "member": self.member, "host": socket.gethostname(),
                "ip": ray.util.get_node_ip_address(), "pid": os.getpid(), "node": ctx.get_node_id()}

    # -- an elastic run's control calls (another thread than run()) --------------------------------------------------
    def abort_group(self) -> None:
        """Wake this rank (and, through shared memory, its node's peers) out of a collective on the current group."""
        if self.group is not None and hasattr(self.group, "abort"):
            self.group.abort()

    def request(self) -> None:
        self.membership.request()

    def is_waiting(self) -> bool:
        return self.membership.waiting

    def assign(self, rank: int, world_size: int) -> None:
        """This rank's number in the group about to be formed (form_group's joins use it)."""
        self.rank, self.world_size = rank, world_size

    def release(self, info: dict) -> None:
        """The new group is formed: hand its communicator to the waiting training thread."""
        comm = RayCommunicator(self.rank, self.world_size, self.group, elastic=True, broken=GroupBroken)
        self.membership.release(comm, info)

    def join_shm(self, path: str, create: bool, slot_bytes: int, timeout: float) -> None:
        self.group = ShmGroup(path, self.rank, self.world_size, create, slot_bytes=slot_bytes, timeout=timeout)

    def unlink_shm(self) -> None:
        self.group.unlink()

    def listen_tcp(self, loopback: bool, iface: str = "") -> tuple[str, int]:
        """Open this rank's TCP mesh listener; returns the (ip, port) its peers dial. It binds loopback when every
        rank shares this node, else the address of `iface` (cluster.iface) or, without one, the address Ray uses
        for this node. The mesh key is derived from the run's secret (NDTRAIN_COORD_TOKEN, given by the driver
        through the actor's constructor, never a command line)."""
        import ray  # the actor runs inside Ray; this module is importable without it
        if loopback:
            host = "127.0.0.1"
        else:
            host = interface_address(iface) if iface else ray.util.get_node_ip_address()
        key = derive_key(os.environ.get(ENV_TOKEN, ""), PURPOSE)
        self.group = TcpGroup(self.rank, self.world_size, key=key, host=host)
        return host, self.group.port

    def connect_tcp(self, peers: list, timeout: float) -> None:
        self.group.timeout = timeout
        self.group.connect([tuple(p) for p in peers])

    def run(self, target: str, args: dict):
        try:
            comm = RayCommunicator(self.rank, self.world_size, self.group, elastic=self.membership is not None,
                                   broken=GroupBroken)
            return start_rank(comm, target, args, self.threads, membership=self.membership, member=self.member)
        except Exception as e:
            if getattr(e, "one_line", False) and reported(e):
                return None  # the coordinator has the one-line reason; a raise would only add Ray's traceback
            raise
