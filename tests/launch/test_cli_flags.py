"""The flags people reach for (issue 17): --data, --lr, --eval-every, --log-every, --version, `config keys` /
--help-config, "did you mean" on a mistyped task, model or key, and the LM path's data import."""
import json
import tomllib

import pytest

from ndtrain.launch.cli import main
from ndtrain.launch.cmd_train import preset_path
from ndtrain.launch.config import describe


def printed_config(capsys, *args) -> dict:
    assert main(["train", *args, "--print-config"]) == 0
    return tomllib.loads(capsys.readouterr().out)


def test_data_flag_is_data_dir(capsys, tmp_path):
    for name in ("a", "b"):
        (tmp_path / name / "train").mkdir(parents=True)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    via_flag = printed_config(capsys, "--task", "xor", "--data", a)
    via_set = printed_config(capsys, "--task", "xor", "--set", f"data.dir={a}")
    assert via_flag == via_set and via_flag["data"]["dir"] == a
    assert printed_config(capsys, "--task", "xor", "--data", a, "--set", f"data.dir={b}")["data"]["dir"] == b


def test_lr_eval_every_log_every_flags(capsys):
    cfg = printed_config(capsys, "--task", "xor", "--lr", "0.02", "--eval-every", "30", "--log-every", "7")
    assert cfg["optim"]["lr"] == 0.02 and cfg["run"]["eval_every"] == 30 and cfg["run"]["log_every"] == 7
    assert printed_config(capsys, "--task", "xor")["optim"]["lr"] == 0.05  # the preset's, without the flag


def test_flags_reach_the_run(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--task", "xor", "--steps", "12", "--out", str(out), "-q", "--no-report",
                 "--log-every", "4", "--eval-every", "6", "--lr", "0.03"]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval" not in r] == [4, 8, 12]
    assert [r["step"] for r in rows if "eval" in r] == [6, 12]
    assert {r["lr"] for r in rows if "lr" in r} == {0.03}


