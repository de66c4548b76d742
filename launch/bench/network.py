"""`ndtrain bench network`: two "laptops" (network namespaces joined by a veth, launch/netns/) on an emulated link
(lan, wifi-good, wifi-poor: launch/netns/link.py), checked with ping and iperf3, then a 2-worker training job
(MPI, or Ray with --backend ray) across them per training option, against one worker on the local backend. Needs root, iproute2, tc, iptables,
ethtool, iperf3 and ping (Debian: apt-get install iproute2 iptables ethtool iperf3 iputils-ping). Sets up, runs and
ALWAYS tears down the namespaces, their qdiscs and iptables rules, and the delay programs.

    sudo .venv/bin/ndtrain bench network [--profiles lan,wifi-good,wifi-poor] [--options plain]
                                         [--link-only] [--cc cubic,bbr] [--iperf-seconds 5] [--steps 200] [--json]
                                         [--allreduce-mb 4 --schedules star,ring --repeat 2]

With --allreduce-mb N, per profile, schedule and congestion control: a 2-rank all-reduce of N MB of float32 over
the link (launch/netns/allreduce_probe.py): today's star through rank 0 against the ring (cluster/comm/ring.py).
Per profile, the link check: ping RTT (user-to-user, `ping -U`) and iperf3 throughput with each congestion control
(`iperf3 -C`, per socket: this container's /proc/sys is read-only, so no per-namespace sysctl).
Per (profile, option), from the run's metrics.jsonl and the veth's byte counters:
  step_s          median step_time over the logged windows (rank 0)
  comm_share      the share of the step blocked in communication: median over the logged windows of comm_blocked_s /
                  step_time (the transport's own count, rank 0), else of the ranks' rank_comm_share
  bytes_per_step  bytes sent per host per step on the veth ((tx_a + tx_b) / 2 / steps, whole run: start-up and
                  evaluations included), i.e. what really crossed the link
  time_to_target_vs_one_worker   wall time until the validation loss first reaches the target (default: the
                  one-worker run's final validation loss) over the one worker's time to it
Options: plain, compress-fp16, compress-bf16, compress-powersgd (`--compress`), sync-every (`--sync-every 16`,
DiLoCo), sync-every-overlap (`--sync-every 16 --sync-overlap`: the outer exchange hidden behind the next 16 steps),
sync-every-fp16 (the same with the outer gradient as fp16), local-sgd (the parameters averaged every 8 steps:
outer lr 1, no momentum; fp16), local-sgd-overlap (the same, each average applied 2 steps after its exchange
starts). Models (--model): s, the issue's S model (default), or lm, the tinyshakespeare char LM at d 256 (--data
input.txt or an imported directory). The one-worker reference and the 2-host runs get identical `ndtrain train`
arguments except the option's flags, the backend, --workers and --steps (--two-host-steps).
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ndtrain.launch import rundir
from ndtrain.launch.netns.hosts import RAY_ENV, TwoHosts, mpi_setup, netns_available, ray_cluster, ray_temp_dirs
from ndtrain.launch.netns.link import PROFILES, LinkProfile, shape

BIN = Path(sys.executable).parent
SUBNET = "10.213.19"
# The issue's S model: a reverse-task Transformer, d 128, 2+2 layers (~4 MB of float32 gradients)
TRAIN_ARGS = ("--task reverse --model transformer --batch-size 64 --seed 3 --threads 1 -q "
              "--set model.d_model=128 --set model.n_heads=4 --set model.d_ff=512 --set model.n_enc_layers=2 "
              "--set model.n_dec_layers=2 --set model.dropout=0.0 --set data.rows=20000 --set run.log_every=10")
# The issue's LM: the tinyshakespeare character LM of configs/shakespeare.toml (nanoGPT's small CPU configuration) at
# d 256 (4 layers, ~3.2 M parameters, ~13 MB of float32 gradients); DATA is filled in by prepare_lm_data. Evaluated
# on the first 256 validation rows (the same rows for every run), so an evaluation does not dwarf the steps.
LM_ARGS = ("--task shakespeare --data {data} --batch-size 12 --seed 3 --threads 1 -q --set model.d_model=256 "
           "--set model.d_ff=1024 --set run.eval_rows=256 --set run.log_every=5")
MODELS = {"s": TRAIN_ARGS, "lm": LM_ARGS}
# DiLoCo's H for the sync-every options: 16. The outer gradient is the whole model (4 MB for S): on good Wi-Fi the
# ring moves it in ~0.18 s, 5-6 of S's ~0.034 s two-worker steps, so H = 8 would leave the overlapped exchange barely
# hidden on a loaded link and H = 16 hides it with room (poor Wi-Fi, ~5 MB/s with loss: ~0.8 s, hidden by 16 steps
# only with fp16's 2 MB). Fewer syncs slow DiLoCo's progress per step, so H stays as small as hides the exchange.
SYNC_H = "16"
# Local SGD (Lin et al. 2020, "Don't Use Large Mini-Batches, Use Local SGD"; PyTorch's PeriodicModelAverager): DiLoCo
# with outer lr 1 and no momentum, i.e. the ranks' parameters averaged every H = 8 steps, as fp16 with error feedback.
# Measured on 2 MPI ranks, no link (docs/network.md, "Local SGD"): with this short H, plain averaging tracks synchronous
# training (the LM 2.217 against 2.171 after 300 steps; S crosses its plateau ~80 steps sooner) where DiLoCo's
# Nesterov 0.7 / 0.9 drifts (2.73 at H = 4). Overlapped, the sum is applied tau = 2 steps after its launch: the
# exchange (2 MB for S, 6.4 MB for the LM) hides behind 2 steps on good Wi-Fi; applied a whole round late (tau = H)
# the LM ended at 2.348.
LOCAL_H, LOCAL_TAU = 8, 2
AVERAGE = ["--outer-lr", "1", "--outer-momentum", "0"]


def local_sgd_options(every: int, delay: int) -> dict[str, list[str]]:
    """The local-sgd options' flags for H = every and tau = delay (1 <= tau <= H)."""
    if not 1 <= delay <= every:
        raise ValueError(f"--local-sgd-delay: need 1 <= tau ({delay}) <= --local-sgd-every ({every})")
    h, tau = str(every), str(delay)
    return {"local-sgd": ["--sync-every", h, "--compress", "fp16", *AVERAGE],
            "local-sgd-overlap": ["--sync-every", h, "--sync-overlap", "--sync-delay", tau, "--compress", "fp16",
                                  *AVERAGE]}


