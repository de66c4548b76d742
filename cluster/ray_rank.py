"""A Ray rank: the actor class one training process runs in (Ray places it and restarts nothing: when a rank dies
the launcher tears the whole group down and starts a new one from the last checkpoint, launch/launch_ray.py).
The driver creates W of them, joins them into a group (cluster.comm.ray_comm.form_group), then calls
`run(target, args)` on all at once."""
from __future__ import annotations

import os
import socket

from .comm.auth import derive_key
from .comm.mesh import PURPOSE
from .comm.netif import interface_address
from .comm.ray_comm import RayCommunicator
from .comm.shm import ShmGroup
from .comm.tcp import TcpGroup
from .metrics_channel import ENV_TOKEN
from .rank_entry import reported, start_rank
from .worker_process import pin_threads


class RankActor:
    def __init__(self, rank: int, world_size: int, env: dict, threads: int):
        os.environ.update({k: str(v) for k, v in env.items()})
        pin_threads(threads)
        self.rank, self.world_size, self.threads = rank, world_size, threads
        self.group = None
        self._shm = None

    def node_info(self) -> dict:
        import ray  # the actor runs inside Ray; this module is importable without it
        ctx = ray.get_runtime_context()
        return {"rank": self.rank, "host": socket.gethostname(), "ip": ray.util.get_node_ip_address(),
                "pid": os.getpid(), "node": ctx.get_node_id()}

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
            return start_rank(RayCommunicator(self.rank, self.world_size, self.group), target, args, self.threads)
        except Exception as e:
            if getattr(e, "one_line", False) and reported(e):
                return None  # the coordinator has the one-line reason; a raise would only add Ray's traceback
            raise
