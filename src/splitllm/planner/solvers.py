"""Placement solvers: the exact Pareto-label solver, the paper-style time-grid DP, baselines.

The problem is a resource-constrained shortest path on a layered graph with two nodes (C, S)
per unit. Every path has a cost vector: server work (the objective), latency, and where they
can bind, client memory and phase latencies (TTFT, TPOT). `exact` keeps at each node every
label not dominated in all of them, so it is exact on continuous costs and yields the whole
latency / server-work frontier in one pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import overload

import numpy as np

from splitllm.errors import UserError
from splitllm.placement import CLIENT, SERVER, Placement
from splitllm.planner.instance import REL_TOL, Instance, Plan, evaluate
from splitllm.planner.labels import TOO_MANY, lower_bounds, pareto_labels, single_cut, trace
from splitllm.planner.network import Switches

SIDES = (CLIENT, SERVER)
C, S = 0, 1


@dataclass(frozen=True, kw_only=True)
class Costs:
    """The instance as arrays over cost dimensions: 0 = server work, 1 = latency, then the rest.

    unit[l, s, d]: cost of running unit l on side s; move[l, p, s, d]: cost of the edge from
    side p (after unit l - 1) to side s (at unit l); move[L, p, C] ends on the client.
    """

    unit: np.ndarray  # [L, 2, D]
    move: np.ndarray  # [L + 1, 2, 2, D]
    allowed: np.ndarray  # [L, 2] bool
    limit: np.ndarray  # [D]


def build_costs(instance: Instance) -> Costs:
    """Cost arrays of an instance; dimensions that cannot bind are left out."""
    units = instance.units
    n = len(units)
    visit_work = np.zeros((n + 1, 2, 2))  # each visit's own server work over its passes
    visit_work[:n, C, S] = instance.passes * instance.job_work_s
    # Every path but the client-only one opens the server's session: the latency limit is what
    # is left after it (`_client_only` weighs that path on its own; `frontier` adds it back).
    dims: list[tuple[np.ndarray, np.ndarray, float]] = [
        (np.array([[0.0, u.server_work] for u in units]), visit_work, math.inf),
        (np.array([[u.client_s, u.server_s] for u in units]), _moves(instance.switches),
         instance.sla_s - instance.session_open_s),
    ]
    mem = np.array([[u.client_mem_bytes, 0.0] for u in units])
    if mem[:, 0].sum() > instance.client_mem_limit_bytes:
        dims.append((mem, np.zeros((n + 1, 2, 2)), instance.client_mem_limit_bytes))
    for p, edges in zip(instance.phase_limits, instance.phase_switches, strict=True):
        opening_s = instance.session_open_s if p.pays_session_open else 0.0  # as the SLA's
        dims.append((np.column_stack([p.client_s, p.server_s]), _moves(edges),
                     p.limit_s - opening_s))
    allowed = np.array([[u.client_ok, u.server_ok] for u in units], dtype=bool)
    return Costs(
        unit=np.stack([d[0] for d in dims], axis=-1),
        move=np.stack([d[1] for d in dims], axis=-1),
        allowed=allowed,
        limit=np.array([d[2] for d in dims]),
    )


def _moves(edges: Switches) -> np.ndarray:
    """[L + 1, 2, 2] crossing times: the edge into unit l carries unit l - 1's output."""
    move = np.zeros((len(edges.up_s), 2, 2))
    move[:, C, S] = edges.up_s
    move[:, S, C] = edges.down_s
    move[-1, :, S] = math.inf  # the result must end on the client
    return move


def _pareto_2d(values: np.ndarray) -> np.ndarray:
    """Rows not dominated in (work, latency) (first of equals kept), by work ascending."""
    if len(values) <= 1:
        return np.arange(len(values))
    order = np.lexsort((values[:, 1], values[:, 0]))
    latency = values[order, 1]
    keep = np.empty(len(order), dtype=bool)
    keep[0] = True
    keep[1:] = latency[1:] < np.minimum.accumulate(latency)[:-1]
    return order[keep]


MAX_LABELS = 20_000  # per node; only reachable when memory / phase limits bind on varied units


