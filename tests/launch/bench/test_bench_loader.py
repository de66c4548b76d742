"""`ndtrain bench loader` runs end to end on a tiny data set (one rank; no timing assertions)."""
import argparse
import json

from ndtrain.launch.bench import loader as bench


def test_bench_loader_smoke(tmp_path, capsys):
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    args = p.parse_args(["--tokens", "20000", "--ranks", "1", "--batch-size", "8", "--block-size", "16", "--json",
                         "--dir", str(tmp_path)])
    assert bench.main(args) == 0
    out = json.loads(capsys.readouterr().out)
    modes = {r["mode"] for r in out["results"]}
    assert modes == set(bench.MODES)
    for r in out["results"]:
        assert r["real_tok_s"] > 0 and 0 <= r["pad_fraction"] < 1 and r["batches"] > 0
    lm = next(r for r in out["results"] if r["mode"] == "lm")
    assert lm["batches"] == (20000 - 1) // 16 // 8
