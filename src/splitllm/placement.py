"""Placement: which side (C = client, S = server) runs each placement unit."""

from __future__ import annotations

from dataclasses import dataclass

from splitllm.errors import UserError

CLIENT = "C"
SERVER = "S"


@dataclass(frozen=True)
class Segment:
    """A maximal run of consecutive units on one side: units [start, stop)."""

    side: str
    start: int
    stop: int


@dataclass(frozen=True)
class Placement:
    """One side per unit, any number of switches; e.g. 'CCSSSC'."""

    sides: str

    def __post_init__(self) -> None:
        if not self.sides or set(self.sides) - {CLIENT, SERVER}:
            raise UserError(f"placement {self.sides!r}: expected a non-empty string of C and S")

    @classmethod
    def parse(cls, text: str, n_units: int) -> Placement:
        """Parse 'CCSS...' and check it has one letter per unit."""
        placement = cls(text.strip().upper())
        if len(placement) != n_units:
            raise UserError(
                f"placement {text!r} has {len(placement)} letters; the model has {n_units} units"
            )
        return placement

    @classmethod
    def all_on(cls, side: str, n_units: int) -> Placement:
        return cls(side * n_units)

    def __len__(self) -> int:
        return len(self.sides)

    def __str__(self) -> str:
        return self.sides

    def segments(self) -> tuple[Segment, ...]:
        """Maximal same-side runs, in order."""
        out: list[Segment] = []
        start = 0
        for i in range(1, len(self.sides) + 1):
            if i == len(self.sides) or self.sides[i] != self.sides[start]:
                out.append(Segment(self.sides[start], start, i))
                start = i
        return tuple(out)

    @property
    def server_visits(self) -> int:
        """Server segments: visits to the server per pass."""
        return sum(segment.side == SERVER for segment in self.segments())

    @property
    def switches(self) -> int:
        """Side changes between consecutive units (input and output crossings not counted)."""
        return len(self.segments()) - 1