def test_bad_flag_values_are_one_line_exit_2(capsys):
    assert main(["train", "--task", "xor", "--lr", "-1", "--print-config"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "optim.lr: must be > 0" in err
    assert main(["train", "--task", "xor", "--log-every", "0", "--print-config"]) == 2
    assert "run.log_every: must be >= 1" in capsys.readouterr().err


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("ndtrain ") and out.split()[1][0].isdigit()


def test_config_keys_lists_every_key_with_type_default_and_doc(capsys):
    assert main(["config", "keys"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["key", "type", "default", "doc"]
    table = {ln.split()[0]: ln for ln in lines[1:] if ln and "." in ln.split()[0]}
    assert set(table) == {name for name, _, _ in describe()}
    assert table["optim.lr"].split()[1:3] == ["float", "0.001"] and "> 0" in table["optim.lr"]
    assert table["run.backend"].split()[1:3] == ["str", "'local'"] and "one of local, mpi, ray" in table["run.backend"]
    assert "GLOBAL batch" in table["run.batch_size"]
    assert main(["config", "keys", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["key"]: r["type"] for r in rows}["optim.betas"] == "list[float]"
    assert {r["key"]: r["default"] for r in rows}["run.steps"] == 1000


def test_config_keys_of_a_model_family(capsys):
    assert main(["config", "keys", "--model", "lm", "--json"]) == 0
    rows = {r["key"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["model.block_size"]["default"] == 0 and rows["model.n_layers"]["type"] == "int"
    assert main(["config", "keys", "--model", "mlp", "--json"]) == 0
    assert {r["key"] for r in json.loads(capsys.readouterr().out)} >= {"model.hidden", "model.activation"}
    assert main(["config", "keys", "--model", "tranformer"]) == 2
    assert "did you mean 'transformer'?" in capsys.readouterr().err


def test_train_help_config(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--help-config"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "optim.lr" in out and "run.eval_every" in out and "cluster.bucket_mb" in out


@pytest.mark.parametrize("args,expect", [
    (["--task", "xro"], "run.task: unknown task 'xro' (did you mean 'xor'?)"),
    (["--task", "shakespear"], "(did you mean 'shakespeare'?)"),
    (["--task", "xor", "--model", "tranformer"], "run.model: unknown model 'tranformer' (did you mean 'transformer'?)"),
    (["--task", "xor", "--set", "optim.lrr=0.1"], "optim.lrr: unknown key (from --set) (did you mean 'lr'?)"),
    (["--task", "xor", "--set", "optm.lr=0.1"], "(did you mean 'optim'?)"),
    (["--task", "xor", "--set", "model.hiden=[4]"], "model.hiden: unknown key for model 'mlp' (did you mean 'hidden'?)"),
])
def test_did_you_mean(args, expect, capsys, tmp_path):
    rc = main(["train", *args, "--steps", "1", "--out", str(tmp_path / "r"), "-q", "--no-report"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and expect in err, err


def test_no_suggestion_when_nothing_is_close(capsys):
    assert main(["train", "--task", "qqqqqq", "--print-config"]) == 2
    err = capsys.readouterr().err
    assert "did you mean" not in err and "presets for your own data (with --data DIR): multi30k, shakespeare" in err


# -- the LM path ----------------------------------------------------------------------------------------------------
def test_data_help_shows_help_and_defaults(capsys):
    for action, wanted in (("import", ["--block-size", "default: 64", "--val-fraction", "default: char",
                                       "rows per shard file (default: 65536)"]),
                           ("prepare", ["default: rows / 10", "generator seed (default: 0)"]),
                           ("inspect", ["rows to decode (default: 3)", "sha256"])):
        with pytest.raises(SystemExit):
            main(["data", action, "--help"])
        out = " ".join(capsys.readouterr().out.split())
        for w in wanted:
            assert w in out, (action, w)


def test_import_block_size_default_agrees_with_the_shakespeare_preset():
    preset = tomllib.loads(preset_path("shakespeare").read_text())
    from ndtrain.launch.cmd_data import add_parser
    import argparse
    p = argparse.ArgumentParser()
    add_parser(p.add_subparsers())
    args = p.parse_args(["data", "import", "--text", "x", "--out", "y"])
    assert args.block_size == preset["model"]["block_size"] == 64


def test_import_val_fraction_and_train_the_shakespeare_preset(tmp_path, capsys):
    text = "".join(f"{i:03d} First Citizen: we are accounted poor citizens.\n" for i in range(100))
    (tmp_path / "input.txt").write_text(text)
    data = tmp_path / "shk"
    assert main(["data", "import", "--text", str(tmp_path / "input.txt"), "--val-fraction", "0.1",
                 "--out", str(data)]) == 0
    train_m = json.loads((data / "train" / "manifest.json").read_text())
    val_m = json.loads((data / "val" / "manifest.json").read_text())
    assert train_m["rows"] == 90 and val_m["rows"] == 10  # whole lines, the last 10% of the characters
    assert train_m["tokenizer"]["sha256"] == val_m["tokenizer"]["sha256"]  # one tokenizer for both
    assert train_m["info"]["max_tgt_len"] == 64
    out = tmp_path / "run"
    assert main(["train", "--task", "shakespeare", "--data", str(data), "--steps", "3", "--out", str(out), "-q",
                 "--no-report", "--set", "model.n_layers=1", "--set", "model.d_model=16", "--set", "model.d_ff=32",
                 "--set", "model.n_heads=2"]) == 0  # the preset's block_size 64 and the import's agree
    assert json.loads((out / "summary.json").read_text())["model"] == "lm"
    capsys.readouterr()
    assert main(["data", "import", "--text", str(tmp_path / "input.txt"), "--val-fraction", "1.5",
                 "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--val-fraction: must be between 0 and 1" in err
    assert not (tmp_path / "x").exists()
    assert main(["data", "import", "--tsv", str(tmp_path / "input.txt"), "--val-fraction", "0.1",
                 "--out", str(tmp_path / "x")]) == 2
    assert "--val-fraction: only with --text" in capsys.readouterr().err


@pytest.mark.parametrize("task", ["shakespeare", "multi30k"])
def test_a_preset_without_its_data_fails_before_any_rank_starts(task, tmp_path, capsys):
    # multi30k's preset is an MPI run: the check must come before mpiexec (no rank traceback)
    assert main(["train", "--task", task, "--data", str(tmp_path / "none"), "--steps", "1", "-q",
                 "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"data.dir: {tmp_path / 'none'}/train: no such data directory" in err
    assert not (tmp_path / "r").exists()