class _TooManyLabels(Exception):
    """The label sets grew past MAX_LABELS (the exact solver hands over to the MILP)."""


@dataclass(frozen=True, kw_only=True)
class _Labels:
    """Every node's labels in flat rows; each layer's client-side rows come first."""

    values: np.ndarray  # [N, D]
    parent: np.ndarray  # [N]: the row it extends in the previous layer
    layer_start: np.ndarray  # [L + 1]
    n_client: np.ndarray  # [L]


def _pareto_labels(costs: Costs, limit: np.ndarray) -> _Labels:
    """Pareto labels of every node; labels that cannot finish within `limit` [D] are cut."""
    values, parent, layer_start, n_client, used = pareto_labels(
        costs.unit, costs.move, costs.allowed, lower_bounds(costs.unit, costs.move, costs.allowed),
        limit * (1 + REL_TOL),
        MAX_LABELS,
    )
    if used == TOO_MANY:
        raise _TooManyLabels
    return _Labels(values=values[:used], parent=parent[:used], layer_start=layer_start,
                   n_client=n_client)


def _final(costs: Costs, labels: _Labels) -> tuple[np.ndarray, np.ndarray]:
    """(values, rows) of complete paths, Pareto in (work, latency), by work ascending."""
    n = costs.unit.shape[0]
    first, split = labels.layer_start[n - 1], labels.layer_start[n - 1] + labels.n_client[n - 1]
    values = labels.values[first:].copy()
    values[: split - first] += costs.move[n, C, C]
    values[split - first :] += costs.move[n, S, C]
    keep = _pareto_2d(values[:, :2])
    return values[keep], first + keep


def _trace(labels: _Labels, rows: np.ndarray) -> np.ndarray:
    """[k, L] bool: where each of the paths ending at `rows` runs each unit on the server."""
    return trace(labels.parent, labels.layer_start, labels.n_client, np.asarray(rows))


def _placement(on_server: np.ndarray) -> Placement:
    return Placement("".join(np.where(on_server, SERVER, CLIENT)))


@dataclass(frozen=True, eq=False, kw_only=True)
class Frontier(Sequence[Plan]):
    """Every Pareto-optimal (server work, latency) placement, by server work ascending.

    Memory, pinned units and phase limits hold for each; the SLA is ignored (the plan for an
    SLA is the first whose latency fits it). Plans are evaluated when read.
    """

    instance: Instance
    server_work: np.ndarray  # [k], ascending
    latency_s: np.ndarray  # [k], descending
    on_server: np.ndarray  # [k, L] bool

    def __len__(self) -> int:
        return len(self.server_work)

    @overload
    def __getitem__(self, i: int) -> Plan: ...
    @overload
    def __getitem__(self, i: slice) -> Sequence[Plan]: ...
    def __getitem__(self, i: int | slice) -> Plan | Sequence[Plan]:
        if isinstance(i, slice):
            return [self[j] for j in range(len(self))[i]]
        return evaluate(self.instance, _placement(self.on_server[i]))


def frontier(instance: Instance) -> Frontier:
    """The whole latency / server-work frontier of an instance from one pass."""
    costs = build_costs(instance)
    limit = costs.limit.copy()
    limit[1] = math.inf  # every latency
    try:
        labels = _pareto_labels(costs, limit)
    except _TooManyLabels:
        raise UserError(f"frontier: over {MAX_LABELS} Pareto labels at one unit (memory or "
                        "phase limits binding on widely varied units); plan one SLA instead"
                        ) from None
    values, rows = _final(costs, labels)
    on_server = _trace(labels, rows)
    work = values[:, 0]
    latency_s = values[:, 1] + np.where(on_server.any(axis=1), instance.session_open_s, 0.0)
    alone = evaluate(replace(instance, sla_s=math.inf), Placement.all_on(CLIENT, len(instance)))
    if alone.feasible and on_server.any(axis=1).all():  # the arrays' phase limits, less the
        # opening, cut the client-only path, which opens nothing: weigh it on its own
        work, latency_s = np.append(work, alone.server_work), np.append(latency_s,
                                                                        alone.latency_s)
        on_server = np.vstack([on_server, np.zeros(len(instance), dtype=bool)])
    keep = _pareto_2d(np.column_stack([work, latency_s]))  # the client-only path may
    # now dominate plans it did not before the others paid their session's opening
    return Frontier(instance=instance, server_work=work[keep], latency_s=latency_s[keep],
                    on_server=on_server[keep])


