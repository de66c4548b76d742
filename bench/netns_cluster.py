"""Two "hosts" on one machine: network namespaces joined by a veth pair stand in for two laptops on a LAN. A Ray
cluster (head in one, worker node in the other) and an MPI job with a two-host hostfile each train the same tiny
float64 transformer with one worker per host, and must end with the parameters of a 1-worker run (within 1e-6
relative, the equivalence result of tests/launch/test_equivalence.py). Sets up, runs and ALWAYS tears down (the
namespaces, and every process inside them, by pid), even on failure or Ctrl-C. Needs root and iproute2.

    sudo .venv/bin/python bench/netns_cluster.py [--only ray|mpi] [--json out.json] [--keep-dirs]
    sudo .venv/bin/python bench/netns_cluster.py --elastic [--json out.json]

--elastic (issue 18, docs/elastic.md): one elastic Ray run across the two hosts (`--workers 2 --min-workers 1
--max-workers 2`, deterministic mode, steps slowed by the test-only NDTRAIN_TEST_STEP_DELAY so the run outlasts a node
restart). Once step KILL_AT is logged, host b's Ray node is stopped the hard way (every process in b's namespace gets
SIGKILL: a laptop that loses power; `ray stop` would stop every Ray on the machine); the run must go on alone on a.
Then b's node is started again (`ray start --address`) and the run must grow back to 2. Measured: death -> the
shrink event in metrics.jsonl (written when the new group completes its first step) and its recovery_s; node start
-> the grow event, and its recovery_s (capacity seen -> the grown group resuming). The final parameters must be
bitwise those of the 1-worker reference.

Recipe for a real cluster of laptops (what this script does with namespaces; run from the repo's venv on every
machine, same Python, same ndtrain checkout, machines reachable on the LAN, e.g. 192.168.1.10 and .11):

  Ray
    1. On the first laptop (the head):   ray start --head --node-ip-address 192.168.1.10 --port 6379 --num-cpus 2
    2. On every other laptop:            ray start --address 192.168.1.10:6379 --node-ip-address 192.168.1.11
                                         --num-cpus 2
    3. On the head, train:               ndtrain train --backend ray --address 192.168.1.10:6379 --workers 2
                                         --threads 2 ...   (num_cpus per actor = --threads: with 2 CPUs per laptop
                                         and --threads 2, Ray places one worker on each laptop)
       Ranks on different nodes exchange gradients over TCP (cluster/comm/tcp.py, every connection authenticated
       by an HMAC challenge on the run's secret); the coordinator runs in the driver and listens on the head's Ray
       address (or --iface NAME's), so the laptops must reach it (open its firewall for the ports Ray and the
       coordinator pick, to the LAN's addresses only). docs/security.md.
    4. When done, on every laptop:       ray stop
    Recent Ray (2.60 here) starts the head with token authentication: every node and driver needs the same token
    (the head writes ~/.ray/auth_token; copy it to the other laptops, or export RAY_AUTH_TOKEN) and drivers need
    RAY_AUTH_MODE=token; on a trusted LAN RAY_AUTH_MODE=disabled on every command switches it off, as this script
    does inside its private namespaces.

  MPI (Open MPI)
    1. Passwordless ssh from the first laptop to the others (ssh-copy-id), same paths everywhere (or the venv's
       bin directory on PATH for non-interactive shells).
    2. A hostfile:                       192.168.1.10 slots=1
                                         192.168.1.11 slots=1
    3. Train:                            ndtrain train --backend mpi --hostfile hosts --workers 2 --threads 2 ...
       If the laptops have several interfaces, pin MPI to the LAN:
         export OMPI_MCA_btl=self,tcp OMPI_MCA_btl_tcp_if_include=192.168.1.0/24
         export PRTE_MCA_oob_tcp_if_include=192.168.1.0/24
       With a hostfile the launcher maps ranks round-robin over the hosts (`--map-by node`): by slot, Open MPI 5
       counts the launching host's cores rather than its hostfile slots and put both ranks there.
       The coordinator listens beside mpiexec on the address of the default route's interface (or --iface NAME's,
       which also pins MPI's traffic to it) and advertises it; the other laptops must be able to reach it.
       This script replaces ssh by an agent that runs the command in the other namespace
       (PRTE_MCA_plm_ssh_agent=<script>: `agent HOST COMMAND...` -> `ip netns exec NS sh -c COMMAND`).

Addresses: 10.213.7.1 (host a) and 10.213.7.2 (host b) exist ONLY inside the two namespaces this script creates;
no traffic leaves them.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ndtrain.launch.netns.hosts import RAY_ENV, TwoHosts, mpi_setup, ray_cluster, ray_temp_dirs

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
BIN = Path(PY).parent
SUBNET, PREFIX = "10.213.7", 24
TAG = f"ndh10{os.getpid() % 100000}"  # unique per run: namespace and link names (<= 15 chars)
HOSTS = {"a": f"{SUBNET}.1", "b": f"{SUBNET}.2"}
STEPS = 20
MODEL = ["--task", "reverse", "--model", "transformer", "--batch-size", "16", "--seed", "3", "--threads", "1",
         "--steps", str(STEPS), "-q", "--set", 'run.dtype="float64"', "--set", "optim.lr=0.01",
         "--set", "model.d_model=16", "--set", "model.n_heads=2", "--set", "model.d_ff=32",
         "--set", "model.n_enc_layers=1", "--set", "model.n_dec_layers=1", "--set", "model.dropout=0.0",
         "--set", "data.rows=256", "--set", "cluster.bucket_mb=0.01"]
TOL = 1e-6
ELASTIC_STEPS, KILL_AT, STEP_DELAY_S = 400, 40, 0.1


NET = TwoHosts(TAG, SUBNET, PREFIX)  # set-up/teardown shared with `ndtrain bench network` (launch/netns/hosts.py)


def ns(host: str) -> str:
    return NET.ns(host)


def setup_network() -> None:
    NET.setup()


def teardown() -> None:
    """Every process inside our namespaces, then the namespaces (the veth pair goes with them). Idempotent."""
    NET.teardown()


def in_ns(host: str, *cmd) -> list[str]:
    """cmd inside host's network namespace, with its own hostname (a UTS namespace): ranks.json then shows which
    "machine" each rank ran on, and MPI does not take the two for one node."""
    return NET.in_ns(host, *cmd)


def hostname(host: str) -> str:
    return NET.hostname(host)


def run_logged(cmd: list[str], log: Path, env: dict, timeout: float) -> int:
    with open(log, "w") as f:
        try:
            return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout,
                                  cwd=REPO).returncode
        except subprocess.TimeoutExpired:
            f.write(f"\n[netns_cluster] timed out after {timeout:.0f} s\n")
            return -1


# -- comparison ------------------------------------------------------------------------------------------------------
def final_params(out: Path, steps: int = STEPS) -> dict[str, np.ndarray]:
    from ndtrain.cluster import checkpoint as ckpt
    c = ckpt.load(out / "checkpoints")
    if c.step != steps:
        raise RuntimeError(f"{out}: final checkpoint at step {c.step}, expected {steps}")
    return c.params


def max_rel_diff(a: dict, b: dict) -> float:
    return max(float(np.linalg.norm(b[k] - a[k]) / max(np.linalg.norm(a[k]), 1e-30)) for k in a)


# -- the two jobs ------------------------------------------------------------------------------------------------------
def ray_job(work: Path, env: dict, reference: dict) -> dict:
    logs = work / "logs"
    head = ray_cluster(NET, env, logs, BIN, PY)
    out = work / "ray"
    rc = run_logged(in_ns("a", BIN / "ndtrain", "train", *MODEL, "--backend", "ray", "--workers", "2",
                          "--address", head, "--out", out), logs / "ray-train.log", env, timeout=300)
    return _result("ray", rc, out, reference, logs / "ray-train.log")


def mpi_job(work: Path, env: dict, reference: dict) -> dict:
    extra, hostfile = mpi_setup(NET, work)
    env = {**env, **extra}
    out = work / "mpi"
    log = work / "logs" / "mpi-train.log"
    rc = run_logged(in_ns("a", BIN / "ndtrain", "train", *MODEL, "--backend", "mpi", "--workers", "2",
                          "--hostfile", hostfile, "--out", out), log, env, timeout=300)
    return _result("mpi", rc, out, reference, log)


def elastic_job(work: Path, env: dict, reference: dict) -> dict:
    """Stop host b's Ray node mid-run, restart it: the run shrinks to 1 worker and grows back to 2 (module doc)."""
    logs = work / "logs"
    head = ray_cluster(NET, env, logs, BIN, PY)
    out = work / "elastic"
    log = logs / "elastic-train.log"
    res: dict = {"backend": "ray-elastic", "log": str(log), "steps": ELASTIC_STEPS, "step_delay_s": STEP_DELAY_S}
    with open(log, "w") as f:
        train = subprocess.Popen(in_ns("a", BIN / "ndtrain", "train", *MODEL, "--backend", "ray", "--workers", "2",
                                       "--min-workers", "1", "--max-workers", "2", "--address", head, "--out", out),
                                 stdout=f, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
                                 env={**env, "NDTRAIN_TEST_STEP_DELAY": str(STEP_DELAY_S)})
    NET.procs.append(train)
    try:
        _wait_for(lambda: _logged_step(out) >= KILL_AT, train, 240, f"step {KILL_AT}")
        node_b = NET.procs[1]  # ray_cluster started a's head, then b's node
        t_death = time.monotonic()
        res["killed_at_step"] = _logged_step(out)
        res["killed_pids"] = _kill_namespace("b")
        node_b.wait(timeout=30)
        _wait_for(lambda: _events(out, "shrink"), train, 120, "the shrink event")
        res["death_to_shrink_event_s"] = round(time.monotonic() - t_death, 2)
        t_start = time.monotonic()
        _restart_node_b(head, env, logs)
        _wait_for(lambda: _events(out, "grow"), train, 180, "the grow event")
        res["node_start_to_grow_event_s"] = round(time.monotonic() - t_start, 2)
        res["exit_status"] = train.wait(timeout=300)
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        res["error"] = f"{type(e).__name__}: {e}"
        res["exit_status"] = train.poll()
    res["events"] = [{k: e.get(k) for k in ("step", "change", "previous_world_size", "world_size", "rank", "host",
                                            "recovery_s")} for e in _events(out)]
    if "error" not in res:
        try:
            final = final_params(out, ELASTIC_STEPS)
            res["bitwise_equal"] = all(final[k].tobytes() == reference[k].tobytes() for k in reference)
            res["max_rel_diff"] = max_rel_diff(reference, final)
            res["summary"] = {k: json.loads((out / "summary.json").read_text()).get(k)
                              for k in ("restarts", "membership_changes", "world_size", "steps")}
        except (OSError, RuntimeError, ValueError, KeyError) as e:
            res["error"] = f"{type(e).__name__}: {e}"
    grow = [e for e in res["events"] if e["change"] == "grow"]
    if grow and "node_start_to_grow_event_s" in res:  # the rest: Ray registering the node, the driver's next look
        res["node_start_to_capacity_seen_s"] = round(res["node_start_to_grow_event_s"] - grow[0]["recovery_s"], 2)
    changes = [(e["change"], e["previous_world_size"], e["world_size"]) for e in res["events"]]
    res["ok"] = res.get("exit_status") == 0 and "error" not in res and res.get("bitwise_equal") is True and \
        changes == [("shrink", 2, 1), ("grow", 1, 2)] and res["summary"]["restarts"] == 0
    return res


