"""`ndtrain bench network` and its link emulation (launch/netns/): profiles, the tc/iptables/ethtool commands,
the NFQUEUE messages of the delay program, the parsers and the result rows, all without root; then, only as root
with `ip netns`, a real shaped link (RTT from the delay program, rate from tbf) that is always torn down."""
import json
import os
import shlex
import shutil
import socket
import struct
import subprocess
import time
from types import SimpleNamespace

import pytest

from ndtrain.launch.bench import network
from ndtrain.launch.netns import delay
from ndtrain.launch.netns.hosts import TwoHosts, netns_available
from ndtrain.launch.netns.link import PROFILES, LinkProfile, shape, shaping_commands, tbf_burst_bytes


# -- profiles and commands (no root) -------------------------------------------------------------------------------
def test_profiles_are_the_issues_links():
    assert (PROFILES["lan"].rate_mbit, PROFILES["lan"].delay_ms, PROFILES["lan"].loss) == (1000, 0.2, 0)
    assert (PROFILES["wifi-good"].rate_mbit, PROFILES["wifi-good"].delay_ms, PROFILES["wifi-good"].loss) == \
        (200, 3, 0.001)
    assert (PROFILES["wifi-poor"].rate_mbit, PROFILES["wifi-poor"].delay_ms, PROFILES["wifi-poor"].loss) == \
        (50, 10, 0.01)
    assert PROFILES["wifi-good"].rtt_ms == 6 and PROFILES["wifi-good"].bdp_bytes == 150_000
    for bad in (dict(rate_mbit=0, delay_ms=1, loss=0), dict(rate_mbit=1, delay_ms=-1, loss=0),
                dict(rate_mbit=1, delay_ms=1, loss=1.0)):
        with pytest.raises(ValueError, match="profile x"):
            LinkProfile("x", **bad)


def test_shaping_commands():
    net = TwoHosts("ndt1", subnet="10.213.19")
    cmds = [" ".join(c) for c in shaping_commands(net, "b", PROFILES["wifi-poor"], queue=1)]
    assert all(c.startswith("ip netns exec ndt1b ") for c in cmds)
    assert any("ethtool -K ndt1vb tso off gso off gro off" in c for c in cmds)
    assert any(f"tc qdisc replace dev ndt1vb root tbf rate 50mbit burst {tbf_burst_bytes(50)} latency 20ms" in c
               for c in cmds)
    loss = [c for c in cmds if "statistic" in c]
    nfq = [c for c in cmds if "NFQUEUE" in c]
    assert loss and "-A INPUT -i ndt1vb -m statistic --mode random --probability 0.01 -j DROP" in loss[0]
    assert nfq and "--queue-num 1 --queue-bypass" in nfq[0]
    assert cmds.index(loss[0]) < cmds.index(nfq[0])  # a dropped packet is never delayed first
    lan = [" ".join(c) for c in shaping_commands(net, "a", PROFILES["lan"], queue=0)]
    assert not any("ethtool" in c or "statistic" in c for c in lan)  # no loss: offloads stay on
    assert shaping_commands(net, "a", PROFILES["none"], queue=0) == []
    assert tbf_burst_bytes(1000) == 125_000 and tbf_burst_bytes(1) == 6000


def test_two_hosts_names_and_setup_commands():
    net = TwoHosts("ndn12345", subnet="10.213.19")
    assert net.addr == {"a": "10.213.19.1", "b": "10.213.19.2"}
    names = {net.ns(h) for h in "ab"} | {net.dev(h) for h in "ab"}
    assert all(len(n) <= 15 for n in names)
    flat = [" ".join(c) for c in net.setup_commands()]
    assert "ip link add ndn12345va type veth peer name ndn12345vb" in flat
    assert "ip -n ndn12345b addr add 10.213.19.2/24 dev ndn12345vb" in flat
    with pytest.raises(ValueError, match="longer than 11"):
        TwoHosts("x" * 12)


def test_netns_available_says_why_not(monkeypatch):
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    assert netns_available() == "needs root"


# -- the delay program's netlink messages (no root) ----------------------------------------------------------------
def test_nfqueue_messages():
    bind, cfg = delay.bind_messages(7, 4096)
    for m in (bind, cfg):
        length, kind, flags, seq, _ = delay.NLMSG_HDR.unpack_from(m)
        assert length == len(m) and kind == (3 << 8) | 2 and flags & delay.NLM_F_ACK
        assert struct.unpack_from("!H", m, 18)[0] == 7  # nfgenmsg res_id: the queue, big-endian
    v = delay.verdict_batch(7, 123456)
    assert delay.NLMSG_HDR.unpack_from(v)[1] == (3 << 8) | 3
    assert struct.unpack_from("!II", v, 24) == (delay.NF_ACCEPT, 123456)  # after nlmsghdr, nfgenmsg, nlattr


