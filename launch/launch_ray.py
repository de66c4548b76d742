"""Run a per-rank target on Ray: connect to --address (or start a local Ray), place N rank actors with `threads`
CPUs each, join them into one communicator group (shared memory on one node, TCP across nodes), run the target on
all of them; the driver is the coordinator.

    rc = run_ray("ndtrain.launch.worker:train_target", {"config": path}, workers=2, writer=RunWriter(out), ...)

A rank that raises is reported by the coordinator (rank, step, traceback); all actors are killed and the status is
non-zero. A rank whose process dies (kill -9: its coordinator link closes, or Ray reports the actor dead), goes
silent or hangs is recovered instead: the whole group is torn down (actors killed, shared-memory file removed) and
started again, `ndtrain train` resuming from the run's last checkpoint, at most max_restarts times (cluster
.max_restarts, else NDTRAIN_MAX_RESTARTS, default 3); summary.json counts them (`restarts`), and metrics.jsonl goes
on without repeating the steps the new group replays.

Process lifetime: Ctrl-C or SIGTERM to the driver stops the ranks at a step boundary with a checkpoint (exit 130 /
143; no restart after that); a second one kills the actors at once. A Ray runtime this driver started is torn down
with it however it ends: a watchdog process (cluster/fate_share.Reaper) SIGKILLs the head, its agents and the rank
actors when the driver is gone, kill -9 included; and ranks that lose the coordinator stop by themselves
(cluster/metrics_channel.py), on a cluster given with --address too.
"""
from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path

from ndtrain.cluster import interrupt
from ndtrain.cluster.coordinator import Coordinator
from ndtrain.cluster.fate_share import Reaper
from ndtrain.cluster.metrics_channel import ENV_TEST_HANG, ENV_TEST_STEP_DELAY
from ndtrain.cluster.comm.netif import interface_address
from ndtrain.cluster.comm.ray_comm import form_group
from ndtrain.cluster.ray_rank import RankActor
from ndtrain.cluster import checkpoint as ckpt
from ndtrain.cluster.supervise import Topology, job_status, supervise
from ndtrain.cluster.worker_process import THREAD_ENV, default_threads
from ndtrain.launch import rundir
from ndtrain.launch.config import worker_bounds
from ndtrain.launch.elastic import ElasticSpec, run_elastic
from ndtrain.cluster.membership import ElasticCoordinator
from ndtrain.launch.recovery import recovery_settings
from ndtrain.launch.launch_mpi import train_job


def ensure_ray(address: str = "", num_cpus: int | None = None):
    """Connect to a running cluster (address, e.g. "auto" or "10.0.0.1:6379") or start a local one. Returns
    (ray, started_here)."""
    import ray  # ray: seconds to import; only the Ray backend needs it
    if ray.is_initialized():
        return ray, False
    kw = dict(include_dashboard=False, log_to_driver=True, configure_logging=False)
    if address:
        ray.init(address=address, **kw)
    else:
        # "local": always a new Ray runtime of our own, never one a `ray start` left on this machine (ray.init()
        # with no address would attach to it, and refuse num_cpus); a cluster is joined only through --address
        ray.init(address="local", num_cpus=num_cpus, **kw)
    return ray, True


