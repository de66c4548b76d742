"""Importers (text, parallel files, TSV; gz) with their errors, and the `ndtrain data` command."""
import gzip

import numpy as np
import pytest

from ndtrain.data import DataError, Loader, open_dataset
from ndtrain.data.importers import import_parallel, import_text
from ndtrain.launch.cli import main

TEXT = "First line, with ünïcode.\nSecond line\n\nlast line without newline"


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_import_text_lm_stream_is_the_text(tmp_path, kind):
    f = tmp_path / "in.txt.gz"
    f.write_bytes(gzip.compress(TEXT.encode()))
    d = import_text(f, tmp_path / "out", tokenizer=kind, vocab_size=300, block_size=4)
    ds = open_dataset(d)
    assert ds.kind == "lm" and ds.info.max_tgt_len == 4
    stream = np.concatenate([ds.columns["tokens"].row(i) for i in range(len(ds))])
    assert ds.tokenizer.decode(stream) == TEXT
    b = next(iter(Loader(ds, 2)))
    assert b["x"].shape == (2, 4) and (b["y"][:, :-1] == b["x"][:, 1:]).all()


def test_import_parallel_files_and_tsv(tmp_path):
    src, tgt = ["a b c", "hello", "x"], ["A B", "HALLO welt", "Y"]
    (tmp_path / "s.txt").write_text("\n".join(src) + "\n")
    (tmp_path / "t.txt.gz").write_bytes(gzip.compress(("\n".join(tgt) + "\n").encode()))
    (tmp_path / "p.tsv").write_text("".join(f"{s}\t{t}\n" for s, t in zip(src, tgt)))
    a = open_dataset(import_parallel(tmp_path / "a", src=tmp_path / "s.txt", tgt=tmp_path / "t.txt.gz",
                                     tokenizer="word"))
    b = open_dataset(import_parallel(tmp_path / "b", tsv=tmp_path / "p.tsv", tokenizer="word"))
    for ds in (a, b):
        assert [ds.tokenizer.decode(ds.columns["src"].row(i)) for i in range(3)] == src
        assert [ds.tokenizer.decode(ds.columns["tgt"].row(i)) for i in range(3)] == tgt
        assert ds.info.max_tgt_len == 3  # longest target (2 words) + BOS
    # a validation import reusing the training tokenizer gets the same ids
    c = open_dataset(import_parallel(tmp_path / "c", tsv=tmp_path / "p.tsv", tokenizer_file=tmp_path / "a" /
                                     "tokenizer.json"))
    np.testing.assert_array_equal(c.columns["tgt"].row(1), a.columns["tgt"].row(1))


def test_importer_errors(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="empty.txt: empty file"):
        import_text(tmp_path / "empty.txt", tmp_path / "o")
    (tmp_path / "s.txt").write_text("a\nb\nc\n")
    (tmp_path / "t.txt").write_text("A\nB\n")
    with pytest.raises(DataError, match=r"s.txt has 3 lines, .*t.txt has 2"):
        import_parallel(tmp_path / "o", src=tmp_path / "s.txt", tgt=tmp_path / "t.txt")
    (tmp_path / "bad.txt").write_bytes(b"fine\nalso fine\nbad \xff\xfe here\n")
    with pytest.raises(DataError, match="bad.txt: line 3: .*not UTF-8"):
        import_text(tmp_path / "bad.txt", tmp_path / "o")
    (tmp_path / "bad.tsv").write_text("a\tb\nno tab here\n")
    with pytest.raises(DataError, match="bad.tsv: line 2: expected 2 tab-separated"):
        import_parallel(tmp_path / "o", tsv=tmp_path / "bad.tsv")
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_cli_prepare_inspect_import(tmp_path, capsys):
    out = tmp_path / "rev"
    assert main(["data", "prepare", "--task", "reverse", "--out", str(out), "--rows", "30", "--shard-rows", "8",
                 "--seed", "4"]) == 0
    assert open_dataset(out / "train").info.name == "reverse" and len(open_dataset(out / "val")) == 3
    capsys.readouterr()
    assert main(["data", "inspect", str(out / "train"), "--rows", "2"]) == 0
    text = capsys.readouterr().out
    assert "30 rows" in text and "4 shard(s)" in text and text.count("row ") == 2 and "->" in text
    assert main(["data", "inspect", str(out), "--rows", "1"]) == 0  # both splits
    text = capsys.readouterr().out
    assert "30 rows" in text and "3 rows" in text and text.count("row ") == 2
    (tmp_path / "t.txt").write_text(TEXT)
    assert main(["data", "import", "--text", str(tmp_path / "t.txt"), "--tokenizer", "char", "--out",
                 str(tmp_path / "lm")]) == 0
    assert open_dataset(tmp_path / "lm").kind == "lm"


@pytest.mark.parametrize("argv, message", [
    (["data", "prepare", "--task", "nope", "--out", "X"], "unknown task"),
    (["data", "inspect", "MISSING"], "no such data directory"),
    (["data", "import", "--src", "S", "--out", "X"], "--src needs --tgt"),
    (["data", "import", "--text", "MISSING.txt", "--out", "X"], "no such file"),
])
def test_cli_bad_input_is_a_one_line_usage_error(tmp_path, capsys, argv, message):
    argv = [a.replace("X", str(tmp_path / "x")).replace("MISSING", str(tmp_path / "missing")) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


# -- tokenizer files are untrusted (issue #16) -------------------------------------------------------------------------
@pytest.mark.parametrize("content, message", [
    ('{"ndtrain_tokenizer": "char"}', "'tokens' missing"),
    ('{"ndtrain_tokenizer": "char", "tokens": 5}', "'tokens' must be a list of strings"),
    ('{"model": {}}', "not a valid HF tokenizers file"),
    (b"\x80\x81binary", "not UTF-8"),
    ("[]", "JSON object expected"),
])
def test_malformed_tokenizer_files_are_value_errors_naming_the_file(tmp_path, content, message):
    from ndtrain.data.tokenizer import load_tokenizer
    p = tmp_path / "tok.json"
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError, match=message) as e:
        load_tokenizer(p)
    assert str(p) in str(e.value) and "\n" not in str(e.value)


def test_bpe_vocab_below_the_byte_alphabet_is_refused_with_the_minimum(tmp_path):
    from ndtrain.data.importers import import_text
    (tmp_path / "t.txt").write_text("some text\n")
    with pytest.raises(DataError, match="at least 260"):
        import_text(tmp_path / "t.txt", tmp_path / "out", tokenizer="bpe", vocab_size=10)
    assert not (tmp_path / "out").exists()
