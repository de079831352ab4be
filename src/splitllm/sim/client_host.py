"""Clients that share one machine: their real CPU on processor-shared cores, and the server's
slowdown while those cores compute (the load test's EMULATED clients, co-located).

A real fleet's clients are each their own device: a client pass takes its device's time
(`walk.Walk.client_s`). The load test runs every client in one process on this machine's other
core(s), computing their units for real and sleeping up to their emulated device's time. There:
- every pass's real CPU seconds (`ClientHost.cpu_s`) queue on the shared cores, each of the n
  passes computing at once at min(1, cores / n) of a core (`SharedCores`); a pass lasts
  max(its emulated time, its completion there), never less than its emulated time;
- the server's steps take `server_factor` times their time, growing with the share of the
  clients' cores busy computing units (their compute and the server's share this machine's
  memory bandwidth); and alike, a pass's unit CPU that starts while the server computes takes
  `server_slowdown` times its CPU (the same sharing seen from the other side: measured at the
  splits' rates, with the server about half busy, a unit cost 1.24-1.34 CPU s per second of
  this machine's time against 1.15-1.19 alone);
- while a policy that reads the server's load runs, the clients' process reads it every
  `poll_s` (the load test's probes: a /metrics page), `cpu_per_poll_s` of CPU each on the
  shared cores, until every request has finished.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from splitllm.sim.engine import Kind, NewEvent, Sharing

WAKE = Kind.CLIENT_WAKE
POLL = -1  # a read of the server's load, as a job on the shared cores (not a request)
OnDone = Callable[[float, int, int], NewEvent | None]  # (now, a, b) -> the next event


@dataclass(frozen=True, kw_only=True)
class ClientHost:
    """The one machine every client of a world runs on (None in a world: each its own device)."""

    cores: float = 1.0
    cpu_per_client_s: tuple[float, ...] = ()  # per client class: real CPU seconds per second of
    # its emulated client time (this machine's CPU per unit over the class's slowdown)
    cpu_per_visit_s: float = 0.0  # client CPU of one visit to the server (its transport work)
    poll_s: float = 0.0  # a load-reading policy's clients read the server's load this often
    cpu_per_poll_s: float = 0.0  # ... at this much client CPU a read (0: never)
    server_slowdown: float = 1.0  # the server's steps x this while the clients' cores are all
    # busy computing units (x1 while idle, linear between; a visit's transport work: idle)

    def scaled_cpu(self, factor: float) -> ClientHost:
        """This machine with all its clients' CPU (units, visits, reads of the load) times
        `factor`."""
        return replace(self, cpu_per_client_s=tuple(c * factor for c in self.cpu_per_client_s),
                       cpu_per_visit_s=self.cpu_per_visit_s * factor,
                       cpu_per_poll_s=self.cpu_per_poll_s * factor)

    @property
    def polls(self) -> bool:
        """Whether load-reading policies' reads of the load cost the clients CPU."""
        return self.poll_s > 0 and self.cpu_per_poll_s > 0

    def cpu_s(self, class_index: int, client_s: float, visits: int) -> float:
        """Real CPU seconds of a gap's client work: its units' and its visits' transport."""
        per_client_s = self.cpu_per_client_s[class_index] if self.cpu_per_client_s else 0.0
        return per_client_s * client_s + self.cpu_per_visit_s * visits

    def server_factor(self, busy_fraction: float) -> float:
        """How many times its own time a server step takes while this share of the clients'
        cores is busy."""
        return 1.0 + (self.server_slowdown - 1.0) * min(max(busy_fraction, 0.0), 1.0)


class SharedCores:
    """The clients' cores, processor-shared (`engine.Sharing`): `arrive` and `wake` return
    engine events; a finished job is handed to `on_done(now_s, a, b)`. Jobs that compute units
    are counted apart: their memory traffic is what slows the server."""

    def __init__(self, cores: float, on_done: OnDone) -> None:
        self.sharing = Sharing(cores, WAKE, self._progressed)
        self.computing = 0  # jobs present that compute units
        self.busy_s = 0.0  # core-seconds computed
        self.on_done = on_done

    def busy_fraction(self) -> float:
        """The share of the cores computing units now (a visit's transport work alone moves
        little memory)."""
        return min(self.computing / self.sharing.cores, 1.0)

    def _progressed(self, began_s: float, now_s: float, jobs: int) -> None:
        self.busy_s += (now_s - began_s) * min(jobs, self.sharing.cores)

    def arrive(self, now_s: float, a: int, b: int, cpu_s: float, units: bool = True
               ) -> NewEvent | None:
        """A job of `cpu_s` CPU seconds starts now (`units`: it computes units)."""
        self.computing += units
        return self.sharing.push(now_s, a, b, cpu_s, tag=int(units))

    def wake(self, now_s: float, version: int, _b: int) -> list[NewEvent]:
        woken = self.sharing.wake(now_s, version)
        if woken is None:
            return []
        done, wake = woken
        out = [] if wake is None else [wake]
        self.computing -= sum(units for *_, units in done)
        for _finish, _seq, a, b, _units in done:
            nxt = self.on_done(now_s, a, b)
            if nxt is not None:
                out.append(nxt)
        return out