def run_ray(target: str, args: dict, workers: int, writer=None, run_dir=None,
            threads: int = 0, address: str = "", global_batch: int | None = None,
            heartbeat_timeout: float = 30.0, start_timeout: float = 120.0, transport: str = "auto",
            shutdown: bool = True, max_restarts: int = 0, on_restart=None, stall_timeout: float = 20.0,
            iface: str = "", straggler: tuple[float, int] = (1.5, 20), min_workers: int = 0,
            max_workers: int = 0) -> int:
    """Run `target` on `workers` Ray actors; returns the exit status (0: every rank finished and reported).

    max_restarts: how many times a group whose process died, went silent or hung is torn down and started again
    (a rank that raised is not restarted: it would raise again). on_restart(args) -> args gives the next group's
    arguments (training: resume from the run's last checkpoint). The count is `restarts` in summary.json.
    writer: the sink of the aggregated records (launch.worker.run_sinks); run_dir: where topology.json and
    ranks.json go (default: writer.dir). min_workers < max_workers: an elastic run (launch/elastic.py): the group
    shrinks and grows in place, no restart."""
    run_dir = run_dir if run_dir is not None else getattr(writer, "dir", None)
    threads = threads or default_threads(workers)
    min_workers, max_workers = (min_workers or workers), (max_workers or workers)
    elastic = min_workers < max_workers
    # an elastic run grows when CPUs free up: a Ray started here offers exactly the starting workers' CPUs
    ray, started = ensure_ray(address, num_cpus=workers * threads if elastic else
                              max(workers * threads, os.cpu_count() or 1))
    interrupt.reinstall()  # ray.init replaced our SIGTERM handler (with one that exits)
    reaper = Reaper.start() if started and shutdown else None  # the Ray runtime started here ends with this process
    if reaper is not None:
        reaper.track_descendants()
    multi_node = len([n for n in ray.nodes() if n.get("Alive")]) > 1
    if elastic and address:  # a node that joins the cluster later must reach the coordinator
        multi_node = True
    # across nodes the coordinator listens on iface's address (cluster.iface) or this node's Ray address, which is
    # also what it advertises; on one node on loopback (docs/security.md)
    if not multi_node:
        bind = "127.0.0.1"
    elif iface:
        bind = interface_address(iface)
    else:
        bind = ray.util.get_node_ip_address()
    kw = dict(writer=writer, ranks_file=rundir.path_in(run_dir, rundir.RANKS), host=bind,
              heartbeat_timeout=heartbeat_timeout, start_timeout=start_timeout, stall_timeout=stall_timeout,
              extra_summary={"restarts": 0}, straggler_factor=straggler[0], straggler_steps=straggler[1])
    coord = (ElasticCoordinator(workers, max_workers, **kw) if elastic else Coordinator(workers, **kw)).start()
    restarts = 0
    try:
        if elastic:  # the group shrinks and grows in place: no restart (launch/elastic.py)
            failure = run_elastic(ray, coord, ElasticSpec(target, args, workers, min_workers, max_workers, threads,
                                                          run_dir, multi_node, global_batch, start_timeout,
                                                          transport, iface, reaper))
        while not elastic:
            failure = _run_group(ray, coord, run_dir, target, args, workers, threads, multi_node, global_batch,
                                 start_timeout, transport, iface, reaper)
            if failure is None or restarts >= max_restarts or not _recoverable(failure) or coord.stop_requested \
                    or interrupt.requested():
                break
            restarts += 1
            args = on_restart(args) if on_restart is not None else args
            print(f"{failure.message()}\nndtrain: restarting the rank group ({restarts} of at most {max_restarts})"
                  + (f" from {args['resume']}" if args.get("resume") else " from the start"),
                  file=sys.stderr, flush=True)
            coord.restart()
            coord.extra_summary["restarts"] = restarts
    finally:  # a second Ctrl-C (KeyboardInterrupt) passes here too: the actors are gone (_run_group), Ray ends
        coord.close()
        if started and shutdown:
            ray.shutdown()
        if reaper is not None:
            reaper.close()
    if failure is not None and max_restarts and restarts >= max_restarts and _recoverable(failure):
        print(f"ndtrain: giving up after {restarts} restart(s) (the cap)", file=sys.stderr, flush=True)
    return job_status(coord, failure, run_dir)


def _recoverable(failure) -> bool:
    """A dead, silent or hung process: restart. A rank that raised (traceback, or a one-line reason such as
    non-finite steps: a restart would meet it again) or Ctrl-C: do not."""
    return not failure.traceback and not failure.named and "interrupted" not in failure.reason


