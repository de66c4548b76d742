"""The driver of an elastic Ray run (cluster.min_workers < cluster.max_workers; docs/elastic.md): shrink the rank
group in place when a rank leaves, grow it when capacity appears, never restarting a surviving process.

    failure = run_elastic(ray, coord, spec)      # coord: cluster.membership.ElasticCoordinator; None on success

Shrink: a member is lost (its coordinator link closed, its Ray actor died, it went silent or hung): its actor is
killed, the survivors are woken out of any collective (abort_group), and once each waits for the next group the
driver connects them (form_group: shared memory on one node, the TCP mesh across nodes) with ranks 0..W-2 in their
old order; they take the most advanced survivor's state (cluster/elastic_rank.py). Fewer than min_workers left: the
same, and the new group writes a checkpoint and stops with one line (exit 2; --resume on any W continues).
Grow: every second, while W < max_workers, the driver looks for a free CPU slot in the Ray cluster
(ray.available_resources); a new rank actor is started there and builds its job; once it waits, the members are
asked to vote for the change (the 4th slot of the step's all-reduce), so all of them leave after the same step; the
group is formed with the joiner as the last rank and it receives the state like a survivor.
"""
from __future__ import annotations

import os
import secrets
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ndtrain.cluster import interrupt
from ndtrain.cluster.comm.ray_comm import form_group
from ndtrain.cluster.elastic_rank import ENV_TEST_DIE_REGROUP
from ndtrain.cluster.metrics_channel import ENV_TEST_DIE, ENV_TEST_HANG, ENV_TEST_STEP_DELAY
from ndtrain.cluster.ray_rank import RankActor
from ndtrain.cluster.supervise import Topology
from ndtrain.cluster.worker_process import THREAD_ENV
from ndtrain.launch import rundir

DIED = ("ActorDiedError", "RayActorError", "ActorUnavailableError")
GROW_EVERY_S = 1.0  # how often the driver looks for capacity (one small GCS query)
REGROUP_TIMEOUT_S = 60.0


@dataclass
class ElasticSpec:
    target: str
    args: dict
    workers: int
    min_workers: int
    max_workers: int
    threads: int
    run_dir: Path | None = None
    multi_node: bool = False
    global_batch: int | None = None
    start_timeout: float = 120.0
    transport: str = "auto"
    iface: str = ""
    reaper: object = None
    env: dict = field(default_factory=dict)


class _Group:
    """The driver's view: members in rank order, their actors, their run() futures, their hosts."""

    def __init__(self):
        self.order: list[int] = []
        self.actors: dict[int, object] = {}
        self.futures: dict[int, object] = {}
        self.hosts: dict[int, str] = {}
        self.returned: set[int] = set()


def run_elastic(ray, coord, spec: ElasticSpec):
    env = dict(coord.env())
    if spec.multi_node:
        env["NDTRAIN_COORD_ADDR"] = coord.address
    for k in THREAD_ENV:
        env[k] = str(spec.threads)
    # test-only fault injection reaches the actors
    for k in (ENV_TEST_HANG, ENV_TEST_STEP_DELAY, ENV_TEST_DIE, ENV_TEST_DIE_REGROUP):
        if k in os.environ:
            env[k] = os.environ[k]
    spec.env = env
    cls = ray.remote(RankActor)
    g = _Group()

    def new_actor(member: int, rank: int, world: int, joining: bool):
        e = dict(env)
        if joining:
            e[ENV_TEST_DIE] = e[ENV_TEST_DIE_REGROUP] = ""  # a fault is injected into a member's first process only
        return cls.options(num_cpus=spec.threads, max_restarts=0, max_concurrency=4).remote(
            rank, world, e, spec.threads, True, member, joining)

    for m in range(spec.workers):
        g.order.append(m)
        g.actors[m] = new_actor(m, m, spec.workers, False)
    try:
        try:
            nodes = _form(ray, g, g.order, spec, release=False)
        except Exception as e:
            coord.fail(None, None, f"could not form the Ray rank group: {type(e).__name__}: {e}")
            return coord.failure
        topo = Topology("ray", sorted({n["host"] for n in nodes}), spec.workers, spec.threads, spec.global_batch,
                        transport=nodes[0]["transport"],
                        extra={"min_workers": spec.min_workers, "max_workers": spec.max_workers})
        print(topo.line() + f" (elastic: {spec.min_workers} to {spec.max_workers} workers)", file=sys.stderr,
              flush=True)
        if spec.run_dir is not None:
            rundir.write_json(spec.run_dir, rundir.TOPOLOGY, {**topo.to_dict(), "nodes": nodes})
        if spec.reaper is not None:
            spec.reaper.track_descendants()
        for m in g.order:
            g.futures[m] = g.actors[m].run.remote(spec.target, spec.args)
        return _supervise(ray, coord, g, spec, new_actor)
    finally:
        for a in g.actors.values():
            try:
                ray.kill(a, no_restart=True)
            except Exception:
                pass


