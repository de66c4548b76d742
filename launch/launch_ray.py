"""Run a per-rank target on Ray: connect to --address (or start a local Ray), place N rank actors with `threads`
CPUs each, join them into one communicator group (shared memory on one node, TCP across nodes), run the target on
all of them; the driver is the coordinator.

    rc = run_ray("ndtrain.cluster.worker:train_rank", {"config": path}, workers=2, writer=RunWriter(out), ...)

A rank that raises is reported by the coordinator (rank, step, traceback); a rank whose actor dies, or that goes
silent, ends the job too; all actors are killed and the status is non-zero.
"""
from __future__ import annotations

import os
import secrets
import sys

from ndtrain.cluster.coordinator import Coordinator
from ndtrain.cluster.rank_entry import THREAD_ENV, default_threads
from ndtrain.cluster.supervise import Topology, report_failure, supervise


def ensure_ray(address: str = "", num_cpus: int | None = None):
    """Connect to a running cluster (address, e.g. "auto" or "10.0.0.1:6379") or start a local one. Returns
    (ray, started_here)."""
    import ray
    if ray.is_initialized():
        return ray, False
    kw = dict(include_dashboard=False, log_to_driver=True, configure_logging=False)
    if address:
        ray.init(address=address, **kw)
    else:
        ray.init(num_cpus=num_cpus, **kw)
    return ray, True


def run_ray(target: str, args: dict, workers: int, writer=None, run_dir=None, total_steps: int | None = None,
            threads: int = 0, address: str = "", global_batch: int | None = None, quiet: bool = False,
            heartbeat_timeout: float = 30.0, start_timeout: float = 120.0, transport: str = "auto",
            shutdown: bool = True) -> int:
    threads = threads or default_threads(workers)
    ray, started = ensure_ray(address, num_cpus=max(workers * threads, os.cpu_count() or 1))
    from ndtrain.cluster.comm.ray_comm import form_group
    from ndtrain.cluster.ray_rank import RankActor

    multi_node = len([n for n in ray.nodes() if n.get("Alive")]) > 1
    bind = "0.0.0.0" if multi_node else "127.0.0.1"
    coord = Coordinator(workers, writer=writer, run_dir=run_dir, total_steps=total_steps, quiet=quiet, host=bind,
                        heartbeat_timeout=heartbeat_timeout, start_timeout=start_timeout).start()
    env = coord.env()
    if multi_node:
        env["NDTRAIN_COORD_ADDR"] = f"{ray.util.get_node_ip_address()}:{coord.port}"
    for k in THREAD_ENV:
        env[k] = str(threads)
    actor_cls = ray.remote(RankActor)
    actors = [actor_cls.options(num_cpus=threads, max_restarts=0).remote(r, workers, env, threads)
              for r in range(workers)]
    futures = []
    failure = None
    try:
        try:
            nodes = form_group(actors, secrets.token_hex(8), timeout=start_timeout, transport=transport)
        except Exception as e:  # a rank could not be placed or joined
            coord.fail(None, None, f"could not form the Ray rank group: {type(e).__name__}: {e}")
            failure = coord.failure
        if failure is None:
            hosts = sorted({n["host"] for n in nodes})
            topo = Topology("ray", hosts, workers, threads, global_batch, transport=nodes[0]["transport"])
            print(topo.line(), file=sys.stderr, flush=True)
            coord.write_json("topology.json", {**topo.to_dict(), "nodes": nodes})
            futures = [a.run.remote(target, args) for a in actors]
            failure = supervise(coord, _watch(ray, futures))
    except KeyboardInterrupt:
        coord.fail(None, None, "interrupted (Ctrl-C)")
        failure = coord.failure
    finally:
        for a in actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:
                pass
        coord.close()
        if started and shutdown:
            ray.shutdown()
    if failure is not None:
        report_failure(failure)
        return 1
    return 0


def _watch(ray, futures):
    """is_running() for supervise: None while any actor's run() is pending, else (ok, what)."""
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
            if state["error"] is not None:
                return False, state["error"]
            if state["left"]:
                return None
        return (state["error"] is None), (state["error"] or "all rank actors returned")

    return is_running


def launch(cfg) -> int:
    """`ndtrain train --backend ray`: write the run's config, run the training loop on run.workers Ray actors."""
    from ndtrain.launch.launch_mpi import _train_job
    return run_ray(**_train_job(cfg), address=cfg.cluster.address)
