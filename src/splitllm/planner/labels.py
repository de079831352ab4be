"""The exact solver's inner loop: Pareto labels over the layered two-side graph, compiled.

A numpy loop over units spends its time in ~15 small array calls per unit and side; compiled
(numba, cached on disk after the first run) the whole pass over 80 units takes well under a
millisecond, which is what lets a server re-plan every request.
"""

from __future__ import annotations

import numpy as np
from numba import njit

TOO_MANY = -1  # returned as the label count when a node would keep more than max_labels


@njit(cache=True)
def lower_bounds(unit: np.ndarray, move: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """[L, 2, D]: least cost, per dimension, from after unit l on side s to the end."""
    n_units, _, dims = unit.shape
    lb = np.empty((n_units, 2, dims))
    for p in range(2):
        lb[n_units - 1, p] = move[n_units, p, 0]  # end on the client
    for l in range(n_units - 2, -1, -1):
        for p in range(2):
            for d in range(dims):
                best = np.inf
                for s in range(2):
                    if allowed[l + 1, s]:
                        best = min(best, move[l + 1, p, s, d] + unit[l + 1, s, d]
                                   + lb[l + 1, s, d])
                lb[l, p, d] = best
    return lb


@njit(cache=True)
def _lex_order(rows: np.ndarray) -> np.ndarray:
    """Row order sorted by column 0, then 1, ... (stable sorts, last key first)."""
    order = np.arange(rows.shape[0])
    for d in range(rows.shape[1] - 1, -1, -1):
        order = order[np.argsort(rows[order, d], kind="mergesort")]
    return order


@njit(cache=True)
def _append_pareto(
    cand: np.ndarray, cand_parent: np.ndarray, count: int,
    values: np.ndarray, parent: np.ndarray, used: int,
) -> int:
    """Append the candidates no other candidate dominates (first of equals kept); new `used`."""
    order = _lex_order(cand[:count])
    dims = cand.shape[1]
    start = used
    best_latency = np.inf
    for i in order:
        if dims == 2:  # sorted by work: kept iff faster than everything before it
            if cand[i, 1] >= best_latency:
                continue
            best_latency = cand[i, 1]
        else:  # only an earlier (lexicographically smaller) kept label can dominate
            dominated = False
            for j in range(start, used):
                no_worse = True
                for d in range(dims):
                    if values[j, d] > cand[i, d]:
                        no_worse = False
                        break
                if no_worse:
                    dominated = True
                    break
            if dominated:
                continue
        values[used] = cand[i]
        parent[used] = cand_parent[i]
        used += 1
    return used


@njit(cache=True)
def pareto_labels(
    unit: np.ndarray, move: np.ndarray, allowed: np.ndarray, lower_bound: np.ndarray,
    limit: np.ndarray, max_labels: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """Labels of every node, layer after layer, in flat arrays.

    unit [L, 2, D], move [L + 1, 2, 2, D], allowed [L, 2], lower_bound [L, 2, D], limit [D].
    Returns (values [N, D], parent [N] (a row of the previous layer), layer_start [L + 1],
    n_client [L] (client rows come first in each layer), N), or N = TOO_MANY.
    """
    n_units, _, dims = unit.shape
    capacity = 1024
    values = np.zeros((capacity, dims))
    parent = np.zeros(capacity, dtype=np.int64)
    layer_start = np.zeros(n_units + 1, dtype=np.int64)
    n_client = np.zeros(n_units, dtype=np.int64)
    used = 1  # row 0: the empty path, on the client, before unit 0
    prev_start, prev_stop, prev_client = 0, 1, 1
    for l in range(n_units):
        layer_start[l] = used
        for s in range(2):
            if not allowed[l, s]:
                if s == 0:
                    n_client[l] = 0
                continue
            k = prev_stop - prev_start
            cand = np.empty((k, dims))
            cand_parent = np.empty(k, dtype=np.int64)
            count = 0
            for r in range(k):
                side = 0 if r < prev_client else 1
                fits = True
                for d in range(dims):
                    v = values[prev_start + r, d] + move[l, side, s, d] + unit[l, s, d]
                    cand[count, d] = v
                    if v + lower_bound[l, s, d] > limit[d]:
                        fits = False
                if fits:
                    cand_parent[count] = prev_start + r
                    count += 1
            if used + count > capacity:
                while used + count > capacity:
                    capacity *= 2
                grown = np.zeros((capacity, dims))
                grown[:used] = values[:used]
                values = grown
                grown_parent = np.zeros(capacity, dtype=np.int64)
                grown_parent[:used] = parent[:used]
                parent = grown_parent
            before = used
            used = _append_pareto(cand, cand_parent, count, values, parent, used)
            if used - before > max_labels:
                return values, parent, layer_start, n_client, TOO_MANY
            if s == 0:
                n_client[l] = used - before
        prev_start, prev_stop, prev_client = layer_start[l], used, n_client[l]
    layer_start[n_units] = used
    return values, parent, layer_start, n_client, used


@njit(cache=True)
def single_cut(
    unit: np.ndarray, move: np.ndarray, allowed: np.ndarray, limit: np.ndarray
) -> tuple[int, int, float]:
    """Best (least work, then latency) plan C^a S^(b-a) C^(n-b) within `limit`: (a, b, work).

    a == b == 0 is all on the client; a == -1 when no such plan fits.
    """
    n_units, _, dims = unit.shape
    pre = np.zeros((2, n_units + 1, dims))  # prefix sums of unit costs on each side
    bad = np.zeros((2, n_units + 1), dtype=np.int64)  # prefix counts of units not allowed
    for s in range(2):
        for l in range(n_units):
            pre[s, l + 1] = pre[s, l] + unit[l, s]
            bad[s, l + 1] = bad[s, l] + (0 if allowed[l, s] else 1)
    best_a, best_b = -1, -1
    best_work, best_latency = np.inf, np.inf
    total = np.empty(dims)
    for a in range(n_units + 1):
        for b in range(a, n_units + 1):
            if a == b and a > 0:
                continue  # all-client is (0, 0)
            if a == b:
                if bad[0, n_units] > 0:
                    continue
                total[:] = pre[0, n_units]
            else:
                if bad[0, a] + bad[0, n_units] - bad[0, b] > 0 or bad[1, b] - bad[1, a] > 0:
                    continue
                for d in range(dims):
                    total[d] = (pre[0, a, d] + pre[1, b, d] - pre[1, a, d] + pre[0, n_units, d]
                                - pre[0, b, d] + move[a, 0, 1, d] + move[b, 1, 0, d])
            if np.all(total <= limit) and (total[0], total[1]) < (best_work, best_latency):
                best_work, best_latency, best_a, best_b = total[0], total[1], a, b
    return best_a, best_b, best_work


@njit(cache=True)
def trace(
    parent: np.ndarray, layer_start: np.ndarray, n_client: np.ndarray, rows: np.ndarray
) -> np.ndarray:
    """[k, L] bool: where each of the paths ending at `rows` runs each unit on the server."""
    n_units = len(n_client)
    on_server = np.empty((len(rows), n_units), dtype=np.bool_)
    for i in range(len(rows)):
        row = rows[i]
        for l in range(n_units - 1, -1, -1):
            on_server[i, l] = row >= layer_start[l] + n_client[l]
            row = parent[row]
    return on_server
