"""Ray communicator: one actor per rank; Ray places and supervises the processes, gradients do NOT go through Ray.

Transport, chosen by measurement (launch/bench/allreduce.py; README): when every rank runs on one node the actors
share a file in /dev/shm and all-reduce with NumPy (cluster.comm.shm: ~MPI speed, no per-call RPC); across nodes
they use TCP sockets between the actors (cluster.comm.tcp), connected through addresses the driver hands out. The
object store (17-30 ms per 4 MB here) and ray.util.collective (needs torch) are not used.

Driver side (launch/launch_ray.py):
    actors = [RankActor.options(num_cpus=k).remote(r, W, env) for r in range(W)]
    topology = form_group(actors, token)        # rendezvous: shm file or TCP mesh; returns each rank's node
"""
from __future__ import annotations

import json
from typing import Any

import numpy as np

from .base import Communicator
from .counters import CommCounters
from .mpi import _flat_view


class RayCommunicator(Communicator):
    """group: a transport with allreduce(flat), broadcast(flat, root), barrier(), allgather_bytes(b), close().
    elastic: any failure of a collective raises `broken` (cluster.elastic_rank.GroupBroken: the loop regroups)."""

    def __init__(self, rank: int, world_size: int, group, elastic: bool = False, broken=ConnectionError):
        self.rank, self.world_size, self.group = rank, world_size, group
        self.elastic, self._broken = elastic, broken
        # the transport's (shm.ShmGroup, tcp.TcpGroup): bytes on the wire and time blocked (counters.CommCounters)
        self.counters = getattr(group, "counters", None) or CommCounters()

    @property
    def overlaps_compute(self) -> bool:
        """True on a transport whose iallreduce progresses in the background (the TCP mesh's ring); the
        shared-memory group reduces inside the call."""
        return bool(getattr(self.group, "overlaps_compute", False))

    def _call(self, fn, *args):
        if not self.elastic:
            return fn(*args)
        try:
            return fn(*args)
        except (OSError, RuntimeError, ValueError) as e:  # ConnectionError, TimeoutError, ShmTimeout, an abort
            raise self._broken(f"rank {self.rank} of {self.world_size}: the group broke: {e}") from e

    def allreduce(self, buf: np.ndarray) -> None:
        if self.world_size > 1:
            self._call(self.group.allreduce, _flat_view(buf, f"RayCommunicator.allreduce on rank {self.rank}"))

    def iallreduce(self, buf: np.ndarray):
        if self.world_size > 1 and hasattr(self.group, "iallreduce"):
            h = self._call(self.group.iallreduce, _flat_view(buf, f"RayCommunicator.iallreduce on rank {self.rank}"))
            return _ElasticHandle(h, self) if self.elastic else h
        return super().iallreduce(buf)

    def broadcast(self, buf: np.ndarray, root: int = 0) -> None:
        if self.world_size > 1:
            self._call(self.group.broadcast, _flat_view(buf, f"RayCommunicator.broadcast on rank {self.rank}"), root)

    def barrier(self) -> None:
        if self.world_size > 1:
            self._call(self.group.barrier)

    def allgather_obj(self, obj: Any) -> list:
        if self.world_size == 1:
            return [obj]
        # JSON, not pickle: these bytes come off our own shared-memory / TCP transport (possibly from another host),
        # and the records are small JSON-able dicts by contract (config hashes, checksums, metric sums, RNG states).
        blob = json.dumps(obj, default=_json_default).encode()
        return [json.loads(b) for b in self._call(self.group.allgather_bytes, blob)]

    def abort(self) -> None:
        if hasattr(self.group, "abort"):
            self.group.abort()

    def close(self) -> None:
        if self.group is not None:
            self.group.close()
            self.group = None


class _ElasticHandle:
    def __init__(self, handle, comm):
        self._handle, self._comm = handle, comm

    def wait(self) -> None:
        self._comm._call(self._handle.wait)


def form_group(actors: list, token: str, slot_bytes: int = 4 << 20, timeout: float = 60.0,
               transport: str = "auto", iface: str = "") -> list[dict]:
    """Driver side: connect the rank actors (RankActor) into one communicator group. transport: "auto" (shm when
    all ranks share a node, else tcp), "shm" or "tcp". The TCP mesh listens on loopback when every rank shares a
    node, else on `iface`'s address (or Ray's node address); it authenticates every connection with a key derived
    from the run's secret the actors hold. Returns each rank's {"rank", "host", "ip", "pid", "node"}."""
    import ray  # ray: optional, seconds to import; only Ray ranks need it

    nodes = ray.get([a.node_info.remote() for a in actors], timeout=timeout)
    same_node = len({n["node"] for n in nodes}) == 1
    if transport == "auto":
        transport = "shm" if same_node else "tcp"
    if transport == "shm":
        if not same_node:
            raise ValueError("transport 'shm' needs every rank on one node; ranks are on "
                             f"{sorted({n['host'] for n in nodes})}")
        path = f"/dev/shm/ndtrain-{token}"
        ray.get(actors[0].join_shm.remote(path, True, slot_bytes, timeout), timeout=timeout)
        ray.get([a.join_shm.remote(path, False, slot_bytes, timeout) for a in actors[1:]], timeout=timeout)
        ray.get(actors[0].unlink_shm.remote(), timeout=timeout)  # every rank has it mapped: drop the name
    elif transport == "tcp":
        peers = ray.get([a.listen_tcp.remote(same_node, iface) for a in actors], timeout=timeout)
        ray.get([a.connect_tcp.remote(peers, timeout) for a in actors], timeout=timeout)
    else:
        raise ValueError(f"transport must be auto, shm or tcp; got {transport!r}")
    for n in nodes:
        n["transport"] = transport
    return nodes


def _json_default(x):
    """NumPy scalars and arrays inside a gathered record become plain numbers and lists."""
    if isinstance(x, (np.generic, np.ndarray)):
        return x.tolist()
    raise TypeError(f"allgather_obj: {type(x).__name__} is not JSON-serialisable (records must be small JSON data)")
