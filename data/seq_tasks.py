"""Sequence (seq2seq) toy tasks as text pairs: copy, reverse, sort, add, dates.

Each generator draws `(key, src_text, tgt_text)` examples from a NumPy Generator. The *key* decides the split: an
example whose key hashes into the held-out bucket (1 in 10) belongs to "val", every other one to "train", so the
validation set is disjoint from training (for dates the key is the calendar date: a held-out date is never seen in
training in any of its formats). Texts are tokenized by a char tokenizer over a fixed alphabet (tasks.py).
"""
from __future__ import annotations

import datetime as dt
import zlib

import numpy as np

DIGITS = "0123456789"
HELD_OUT_BUCKETS = 10  # 1 in 10 keys is validation


def is_val_key(key) -> bool:
    """Stable across processes and Python versions (crc32, not hash())."""
    return zlib.crc32(repr(key).encode()) % HELD_OUT_BUCKETS == 0


# --- digit-string tasks -------------------------------------------------------------------------------------------
def _digits(rng, min_len, max_len) -> str:
    n = int(rng.integers(min_len, max_len + 1))
    return "".join(DIGITS[d] for d in rng.integers(0, 10, n))


def copy_example(rng, min_len=1, max_len=12):
    s = _digits(rng, min_len, max_len)
    return s, s, s


def reverse_example(rng, min_len=1, max_len=12):
    s = _digits(rng, min_len, max_len)
    return s, s, s[::-1]


def sort_example(rng, min_len=1, max_len=12):
    s = _digits(rng, min_len, max_len)
    return s, s, "".join(sorted(s))


def add_example(rng, max_digits=3):
    a, b = (int(rng.integers(0, 10 ** int(rng.integers(1, max_digits + 1)))) for _ in range(2))
    return (a, b), f"{a}+{b}", str(a + b)


# --- dates: many human formats -> ISO ------------------------------------------------------------------------------
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
# Two-digit years are unambiguous inside this range (70..99 -> 19xx, 00..69 -> 20xx).
DATE_MIN, DATE_MAX = dt.date(1970, 1, 1), dt.date(2069, 12, 31)
# Only one all-numeric slash order (US month/day/year): with both orders "04/03/21" would have two answers.
DATE_FORMATS = [
    lambda d: f"{d.day} {MONTHS[d.month - 1]} {d.year}",                       # 3 March 2021
    lambda d: f"{d.month:02d}/{d.day:02d}/{d.year % 100:02d}",                 # 03/03/21
    lambda d: f"{WEEKDAYS[d.weekday()][:3]}, {MONTHS[d.month - 1][:3]} {d.day} {d.year}",  # Wed, Mar 3 2021
    lambda d: f"{MONTHS[d.month - 1]} {d.day}, {d.year}",                      # March 3, 2021
    lambda d: f"{d.day}.{d.month}.{d.year}",                                   # 3.3.2021
    lambda d: f"{WEEKDAYS[d.weekday()]}, {d.day} {MONTHS[d.month - 1]} {d.year}",  # Wednesday, 3 March 2021
    lambda d: f"{d.day:02d}-{MONTHS[d.month - 1][:3]}-{d.year}",               # 03-Mar-2021
    lambda d: f"{d.day} {MONTHS[d.month - 1][:3].lower()} {d.year % 100:02d}",  # 3 mar 21
    lambda d: f"{MONTHS[d.month - 1].upper()} {d.day} {d.year}",               # MARCH 3 2021
    lambda d: f"{d.month}/{d.day}/{d.year}",                                   # 3/3/2021
]


def dates_example(rng):
    d = DATE_MIN + dt.timedelta(days=int(rng.integers(0, (DATE_MAX - DATE_MIN).days + 1)))
    fmt = DATE_FORMATS[int(rng.integers(len(DATE_FORMATS)))]
    return d.toordinal(), fmt(d), d.isoformat()


def dates_alphabet() -> str:
    words = "".join(MONTHS) + "".join(WEEKDAYS)
    return "".join(sorted(set(words + words.upper() + words.lower() + DIGITS + " ,./-")))


# name -> (example function, alphabet, max source length, max target length) with default settings
SEQ_TASKS = {
    "copy": (copy_example, DIGITS, 12, 12),
    "reverse": (reverse_example, DIGITS, 12, 12),
    "sort": (sort_example, DIGITS, 12, 12),
    "add": (add_example, DIGITS + "+", 7, 4),
    "dates": (dates_example, dates_alphabet(), 30, 10),
}


def generate_pairs(name: str, n_rows: int, seed: int, split: str) -> list[tuple[str, str]]:
    """n_rows (src_text, tgt_text) pairs of the split, deterministic in (name, seed, split)."""
    example = SEQ_TASKS[name][0]
    want_val = split == "val"
    # Separate streams per split so train rows do not depend on how many val rows were asked for.
    rng = np.random.default_rng([seed, zlib.crc32(name.encode()), int(want_val)])
    out = []
    tries, limit = 0, 1000 * n_rows + 10_000
    while len(out) < n_rows:
        key, src, tgt = example(rng)
        if is_val_key((name, key)) == want_val:
            out.append((src, tgt))
        tries += 1
        if tries > limit:
            raise RuntimeError(f"task {name!r}: could not draw {n_rows} {split} rows (too few distinct examples)")
    return out