# option name -> extra `ndtrain train` flags, or None while the training loop lacks it (reason in NOT_YET)
OPTIONS: dict[str, list[str] | None] = {"plain": [], "compress-fp16": ["--compress", "fp16"],
                                         "compress-bf16": ["--compress", "bf16"],
                                         "compress-powersgd": ["--compress", "powersgd"],
                                         "sync-every": ["--sync-every", SYNC_H],  # DiLoCo, blocking outer sync
                                         "sync-every-overlap": ["--sync-every", SYNC_H, "--sync-overlap"],
                                         "sync-every-fp16": ["--sync-every", SYNC_H, "--sync-overlap",
                                                             "--compress", "fp16"],
                                         **local_sgd_options(LOCAL_H, LOCAL_TAU)}
NOT_YET: dict[str, str] = {}  # option -> why it cannot run yet (every option runs today)


def add_arguments(p) -> None:
    p.add_argument("--profiles", default="lan,wifi-good,wifi-poor",
                   help=f"comma-separated link profiles ({', '.join(PROFILES)})")
    p.add_argument("--options", default="plain", help=f"comma-separated training options ({', '.join(OPTIONS)})")
    p.add_argument("--link-only", action="store_true", help="check the links (ping, iperf3) and train nothing")
    p.add_argument("--no-link-check", action="store_true", help="skip ping/iperf3")
    p.add_argument("--cc", default="cubic,bbr", help="congestion controls for iperf3 (per socket)")
    p.add_argument("--iperf-seconds", type=float, default=5.0)
    p.add_argument("--allreduce-mb", type=float, default=0.0,
                   help="also time a 2-rank all-reduce of this many MB over the link per schedule and --cc (0: off)")
    p.add_argument("--schedules", default="star,ring", help="all-reduce schedules: star (tcp.py today), ring, chain")
    p.add_argument("--repeat", type=int, default=2, help="timed all-reduces per schedule (after one warm-up)")
    p.add_argument("--backend", choices=("mpi", "ray"), default="mpi",
                   help="2-worker training across the hosts: MPI (a two-host hostfile) or Ray (a node per host, "
                        "gradients over the TCP mesh)")
    p.add_argument("--model", choices=tuple(MODELS), default="s",
                   help="s: the issue's S model (reverse task); lm: the tinyshakespeare char LM at d 256 (needs --data)")
    p.add_argument("--data", help="--model lm: tinyshakespeare's input.txt (split 90/10 and imported into the work "
                                  "directory) or a directory already imported (train/, val/)")
    p.add_argument("--steps", type=int, help="training steps per run (default: 600 for s, 300 for lm: long enough "
                                             "for DiLoCo's syncs to show in the loss)")
    p.add_argument("--local-sgd-every", type=int, default=LOCAL_H,
                   help="H of the local-sgd options (steps between averages)")
    p.add_argument("--local-sgd-delay", type=int, default=LOCAL_TAU,
                   help="tau of local-sgd-overlap (steps from an exchange's launch to its average; <= H)")
    p.add_argument("--two-host-steps", type=int,
                   help="training steps of the 2-host runs (default: --steps); more than the one worker's when an "
                        "option needs more steps to reach its loss (the schedule stretches with them)")
    p.add_argument("--eval-every", type=int, help="steps between validation losses (default: steps / 15)")
    p.add_argument("--target-loss", type=float, help="validation loss target (default: the 1-worker final loss)")
    p.add_argument("--train-args", help="`ndtrain train` arguments of every run (default: those of --model)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per training run")
    p.add_argument("--keep-dirs", action="store_true")
    p.add_argument("--json", action="store_true", help="print one JSON object per (profile, option) line")


