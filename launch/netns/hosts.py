"""Two "hosts" a and b: network namespaces joined by one veth pair, addresses only inside them. Set up, and ALWAYS
torn down (every process inside the namespaces by pid, then the namespaces; the veth, its qdiscs and the iptables
rules live in them and go too), even on failure: use it as a context manager. Needs root and iproute2.

    with TwoHosts("ndnet1234", subnet="10.213.19") as net:
        subprocess.run(net.in_ns("a", "ping", "-c", "1", net.addr["b"]))
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path


def sh(*cmd, check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], check=check, timeout=timeout, capture_output=True, text=True, **kw)


def netns_available() -> str | None:
    """None when this process can create network namespaces, else the reason why not."""
    if os.geteuid() != 0:
        return "needs root"
    if not shutil.which("ip"):
        return "needs iproute2 (ip)"
    try:
        r = sh("ip", "netns", "list", check=False, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"`ip netns` failed: {e}"
    return None if r.returncode == 0 else f"`ip netns` failed: {r.stderr.strip()}"


class TwoHosts:
    """tag: a unique prefix (<= 11 characters: namespace and link names are tag + 1-3 characters, at most 15);
    subnet: the first three octets of the private /24 (host a .1, host b .2)."""

    HOSTS = ("a", "b")

    def __init__(self, tag: str, subnet: str = "10.213.7", prefix: int = 24):
        if len(tag) > 11:
            raise ValueError(f"tag {tag!r} longer than 11 characters (Linux link names are at most 15)")
        self.tag, self.subnet, self.prefix = tag, subnet, prefix
        self.addr = {h: f"{subnet}.{i + 1}" for i, h in enumerate(self.HOSTS)}
        self.procs: list[subprocess.Popen] = []  # started inside the namespaces (stopped first at teardown)
        self.ray_head: str | None = None  # set by ray_cluster users (launch/bench/network.py)

    def ns(self, host: str) -> str:
        return f"{self.tag}{host}"

    def dev(self, host: str) -> str:
        """host's end of the veth pair."""
        return f"{self.tag}v{host}"

    def hostname(self, host: str) -> str:
        return f"{self.tag}-{host}"

    def peer(self, host: str) -> str:
        return "b" if host == "a" else "a"

    # -- commands ------------------------------------------------------------------------------------------------
    def exec_ns(self, host: str, *cmd) -> list[str]:
        """cmd inside host's network namespace."""
        return ["ip", "netns", "exec", self.ns(host), *map(str, cmd)]

    def in_ns(self, host: str, *cmd) -> list[str]:
        """cmd inside host's network namespace with its own hostname (a UTS namespace), so a job that records
        which machine each rank ran on sees two machines."""
        return ["ip", "netns", "exec", self.ns(host), "unshare", "--uts", "/bin/sh", "-c",
                'hostname "$0"; exec "$@"', self.hostname(host), *map(str, cmd)]

    def run(self, host: str, *cmd, **kw) -> subprocess.CompletedProcess:
        return sh(*self.exec_ns(host, *cmd), **kw)

    def setup_commands(self) -> list[list[str]]:
        """The iproute2 commands that build the pair: each side has lo, its address, and a default route over the
        veth (a process asking "which address do others see me by" gets 10.213.x.y, as on a real LAN)."""
        cmds = [["ip", "netns", "add", self.ns(h)] for h in self.HOSTS]
        cmds.append(["ip", "link", "add", self.dev("a"), "type", "veth", "peer", "name", self.dev("b")])
        for h in self.HOSTS:
            d = self.dev(h)
            cmds += [["ip", "link", "set", d, "netns", self.ns(h)],
                     ["ip", "-n", self.ns(h), "addr", "add", f"{self.addr[h]}/{self.prefix}", "dev", d],
                     ["ip", "-n", self.ns(h), "link", "set", "lo", "up"],
                     ["ip", "-n", self.ns(h), "link", "set", d, "up"],
                     ["ip", "-n", self.ns(h), "route", "add", "default", "dev", d]]
        return cmds

    # -- set up / tear down ----------------------------------------------------------------------------------------
    def setup(self) -> "TwoHosts":
        for cmd in self.setup_commands():
            sh(*cmd)
        return self

    def teardown(self) -> None:
        """Stop the processes we started, kill every other process inside our namespaces (they are all ours),
        then delete the namespaces. Safe to call more than once, and after a partial set-up."""
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
        present = sh("ip", "netns", "list", check=False).stdout.split()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            alive = False
            for h in self.HOSTS:
                if self.ns(h) not in present:
                    continue
                for pid in sh("ip", "netns", "pids", self.ns(h), check=False).stdout.split():
                    try:
                        os.kill(int(pid), sig)
                        alive = True
                    except (ProcessLookupError, ValueError):
                        pass
            if alive and sig == signal.SIGTERM:
                time.sleep(3)
        for h in self.HOSTS:
            if self.ns(h) in present:
                sh("ip", "netns", "del", self.ns(h), check=False)
        # a veth whose move into a namespace failed is still in ours
        sh("ip", "link", "del", self.dev("a"), check=False)

    def __enter__(self) -> "TwoHosts":
        # SIGTERM/SIGHUP become an exception, so the `with` block's teardown runs on `kill` too (not only Ctrl-C)
        self._old = {s: signal.signal(s, _raise_exit) for s in (signal.SIGTERM, signal.SIGHUP)}
        try:
            return self.setup()
        except BaseException:
            self.teardown()
            self._restore()
            raise

    def __exit__(self, *exc) -> None:
        try:
            self.teardown()
        finally:
            self._restore()

    def _restore(self) -> None:
        for s, h in getattr(self, "_old", {}).items():
            signal.signal(s, h)


