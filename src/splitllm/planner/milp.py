"""An independent solver: the placement problem as a mixed-integer linear program (HiGHS).

Used to check `exact` and as `--solver milp`. Variables: x[l] = 1 if unit l runs on the server,
up[l] / down[l] >= the switch indicators on the edge into unit l (edge L ends on the client),
opened >= every x[l] (the request opens a server session: its latency pays `session_open_s`,
and so does a phase limit that holds the first token).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from splitllm.placement import CLIENT, SERVER, Placement
from splitllm.planner.instance import REL_TOL, Instance


def _latency_row(
    instance: Instance,
    client_s: Sequence[float],
    server_s: Sequence[float],
    out_bytes: Sequence[float],
    input_bytes: float,
    output_bytes: float,
    passes: int,
) -> tuple[np.ndarray, float]:
    """Coefficients over [x, up, down] and the constant part of one latency sum."""
    n, link = len(instance.units), instance.link
    # The crossing formula restated on purpose (see planner/network.py): this is the check.
    carried = [input_bytes, *out_bytes[:-1], output_bytes]  # bytes on the edge into unit l
    # each visit's fixed cost, queueing and the server's own seconds
    wait_s = link.visit_s + instance.server_wait_s + instance.job_s
    up = [passes * (link.rtt_s / 2 + wait_s) + carried[l] / link.uplink_bytes_per_s
          for l in range(n)]
    down = [passes * link.rtt_s / 2 + carried[l] / link.downlink_bytes_per_s
            for l in range(n + 1)]
    row = np.concatenate([np.subtract(server_s, client_s), up, [0.0], down, [0.0]])
    return row, float(np.sum(client_s))


def solve_milp(instance: Instance) -> Placement | None:
    """Least-server-work placement within the SLA, memory and phase limits, or None."""
    units = instance.units
    n = len(units)
    nvar = n + 2 * (n + 1) + 1  # x[0..n-1], up[0..n], down[0..n], opened
    x, up, down, opened = 0, n, 2 * n + 1, nvar - 1
    rows, lower, upper = [], [], []
    for l in range(n):  # opened >= x[l]
        row = np.zeros(nvar)
        row[opened], row[x + l] = 1.0, -1.0
        rows.append(row)
        lower.append(0.0)
        upper.append(np.inf)
    for l in range(n + 1):  # up[l] >= x[l] - x[l-1];  down[l] >= x[l-1] - x[l]
        for var, sign in ((up, 1.0), (down, -1.0)):
            row = np.zeros(nvar)
            row[var + l] = 1.0
            if l < n:
                row[x + l] -= sign
            if l > 0:
                row[x + l - 1] += sign
            rows.append(row)
            lower.append(0.0)
            upper.append(np.inf)
    sla_row, constant = _latency_row(
        instance, [u.client_s for u in units], [u.server_s for u in units],
        [u.out_bytes for u in units], instance.input_bytes, instance.output_bytes,
        instance.passes)
    sla_row[opened] = instance.session_open_s
    sums = [(instance.sla_s, (sla_row, constant))]
    for p in instance.phase_limits:
        row, phase_constant = _latency_row(instance, p.client_s, p.server_s, p.out_bytes,
                                           p.input_bytes, p.output_bytes, p.passes)
        row[opened] = instance.session_open_s if p.pays_session_open else 0.0
        sums.append((p.limit_s, (row, phase_constant)))
    for limit_s, (row, constant) in sums:
        rows.append(row)
        lower.append(-np.inf)
        upper.append(limit_s * (1 + REL_TOL) - constant)
    if np.isfinite(instance.client_mem_limit_bytes):
        mem = np.array([u.client_mem_bytes for u in units])
        row = np.zeros(nvar)
        # Bytes (~1e9) next to rows in seconds mislead HiGHS's presolve into calling a worse
        # plan optimal: state the row in units of the largest unit's memory.
        scale = float(np.max(mem, initial=1.0))
        row[x : x + n] = -mem / scale  # client memory = sum(mem) - sum(mem * x)
        rows.append(row)
        lower.append(-np.inf)
        upper.append((instance.client_mem_limit_bytes * (1 + REL_TOL) - mem.sum()) / scale)
    low = np.zeros(nvar)
    high = np.ones(nvar)
    for l, unit in enumerate(units):
        low[x + l] = 0.0 if unit.client_ok else 1.0
        high[x + l] = 1.0 if unit.server_ok else 0.0
    cost = np.zeros(nvar)
    cost[x : x + n] = [u.server_work for u in units]
    cost[up : up + n] = instance.passes * instance.job_work_s  # each visit's own server work
    integrality = np.zeros(nvar)
    integrality[x : x + n] = 1
    result = milp(
        cost,
        constraints=LinearConstraint(np.array(rows), lower, upper),
        integrality=integrality,
        bounds=Bounds(low, high),
        options={"mip_rel_gap": 0.0},
    )
    if result.x is None:
        return None
    return Placement("".join(SERVER if v > 0.5 else CLIENT for v in result.x[:n]))