def _form(ray, g: _Group, order: list[int], spec: ElasticSpec, release: bool, info: dict | None = None):
    """Connect the members of `order` (rank r = order[r]) into a new group; release: hand it to their waiting loops."""
    actors = [g.actors[m] for m in order]
    ray.get([a.assign.remote(r, len(order)) for r, a in enumerate(actors)], timeout=spec.start_timeout)
    token = secrets.token_hex(8)
    try:
        nodes = form_group(actors, token, timeout=spec.start_timeout, transport=spec.transport, iface=spec.iface)
    finally:
        Path(f"/dev/shm/ndtrain-{token}").unlink(missing_ok=True)
    for m, n in zip(order, nodes):
        g.hosts[m] = n["host"]
    if release:
        ray.get([a.release.remote(info or {}) for a in actors], timeout=spec.start_timeout)
    return nodes


def _supervise(ray, coord, g: _Group, spec: ElasticSpec, new_actor):
    ended_at, error = None, None
    next_look = time.monotonic() + GROW_EVERY_S
    joining = None  # (member, capacity seen at)
    while True:
        if interrupt.requested() and not coord.stop_requested:
            coord.request_stop()
        coord.poll(0.2)
        if coord.failure is not None:
            return coord.failure
        error = _check_futures(ray, coord, g) or error
        if coord.finished and set(g.order) <= g.returned:
            return None
        lost = coord.take_lost()
        if lost:
            if joining is not None:  # the joiner's state transfer waits for the group: start again later
                _drop(ray, coord, g, joining[0])
                joining = None
            failure = _shrink(ray, coord, g, spec, lost)
            if failure is not None:
                return failure
            continue
        if error is not None:  # a rank raised: its report reaches the coordinator; give it a moment
            ended_at = ended_at or time.monotonic()
            if time.monotonic() - ended_at > 3.0:
                coord.fail(None, None, error)
                return coord.failure
            continue
        if coord.stop_requested or g.returned:
            continue
        now = time.monotonic()
        if joining is None and now >= next_look and len(g.order) < spec.max_workers:
            next_look = now + GROW_EVERY_S
            if _has_capacity(ray, spec.threads):
                m = min(set(range(spec.max_workers)) - set(g.actors))
                coord.admit(m)
                g.actors[m] = new_actor(m, m, m + 1, True)
                g.futures[m] = g.actors[m].run.remote(spec.target, spec.args)
                joining = [m, now, g.actors[m].is_waiting.remote()]
        elif joining is not None:
            m, t0, ref = joining
            if m in g.returned or m not in g.actors:
                joining = None
                continue
            ready, _ = ray.wait([ref], timeout=0)  # the joiner may still be starting: never block on it
            if not ready:
                continue
            try:
                waiting = bool(ray.get(ref))
            except Exception:  # it died while starting: its run() future reports it
                joining = None
                continue
            if not waiting:
                joining[2] = g.actors[m].is_waiting.remote()
                continue
            joining = None
            failure = _grow(ray, coord, g, spec, m, t0)
            if failure is not None:
                return failure


def _check_futures(ray, coord, g: _Group) -> str | None:
    """Note the members whose run() ended; a dead actor is a lost member; returns the first raised error's text."""
    pending = {f: m for m, f in g.futures.items() if m not in g.returned}
    if not pending:
        return None
    ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=0)
    error = None
    for f in ready:
        m = pending[f]
        g.returned.add(m)
        try:
            ray.get(f)
        except Exception as e:
            if type(e).__name__ in DIED:
                coord.fail(m, coord.last_step.get(m), f"its Ray actor process died ({type(e).__name__})")
            else:
                first = str(e).strip().splitlines()
                error = error or f"rank {m}'s actor ended: {type(e).__name__}: {first[0] if first else ''}"
    return error


def _drop(ray, coord, g: _Group, m: int) -> None:
    try:
        ray.kill(g.actors.pop(m), no_restart=True)
    except Exception:
        pass
    g.futures.pop(m, None)
    g.returned.discard(m)
    if m in g.order:
        g.order.remove(m)
    coord.retire(m)