def parse_list(text: str, known, what: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in names if x not in known]
    if bad or not names:
        raise ValueError(f"--{what}: unknown {bad or 'empty list'}; known: {', '.join(known)}")
    return names


# -- link check ------------------------------------------------------------------------------------------------------
PING_RTT = re.compile(r"rtt min/avg/max/mdev = ([\d.]+)/([\d.]+)/([\d.]+)/([\d.]+) ms")


def parse_ping(text: str) -> dict:
    m = PING_RTT.search(text)
    if not m:
        raise ValueError(f"no RTT summary in ping output: {text[-200:]!r}")
    return {"rtt_min_ms": float(m.group(1)), "rtt_avg_ms": float(m.group(2)), "rtt_max_ms": float(m.group(3))}


def parse_iperf(text: str) -> dict:
    end = json.loads(text)["end"]
    return {"mbit_s": end["sum_received"]["bits_per_second"] / 1e6,
            "retransmits": end["sum_sent"].get("retransmits")}


def iperf_commands(net: TwoHosts, cc: str, seconds: float) -> tuple[list[str], list[str]]:
    """(server in host b, client in host a sending to b with congestion control cc)."""
    return (net.exec_ns("b", "iperf3", "-s", "-1", "-B", net.addr["b"]),
            net.exec_ns("a", "iperf3", "-c", net.addr["b"], "-t", f"{seconds:g}", "-C", cc, "-J"))


