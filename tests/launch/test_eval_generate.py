"""`ndtrain eval` and `ndtrain generate` (and launch/restore.py under them) on tiny runs trained in tmp dirs:
the restored model is the trained one (parameter checksum), eval's figures are the trainer's final eval, generate
decodes through engine.decoding, and bad input is one line on stderr with exit status 2."""
import io
import json
import shutil

import numpy as np
import pytest

from ndtrain.cluster import checkpoint as ckpt
from ndtrain.engine import decoding
from ndtrain.engine.metrics import corpus_bleu
from ndtrain.launch.cli import main
from ndtrain.launch.restore import load_run, split_dataset
from ndtrain.launch.rundir import read_summary
from helpers.runs import TINY_LM, train

@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm")
    rng = np.random.default_rng(0)
    words = ["the", "cat", "sat", "on", "a", "mat"]
    for split, n in (("train", 120), ("val", 30)):
        (root / f"{split}.txt").write_text("".join(" ".join(rng.choice(words, 6)) + "\n" for _ in range(n)))
    data = root / "data"
    assert main(["data", "import", "--text", str(root / "train.txt"), "--block-size", "16",
                 "--out", str(data / "train")]) == 0
    assert main(["data", "import", "--text", str(root / "val.txt"), "--block-size", "16", "--tokenizer-file",
                 str(data / "train" / "tokenizer.json"), "--out", str(data / "val")]) == 0
    return train(root / "run", "--model", "lm", "--set", f"data.dir={data}", "--steps", "10", "--batch-size", "8",
                 *TINY_LM)