def _all_waiting(ray, actors, timeout: float = 10.0) -> bool:
    try:
        return all(ray.get([a.is_waiting.remote() for a in actors], timeout=timeout))
    except Exception as e:
        if type(e).__name__ == "GetTimeoutError":
            return False  # busy: asked again on the next round
        raise


def _wait_until_waiting(ray, coord, g: _Group, order: list[int], deadline: float) -> str | None:
    """Pump the coordinator until every member of `order` waits for the next group; a reason when not."""
    while True:
        coord.poll(0.05)
        if coord.failure is not None:
            return coord.failure.message()
        if _check_futures(ray, coord, g) is not None or any(m in g.returned for m in order):
            return "a rank ended while the group re-formed"
        if coord.lost:
            return "another rank was lost while the group re-formed"
        if _all_waiting(ray, [g.actors[m] for m in order]):
            return None
        if time.monotonic() > deadline:
            return f"the ranks did not come to the regroup within {REGROUP_TIMEOUT_S:.0f} s"


def _shrink(ray, coord, g: _Group, spec: ElasticSpec, lost: list[tuple[int, str]]):
    t0 = time.monotonic()
    previous = len(g.order)
    for m, _ in lost:
        if m in g.actors:
            _drop(ray, coord, g, m)
    for m in g.order:  # wake ranks blocked on the dead one (shared memory: the abort word; TCP: sockets shut)
        g.actors[m].abort_group.remote()
    if not g.order:
        coord.fail(lost[0][0], None, "every worker left: " + lost[0][1])
        return coord.failure
    below = len(g.order) < spec.min_workers
    why = _wait_until_waiting(ray, coord, g, g.order, t0 + REGROUP_TIMEOUT_S)
    if why is not None:
        more = coord.take_lost()
        if more:  # a second rank died meanwhile: one more shrink covers both
            return _shrink(ray, coord, g, spec, more)
        coord.fail(lost[0][0], None, f"could not shrink the group: {why}")
        return coord.failure
    try:
        coord.regroup(g.order)
        member, reason = lost[0]
        coord.begin_change("shrink", member, g.hosts.get(member, "?"), reason, previous, t0)
        left = f"rank {member} on {g.hosts.get(member, '?')}: {reason}"
        _form(ray, g, g.order, spec, release=True,
              info={"below_min": below, "min_workers": spec.min_workers, "left": left})
    except Exception as e:
        more = _lost_meanwhile(ray, coord, g)
        if more:
            return _shrink(ray, coord, g, spec, more)
        coord.fail(None, None, f"could not re-form the group: {type(e).__name__}: {e}")
        return coord.failure
    return None


def _grow(ray, coord, g: _Group, spec: ElasticSpec, m: int, t0: float):
    for a in g.order:
        g.actors[a].request.remote()
    why = _wait_until_waiting(ray, coord, g, g.order, time.monotonic() + REGROUP_TIMEOUT_S)
    if why is not None:
        _drop(ray, coord, g, m)
        return None  # the run ended, or a rank was lost meanwhile: the loop handles it
    previous = len(g.order)
    order = g.order + [m]
    try:
        g.order = order
        coord.regroup(order)
        coord.begin_change("grow", m, "?", "capacity for another worker appeared", previous, t0)
        _form(ray, g, order, spec, release=True, info={"below_min": False})
        coord.pending_change["host"] = g.hosts.get(m, "?")
    except Exception as e:
        more = _lost_meanwhile(ray, coord, g)
        if more:
            return _shrink(ray, coord, g, spec, more)
        coord.fail(m, None, f"could not grow the group: {type(e).__name__}: {e}")
        return coord.failure
    return None


def _lost_meanwhile(ray, coord, g: _Group, wait_s: float = 5.0) -> list[tuple[int, str]]:
    """Forming a group failed: was a member lost meanwhile? Its link's eof or its actor's death may take a moment
    to arrive; pump both for up to wait_s. The lost members (empty: the failure was something else)."""
    deadline = time.monotonic() + wait_s
    while not coord.lost and coord.failure is None and time.monotonic() < deadline:
        coord.poll(0.05)
        _check_futures(ray, coord, g)
    return coord.take_lost()


def _has_capacity(ray, threads: int) -> bool:
    """A CPU slot for one more rank somewhere in the Ray cluster."""
    try:
        return float(ray.available_resources().get("CPU", 0.0)) >= threads
    except Exception:
        return False