def test_packet_ids_parse_and_errors():
    def packet(pid):
        attrs = delay.nlattr(delay.NFQA_PACKET_HDR, struct.pack("!IHB", pid, 0x0800, 1)) + delay.nlattr(9, b"xx")
        return delay.nfq_message(delay.NFQNL_MSG_PACKET, 0, attrs)
    assert delay.packet_ids(packet(5) + packet(6)) == [5, 6]
    ack = delay.NLMSG_HDR.pack(36, delay.NLMSG_ERROR, 0, 1, 0) + struct.pack("=i", 0) + b"\0" * 16
    assert delay.packet_ids(ack) == []
    err = delay.NLMSG_HDR.pack(36, delay.NLMSG_ERROR, 0, 1, 0) + struct.pack("=i", -1) + b"\0" * 16
    with pytest.raises(OSError, match="nfnetlink"):
        delay.packet_ids(err)


def test_delay_program_refuses_bad_arguments(capsys):
    assert delay.main(["--queue", "70000", "--delay-ms", "1"]) == 2
    assert "--queue" in capsys.readouterr().err


# -- the benchmark's parsing and rows (no root) --------------------------------------------------------------------
def test_parsers():
    assert network.parse_ping("...\nrtt min/avg/max/mdev = 6.601/7.812/9.1/0.4 ms\n") == \
        {"rtt_min_ms": 6.601, "rtt_avg_ms": 7.812, "rtt_max_ms": 9.1}
    with pytest.raises(ValueError, match="no RTT"):
        network.parse_ping("100% packet loss")
    text = json.dumps({"end": {"sum_received": {"bits_per_second": 1.89e8}, "sum_sent": {"retransmits": 82}}})
    assert network.parse_iperf(text) == {"mbit_s": 189.0, "retransmits": 82}
    net = TwoHosts("ndt1", subnet="10.213.19")
    server, client = network.iperf_commands(net, "bbr", 5)
    assert server[:4] == ["ip", "netns", "exec", "ndt1b"] and "-s" in server
    assert client[:4] == ["ip", "netns", "exec", "ndt1a"] and client[-4:] == ["5", "-C", "bbr", "-J"]


def test_time_to_target_and_summaries():
    recs = [{"step": 10, "step_time": 9.0, "comm_share": 0.9},
            {"step": 20, "step_time": 1.0, "comm_share": 0.5},
            {"step": 20, "time": 30.0, "eval": {"loss": 2.0}},
            {"step": 30, "step_time": 3.0, "comm_share": 0.7},
            {"step": 40, "time": 50.0, "eval": {"loss": 1.0}},
            {"step": 40, "time": 55.0, "eval": {"loss": 0.9}}]
    assert network.time_to_target(recs, 1.5) == 50.0
    assert network.time_to_target(recs, 0.5) is None
    assert network.final_eval_loss(recs) == 0.9
    assert network.summarize(recs) == {"step_s": 2.0, "comm_share": 0.6}  # the first window (start-up) left out
    recs[3]["rank_comm_share"] = {"0": 0.8, "1": 0.9}  # the ranks' own timing wins over the window's comm_share
    assert network.summarize(recs)["comm_share"] == pytest.approx((0.5 + 0.85) / 2)
    recs[1]["comm_blocked_s"] = 0.9  # and the transport's count of time blocked wins over both
    assert network.summarize(recs)["comm_share"] == pytest.approx((0.9 + 0.85) / 2)


def test_rows_and_option_lists(capsys):
    # every option now runs, with the training flag it names
    assert network.OPTIONS["compress-fp16"] == ["--compress", "fp16"]
    assert network.OPTIONS["compress-powersgd"] == ["--compress", "powersgd"]
    assert network.OPTIONS["sync-every"] == ["--sync-every", "16"]
    assert network.OPTIONS["sync-every-overlap"] == ["--sync-every", "16", "--sync-overlap"]
    assert network.OPTIONS["sync-every-fp16"] == ["--sync-every", "16", "--sync-overlap", "--compress", "fp16"]
    assert network.OPTIONS["local-sgd-overlap"] == ["--sync-every", "8", "--sync-overlap", "--sync-delay", "2",
                                                    "--compress", "fp16", "--outer-lr", "1", "--outer-momentum",
                                                    "0"]
    from ndtrain.launch.cmd_train import add_parser
    import argparse
    sub = argparse.ArgumentParser().add_subparsers()
    add_parser(sub)
    p = sub.choices["train"]
    for flags in network.OPTIONS.values():
        p.parse_args(flags)  # the train command accepts each option's flags
    row = network.not_available("wifi-good", "sync-every")
    for k in ("profile", "option", "step_s", "comm_share", "bytes_per_step", "time_to_target_vs_one_worker"):
        assert k in row
    assert row["available"] is False
    args = SimpleNamespace(json=True)
    network.emit(args, row)
    assert json.loads(capsys.readouterr().out) == row
    with pytest.raises(ValueError, match="unknown"):
        network.parse_list("lan,moon", network.PROFILES, "profiles")


