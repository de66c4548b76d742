"""A word-level translation run end to end through the CLI: BLEU and wall_time in every eval event (metrics.jsonl and
TensorBoard), `ndtrain eval` equal to the slow path (separate forward, decode for exact match, decode again for
BLEU), --beam/--lenpen, --threads pinning BLAS, and `ndtrain average` (the arithmetic mean, written atomically with
a valid record hash, usable as --checkpoint avg)."""
import json

import numpy as np
import pytest

from ndtrain.cluster import checkpoint as ckpt
from ndtrain.data.info import PAD
from ndtrain.data.loader import Loader
from ndtrain.engine import decoding, losses, metrics
from ndtrain.launch.cli import main
from ndtrain.launch.restore import load_run, split_dataset
from ndtrain.launch.rundir import read_metrics

WORDS = ["the", "a", "red", "blue", "cat", "dog", "sees", "likes", "big", "small"]
GERMAN = {"the": "der", "a": "ein", "red": "rote", "blue": "blaue", "cat": "Katze", "dog": "Hund", "sees": "sieht",
          "likes": "mag", "big": "grosse", "small": "kleine"}


@pytest.fixture(scope="module")
def mt_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("mt")
    rng = np.random.default_rng(0)
    for split, n in (("train", 240), ("val", 40)):
        src = [" ".join(rng.choice(WORDS, rng.integers(2, 7))) for _ in range(n)]
        (root / f"{split}.en").write_text("\n".join(src) + "\n")
        (root / f"{split}.de").write_text("\n".join(" ".join(GERMAN[w] for w in s.split()) + " ." for s in src) + "\n")
    data = root / "data"
    assert main(["data", "import", "--src", str(root / "train.en"), "--tgt", str(root / "train.de"),
                 "--tokenizer", "word", "--out", str(data / "train")]) == 0
    assert main(["data", "import", "--src", str(root / "val.en"), "--tgt", str(root / "val.de"), "--tokenizer-file",
                 str(data / "train" / "tokenizer.json"), "--out", str(data / "val")]) == 0
    out = root / "run"
    assert main(["train", "--out", str(out), "--quiet", "--model", "transformer", "--set", f"data.dir={data}",
                 "--steps", "40", "--batch-size", "16", "--set", "run.eval_every=10", "--checkpoint-every", "10",
                 "--set", "run.keep_checkpoints=5", "--set", "model.d_model=16", "--set", "model.n_heads=2",
                 "--set", "model.d_ff=32", "--set", "model.n_enc_layers=1", "--set", "model.n_dec_layers=1",
                 "--set", "model.dropout=0.1", "--set", "model.share_embeddings=true",
                 "--set", "model.label_smoothing=0.1", "--set", "optim.lr=3e-3"]) == 0
    return out


