"""`ndtrain bench realdata` on a tiny generated parallel corpus (no /work/shared): it imports the raw files itself,
times the real, plain and synthetic modes and the evaluation, and reports every field (not its speed)."""
import gzip
import io
import json
from contextlib import redirect_stdout

import numpy as np
import pytest

from ndtrain.launch.cli import main

TINY = ["--set", "model.d_model=16", "--set", "model.n_heads=2", "--set", "model.d_ff=32",
        "--set", "model.n_enc_layers=1", "--set", "model.n_dec_layers=1", "--set", "run.batch_size=16",
        "--set", "run.eval_batch_size=32"]


def write_corpus(d, rng):
    words_en = [f"w{i}" for i in range(40)]
    words_de = [f"v{i}" for i in range(40)]
    for split, n in (("train", 300), ("val", 40)):
        lens = np.minimum(2 + rng.geometric(0.15, n), 30)  # a long tail, as real sentences
        en = [" ".join(rng.choice(words_en, k)) for k in lens]
        de = [" ".join(rng.choice(words_de, max(1, k + int(rng.integers(-2, 3))))) for k in lens]
        for lang, lines in (("en", en), ("de", de)):
            with gzip.open(d / f"{split}.{lang}.gz", "wt") as f:
                f.write("\n".join(lines) + "\n")


def run_bench(*args):
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main(["bench", "realdata", *args]) == 0
    return buf.getvalue()


@pytest.mark.timeout(120)
def test_bench_realdata_reports_every_field(tmp_path):
    write_corpus(tmp_path, np.random.default_rng(0))
    out = run_bench(str(tmp_path), "--json", "--steps", "2", "--warmup", "1", "--eval-rows", "8",
                    "--vocab-size", "300", *TINY)
    r = json.loads(out.strip().splitlines()[-1])
    assert set(r["train"]) == {"real", "plain", "before", "synthetic"}
    for mode, row in r["train"].items():
        assert row["tok_s"] > 0 and row["tokens_per_step"] > 0 and row["step_ms_median"] > 0
        assert 0.0 <= row["pad_fraction"] < 1.0
    assert r["train"]["synthetic"]["pad_fraction"] == 0.0
    assert r["train"]["real"]["pad_fraction"] < r["train"]["plain"]["pad_fraction"]  # the preset buckets
    assert r["train"]["before"]["pad_fraction"] == r["train"]["plain"]["pad_fraction"]  # the same batches
    assert r["bucket"] is True and r["batch_size"] == 16 and r["pad_fraction"] == r["train"]["real"]["pad_fraction"]
    assert r["synthetic_shape"] == [16, round(r["mean_src_len"]), round(r["mean_tgt_len"]) + 1]
    assert r["real_vs_synthetic"] == pytest.approx(r["train"]["real"]["tok_s"] / r["train"]["synthetic"]["tok_s"])
    assert r["meets_target"] == (r["real_vs_synthetic"] >= 0.75)
    ev = r["eval"]
    assert ev["rows"] == 40 and ev["forward_tok_s"] > 0 and ev["metrics_rows"] == 8 and ev["metrics_tok_s"] > 0


def test_bench_realdata_takes_an_imported_dir_and_prints_a_table(tmp_path):
    raw, imported = tmp_path / "raw", tmp_path / "imp"
    raw.mkdir()
    write_corpus(raw, np.random.default_rng(1))
    from ndtrain.launch.bench.realdata import _import_raw
    _import_raw(raw, imported, 300)
    out = run_bench(str(imported), "--steps", "1", "--warmup", "0", "--eval-rows", "4", *TINY)
    assert "real / synthetic =" in out and "pad_fraction" in out and "synthetic" in out


def test_bench_realdata_bad_dir_exits_2(tmp_path, capsys):
    assert main(["bench", "realdata", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(tmp_path) in err[0]
