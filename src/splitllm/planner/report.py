"""Readable tables of plans (rich)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from rich.table import Table

from splitllm.placement import CLIENT
from splitllm.planner.instance import Instance, Plan


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.2f}"


def plan_table(instance: Instance, plans: Mapping[str, Plan | None]) -> Table:
    """One row per solver: placement, latency breakdown, server work against server-only."""
    reference = plans.get("server-only")
    table = Table(title=f"Plans, times in ms (SLA {_ms(instance.sla_s)} ms)")
    for column in ("solver", "placement", "sw", "client", "server", "network",
                   "latency", "work", "vs S-only"):
        table.add_column(column, justify="left" if column in ("solver", "placement") else "right")
    for name, plan in plans.items():
        if plan is None:
            table.add_row(name, "[red]infeasible[/red]", *[""] * 7)
            continue
        saving = ""
        if reference is not None and reference.server_work > 0:
            saving = f"{plan.server_work / reference.server_work - 1:+.1%}"
        table.add_row(
            name, _compact(plan.placement.sides), str(plan.placement.switches),
            _ms(plan.client_compute_s), _ms(plan.server_compute_s), _ms(plan.network_s),
            _ms(plan.latency_s), _ms(plan.server_work), saving,
        )
    return table


def _compact(sides: str) -> str:
    """'CCCSSSSC' -> 'C3 S4 C1' for long placements."""
    if len(sides) <= 24:
        return sides
    out, start = [], 0
    for i in range(1, len(sides) + 1):
        if i == len(sides) or sides[i] != sides[start]:
            out.append(f"{sides[start]}{i - start}")
            start = i
    return " ".join(out)


def units_table(instance: Instance, plan: Plan) -> Table:
    """Each unit's side and its costs under one plan."""
    table = Table(title=f"Units of placement {plan.placement}")
    for column in ("unit", "side", "client ms", "server ms", "out KiB", "client MiB"):
        table.add_column(column, justify="left" if column in ("unit", "side") else "right")
    for unit, side in zip(instance.units, plan.placement.sides, strict=True):
        table.add_row(
            unit.name, "client" if side == CLIENT else "[bold]server[/bold]",
            _ms(unit.client_s), _ms(unit.server_s), f"{unit.out_bytes / 1024:,.1f}",
            f"{unit.client_mem_bytes / 2**20:,.1f}",
        )
    return table


def frontier_table(frontier: Sequence[Plan]) -> Table:
    """The latency / server-work frontier, by server work."""
    table = Table(title=f"Frontier ({len(frontier)} plans): any SLA >= latency gets that work")
    for column in ("server work ms", "latency ms", "placement"):
        table.add_column(column, justify="left" if column == "placement" else "right")
    for plan in frontier:
        table.add_row(_ms(plan.server_work), _ms(plan.latency_s), _compact(plan.placement.sides))
    return table