def _wait_for(cond, proc, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            raise RuntimeError(f"the run ended (status {proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"no {what} within {timeout:.0f} s")
        time.sleep(0.05)


def _metrics(out: Path) -> list[dict]:
    rows = []
    try:
        for line in (out / "metrics.jsonl").read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                pass  # a line being written
    except OSError:
        pass
    return rows


def _logged_step(out: Path) -> int:
    return max([r["step"] for r in _metrics(out) if "loss" in r and isinstance(r.get("step"), int)], default=0)


def _events(out: Path, change: str | None = None) -> list[dict]:
    return [r for r in _metrics(out) if r.get("event") == "membership" and change in (None, r.get("change"))]


def _kill_namespace(host: str) -> int:
    """SIGKILL every process in host's namespace (its Ray node, its rank): the laptop is gone."""
    pids = [int(p) for p in subprocess.run(["ip", "netns", "pids", ns(host)], capture_output=True, text=True,
                                           timeout=30).stdout.split()]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(pids)


def _restart_node_b(head: str, env: dict, logs: Path) -> None:
    """b's node again, as ray_cluster started it (`ray start --address`, one CPU, --block)."""
    cmd = in_ns("b", BIN / "ray", "start", "--address", head, "--node-ip-address", HOSTS["b"], "--temp-dir",
                ray_temp_dirs(NET)["b"], "--num-cpus", "1", "--disable-usage-stats", "--block")
    with open(logs / "ray-b-restart.log", "w") as log:
        NET.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**env, **RAY_ENV},
                                          start_new_session=True))


