"""Runs several test modules read without changing them (each test that changes one copies it first)."""
import pytest

from helpers.runs import TINY_TRANSFORMER, train


@pytest.fixture(scope="session")
def xor_run(tmp_path_factory):
    """xor, the 2-4-1 MLP: 50 steps, records every 5, evaluations and checkpoints at 25 and 50."""
    return train(tmp_path_factory.mktemp("xor") / "run", "--task", "xor", "--model", "mlp", "--steps", "50",
                 "--checkpoint-every", "25", "--set", "run.log_every=5", "--set", "run.eval_every=25")


@pytest.fixture(scope="session")
def rev_run(tmp_path_factory):
    """reverse, a tiny seq2seq Transformer (no dropout): 12 steps on 160 rows."""
    return train(tmp_path_factory.mktemp("rev") / "run", "--task", "reverse", "--model", "transformer",
                 "--steps", "12", "--batch-size", "16", *TINY_TRANSFORMER, "--set", "model.dropout=0.0",
                 "--set", "data.rows=160", "--set", "optim.lr=3e-3")