def _eval_json(capsys, run, *extra):
    capsys.readouterr()
    assert main(["eval", "--run", str(run), "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def test_eval_events_carry_bleu_and_wall_time(mt_run):
    evals = [r for r in read_metrics(mt_run) if "eval" in r]
    assert [r["step"] for r in evals] == [10, 20, 30, 40]
    walls = [r["wall_time"] for r in evals]
    assert all(w > 0 for w in walls) and walls == sorted(walls)
    assert all(0 <= r["eval_s"] <= r["wall_time"] for r in evals)
    for r in evals:
        assert {"bleu", "exact_match", "loss"} <= set(r["eval"]) and 0.0 <= r["eval"]["bleu"] <= 100.0
    ck = ckpt.load(ckpt.latest(mt_run / "checkpoints"))
    assert ck.meta["wall_time"] >= walls[-1]  # the clock a resumed run continues from


def test_tensorboard_gets_bleu_against_wall_time(monkeypatch, tmp_path):
    from ndtrain.launch import progress
    scalars = []

    class Writer:
        def __init__(self, path):
            pass

        def add_scalar(self, tag, value, step):
            scalars.append((tag, value, step))

        def close(self):
            pass

    monkeypatch.setattr(progress, "summary_writer_class", lambda: Writer)
    sink = progress.TensorBoardSink(tmp_path)
    sink.log({"step": 40, "time": 3.0, "wall_time": 61.6, "eval_s": 0.5, "eval": {"bleu": 12.5, "loss": 2.0}})
    assert ("eval/bleu", 12.5, 40) in scalars and ("eval/wall_time", 61.6, 40) in scalars
    assert ("eval_vs_wall_s/bleu", 12.5, 62) in scalars


def test_eval_equals_the_slow_path(mt_run, capsys, monkeypatch):
    """One forward-only pass plus one decode per batch gives what the old path gave: teacher-forced loss from a
    forward with its backward, exact match from a decode to the batch's target width, BLEU from a second decode up
    to the task's longest target."""
    res = _eval_json(capsys, mt_run, "--batch-size", "16")["metrics"]
    run = load_run(mt_run)
    model, tok = run.model, run.tokenizer
    val = split_dataset(run.cfg, "val")
    loss_sum = count = exact = n = 0.0
    hyps, refs = [], []
    for batch in Loader.for_eval(val, 16, 0, 1):
        logits, _ = model.module(batch["src"], batch["tgt_in"], train=False)
        ls, c, _ = losses.cross_entropy_fused(logits.copy(), batch["tgt_out"], ignore_index=PAD)
        loss_sum, count = loss_sum + ls, count + c
        pred = decoding.greedy(model.module, batch["src"], max_len=batch["tgt_out"].shape[1])
        exact += metrics.sequence_exact_match(pred, batch["tgt_out"]).sum()
        n += len(pred)
        full = decoding.greedy(model.module, batch["src"], max_len=run.info.max_tgt_len)
        hyps += [tok.decode(r) for r in full]
        refs += [tok.decode(r) for r in batch["tgt_out"]]
    assert res["loss"] == pytest.approx(loss_sum / count, rel=1e-6)
    assert res["exact_match"] == pytest.approx(exact / n, abs=1e-12)
    assert res["bleu"] == pytest.approx(metrics.corpus_bleu(hyps, [refs]).score, abs=1e-9)
    # the same figures whatever the batch size (sums over batches are exact; BLEU from summed statistics) and
    # whatever the length-sorted chunks a batch is cut into (each trimmed of its padding)
    res_big = _eval_json(capsys, mt_run)["metrics"]
    assert res_big["bleu"] == pytest.approx(res["bleu"], abs=1e-9)
    assert res_big["exact_match"] == pytest.approx(res["exact_match"], abs=1e-12)
    from ndtrain.launch.models.transformer import Seq2SeqModel
    monkeypatch.setattr(Seq2SeqModel, "EVAL_CHUNK_ROWS", 7)
    res_small = _eval_json(capsys, mt_run)["metrics"]
    for k in ("loss", "token_accuracy", "exact_match", "bleu"):
        assert res_small[k] == pytest.approx(res[k], rel=1e-6, abs=1e-9), k


def test_eval_beam_and_lenpen_flags(mt_run, capsys):
    res = _eval_json(capsys, mt_run, "--beam", "3", "--lenpen", "1.0", "--lenpen-kind", "fairseq")["metrics"]
    run = load_run(mt_run)
    val = split_dataset(run.cfg, "val")
    batch = val.batch(np.arange(val.n_rows()))
    toks, _ = decoding.beam_search(run.model.module, batch["src"], beam_size=3, max_len=run.info.max_tgt_len,
                                   alpha=1.0, penalty="fairseq")
    hyps = [run.tokenizer.decode(r) for r in toks]
    refs = [run.tokenizer.decode(r) for r in batch["tgt_out"]]
    assert res["bleu"] == pytest.approx(metrics.corpus_bleu(hyps, [refs]).score, abs=1e-9)
    capsys.readouterr()
    assert main(["eval", "--run", str(mt_run), "--beam", "0"]) == 2
    assert "--beam" in capsys.readouterr().err


@pytest.mark.parametrize("cmd", [["eval"], ["generate", "the cat"]])
def test_eval_and_generate_pin_blas_threads(mt_run, monkeypatch, capsys, cmd):
    from threadpoolctl import threadpool_info
    import ndtrain.launch.cmd_eval as cmd_eval
    import ndtrain.launch.cmd_generate as cmd_generate
    seen = []

    def spy(real):
        def wrapped(*a, **k):
            seen.append([p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"])
            return real(*a, **k)
        return wrapped

    monkeypatch.setattr(cmd_eval, "evaluate", spy(cmd_eval.evaluate))
    monkeypatch.setattr(cmd_generate, "generate", spy(cmd_generate.generate))
    assert main([cmd[0], "--run", str(mt_run), "--threads", "1", *cmd[1:]]) == 0
    assert seen and seen[0] and all(n == 1 for n in seen[0])
    assert main([cmd[0], "--run", str(mt_run), "--threads", "0", *cmd[1:]]) == 2
    assert "--threads" in capsys.readouterr().err


def test_average_is_the_arithmetic_mean_and_evaluates(mt_run, capsys):
    found = ckpt.list_checkpoints(mt_run / "checkpoints")
    assert [ckpt.load(p).step for p in found] == [10, 20, 30, 40]
    assert main(["average", "--run", str(mt_run), "--last", "3"]) == 0
    avg = ckpt.load(mt_run / "checkpoints" / "avg.json")  # verifies the npz sha256 and the record's own hash
    last3 = [ckpt.load(p) for p in found[-3:]]
    assert avg.step == 40 and avg.meta["averaged"]["steps"] == [20, 30, 40]
    for name, value in avg.params.items():
        want = (last3[0].params[name].astype(np.float64) + last3[1].params[name] + last3[2].params[name]) / 3
        np.testing.assert_allclose(value, want, rtol=1e-6, atol=1e-7)
        assert value.dtype == last3[-1].params[name].dtype
    assert not any(".tmp" in p.name or p.name.startswith(".") for p in (mt_run / "checkpoints").iterdir())
    assert ckpt.list_checkpoints(mt_run / "checkpoints") == found  # never taken for a resumable checkpoint
    # usable by eval and generate
    res = _eval_json(capsys, mt_run, "--checkpoint", "avg")
    assert res["checkpoint"].endswith("avg.json") and res["step"] == 40
    assert res["metrics"] != _eval_json(capsys, mt_run)["metrics"]
    assert main(["generate", "--run", str(mt_run), "--checkpoint", "avg", "--beam", "2", "the red cat"]) == 0
    # a tampered average is refused with one line
    js = mt_run / "checkpoints" / "avg.json"
    rec = json.loads(js.read_text())
    rec["step"] = 41
    js.write_text(json.dumps(rec))
    capsys.readouterr()
    assert main(["eval", "--run", str(mt_run), "--checkpoint", "avg"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "avg.json" in err


def test_average_errors_are_one_line(mt_run, tmp_path, capsys):
    before = sorted(p.name for p in (mt_run / "checkpoints").iterdir())
    for argv, words in [(["--last", "9"], "asks for more"), (["--last", "0"], "--last"),
                        (["--last", "2", "--out", str(tmp_path / "x.npz")], "--out")]:
        capsys.readouterr()
        assert main(["average", "--run", str(mt_run), *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err
    assert sorted(p.name for p in (mt_run / "checkpoints").iterdir()) == before
    assert main(["eval", "--run", str(mt_run), "--checkpoint", "nosuch"]) == 2


def test_average_of_known_checkpoints(tmp_path):
    """Three hand-made checkpoints: the average is exactly their mean (float64 accumulation), buffers too."""
    from ndtrain.engine.params import Param, ParamStore
    from ndtrain.engine.module import Module
    from ndtrain.launch.cmd_average import average

    class M(Module):
        def __init__(self):
            super().__init__()
            self.w = Param((2, 3))
            self.b = Param((3,), decay=False)

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text("")
    m = M()
    store = ParamStore.from_module(m, dtype=np.float32)
    for k, step in enumerate((5, 10, 15)):
        store.data[:] = np.arange(store.size) * (k + 1)
        ckpt.save(run / "checkpoints", step, store, buffers={"running": np.full(3, float(k))}, meta={"x": k})
    path = average(run, 3)
    got = ckpt.load(path)
    np.testing.assert_array_equal(got.params["w"], (np.arange(6) * 2).reshape(2, 3))  # mean of 1x, 2x, 3x
    np.testing.assert_array_equal(got.buffers["running"], np.full(3, 1.0))
    assert got.meta["x"] == 2 and got.step == 15 and "loader" not in got.meta
    assert average(run, 2, tmp_path / "two.json") == tmp_path / "two.json"
    np.testing.assert_array_equal(ckpt.load(tmp_path / "two.json").params["b"], np.arange(6, 9) * 2.5)


def test_wall_time_continues_across_a_resume(tmp_path):
    out = tmp_path / "run"
    base = ["train", "--out", str(out), "--quiet", "--task", "xor", "--model", "mlp", "--set", "run.eval_every=10",
            "--checkpoint-every", "10"]
    assert main([*base, "--steps", "20"]) == 0
    first = [r for r in read_metrics(out) if "eval" in r]
    ck = ckpt.load(out / "checkpoints" / "ckpt-00000020.json")
    assert ck.meta["wall_time"] >= first[-1]["wall_time"] > first[0]["wall_time"] > 0
    assert main([*base, "--steps", "30", "--resume", str(out)]) == 0
    evals = [r for r in read_metrics(out) if "eval" in r]
    assert [r["step"] for r in evals] == [10, 20, 30]
    assert evals[-1]["wall_time"] > ck.meta["wall_time"]  # the resumed run's clock starts where the checkpoint's ended
    assert evals[-1]["time"] < evals[-1]["wall_time"]  # `time` counts this process's loop only


def test_lm_eval_chunks_give_the_same_sums(monkeypatch):
    """The LM's eval forward runs by chunks of EVAL_CHUNK_TOKENS tokens: the sums equal one forward of the batch."""
    from ndtrain.engine.params import ParamStore
    from ndtrain.launch.models.transformer import LMModel, build_lm
    from ndtrain.data.info import TaskInfo
    info = TaskInfo(name="t", kind="lm", tgt_vocab_size=20, max_tgt_len=8)
    model = build_lm(info, {"d_model": 16, "n_heads": 2, "d_ff": 32, "n_layers": 2})
    ParamStore.from_module(model.module, dtype=np.float64, seed=0)
    model.module.eval()
    rng = np.random.default_rng(0)
    batch = {"x": rng.integers(4, 20, (13, 8)).astype(np.int32), "y": rng.integers(4, 20, (13, 8)).astype(np.int32)}
    batch["y"][5, 6:] = 0  # a short row
    logits, _ = model.module(batch["x"], train=False)
    want_loss, want_count, _ = losses.cross_entropy_fused(logits.copy(), batch["y"], ignore_index=PAD)
    want_correct, _ = metrics.token_accuracy_sums(logits, batch["y"])
    monkeypatch.setattr(LMModel, "EVAL_CHUNK_TOKENS", 24)  # 3 rows a chunk: 5 chunks, the last of 1 row
    got = model.metric_sums(batch)
    assert got["loss_sum"] == pytest.approx(want_loss, rel=1e-12) and got["count"] == want_count == 13 * 8 - 2
    assert got["correct"] == want_correct
