"""PNG plots of studies (matplotlib, Agg backend, imported only when plotting)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from splitllm.sim.paper import POLICIES, PaperPoint, reductions
from splitllm.sim.study import PaperStudy, SimStudy


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, out: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    _pyplot().close(fig)
    return name


def _curves(study: SimStudy, out: Path) -> str:
    plt = _pyplot()
    fig, (good, att) = plt.subplots(1, 2, figsize=(11, 4))
    caps = {c.policy: c.rate_per_s for c in study.capacities}
    for policy in study.world.policies:
        ms = [m for m in study.curve if m.policy == policy]
        rates = [m.rate_per_s for m in ms]
        line = good.plot(rates, [m.goodput_per_s for m in ms], marker="o", label=policy)[0]
        att.plot(rates, [m.sla_attainment for m in ms], marker="o", color=line.get_color(),
                 label=policy)
        if 0 < caps.get(policy, 0) < float("inf"):
            att.axvline(caps[policy], color=line.get_color(), linestyle=":", linewidth=1)
    att.axhline(study.world.sweep.target_attainment, color="grey", linestyle="--", linewidth=1)
    good.set(xlabel="arrival rate (req/s)", ylabel="goodput (req/s in SLA)", title="Goodput")
    att.set(xlabel="arrival rate (req/s)", ylabel="share of requests in SLA",
            title="SLA attainment (dotted: capacity)", ylim=(-0.02, 1.02))
    good.legend(fontsize=8)
    return _save(fig, out, "goodput.png")


def _server_work(study: SimStudy, out: Path) -> str:
    plt = _pyplot()
    runs = study.at(0)
    types = [t.name for t in study.world.types]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(types)), 4))
    width = 0.8 / len(runs)
    for k, m in enumerate(runs):
        by_type = dict(m.server_s_by_type)
        ax.bar(np.arange(len(types)) + k * width, [by_type.get(t, 0.0) for t in types],
               width, label=m.policy)
    ax.set_xticks(np.arange(len(types)) + width * (len(runs) - 1) / 2, types)
    ax.set(ylabel="server s per request", yscale="log",
           title=f"Server work per request type ({study.rates_per_s[0]:.3g} req/s)")
    ax.legend(fontsize=8)
    return _save(fig, out, "server_work.png")


def _placement(study: SimStudy, out: Path) -> str:
    plt = _pyplot()
    middle = len(study.rates_per_s) // 2
    runs = study.at(middle)
    shares = [dict(m.client_share_by_unit) for m in runs]
    types = [t.name for t in study.world.types if t.model is not None]
    fig, axes = plt.subplots(len(types), 1, squeeze=False, layout="constrained",
                             figsize=(10, 1.2 + (0.9 + 0.25 * len(runs)) * len(types)))
    image = None
    for ax, name in zip(axes[:, 0], types, strict=True):
        grid = np.array([s.get(name, ()) for s in shares], dtype=float)
        image = ax.imshow(grid, aspect="auto", vmin=0, vmax=1, cmap="viridis")
        ax.set_yticks(range(len(runs)), [m.policy for m in runs], fontsize=7)
        ax.set_title(f"{name}: share of requests running each unit on the client", fontsize=9)
        ax.set_xlabel("unit (embed, blocks..., head)", fontsize=7)
    if image is not None:
        fig.colorbar(image, ax=axes[:, 0].tolist(), fraction=0.03)
    fig.suptitle(f"Where units run ({study.rates_per_s[middle]:.3g} req/s)", fontsize=10)
    fig.savefig(out / "placement.png", dpi=110)
    plt.close(fig)
    return "placement.png"


def sim_plots(study: SimStudy, out: Path) -> list[str]:
    """Goodput and attainment against rate, server work per type, where units run."""
    return [_curves(study, out), _server_work(study, out), _placement(study, out)]


def _paper_work(study: PaperStudy, out: Path) -> str:
    plt = _pyplot()
    models = list(study.grid.models)
    fig, ax = plt.subplots(figsize=(max(7, 1.5 * len(models)), 4))
    width = 0.8 / len(POLICIES)
    for k, policy in enumerate(POLICIES):
        rel = [1 - reductions([p for p in study.points if p.model == m]).mean(axis=0)[k]
               for m in models]
        ax.bar(np.arange(len(models)) + k * width, rel, width, label=policy)
    ax.set_xticks(np.arange(len(models)) + width * (len(POLICIES) - 1) / 2, models, fontsize=8)
    ax.set(ylabel="server work / server-only (mean)", ylim=(0, 1.05),
           title="Server workload per policy per model (zero load)")
    ax.legend(fontsize=8)
    return _save(fig, out, "paper_server_work.png")


def _paper_sweeps(study: PaperStudy, out: Path) -> str:
    plt = _pyplot()
    pts = list(study.points)
    red = reductions(pts)
    axes_spec: list[tuple[str, Any]] = [
        ("SLA slack", lambda p: p.sla_slack), ("speed ratio server/client",
                                               lambda p: p.speed_ratio),
        ("link", lambda p: p.link),
        ("sequence length rank", lambda p: _length_rank(study, p)),
    ]
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.6), sharey=True)
    for ax, (label, key) in zip(axes, axes_spec, strict=True):
        values = sorted({key(p) for p in pts}, key=_order(study, label))
        for k, policy in enumerate(POLICIES[1:], start=1):
            means = [red[[key(p) == v for p in pts], k].mean() for v in values]
            ax.plot([str(v) for v in values], means, label=policy, marker="os^"[k - 1],
                    linestyle="-" if policy != "best-single-cut" else "--")
        ax.set(xlabel=label, ylim=(0, 1))
    axes[0].set_ylabel("mean reduction vs server-only")
    axes[0].legend(fontsize=8)
    fig.suptitle("Server workload reduction along each swept parameter (all models)")
    return _save(fig, out, "paper_sweeps.png")


def _length_rank(study: PaperStudy, p: PaperPoint) -> int:
    return study.grid.lengths(p.model).index(p.prompt_tokens)


def _order(study: PaperStudy, label: str) -> Any:
    if label == "link":
        return lambda v: study.grid.links.index(v)
    return lambda v: v


def paper_plots(study: PaperStudy, out: Path) -> list[str]:
    """Server work per policy per model; reduction along each swept parameter."""
    return [_paper_work(study, out), _paper_sweeps(study, out)]
