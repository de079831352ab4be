"""Speculative decoding across the split, side by side in one run over emulated links.

For each EMULATED link (4g, 5g, wifi: the transport delays every message by the link's
latency and bandwidth), each prompt kind (rewrite and summarise a given text, edit given
code, open chat) and each placement (server-only; a split with embed and head on the client),
greedy generation without speculation, with k = 4 prompt-lookup drafts and with `auto`:
decode tokens/s, round trips per generated token, draft acceptance, and whether the tokens
are the same as without speculation (they must be). Then open chat side by side, `auto`
against no speculation, runs interleaved and repeated (the median of each): the target is
auto never more than 5% slower. The load average is printed: rerun on a quiet machine. The
server is a child process; the client runs here. Speed is measured here, never asserted in
tests.

    .venv/bin/python benchmarks/bench_speculative.py [--model smollm2] [--tokens 48]
        [--links 4g,5g,wifi] [--threads 1] [--repeats 5] [--quick]

--quick (under 3 minutes on a quiet machine): 4G only, 32 tokens, 3 repeats.
"""

from __future__ import annotations

import argparse
import os
import statistics
from dataclasses import dataclass

import torch
from rich.console import Console
from rich.table import Table

from splitllm.runtime.client import Generation, connect
from splitllm.runtime.demo import served
from splitllm.runtime.models import LoadedModel, encode_prompt, load_model
from splitllm.runtime.units import UnitStack

TEXT = ("The city council met on Tuesday to discuss the new bicycle lanes on Main Street. "
        "Several shop owners said the lanes had reduced parking and hurt their business, "
        "while cyclists said the lanes had made their commute much safer. The council "
        "agreed to collect traffic data for three more months before making a decision.")
CODE = ("def total(items):\n    result = 0\n    for item in items:\n        result = result + "
        "item.price * item.count\n    return result\n")
PROMPTS = {
    "rewrite": f"Rewrite this text in the same words, but in the past perfect tense:\n\n{TEXT}",
    "summarise": f"Summarise this text, quoting its key sentences:\n\n{TEXT}",
    "code edit": f"Rename the variable `result` to `amount` in this code and show all of it:"
                 f"\n\n{CODE}",
    "open chat": "Write a short story about a robot who learns to paint.",
}
MODES: dict[str, int | str] = {"off": 0, "k=4": 4, "auto": "auto"}


@dataclass(frozen=True)
class Row:
    """One generation's speed and traffic."""

    link: str
    prompt: str
    placement: str
    mode: str
    result: Generation
    same_tokens: bool

    @property
    def decode_tokens_per_s(self) -> float:
        return 1.0 / self.result.tpot_s if self.result.tpot_s > 0 else 0.0

    @property
    def round_trips_per_token(self) -> float:
        return self.result.round_trips / len(self.result.tokens)

    @property
    def acceptance(self) -> str:
        r = self.result
        return f"{r.accepted}/{r.drafted}" if r.drafted else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--links", default="4g,5g,wifi")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5, help="open chat: runs of each mode")
    parser.add_argument("--quick", action="store_true", help="4G, 32 tokens, 3 repeats")
    args = parser.parse_args()
    if args.quick:
        args.links, args.tokens, args.repeats = "4g", 32, 3
    torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    n = UnitStack(loaded.model).n_units
    placements = {"server-only": "S" * n, "split (embed, head on C)": "C" + "S" * (n - 2) + "C"}
    console = Console(width=140)
    console.print(f"load average (1 min) before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} "
                  "CPUs")
    with served(args.model, args.threads) as url:
        show(console, measure(loaded, url, args.links.split(","), placements, args.tokens), args)
        chat = open_chat(loaded, url, args.links.split(","), placements, args.tokens,
                         args.repeats)
    show_open_chat(console, chat, args.repeats)
    console.print(f"load average (1 min) after: {os.getloadavg()[0]:.1f}")


