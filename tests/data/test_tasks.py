"""Built-in tasks: shapes, dtypes, determinism, held-out validation, tokenizer round trips."""
import numpy as np
import pytest

from ndtrain.data.info import BOS, EOS, PAD, UNK
from ndtrain.data.seq_tasks import DATE_FORMATS, is_val_key
from ndtrain.data.tasks import TASKS, VECTOR_TASKS, generate, task_tokenizer
from ndtrain.data.tokenizer import (BpeTokenizer, CharTokenizer, WordTokenizer, load_tokenizer, tokenizer_from_json,
                                    train_tokenizer)


@pytest.mark.parametrize("name", VECTOR_TASKS)
def test_vector_tasks_shapes_and_determinism(name):
    info, c = generate(name, 40, seed=3)
    assert c["x"].dtype == np.float32 and c["x"].shape == (40, info.n_features)
    if info.kind == "classification":
        assert c["y"].dtype == np.int64 and c["y"].shape == (40,)
        assert c["y"].min() >= 0 and c["y"].max() < info.n_outputs
    else:
        assert c["y"].dtype == np.float32 and c["y"].shape == (40, info.n_outputs)
    _, again = generate(name, 40, seed=3)
    _, other = generate(name, 40, seed=4)
    np.testing.assert_array_equal(c["x"], again["x"])
    assert not np.array_equal(c["x"], other["x"])


def test_xor_labels_and_four_points():
    _, c = generate("xor", 4, seed=0)
    np.testing.assert_array_equal(c["y"], [0, 1, 1, 0])
    _, c = generate("xor", 500, seed=0)
    corner = np.round(c["x"]).astype(int)
    np.testing.assert_array_equal(c["y"], corner[:, 0] ^ corner[:, 1])


def test_sine_is_sine_and_digits_split():
    _, c = generate("sine", 100, seed=0)
    np.testing.assert_allclose(c["y"], np.sin(c["x"]), atol=1e-6)
    _, tr = generate("digits", seed=1)
    _, va = generate("digits", seed=1, split="val")
    assert len(tr["x"]) + len(va["x"]) == 1797 and abs(len(va["x"]) - 359) <= 1
    assert 0.0 <= tr["x"].min() and tr["x"].max() <= 1.0
    # disjoint: no validation image appears in training
    train_rows = {r.tobytes() for r in tr["x"]}
    assert sum(r.tobytes() in train_rows for r in va["x"]) < 5  # load_digits has a few duplicate images


@pytest.mark.parametrize("name", [t for t in TASKS if t not in VECTOR_TASKS])
def test_sequence_tasks_semantics_and_held_out(name):
    info, c = generate(name, 300, seed=0)
    tok = task_tokenizer(name)
    assert info.kind == "seq2seq" and info.src_vocab_size == tok.vocab_size
    assert load_tokenizer_json_equal(info.extra["tokenizer_json"], tok)
    for s, t in zip(c["src"], c["tgt"]):
        assert s.dtype == np.int32 and t.dtype == np.int32
        assert not np.isin(s, [PAD, UNK, BOS, EOS]).any() and not np.isin(t, [PAD, UNK, BOS, EOS]).any()
        assert len(s) <= info.max_src_len and len(t) + 1 <= info.max_tgt_len
        src, tgt = tok.decode(s), tok.decode(t)
        if name == "copy":
            assert tgt == src
        elif name == "reverse":
            assert tgt == src[::-1]
        elif name == "sort":
            assert tgt == "".join(sorted(src))
        elif name == "add":
            a, b = src.split("+")
            assert int(tgt) == int(a) + int(b)
    _, val = generate(name, 100, seed=0, split="val")
    train_src = {tok.decode(s) for s in c["src"]}
    val_src = {tok.decode(s) for s in val["src"]}
    if name != "dates":  # dates: held out by calendar date, checked below
        assert not (train_src & val_src)


def load_tokenizer_json_equal(text, tok):
    return tokenizer_from_json(text).tokens == tok.tokens


def test_dates_formats_and_held_out_dates():
    import datetime as dt

    tok = task_tokenizer("dates")
    d = dt.date(2021, 3, 3)
    texts = [f(d) for f in DATE_FORMATS]
    assert "3 March 2021" in texts and "03/03/21" in texts and "Wed, Mar 3 2021" in texts
    for t in texts:  # every format is covered by the alphabet
        assert UNK not in tok.encode(t)
    _, tr = generate("dates", 400, seed=0)
    _, va = generate("dates", 100, seed=0, split="val")
    train_dates = {tok.decode(t) for t in tr["tgt"]}
    val_dates = {tok.decode(t) for t in va["tgt"]}
    assert not (train_dates & val_dates)
    for iso in val_dates:
        assert is_val_key(("dates", dt.date.fromisoformat(iso).toordinal()))


def test_generate_bad_input():
    with pytest.raises(ValueError, match="unknown task"):
        generate("nope", 10)
    with pytest.raises(ValueError, match="split"):
        generate("xor", 10, split="test")


TEXTS = ["Hello world, hello there.", "Zwei Bücher über Ärger —  und mehr", "a b  c\nd\te", ""]


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_lossless_tokenizers_round_trip(kind, tmp_path):
    tok = train_tokenizer(kind, TEXTS * 5, vocab_size=300)
    for t in TEXTS:
        ids = tok.encode(t)
        assert ids.dtype == np.int32 and (ids >= 4).all()
        assert tok.decode(ids) == t
        assert tok.decode(np.concatenate([[BOS], ids, [EOS, PAD, PAD]])) == t  # specials dropped, stop at EOS
    tok.save(tmp_path / "tok.json")
    back = load_tokenizer(tmp_path / "tok.json")
    assert type(back) is type(tok) and back.vocab_size == tok.vocab_size
    for t in TEXTS:
        np.testing.assert_array_equal(back.encode(t), tok.encode(t))


def test_special_ids_fixed_and_word_tokenizer():
    for kind in ("char", "word", "bpe"):
        tok = train_tokenizer(kind, TEXTS, vocab_size=280)
        if isinstance(tok, BpeTokenizer):
            assert [tok.hf.token_to_id(t) for t in ("<pad>", "<unk>", "<bos>", "<eos>")] == [0, 1, 2, 3]
        else:
            assert tok.tokens[:4] == ["<pad>", "<unk>", "<bos>", "<eos>"]
    w = WordTokenizer.train(["the cat sat", "the dog"])
    assert w.decode(w.encode("the   cat\tsat")) == "the cat sat"
    assert w.encode("the zebra")[1] == UNK
    c = CharTokenizer.train(["aab"], vocab_size=5)  # room for one char only: the most frequent
    assert c.tokens[4:] == ["a"] and c.encode("b")[0] == UNK