def test_model_choice_gives_every_run_the_same_arguments_but_the_option(tmp_path, capsys):
    """--model s|lm: defaults for steps and evaluation; the LM's data from tinyshakespeare's input.txt (split 90/10
    and imported) or an imported directory; the one-worker and 2-host commands differ only in backend, output,
    --workers and the option's flags. A run that never reaches the target prints "not reached" and its final loss."""
    import argparse
    p = argparse.ArgumentParser()
    network.add_arguments(p)
    env = dict(os.environ)
    args = p.parse_args([])
    network.resolve_run_args(args, tmp_path, env)
    assert (args.model, args.steps, args.eval_every, args.train_args) == ("s", 600, 40, network.TRAIN_ARGS)
    text = tmp_path / "input.txt"
    text.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 200)
    args = p.parse_args(["--model", "lm", "--data", str(text), "--steps", "30"])
    network.resolve_run_args(args, tmp_path / "w", env)
    data = tmp_path / "w" / "lm-data"
    assert (data / "train" / "manifest.json").is_file() and (data / "val" / "manifest.json").is_file()
    assert f"--data {data}" in args.train_args and "model.d_model=256" in args.train_args
    one = network.train_command(args, "local", tmp_path / "one", [])
    two = network.train_command(args, "mpi", tmp_path / "two", ["--workers", "2", *network.OPTIONS["sync-every-fp16"]])
    differ = [a for a in two if a not in one]
    assert differ == ["mpi", str(tmp_path / "two"), "--workers", "2", "--sync-every", "16", "--sync-overlap",
                      "--compress", "fp16"]
    with pytest.raises(RuntimeError, match="needs --data"):
        network.resolve_run_args(p.parse_args(["--model", "lm"]), tmp_path, env)
    network.emit(SimpleNamespace(json=False), {"profile": "wifi-poor", "option": "plain", "step_s": 1.0,
                                               "comm_share": 0.5, "bytes_per_step": 1e6, "final_eval_loss": 2.5,
                                               "time_to_target_vs_one_worker": None})
    assert "not reached (final validation loss 2.5000)" in capsys.readouterr().out


def test_every_models_runs_parse_to_a_valid_config(tmp_path):
    """Each model's `ndtrain train` arguments, with each option's flags, are a config `ndtrain train` accepts (the
    LM's once named a key that does not exist, and its reference run failed at its first line)."""
    from ndtrain.launch.cli import build_parser
    from ndtrain.launch.cmd_train import resolve_config
    from ndtrain.launch.config import validate
    parser = build_parser()
    for model, train_args in network.MODELS.items():
        for option, flags in network.OPTIONS.items():
            argv = ["train", *shlex.split(train_args.format(data=tmp_path)), "--steps", "10", "--backend", "ray",
                    "--workers", "2", "--out", str(tmp_path / "out"), *flags]
            cfg = validate(resolve_config(parser.parse_args(argv)))
            assert (cfg.run.steps, cfg.run.workers) == (10, 2), (model, option)
            assert cfg.run.eval_rows == (256 if model == "lm" else 0), (model, option)
            if option.startswith("local-sgd"):  # plain averaging every 8 steps, as fp16
                c = cfg.cluster
                assert (c.sync_every, c.outer_lr, c.outer_momentum, c.compress) == (8, 1.0, 0.0, "fp16"), option
                assert (c.sync_overlap, c.sync_delay) == ((True, 2) if option.endswith("overlap") else (False, 0))


def test_two_host_steps_change_only_the_two_host_runs(tmp_path):
    import argparse
    p = argparse.ArgumentParser()
    network.add_arguments(p)
    args = p.parse_args(["--steps", "300", "--two-host-steps", "360"])
    network.resolve_run_args(args, tmp_path, dict(os.environ))
    one = network.train_command(args, "local", tmp_path / "one", [])
    two = network.train_command(args, "ray", tmp_path / "two", [], args.two_host_steps)
    assert one[one.index("--steps") + 1] == "300" and two[two.index("--steps") + 1] == "360"


def test_main_refuses_unknown_profiles(capsys):
    import argparse
    p = argparse.ArgumentParser()
    network.add_arguments(p)
    assert network.main(p.parse_args(["--profiles", "moon"])) == 2
    assert "moon" in capsys.readouterr().err


def test_registered_as_a_bench():
    from ndtrain.launch.cmd_bench import available
    assert "network" in available()