def measure(loaded: LoadedModel, url: str, links: list[str], placements: dict[str, str],
            tokens: int) -> list[Row]:
    rows = []
    for link in links:
        with connect(url, loaded, emulate_link=link) as session:
            for prompt_name, prompt in PROMPTS.items():
                ids = encode_prompt(loaded, prompt)
                for placement_name, placement in placements.items():
                    plain: Generation | None = None
                    for mode, k in MODES.items():
                        result = session.generate(ids, tokens, placement=placement,
                                                  stop_at_eos=False, speculate=k)
                        plain = plain or result
                        rows.append(Row(link, prompt_name, placement_name, mode, result,
                                        result.tokens == plain.tokens))
    return rows


@dataclass(frozen=True)
class ChatRow:
    """Open chat, no speculation against auto: interleaved runs of each."""

    link: str
    placement: str
    off: list[Generation]
    auto: list[Generation]

    @staticmethod
    def tokens_per_s(runs: list[Generation]) -> list[float]:
        return sorted(1.0 / r.tpot_s if r.tpot_s > 0 else 0.0 for r in runs)


def open_chat(loaded: LoadedModel, url: str, links: list[str], placements: dict[str, str],
              tokens: int, repeats: int) -> list[ChatRow]:
    ids = encode_prompt(loaded, PROMPTS["open chat"])
    rows = []
    for link in links:
        with connect(url, loaded, emulate_link=link) as session:
            for name, placement in placements.items():
                runs: dict[int | str, list[Generation]] = {0: [], "auto": []}
                for _ in range(repeats):  # interleaved: a change of load hits both alike
                    for k, results in runs.items():
                        results.append(session.generate(ids, tokens, placement=placement,
                                                        stop_at_eos=False, speculate=k))
                rows.append(ChatRow(link, name, runs[0], runs["auto"]))
    return rows


def show_open_chat(console: Console, rows: list[ChatRow], repeats: int) -> None:
    table = Table(title=f"Open chat: auto k against no speculation, median of {repeats} "
                        "interleaved runs each (target: auto >= 0.95x)")
    for column in ("link", "placement", "off tok/s (min-max)", "auto tok/s (min-max)",
                   "auto / off", "round trips off, auto", "drafts sent by auto (accepted)",
                   "same tokens"):
        table.add_column(column)
    for row in rows:
        off, auto = ChatRow.tokens_per_s(row.off), ChatRow.tokens_per_s(row.auto)
        ratio = statistics.median(auto) / statistics.median(off) if off[0] > 0 else 0.0
        table.add_row(row.link, row.placement,
                      f"{statistics.median(off):.1f} ({off[0]:.1f}-{off[-1]:.1f})",
                      f"{statistics.median(auto):.1f} ({auto[0]:.1f}-{auto[-1]:.1f})",
                      f"{ratio:.2f}",
                      f"{row.off[0].round_trips}, {row.auto[0].round_trips}",
                      f"{row.auto[0].drafted} ({row.auto[0].accepted})",
                      "yes" if all(r.tokens == row.off[0].tokens for r in row.auto) else "NO")
    console.print(table)


def show(console: Console, rows: list[Row], args: argparse.Namespace) -> None:
    table = Table(title=f"Speculative decoding, {args.model}, {args.tokens} new tokens, greedy, "
                        "EMULATED links")
    for column in ("link", "prompt", "placement", "mode", "decode tok/s", "x off",
                   "round trips / token", "accepted / drafted", "same tokens"):
        table.add_column(column, justify="right" if column[0] in "drx" else "left")
    base: dict[tuple[str, str, str], float] = {}
    for row in rows:
        key = (row.link, row.prompt, row.placement)
        base.setdefault(key, row.decode_tokens_per_s)
        table.add_row(row.link, row.prompt, row.placement, row.mode,
                      f"{row.decode_tokens_per_s:.1f}",
                      f"{row.decode_tokens_per_s / base[key]:.2f}",
                      f"{row.round_trips_per_token:.2f}", row.acceptance,
                      "yes" if row.same_tokens else "NO")
    console.print(table)


if __name__ == "__main__":
    main()
