"""Picking the next token from logits: greedy, or temperature + top-p with an explicit seed."""

from __future__ import annotations

import torch

from splitllm.runtime.protocol import Sampling


class Sampler:
    """Draws next tokens for one sequence; whichever side holds the LM head owns it."""

    def __init__(self, sampling: Sampling) -> None:
        self.sampling = sampling
        self.generator = torch.Generator(device="cpu")
        if sampling.seed is not None:
            self.generator.manual_seed(sampling.seed)
        else:
            self.generator.seed()

    def __call__(self, logits: torch.Tensor) -> int:
        """One token id from logits [1, V]."""
        if self.sampling.temperature == 0.0:
            return int(torch.argmax(logits[0]).item())
        probs = torch.softmax(logits[0].float() / self.sampling.temperature, dim=-1)  # [V]
        if self.sampling.top_p < 1.0:
            probs = _top_p(probs, self.sampling.top_p)
        return int(torch.multinomial(probs, 1, generator=self.generator).item())


def _top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches top_p; renormalize."""
    sorted_probs, order = torch.sort(probs, descending=True)  # [V]
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    sorted_probs[mass_before >= top_p] = 0.0  # the most likely token always survives
    kept = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return kept / kept.sum()