# -- a real link (root and `ip netns` only) ------------------------------------------------------------------------
def _root_link_or_skip():
    why = netns_available()
    if why:
        pytest.skip(f"network namespaces: {why}")
    for tool in ("tc", "iptables", "ping"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")


@pytest.mark.timeout(120)
def test_a_shaped_link_has_the_profiles_delay_and_is_torn_down():
    _root_link_or_skip()
    prof = LinkProfile("t", 100.0, 5.0, 0.0)
    tag = f"ndq{int(time.time() * 1000) % 100000}"
    net = TwoHosts(tag, subnet="10.213.29")
    try:
        with net:
            shape(net, prof)
            r = net.run("a", "ping", "-U", "-q", "-c", "5", "-i", "0.1", net.addr["b"], check=False, timeout=30)
            rtt = network.parse_ping(r.stdout)
            assert rtt["rtt_min_ms"] >= 2 * prof.delay_ms * 0.95, rtt  # both directions delayed
            qd = net.run("a", "tc", "qdisc", "show", "dev", net.dev("a")).stdout
            assert "tbf" in qd and "100Mbit" in qd
            delay_procs = list(net.procs)
            assert len(delay_procs) == 2 and all(p.poll() is None for p in delay_procs)
            raise KeyError("a failure inside the block")
    except KeyError:
        pass
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert net.ns("a") not in left and net.ns("b") not in left
    assert all(p.poll() is not None for p in delay_procs)  # the delay programs were stopped
    assert subprocess.run(["ip", "link", "show", net.dev("a")], capture_output=True).returncode != 0


def test_probe_commands_and_the_star_it_compares_with():
    import threading

    import numpy as np

    from ndtrain.cluster.comm.ring import SocketLink
    from ndtrain.launch.netns import allreduce_probe
    net = TwoHosts("ndt1", subnet="10.213.19")
    r0, r1 = network.probe_commands(net, PROFILES["wifi-good"], "ring", "bbr", 4, 2, 29500)
    assert r0[:4] == ["ip", "netns", "exec", "ndt1a"] and r1[:4] == ["ip", "netns", "exec", "ndt1b"]
    assert "--bdp-bytes" in r0 and r0[r0.index("--bdp-bytes") + 1] == "150000"
    assert r1[r1.index("--addr") + 1] == "10.213.19.1"  # rank 1 dials rank 0's namespace address
    assert allreduce_probe.private_address("10.213.19.1") and allreduce_probe.private_address("127.0.0.1")
    assert not allreduce_probe.private_address("0.0.0.0") and not allreduce_probe.private_address("192.168.1.5")
    assert allreduce_probe.main(["--rank", "0", "--addr", "0.0.0.0"]) == 2
    # the star (tcp.py's schedule for two ranks) over a socketpair: both ranks end with the sum
    a, b = socket.socketpair()
    x = [np.full(3_000_000, r + 1.0, np.float32) for r in range(2)]  # > one 4 MB piece
    sent = [0, 0]

    def run(r, s):
        sent[r] = allreduce_probe.star(r, SocketLink(s, r, 1 - r, 20), x[r])

    ts = [threading.Thread(target=run, args=(r, s)) for r, s in ((0, a), (1, b))]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert (x[0] == 3).all() and (x[1] == 3).all() and sent == [12_000_000, 12_000_000]
    a.close()
    b.close()


@pytest.mark.timeout(120)
def test_allreduce_probe_over_a_shaped_link():
    _root_link_or_skip()
    tag = f"ndp{int(time.time() * 1000) % 100000}"
    with TwoHosts(tag, subnet="10.213.31") as net:
        shape(net, LinkProfile("t", 200.0, 1.0, 0.0))
        got = network.probe_allreduce(net, PROFILES["lan"], ["star", "ring"], ["bbr"], 0.5, 1, timeout=60)
    assert [g.get("schedule") for g in got] == ["star", "ring"], got
    assert all("error" not in g and g["bytes_sent_per_rank"] == 524288 for g in got), got


def test_local_sgd_every_and_delay_set_the_local_sgd_flags(capsys):
    flags = network.local_sgd_options(16, 4)["local-sgd-overlap"]
    assert flags[flags.index("--sync-every") + 1] == "16" and flags[flags.index("--sync-delay") + 1] == "4"
    assert "--sync-delay" not in network.local_sgd_options(16, 4)["local-sgd"]
    with pytest.raises(ValueError, match="local-sgd-delay"):
        network.local_sgd_options(8, 9)
    import argparse
    p = argparse.ArgumentParser()
    network.add_arguments(p)
    assert network.main(p.parse_args(["--local-sgd-every", "4", "--local-sgd-delay", "5"])) == 2
    assert "--local-sgd-delay" in capsys.readouterr().err