def _exact(instance: Instance) -> Placement | None:
    costs = build_costs(instance)
    limit = costs.limit.copy()
    # A cheap feasible plan bounds the server work worth exploring (branch and bound).
    cut = _single_cut(costs)
    incumbent = cut[0] if cut else None
    if cut:
        limit[0] = cut[1]
    try:
        labels = _pareto_labels(costs, limit)
    except _TooManyLabels:
        from splitllm.planner.milp import solve_milp

        return solve_milp(instance)
    values, rows = _final(costs, labels)
    fits = np.flatnonzero(values[:, 1] <= costs.limit[1] * (1 + REL_TOL))
    if not len(fits):
        return incumbent
    return _placement(_trace(labels, rows[fits[:1]])[0])


def _dp_grid(instance: Instance, step_s: float) -> Placement | None:
    """The reference DP over (unit, time used, side), costs rounded UP to the grid.

    Rounding up makes every grid path's true latency <= its grid latency, so a returned plan
    never breaks the SLA. It has no memory or phase dimension: a plan that breaks those is
    dropped (None) rather than repaired.
    """
    costs = build_costs(instance)
    steps = costs.limit[1] / step_s + REL_TOL
    if steps < 0:  # the session's opening alone breaks the SLA
        return None
    if steps > 5_000_000:  # also an SLA of inf
        raise UserError(f"dp-grid: SLA / step = {steps:.0f} grid points; use a larger --step-s")
    budget = math.floor(steps)
    unit = np.ceil(costs.unit[:, :, 1] / step_s)
    move = np.ceil(costs.move[:, :, :, 1] / step_s)
    work_unit = costs.unit[:, :, 0]
    work_move = costs.move[:, :, :, 0]  # a visit's own server work
    n = len(instance)
    best = np.full((2, budget + 1), math.inf)  # best[s, b]: least work having used b steps
    best[C, 0] = 0.0  # before unit 0, on the client
    parents = np.zeros((n, 2, budget + 1), dtype=np.int8)
    for l in range(n):
        new = np.full((2, budget + 1), math.inf)
        for s in (C, S):
            if not costs.allowed[l, s]:
                continue
            for p in (C, S):
                shift = move[l, p, s] + unit[l, s]
                if not math.isfinite(shift) or shift > budget:
                    continue
                k = int(shift)
                cand = np.full(budget + 1, math.inf)
                cand[k:] = best[p, : budget + 1 - k] + work_unit[l, s] + work_move[l, p, s]
                better = cand < new[s]
                new[s][better] = cand[better]
                parents[l, s][better] = p
        best = new
    end = np.full((2, budget + 1), math.inf)
    for s in (C, S):
        k = move[n, s, C]
        if math.isfinite(k) and k <= budget:
            end[s, int(k):] = best[s, : budget + 1 - int(k)]
    if not np.isfinite(end).any():
        return None
    ties = np.argwhere(end == end.min())  # least work, then fewest grid steps
    s, b = min(ties, key=lambda sb: (sb[1], sb[0]))
    side, used = int(s), int(b) - int(move[n, int(s), C])
    sides = []
    for l in range(n - 1, -1, -1):
        sides.append(SIDES[side])
        p = int(parents[l, side, used])
        used -= int(move[l, p, side] + unit[l, side])
        side = p
    placement = Placement("".join(reversed(sides)))
    return placement if evaluate(instance, placement).feasible else None


def _uniform(instance: Instance, side: str) -> Placement | None:
    placement = Placement.all_on(side, len(instance))
    return placement if evaluate(instance, placement).feasible else None