def _result(backend: str, rc: int, out: Path, reference: dict, log: Path) -> dict:
    res = {"backend": backend, "exit_status": rc, "log": str(log)}
    try:
        ranks = json.loads((out / "ranks.json").read_text())
        res["ranks"] = [{k: r.get(k) for k in ("rank", "host", "ip", "pid") if k in r} for r in ranks]
        topo = json.loads((out / "topology.json").read_text())
        res["nodes"] = [n.get("ip") for n in topo.get("nodes", [])] or topo.get("hosts")
        res["transport"] = topo.get("transport")
        res["max_rel_diff"] = max_rel_diff(reference, final_params(out))
    except (OSError, RuntimeError, ValueError, KeyError) as e:
        res["error"] = f"{type(e).__name__}: {e}"
    hosts = {r.get("host") for r in res.get("ranks", [])}
    if "error" not in res and hosts != {hostname(h) for h in HOSTS}:
        res["error"] = f"ranks ran on {sorted(hosts)}, expected one on each of {sorted(map(hostname, HOSTS))}"
    res["ok"] = rc == 0 and res.get("max_rel_diff", 1.0) <= TOL and "error" not in res
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=("ray", "mpi"), help="run one backend only")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--elastic", action="store_true",
                   help="the elastic Ray rehearsal instead: host b's node stopped mid-run, then restarted")
    p.add_argument("--keep-dirs", action="store_true", help="keep the work directory (run dirs and logs)")
    a = p.parse_args(argv)
    if os.geteuid() != 0 or not shutil.which("ip"):
        print("netns_cluster: needs root and iproute2 (ip)", file=sys.stderr)
        return 77
    work = Path(tempfile.mkdtemp(prefix="ndtrain-netns-"))
    (work / "logs").mkdir()
    # RAY_ENV: no usage stats, and no token authentication inside the private namespaces (see the recipe above)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **RAY_ENV,
           "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    results = []
    # an empty --config: the built-in defaults plus the flags in MODEL, whatever the task's preset
    # (configs/<task>.toml) says; every run below gets the same one
    (work / "base.toml").write_text("# netns_cluster: defaults + command-line flags only\n")
    MODEL.extend(["--config", str(work / "base.toml")])
    if a.elastic:  # bitwise equal to the reference whatever W: deterministic mode, 2 micro-batches (W = 1 or 2)
        MODEL[MODEL.index("--steps") + 1] = str(ELASTIC_STEPS)
        MODEL.extend(["--set", "run.deterministic=true", "--set", "run.micro_batches=2", "--set", "run.log_every=1"])
    try:
        ref = work / "reference"
        rc = run_logged([str(BIN / "ndtrain"), "train", *MODEL, "--backend", "local", "--out", str(ref)],
                        work / "logs" / "reference.log", env, timeout=300)
        if rc != 0:
            raise RuntimeError(f"the 1-worker reference run failed (see {work / 'logs' / 'reference.log'})")
        reference = final_params(ref, ELASTIC_STEPS if a.elastic else STEPS)
        setup_network()
        jobs = (("ray-elastic", elastic_job),) if a.elastic else (("ray", ray_job), ("mpi", mpi_job))
        for backend, job in jobs:
            if a.elastic or a.only in (None, backend):
                try:
                    results.append(job(work, env, reference))
                except Exception as e:  # report and go on to the other backend; teardown below either way
                    results.append({"backend": backend, "ok": False, "error": f"{type(e).__name__}: {e}"})
                print(json.dumps(results[-1]), flush=True)
    finally:
        teardown()
        for d in ray_temp_dirs(NET).values():
            shutil.rmtree(d, ignore_errors=True)
    ok = bool(results) and all(r["ok"] for r in results)
    if a.json:
        Path(a.json).write_text(json.dumps({"ok": ok, "results": results, "work": str(work)}, indent=2))
    for r in results:
        if not r["ok"] and "log" in r and Path(r["log"]).exists():
            print(f"--- {r['backend']} log tail ---\n" + Path(r["log"]).read_text()[-3000:], file=sys.stderr)
    if not a.keep_dirs and ok:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"netns_cluster: work directory {work}", file=sys.stderr)
    print(("PASS" if ok else "FAIL") + ": " + ", ".join(
        f"{r['backend']} max rel diff {r.get('max_rel_diff', float('nan')):.3g}" for r in results), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
