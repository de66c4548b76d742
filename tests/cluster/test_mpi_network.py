"""What an MPI job exposes: the coordinator's token is passed to the ranks by name (never on an argv `ps` shows),
a single-host job's ranks and coordinator listen on loopback only, and --iface / cluster.iface picks the interface
of a multi-host job (validated: an unknown interface is one line, exit 2)."""
import ipaddress
import os
import socket
import subprocess
import sys
import time

import pytest

from ndtrain.launch import launch_mpi
from ndtrain.launch.cli import main

TOKEN = "0123456789abcdef-secret-token"
ENV = {"NDTRAIN_COORD_ADDR": "127.0.0.1:5", "NDTRAIN_COORD_TOKEN": TOKEN, "OMP_NUM_THREADS": "1"}


def _argv(monkeypatch, flavour, **kw):
    monkeypatch.setattr(launch_mpi, "mpi_flavour", lambda mpiexec: flavour)
    return launch_mpi.mpiexec_command("ndtrain.cluster.probe:probe_rank", {}, 2, 1, dict(ENV),
                                      mpiexec="/opt/mpi/bin/mpiexec", **kw)


@pytest.mark.parametrize("flavour", ["mpich", "openmpi"])
@pytest.mark.parametrize("hostfile", ["", "hosts.txt"])
def test_the_token_is_passed_by_name_never_on_the_command_line(monkeypatch, flavour, hostfile):
    cmd = _argv(monkeypatch, flavour, hostfile=hostfile)
    assert not any(TOKEN in a for a in cmd), cmd
    if flavour == "mpich":
        i = cmd.index("-genvlist")
        assert cmd[i + 1].split(",") == list(ENV)  # the values stay in mpiexec's environment
    else:
        assert [cmd[i + 1] for i, a in enumerate(cmd) if a == "-x"] == list(ENV)


def test_openmpi_single_host_ranks_use_shared_memory_only(monkeypatch):
    cmd = _argv(monkeypatch, "openmpi")
    i = cmd.index("btl")
    assert cmd[i - 1] == "--mca" and cmd[i + 1] == "self,sm"


def test_iface_selects_the_interface_of_a_multi_host_job(monkeypatch):
    cmd = " ".join(_argv(monkeypatch, "openmpi", hostfile="hosts.txt", iface="eth1"))
    assert "--mca btl_tcp_if_include eth1" in cmd and "--prtemca prte_if_include eth1" in cmd
    assert "btl self,sm" not in cmd
    cmd = " ".join(_argv(monkeypatch, "mpich", hostfile="hosts.txt", iface="eth1"))
    assert "-iface eth1" in cmd


def test_iface_option_reaches_the_config_and_unknown_names_are_one_line(tmp_path, capsys):
    assert main(["train", "--task", "xor", "--iface", "lo", "--print-config"]) == 0
    assert 'iface = "lo"' in capsys.readouterr().out
    rc = main(["train", "--task", "xor", "--iface", "nosuch0", "--steps", "1", "--out", str(tmp_path / "r"), "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "cluster.iface" in err and "nosuch0" in err, err
    assert "Traceback" not in err and not (tmp_path / "r").exists()


# -- a real single-host job: what its process tree listens on ------------------------------------------------------
def _tree(root: int) -> list[int]:
    """root and all its descendants (by parent pid, from /proc)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def _addr(hex_addr: str) -> str:
    ip_hex, port_hex = hex_addr.split(":")
    raw = bytes.fromhex(ip_hex)
    if len(raw) == 4:
        ip = socket.inet_ntop(socket.AF_INET, raw[::-1])
    else:
        ip = socket.inet_ntop(socket.AF_INET6, b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))
    return f"{ip}:{int(port_hex, 16)}"


def _listening() -> dict[str, str]:
    """socket inode -> "ip:port" of every TCP listener in this network namespace."""
    out = {}
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if parts[3] == "0A":  # LISTEN
                out[parts[9]] = _addr(parts[1])
    return out


def _listeners_of(pids: list[int]) -> dict[int, list[str]]:
    table = _listening()
    found = {}
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        addrs = []
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:[") and link[8:-1] in table:
                addrs.append(table[link[8:-1]])
        if addrs:
            found[pid] = addrs
    return found


def _is_loopback(addr: str) -> bool:
    ip = ipaddress.ip_address(addr.rsplit(":", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


@pytest.mark.timeout(180)
def test_single_host_mpi_job_listens_on_loopback_only(mpi_ok, tmp_path):
    """Every listener of the job's ranks and of the driver (the coordinator) is on loopback. Open MPI's own launcher
    daemon (prterun) is the documented exception: PRRTE binds its out-of-band port to 0.0.0.0 and [::] whatever the
    MCA settings (docs/security.md); it is recorded, not asserted."""
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("NDTRAIN_")}
    env.update(NDTRAIN_TEST_STEP_DELAY="0.1", NDTRAIN_REPORT="0", NDTRAIN_TENSORBOARD="0")
    proc = subprocess.Popen([sys.executable, "-m", "ndtrain.launch", "train", "--task", "xor", "--model", "mlp",
                             "--backend", "mpi", "--workers", "2", "--threads", "1", "--steps", "60",
                             "--set", "run.log_every=5", "--out", str(out), "-q"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: dict[str, set] = {}
    ranks_seen = set()
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            metrics = out / "metrics.jsonl"
            if metrics.exists() and metrics.stat().st_size > 0:  # ranks are past MPI_Init and training
                pids = _tree(proc.pid)
                for pid, addrs in _listeners_of(pids).items():
                    seen.setdefault(f"{_comm(pid)}[{'driver' if pid == proc.pid else pid}]", set()).update(addrs)
                ranks_seen |= {p for p in pids if _comm(p).startswith("python") and p != proc.pid}
            time.sleep(0.2)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    assert len(ranks_seen) >= 2, f"never saw the ranks running: {seen}"
    assert any(k.endswith("[driver]") for k in seen), seen  # the coordinator was sampled
    exposed = {who: sorted(a for a in addrs if not _is_loopback(a)) for who, addrs in seen.items()
               if not who.startswith("prterun")}
    assert all(not v for v in exposed.values()), f"listening off loopback: {exposed} (all: {seen})"
    print("listeners:", {k: sorted(v) for k, v in seen.items()})