def _client_only(solver: Callable[[Instance], Placement | None]
                 ) -> Callable[[Instance], Placement | None]:
    """A least-work solver on cost arrays, with the client-only plan weighed on its own: it
    opens no server session, which the arrays charge every path (ties: the lower latency)."""
    def solve_it(instance: Instance) -> Placement | None:
        found, alone = solver(instance), _uniform(instance, CLIENT)
        if found is None or alone is None:
            return found or alone
        plans = [evaluate(instance, p) for p in (found, alone)]
        return min(plans, key=lambda plan: (plan.server_work, plan.latency_s)).placement

    return solve_it


def _greedy(instance: Instance) -> Placement | None:
    """Start all on the server; move units to the client one at a time.

    Each step takes the move with the largest server-work saving per second of added latency
    (a move that adds no latency ranks first), among moves that keep client memory within its
    limit and do not push latency past max(SLA, current latency). Stops when no move is left.
    """
    sides = [SERVER if u.server_ok else CLIENT for u in instance.units]
    current = evaluate(instance, Placement("".join(sides)))
    while True:
        best: tuple[float, float, int] | None = None
        chosen: Plan | None = None
        for i, unit in enumerate(instance.units):
            if sides[i] == CLIENT or not unit.client_ok:
                continue
            trial = evaluate(instance, Placement("".join([*sides[:i], CLIENT, *sides[i + 1:]])))
            if trial.client_mem_bytes > instance.client_mem_limit_bytes * (1 + REL_TOL):
                continue
            if trial.latency_s > max(instance.sla_s, current.latency_s) * (1 + REL_TOL):
                continue
            added_s = trial.latency_s - current.latency_s
            rate = math.inf if added_s <= 0 else unit.server_work / added_s
            key = (rate, unit.server_work, -i)  # ties: larger saving, then the earlier unit
            if best is None or key > best:
                best, chosen = key, trial
        if chosen is None:
            break
        sides = list(chosen.placement.sides)
        current = chosen
    return current.placement if current.feasible else None


def _single_cut(costs: Costs) -> tuple[Placement, float] | None:
    """(plan, work) of the best C^a S^(b-a) C^(n-b): one switch each way at most (Neurosurgeon)."""
    a, b, work = single_cut(costs.unit, costs.move, costs.allowed, costs.limit * (1 + REL_TOL))
    if a < 0:
        return None
    n = costs.unit.shape[0]
    return Placement(CLIENT * a + SERVER * (b - a) + CLIENT * (n - b)), work


def _best_single_cut(instance: Instance) -> Placement | None:
    cut = _single_cut(build_costs(instance))
    return cut[0] if cut else None


DEFAULT_STEP_S = 0.001

SOLVERS: dict[str, Callable[[Instance], Placement | None]] = {
    "exact": _client_only(_exact),
    "dp-grid": _client_only(lambda instance: _dp_grid(instance, DEFAULT_STEP_S)),
    "server-only": lambda instance: _uniform(instance, SERVER),
    "client-only": lambda instance: _uniform(instance, CLIENT),
    "greedy": _greedy,
    "best-single-cut": _client_only(_best_single_cut),
}


def solve(instance: Instance, solver: str = "exact", step_s: float | None = None) -> Plan | None:
    """The plan a solver picks (least server work within the SLA), or None if it finds none."""
    if solver == "milp":
        from splitllm.planner.milp import solve_milp

        placement = solve_milp(instance)
    elif solver == "dp-grid" and step_s is not None:
        placement = _client_only(lambda i: _dp_grid(i, step_s))(instance)
    elif solver in SOLVERS:
        placement = SOLVERS[solver](instance)
    else:
        raise UserError(f"unknown solver {solver!r}: use one of {', '.join([*SOLVERS, 'milp'])}")
    return None if placement is None else evaluate(instance, placement)


BASELINES = ("server-only", "client-only", "greedy", "best-single-cut")


def compare(
    instance: Instance, solver: str = "exact", step_s: float | None = None
) -> dict[str, Plan | None]:
    """The chosen solver's plan first, then each baseline's (None where it finds none)."""
    names = dict.fromkeys([solver, *BASELINES])
    return {name: solve(instance, name, step_s) for name in names}
