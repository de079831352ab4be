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


AUTO = "auto"
MAX_DRAFT_TOKENS = 64  # what a client may ask for (a server's message limit still applies)
MAX_AUTO_K = 8
MIN_HIT_RATE = 0.25  # auto: below this running hit rate of drafts, stop sending them...
RESUME_HIT_RATE = 0.5  # ... and start again only above this one (two free probes in a row)
WORTH_REACHING = 0.15  # auto: draft position j is sent while rate ** j is at least this
RATE_WEIGHT = 0.3  # weight of one new observation in the running hit rate


class Drafter:
    """Prompt-lookup drafts for each pass: k of them, or ('auto') as many as the hit rate pays.

    'auto' keeps a running rate at which a draft token is right given the ones before it were.
    It stops sending drafts after two passes whose first draft missed (from its prior), since
    rejected drafts cost the server compute. While sending none it still looks one up and
    checks it against the model's token (free: nothing is sent), so the rate keeps moving;
    speculation resumes only once the rate is well above where it stopped (hysteresis), so
    text that repeats a word now and then does not make it flip back and forth.
    """

    def __init__(self, k: int | str) -> None:
        if k != AUTO and not (isinstance(k, int) and k >= 0):
            raise ValueError(f"speculate: a number of draft tokens >= 0 or 'auto', not {k!r}")
        self.fixed = None if k == AUTO else int(k)
        self.hit_rate = 0.5
        self.sending = True  # auto: whether drafts are sent at all (see the hysteresis above)
        self.shadow: int | None = None  # auto, sending none: the draft it would have sent

    def k(self) -> int:
        """Drafts to send in the next pass."""
        if self.fixed is not None:
            return self.fixed
        if not self.sending:
            return 0
        k = 1
        while k < MAX_AUTO_K and self.hit_rate ** (k + 1) >= WORTH_REACHING:
            k += 1
        return k

    def draft(self, history: Sequence[int], budget: int) -> list[int]:
        """The drafts of the next pass, at most `budget` of them."""
        k = self.k()
        self.shadow = None
        if k == 0 and self.fixed is None:
            probe = prompt_lookup(history, 1)
            self.shadow = probe[0] if probe else None
        return prompt_lookup(history, min(k, budget))

    def observe(self, drafts: Sequence[int], picked: Sequence[int]) -> int:
        """How many drafts the model's tokens accept; updates the running hit rate."""
        accepted = next((j for j, d in enumerate(drafts) if d != picked[j]), len(drafts))
        hits = [True] * accepted + ([False] if accepted < len(drafts) else [])
        if self.shadow is not None:
            hits = [self.shadow == picked[0]]
        for hit in hits:
            self.hit_rate += RATE_WEIGHT * (float(hit) - self.hit_rate)
        threshold = MIN_HIT_RATE if self.sending else RESUME_HIT_RATE
        self.sending = self.hit_rate >= threshold
        return accepted