def _run_group(ray, coord, run_dir, target, args, workers, threads, multi_node, global_batch, start_timeout,
               transport, iface="", reaper=None):
    """Start one group of rank actors for the coordinator's current generation, supervise it, tear it down (every
    actor killed, the shared-memory file removed). Returns None on success, else the Failure."""
    env = coord.env()
    if multi_node:
        env["NDTRAIN_COORD_ADDR"] = coord.address  # bound to the advertised address (run_ray)
    for k in THREAD_ENV:
        env[k] = str(threads)
    for k in (ENV_TEST_HANG, ENV_TEST_STEP_DELAY):  # test-only fault injection reaches the actors too
        if k in os.environ:
            env[k] = os.environ[k]
    if coord.generation > 0:
        env[ENV_TEST_HANG] = ""  # a hang is injected once (Ray workers inherit the driver's environment)
    actor_cls = ray.remote(RankActor)
    actors = [actor_cls.options(num_cpus=threads, max_restarts=0).remote(r, workers, env, threads)
              for r in range(workers)]
    group_token = secrets.token_hex(8)
    failure = None
    try:
        try:
            nodes = form_group(actors, group_token, timeout=start_timeout, transport=transport, iface=iface)
        except Exception as e:  # a rank could not be placed or joined
            coord.fail(None, None, f"could not form the Ray rank group: {type(e).__name__}: {e}")
            failure = coord.failure
        if failure is None:
            hosts = sorted({n["host"] for n in nodes})
            topo = Topology("ray", hosts, workers, threads, global_batch, transport=nodes[0]["transport"])
            if coord.generation == 0:
                print(topo.line(), file=sys.stderr, flush=True)
            if run_dir is not None:
                rundir.write_json(run_dir, rundir.TOPOLOGY, {**topo.to_dict(), "nodes": nodes})
            if reaper is not None:
                reaper.track_descendants()  # the rank actors' processes (children of this driver's raylet)
            futures = [a.run.remote(target, args) for a in actors]
            failure = supervise(coord, _watch(ray, futures, coord))
    finally:
        for a in actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:
                pass
        # rank 0 unlinks the file once every rank has mapped it; a group that died while forming may leave it
        Path(f"/dev/shm/ndtrain-{group_token}").unlink(missing_ok=True)
    return failure


def _watch(ray, futures, coord=None):
    """is_running() for supervise: None while any actor's run() is pending, else (ok, what). An actor that died
    (its process killed) fails the coordinator at once, naming the rank and its last step."""
    rank_of = {f: r for r, f in enumerate(futures)}
    state = {"left": list(futures), "error": None}

    def is_running():
        if state["left"]:
            ready, state["left"] = ray.wait(state["left"], num_returns=len(state["left"]), timeout=0)
            for f in ready:
                try:
                    ray.get(f)
                except Exception as e:  # the rank raised (its traceback reached the coordinator) or its actor died
                    if state["error"] is None:
                        first = str(e).strip().splitlines()
                        state["error"] = f"rank {rank_of[f]}'s actor ended: {type(e).__name__}: " \
                                         f"{first[0] if first else ''}"
                        died = type(e).__name__ in ("ActorDiedError", "RayActorError", "ActorUnavailableError")
                        if died and coord is not None and coord.failure is None:
                            r = rank_of[f]
                            coord.fail(r, coord.last_step.get(r), f"its Ray actor process died ({type(e).__name__})")
            if state["error"] is not None:
                return False, state["error"]
            if state["left"]:
                return None
        return (state["error"] is None), (state["error"] or "all rank actors returned")

    return is_running


def launch(cfg, console=None) -> int:
    """`ndtrain train --backend ray`: write the run's config, run the training job on run.workers Ray actors
    (restarting the group from the last checkpoint when a process dies), the records going to the run directory
    and `console`."""
    settings = recovery_settings(cfg)
    ckpt_dir = rundir.checkpoints_dir(cfg.run.out)

    def resume_args(args: dict) -> dict:
        return {**args, "resume": str(ckpt_dir.resolve())} if ckpt.latest(ckpt_dir) is not None else args

    min_workers, max_workers = worker_bounds(cfg)
    return run_ray(**train_job(cfg, console), address=cfg.cluster.address, iface=cfg.cluster.iface,
                   min_workers=min_workers, max_workers=max_workers,
                   on_restart=resume_args, max_restarts=settings["max_restarts"],
                   heartbeat_timeout=settings["heartbeat_timeout"], stall_timeout=settings["stall_timeout"],
                   straggler=(cfg.cluster.straggler_factor, cfg.cluster.straggler_steps))