def _raise_exit(signum, _frame):
    raise SystemExit(128 + signum)


MPI_AGENT = """#!/bin/sh
# Open MPI launch agent standing in for ssh: `agent [ssh options] HOST COMMAND...` runs COMMAND in HOST's namespace.
while [ "${1#-}" != "$1" ]; do shift; done
host="$1"; shift
case "$host" in
%s
  *) echo "netns agent: unknown host $host" >&2; exit 255;;
esac
exec ip netns exec "$ns" unshare --uts /bin/sh -c "hostname $name; $*"
"""


def mpi_setup(net: TwoHosts, work) -> tuple[dict, Path]:
    """An Open MPI job across net's two hosts (one slot each): writes the launch agent (ssh replaced by
    `ip netns exec`) and a hostfile into directory `work`; returns (environment additions, hostfile path)."""
    work = Path(work)
    agent = work / "netns_agent.sh"
    cases = "\n".join(f"  {ip}) ns={net.ns(h)}; name={net.hostname(h)};;" for h, ip in net.addr.items())
    agent.write_text(MPI_AGENT % cases)
    agent.chmod(0o755)
    hostfile = work / "hosts"
    hostfile.write_text("".join(f"{ip} slots=1\n" for ip in net.addr.values()))
    cidr = f"{net.subnet}.0/{net.prefix}"
    env = {"PRTE_MCA_plm_ssh_agent": str(agent), "PRTE_MCA_plm_rsh_agent": str(agent),
           "OMPI_MCA_btl": "self,tcp", "OMPI_MCA_btl_tcp_if_include": cidr, "OMPI_MCA_pml": "ob1",
           "PRTE_MCA_oob_tcp_if_include": cidr, "OMPI_MCA_oob_tcp_if_include": cidr}
    return env, hostfile


RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0",
           # `ray start --head` turns on token authentication (Ray >= 2.5x) and the drivers here run without the
           # token; the namespaces are private to this machine, so it is switched off inside them
           "RAY_AUTH_MODE": "disabled"}
_RAY_NODES = ("import ray,sys; ray.init(address=sys.argv[1], logging_level='ERROR', log_to_driver=False); "
              "print(sum(1 for x in ray.nodes() if x['Alive']))")


def ray_cluster(net: TwoHosts, env: dict, logs, bin_dir, python: str, port: int = 6379,
                timeout: float = 120.0) -> str:
    """A Ray cluster over net's two hosts (head in a, a worker node in b, one CPU each so one rank lands on each):
    the `ray start --block` processes are registered in net.procs (stopped at teardown). Returns the head address.
    Its temporary directories are /tmp/ray-<namespace> (ray_temp_dirs)."""
    logs = Path(logs)
    head = f"{net.addr['a']}:{port}"
    env = {**env, **RAY_ENV}
    common = ["--num-cpus", "1", "--disable-usage-stats", "--block"]
    for h, extra in (("a", ["--head", "--port", str(port), "--include-dashboard", "false"]),
                     ("b", ["--address", head])):
        cmd = net.in_ns(h, Path(bin_dir) / "ray", "start", *extra, "--node-ip-address", net.addr[h], "--temp-dir",
                        ray_temp_dirs(net)[h], *common)
        with open(logs / f"ray-{h}.log", "w") as log:
            net.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                              start_new_session=True))
        _wait_for_nodes(net, env, python, head, 1 if h == "a" else 2, timeout)
    return head


def ray_temp_dirs(net: TwoHosts) -> dict[str, str]:
    return {h: f"/tmp/ray-{net.ns(h)}" for h in net.HOSTS}


def _wait_for_nodes(net: TwoHosts, env: dict, python: str, head: str, n: int, timeout: float) -> None:
    """Until the cluster at `head` has n alive nodes (asked from inside host a)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = subprocess.run(net.in_ns("a", python, "-c", _RAY_NODES, head), capture_output=True, text=True, env=env,
                           timeout=90)
        if r.returncode == 0 and r.stdout.strip().splitlines()[-1:] == [str(n)]:
            return
        time.sleep(2)
    raise RuntimeError(f"Ray cluster at {head} did not reach {n} alive node(s) within {timeout:.0f} s")