def _json_eval(capsys, run, *extra):
    capsys.readouterr()
    assert main(["eval", "--run", str(run), "--json", *extra]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1  # one JSON object on one line
    return json.loads(out)


def _generate(capsys, run, *args, monkeypatch=None, stdin=None):
    if stdin is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    capsys.readouterr()
    assert main(["generate", "--run", str(run), *args]) == 0
    return capsys.readouterr().out.splitlines()


# -- restore --------------------------------------------------------------------------------------------------------
def test_restore_rebuilds_the_trained_parameters(xor_run):
    run = load_run(xor_run)
    s = read_summary(xor_run)
    assert run.step == s["steps"] == 50
    assert run.store.checksum() == s["param_checksum"]
    assert run.tokenizer is None and run.info.kind == "classification"
    assert not run.model.module.training  # eval mode


def test_restore_skips_a_damaged_newest_checkpoint(xor_run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(xor_run, copy)
    newest = ckpt.latest(copy / "checkpoints")
    with open(newest.with_suffix(".npz"), "r+b") as f:
        f.seek(100)
        f.write(b"\x00garbage\x00")
    run = load_run(copy)
    assert run.step == 25 and "damaged" in capsys.readouterr().err


def test_restore_seq2seq_has_its_tokenizer(rev_run):
    run = load_run(rev_run)
    assert run.store.checksum() == read_summary(rev_run)["param_checksum"]
    assert run.tokenizer.decode(run.tokenizer.encode("0123")) == "0123"


# -- eval -----------------------------------------------------------------------------------------------------------
def test_eval_json_equals_the_trainers_final_eval(xor_run, capsys):
    res = _json_eval(capsys, xor_run)
    s = read_summary(xor_run)
    assert res["step"] == s["steps"] and res["split"] == "val" and res["model"] == "mlp" and res["task"] == "xor"
    assert set(res["metrics"]) == set(s["eval"]) == {"loss", "accuracy"}
    for k, v in s["eval"].items():
        assert res["metrics"][k] == pytest.approx(v, rel=1e-12, abs=1e-12)
    assert res["rows"] == len(split_dataset(load_run(xor_run).cfg, "val"))


def test_eval_train_split_differs_from_val(xor_run, capsys):
    val, train = _json_eval(capsys, xor_run), _json_eval(capsys, xor_run, "--split", "train")
    assert train["split"] == "train" and train["metrics"]["loss"] != val["metrics"]["loss"]


def test_eval_table_lists_every_metric(xor_run, capsys):
    assert main(["eval", "--run", str(xor_run)]) == 0
    out = capsys.readouterr().out
    assert "metric" in out and "value" in out and "step 50" in out
    s = read_summary(xor_run)
    for k, v in s["eval"].items():
        line = next(ln for ln in out.splitlines() if f" {k} " in ln)
        assert f"{v:.6g}" in line


def test_eval_seq2seq_matches_summary_and_bleu_matches_generate(rev_run, capsys, tmp_path):
    res = _json_eval(capsys, rev_run, "--bleu")
    s = read_summary(rev_run)
    for k, v in s["eval"].items():
        assert res["metrics"][k] == pytest.approx(v, rel=1e-9)
    assert {"exact_match", "token_accuracy", "perplexity"} <= set(res["metrics"])
    # BLEU is the corpus BLEU of what `generate` produces for the validation sources
    run = load_run(rev_run)
    val = split_dataset(run.cfg, "val")
    batch = val.batch(np.arange(val.n_rows()))
    sources = [run.tokenizer.decode(r) for r in batch["src"]]
    refs = [run.tokenizer.decode(r) for r in batch["tgt_out"]]
    (tmp_path / "src.txt").write_text("\n".join(sources) + "\n")
    hyps = _generate(capsys, rev_run, "--input", str(tmp_path / "src.txt"))
    assert len(hyps) == len(sources)
    assert res["metrics"]["bleu"] == pytest.approx(corpus_bleu(hyps, [refs]).score, abs=1e-9)
    assert "bleu" not in _json_eval(capsys, rev_run)["metrics"]  # a char task: no BLEU unless asked


def test_eval_lm_reports_perplexity(lm_run, capsys):
    res = _json_eval(capsys, lm_run)
    s = read_summary(lm_run)
    assert set(res["metrics"]) == set(s["eval"]) and "perplexity" in res["metrics"]
    assert res["metrics"]["loss"] == pytest.approx(s["eval"]["loss"], rel=1e-9)
    assert res["metrics"]["perplexity"] == pytest.approx(np.exp(res["metrics"]["loss"]), rel=1e-9)


# -- generate -------------------------------------------------------------------------------------------------------
def test_generate_text_argument_is_greedy_decoding(rev_run, capsys):
    out = _generate(capsys, rev_run, "1234")
    run = load_run(rev_run)
    src = run.tokenizer.encode("1234")[None, :]
    want = run.tokenizer.decode(decoding.greedy(run.model.module, src, max_len=run.info.max_tgt_len)[0])
    assert out == [want]
    assert set(want) <= set("0123456789")


def test_generate_reads_stdin_one_line_per_line(rev_run, capsys, monkeypatch):
    lines = ["12", "98765", "4"]
    out = _generate(capsys, rev_run, monkeypatch=monkeypatch, stdin="\n".join(lines) + "\n")
    assert len(out) == 3
    # batched decoding (padded sources) gives what one-at-a-time decoding gives
    assert out == [_generate(capsys, rev_run, s)[0] for s in lines]


def test_generate_beam_and_seeded_sampling(rev_run, capsys):
    beam = _generate(capsys, rev_run, "--beam", "3", "555")
    assert len(beam) == 1 and set(beam[0]) <= set("0123456789")
    a = _generate(capsys, rev_run, "--temperature", "2", "--top-k", "8", "--seed", "5", "31415")
    b = _generate(capsys, rev_run, "--temperature", "2", "--top-k", "8", "--seed", "5", "31415")
    c = [_generate(capsys, rev_run, "--temperature", "2", "--top-k", "8", "--seed", s, "31415")[0]
         for s in ("6", "7", "8", "9")]
    assert a == b and len(set(c + a)) > 1  # the seed decides the sample


def test_generate_lm_continues_the_prompt(lm_run, capsys):
    out = _generate(capsys, lm_run, "--max-len", "40", "--temperature", "0.8", "--seed", "1", "the cat")
    assert len(out) == 1 and out[0].startswith("the cat") and len(out[0].replace("\\n", "\n")) == len("the cat") + 40
    assert "\n" not in out[0]


# -- errors ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cmd", [["eval"], ["generate", "12"], ["report"]])
def test_bad_run_dir_is_one_line_exit_2(tmp_path, capsys, cmd):
    rc = main([cmd[0], "--run", str(tmp_path / "nosuch"), *cmd[1:]])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "nosuch" in err


def test_run_without_checkpoint_names_the_folder(xor_run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(xor_run, copy)
    shutil.rmtree(copy / "checkpoints")
    assert main(["eval", "--run", str(copy)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "checkpoints" in err


@pytest.mark.parametrize("args, words", [
    (["--beam", "2", "--temperature", "0.5"], "--beam"),
    (["--temperature", "0"], "--temperature"),
    (["--top-p", "1.5"], "--top-p"),
    (["--max-len", "0"], "--max-len"),
])
def test_generate_bad_flags_exit_2(rev_run, capsys, args, words):
    assert main(["generate", "--run", str(rev_run), *args, "12"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err


def test_generate_on_a_classifier_is_an_error(xor_run, capsys):
    assert main(["generate", "--run", str(xor_run), "1 0"]) == 2
    assert "seq2seq or lm" in capsys.readouterr().err
