"""Speculative decoding in the cost model: fewer decode passes, each over k + 1 positions.

A pass verifies k draft tokens and the last token at once. With a per-draft hit rate `a` (a
draft is right given the drafts before it were), a pass yields on average
1 + a + a^2 + ... + a^k tokens, so G - 1 decode tokens need that many times fewer passes:
fewer round trips at every switch. Every pass still runs all k + 1 positions through every
unit, so rejected drafts cost compute (on the server too); decode being memory-bound, a
pass over k + 1 positions costs little more than one over a single position.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import brentq

from splitllm.errors import UserError


@dataclass(frozen=True, kw_only=True)
class Speculation:
    """k draft tokens per decode pass and the rate at which each draft is accepted."""

    draft_tokens: int
    hit_rate: float  # P(a draft is right | the drafts before it were): measured per request type

    def __post_init__(self) -> None:
        if self.draft_tokens < 0 or not 0.0 <= self.hit_rate <= 1.0:
            raise UserError("speculation needs draft_tokens >= 0 and a hit rate in [0, 1]")

    @property
    def tokens_per_pass(self) -> float:
        """Expected tokens one decode pass yields: the accepted drafts and one of the model's."""
        return float(sum(self.hit_rate ** j for j in range(self.draft_tokens + 1)))

    @property
    def positions_per_pass(self) -> int:
        """Positions every unit runs in one decode pass."""
        return self.draft_tokens + 1


def decode_passes(decode_tokens: int, speculation: Speculation | None) -> int:
    """Passes that produce `decode_tokens` tokens after the prefill's first one."""
    if speculation is None or decode_tokens == 0:
        return decode_tokens
    return max(1, math.ceil(decode_tokens / speculation.tokens_per_pass))


def pass_contexts(prompt_tokens: int, decode_tokens: int, speculation: Speculation | None
                  ) -> np.ndarray:
    """[passes] positions in context at each decode pass (its last position)."""
    passes = decode_passes(decode_tokens, speculation)
    step = 1.0 if speculation is None else decode_tokens / passes
    positions = 0 if speculation is None else speculation.draft_tokens
    return prompt_tokens + np.ceil(np.arange(1, passes + 1) * step).astype(int) + positions


def measured_hit_rate(draft_tokens: int, tokens_per_pass: float) -> float:
    """The hit rate `a` at which k drafts per pass yield `tokens_per_pass` (1 + a + ... + a^k)."""
    if draft_tokens < 1 or tokens_per_pass <= 1.0:
        return 0.0
    if tokens_per_pass >= draft_tokens + 1:
        return 1.0

    def excess(a: float) -> float:
        return Speculation(draft_tokens=draft_tokens, hit_rate=a).tokens_per_pass - tokens_per_pass

    return float(brentq(excess, 0.0, 1.0))
