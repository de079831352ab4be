"""Draft tokens for speculative decoding: prompt lookup, no extra model.

Text that summarises, rewrites or edits a given text repeats it: the tokens that followed the
latest earlier occurrence of the last few tokens are a good guess of the next ones. The model
verifies every draft in one pass (runtime/decoding.py), so a bad guess costs compute, never
correctness.
"""

from __future__ import annotations

from collections.abc import Sequence

MAX_NGRAM = 3  # the longest suffix looked up; shorter ones are tried when it never occurred


def prompt_lookup(history: Sequence[int], k: int, max_ngram: int = MAX_NGRAM) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the history's suffix."""
    if k < 1:
        return []
    seq = list(history)
    for n in range(min(max_ngram, len(seq) - 1), 0, -1):
        suffix = seq[-n:]
        for begin in range(len(seq) - n - 1, -1, -1):  # latest first; never the suffix itself
            if seq[begin:begin + n] == suffix:
                return seq[begin + n:begin + n + k]
    return []