def check_link(net: TwoHosts, ccs: list[str], seconds: float) -> dict:
    r = net.run("a", "ping", "-U", "-q", "-c", "40", "-i", "0.05", net.addr["b"], check=False, timeout=60)
    out: dict = {"ping": parse_ping(r.stdout), "iperf3": {}}
    for cc in ccs:
        server_cmd, client_cmd = iperf_commands(net, cc, seconds)
        server = subprocess.Popen(server_cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        net.procs.append(server)
        time.sleep(0.5)
        c = subprocess.run(client_cmd, capture_output=True, text=True, timeout=seconds + 60)
        try:
            out["iperf3"][cc] = parse_iperf(c.stdout)
        except (ValueError, KeyError) as e:
            out["iperf3"][cc] = {"error": f"{type(e).__name__}: {e}; {c.stderr.strip()[-200:]}"}
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
    return out


def probe_commands(net: TwoHosts, profile: LinkProfile, schedule: str, cc: str, mb: float, repeat: int,
                   port: int) -> list[list[str]]:
    """(rank 0 in host a, rank 1 in host b) of launch/netns/allreduce_probe.py."""
    common = ["--addr", net.addr["a"], "--port", str(port), "--mb", f"{mb:g}", "--schedule", schedule, "--cc", cc,
              "--bdp-bytes", str(profile.bdp_bytes), "--repeat", str(repeat)]
    return [net.exec_ns(h, sys.executable, "-m", "ndtrain.launch.netns.allreduce_probe", "--rank", str(r), *common)
            for r, h in enumerate(net.HOSTS)]


def probe_allreduce(net: TwoHosts, profile: LinkProfile, schedules: list[str], ccs: list[str], mb: float,
                    repeat: int, timeout: float = 600) -> list[dict]:
    out = []
    for i, (cc, schedule) in enumerate((c, s) for c in ccs for s in schedules):
        procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for cmd in probe_commands(net, profile, schedule, cc, mb, repeat, 29419 + i)]
        net.procs.extend(procs)
        try:
            outs = [p.communicate(timeout=timeout) for p in procs]
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            out.append({"schedule": schedule, "cc": cc, "error": f"timed out after {timeout:.0f} s"})
            continue
        try:
            out.append(json.loads(outs[0][0].strip().splitlines()[-1]))
        except (ValueError, IndexError):
            out.append({"schedule": schedule, "cc": cc,
                        "error": (outs[0][1] + outs[1][1]).strip()[-300:] or "no output"})
    return out


# -- training runs ---------------------------------------------------------------------------------------------------
def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def time_to_target(records: list[dict], target: float) -> float | None:
    """Wall time of the first evaluation whose loss is <= target (None: never reached)."""
    for r in records:
        ev = r.get("eval")
        if isinstance(ev, dict) and ev.get("loss") is not None and ev["loss"] <= target and "time" in r:
            return float(r["time"])
    return None


def final_eval_loss(records: list[dict]) -> float | None:
    evals = [r["eval"]["loss"] for r in records if isinstance(r.get("eval"), dict) and "loss" in r["eval"]]
    return evals[-1] if evals else None


def summarize(records: list[dict]) -> dict:
    """Median step time and communication share over the logged training windows (the first one holds start-up
    costs and is left out when there are others)."""
    train = [r for r in records if "step_time" in r]
    if len(train) > 1:
        train = train[1:]
    step = [r["step_time"] for r in train]
    # the transport's own count of time blocked per step (comm_blocked_s, cluster/comm/counters.py) where the
    # record has it; else the ranks' timing (rank_comm_share); the record's comm_share holds only the last step's
    # wait of each window, which hides most of it (issue 19)
    share = [r["comm_blocked_s"] / r["step_time"] if r.get("comm_blocked_s") is not None and r["step_time"] > 0
             else sum(r["rank_comm_share"].values()) / len(r["rank_comm_share"]) if r.get("rank_comm_share")
             else r["comm_share"] for r in train
             if r.get("comm_blocked_s") is not None or r.get("rank_comm_share") or r.get("comm_share") is not None]
    return {"step_s": statistics.median(step) if step else None,
            "comm_share": statistics.median(share) if share else None}


def veth_tx_bytes(net: TwoHosts, host: str) -> int:
    r = net.run(host, "ip", "-s", "-j", "link", "show", "dev", net.dev(host))
    return int(json.loads(r.stdout)[0]["stats64"]["tx"]["bytes"])


def prepare_lm_data(path: str, work: Path, env: dict) -> Path:
    """A directory with train/ and val/ for the LM: `path` itself when it is one, else tinyshakespeare's input.txt
    split as nanoGPT's prepare.py does (first 90% of the characters train, the last 10% validate; the vocabulary of
    the whole file) and imported (`ndtrain data import`, block size 64), as bench/run_shakespeare.sh does."""
    src = Path(path)
    if src.is_dir():
        if not ((src / "train").is_dir() and (src / "val").is_dir()):
            raise RuntimeError(f"--data {src}: expected an imported directory with train/ and val/")
        return src
    if not src.is_file():
        raise RuntimeError(f"--data {src}: no such file or directory")
    text = src.read_text(encoding="utf-8")
    n = int(0.9 * len(text))
    data = work / "lm-data"
    data.mkdir(parents=True, exist_ok=True)
    (data / "train.txt").write_text(text[:n], encoding="utf-8")
    (data / "val.txt").write_text(text[n:], encoding="utf-8")
    nd = str(BIN / "ndtrain")
    steps = [[nd, "data", "import", "--text", str(src), "--tokenizer", "char", "--block-size", "64",
              "--out", str(data / "vocab")]]
    for split in ("train", "val"):
        steps.append([nd, "data", "import", "--text", str(data / f"{split}.txt"), "--tokenizer-file",
                      str(data / "vocab" / rundir.TOKENIZER), "--block-size", "64", "--out", str(data / split)])
    for cmd in steps:
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if r.returncode != 0:
            raise RuntimeError(f"--data {src}: `{' '.join(cmd[1:4])}` failed: {(r.stderr or r.stdout).strip()[-300:]}")
    return data


def resolve_run_args(args, work: Path, env: dict) -> None:
    """Fill args.train_args, args.steps and args.eval_every from --model (explicit values win). Every run, the
    one-worker reference included, gets the same arguments; only the option's flags and the backend differ."""
    if args.steps is None:
        args.steps = 600 if args.model == "s" else 300
    if args.eval_every is None:
        args.eval_every = max(1, args.steps // 15)
    if args.train_args is None:
        if args.model == "lm":
            if not args.data:
                raise RuntimeError("--model lm needs --data (tinyshakespeare's input.txt or an imported directory)")
            args.train_args = LM_ARGS.format(data=shlex.quote(str(prepare_lm_data(args.data, work, env))))
        else:
            args.train_args = TRAIN_ARGS


def train_command(args, backend: str, out: Path, extra: list[str], steps: int | None = None) -> list[str]:
    return [str(BIN / "ndtrain"), "train", *shlex.split(args.train_args), "--steps", str(steps or args.steps),
            "--set", f"run.eval_every={args.eval_every}", "--backend", backend, "--out", str(out), *extra]


def run_logged(cmd: list[str], log: Path, env: dict, timeout: float) -> int:
    with open(log, "w") as f:
        try:
            return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            f.write(f"\n[bench network] timed out after {timeout:.0f} s\n")
            return -1


def one_worker(args, work: Path, env: dict) -> dict:
    out = work / "one-worker"
    t0 = time.monotonic()
    rc = run_logged(train_command(args, "local", out, []), work / "one-worker.log", env, args.timeout)
    if rc != 0:
        raise RuntimeError(f"the 1-worker run failed (exit {rc}; see {work / 'one-worker.log'})")
    recs = read_metrics(out / rundir.METRICS)
    return {"records": recs, "wall_s": time.monotonic() - t0, **summarize(recs)}


def two_hosts(args, net: TwoHosts, work: Path, env: dict, profile: str, option: str, target: float,
              t_one: float | None) -> dict:
    out = work / f"{profile}-{option}"
    log = work / f"{profile}-{option}.log"
    if args.backend == "ray":
        if net.ray_head is None:
            net.ray_head = ray_cluster(net, env, work, BIN, sys.executable)
        extra_env, where = RAY_ENV, ["--address", net.ray_head]
    else:
        extra_env, hostfile = mpi_setup(net, work)
        where = ["--hostfile", str(hostfile)]
    tx0 = {h: veth_tx_bytes(net, h) for h in net.HOSTS}
    steps = getattr(args, "two_host_steps", None) or args.steps
    cmd = net.in_ns("a", *train_command(args, args.backend, out, ["--workers", "2", *where, *OPTIONS[option]],
                                        steps))
    rc = run_logged(cmd, log, {**env, **extra_env}, args.timeout)
    res: dict = {"profile": profile, "option": option, "backend": args.backend, "available": True,
                 "exit_status": rc}
    if rc != 0:
        return {**res, "error": f"training failed (see {log})", "step_s": None, "comm_share": None,
                "bytes_per_step": None, "time_to_target_vs_one_worker": None}
    sent = sum(veth_tx_bytes(net, h) - tx0[h] for h in net.HOSTS)
    recs = read_metrics(out / rundir.METRICS)
    t = time_to_target(recs, target)
    return {**res, **summarize(recs), "steps": steps, "bytes_per_step": sent / 2 / steps,
            "time_to_target_s": t, "final_eval_loss": final_eval_loss(recs),
            "time_to_target_vs_one_worker": t / t_one if t is not None and t_one else None}


def not_available(profile: str, option: str) -> dict:
    return {"profile": profile, "option": option, "available": False, "reason": NOT_YET.get(option, "not available"),
            "step_s": None, "comm_share": None, "bytes_per_step": None, "time_to_target_vs_one_worker": None}


# -- main --------------------------------------------------------------------------------------------------------
def main(args) -> int:
    try:
        profiles = parse_list(args.profiles, PROFILES, "profiles")
        options = parse_list(args.options, OPTIONS, "options")
        ccs = [c.strip() for c in args.cc.split(",") if c.strip()]
        schedules = parse_list(args.schedules, ("star", "ring", "chain"), "schedules")
        OPTIONS.update(local_sgd_options(args.local_sgd_every, args.local_sgd_delay))
    except ValueError as e:
        print(f"bench network: {e}", file=sys.stderr)
        return 2
    why = netns_available()
    if why:
        print(f"bench network: {why} (network namespaces, tc, iptables)", file=sys.stderr)
        return 77
    work = Path(tempfile.mkdtemp(prefix="ndtrain-network-"))
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    try:
        if not args.link_only:
            resolve_run_args(args, work, env)
        ok = _run(args, profiles, options, ccs, schedules, work, env)
    except RuntimeError as e:  # a failed set-up or reference run: one line (everything is torn down already)
        print(f"bench network: {e}", file=sys.stderr)
        ok = False
    if not args.keep_dirs and ok:
        subprocess.run(["rm", "-rf", str(work)], check=False)
    else:
        print(f"bench network: work directory {work}", file=sys.stderr)
    return 0 if ok else 1


def _run(args, profiles, options, ccs, schedules, work: Path, env: dict) -> bool:
    """The reference run, then per profile: a fresh pair of hosts, shaped; the checks and runs asked for."""
    one = None
    target = args.target_loss
    if not args.link_only and any(OPTIONS[o] is not None for o in options):
        one = one_worker(args, work, env)
        if target is None:
            target = final_eval_loss(one["records"])
        one["time_to_target_s"] = time_to_target(one["records"], target) if target is not None else None
        emit(args, {"profile": "local", "option": "one-worker", "step_s": one["step_s"], "comm_share": None,
                    "bytes_per_step": 0, "time_to_target_s": one["time_to_target_s"], "target_loss": target,
                    "final_eval_loss": final_eval_loss(one["records"]), "model": args.model, "steps": args.steps,
                    "time_to_target_vs_one_worker": 1.0})
    ok = True
    for name in profiles:
        profile: LinkProfile = PROFILES[name]
        tag = f"ndn{os.getpid() % 100000}"
        net = TwoHosts(tag, subnet=SUBNET)
        with net:
            shape(net, profile)
            if not args.no_link_check:
                emit(args, {"profile": name, "link": {"rate_mbit": profile.rate_mbit, "delay_ms": profile.delay_ms,
                                                      "loss": profile.loss}, **check_link(net, ccs, args.iperf_seconds)})
            if args.allreduce_mb > 0:
                for r in probe_allreduce(net, profile, schedules, ccs, args.allreduce_mb, args.repeat):
                    ok &= "error" not in r
                    emit(args, {"profile": name, "allreduce": r})
            if args.link_only:
                continue
            for option in options:
                if OPTIONS[option] is None:
                    emit(args, not_available(name, option))
                    continue
                r = two_hosts(args, net, work, env, name, option, target, one["time_to_target_s"])
                ok &= "error" not in r
                emit(args, r)
        for d in ray_temp_dirs(net).values():
            shutil.rmtree(d, ignore_errors=True)
    return ok


def emit(args, rec: dict) -> None:
    if args.json:
        print(json.dumps(rec), flush=True)
        return
    if "link" in rec:
        p, l = rec["ping"], rec["link"]
        speeds = ", ".join(f"{cc} {v['mbit_s']:.0f} Mbit/s ({v['retransmits']} retransmits)" if "mbit_s" in v
                           else f"{cc} {v['error']}" for cc, v in rec["iperf3"].items())
        print(f"{rec['profile']:10s} link {l['rate_mbit'] or 'unshaped'} Mbit/s, {l['delay_ms']:g} ms one-way, "
              f"loss {l['loss']:g}: ping RTT {p['rtt_avg_ms']:.2f} ms (min {p['rtt_min_ms']:.2f}); iperf3 {speeds}",
              flush=True)
        return
    if "allreduce" in rec:
        a = rec["allreduce"]
        if "error" in a:
            print(f"{rec['profile']:10s} all-reduce {a['schedule']:5s} {a['cc']}: ERROR {a['error']}", flush=True)
        else:
            print(f"{rec['profile']:10s} all-reduce {a['schedule']:5s} {a['cc']:5s} {a['mb']:g} MB: median "
                  f"{a['median_s']:.3f} s ({a['payload_mbit_s']:.0f} Mbit/s of payload, best), "
                  f"{a['bytes_sent_per_rank'] / 1e6:.2f} MB sent per rank", flush=True)
        return
    if rec.get("available") is False:
        print(f"{rec['profile']:10s} {rec['option']:18s} not available: {rec['reason']}", flush=True)
        return

    def f(x, fmt):
        return "-" if x is None else format(x, fmt)
    ratio = rec["time_to_target_vs_one_worker"]
    reached = (f"time to target x{ratio:.2f} of one worker" if ratio is not None
               else "time to target: not reached" if "error" not in rec else "")
    final = rec.get("final_eval_loss")
    print(f"{rec['profile']:10s} {rec['option']:18s} step {f(rec['step_s'], '.3f')} s  comm "
          f"{f(rec['comm_share'] and 100 * rec['comm_share'], '.0f')}%  {f(rec['bytes_per_step'] and rec['bytes_per_step'] / 1e6, '.2f')} MB/step  "
          f"{reached}" + (f" (final validation loss {final:.4f})" if final is not None else "")
          + (f"  ERROR {rec['error']}" if "error" in rec else ""), flush=True)
