"""Bytes a generation puts on the wire, from encoding the protocol's real frames.

No assumed overheads: each size is the length of a frame built with `encode_frame` (tensor
frames: header + raw payload, as `encode_tensor` sends them) or `text`, for the messages a
generation exchanges (docs/protocol.md): `forward` up, `hidden` and `token` replies down, once
per pass; and, once per generation that runs a unit on the server, the messages that open and
close its session there (`open`/`opened`, `close`/`closed`). These are message bytes, what the
transport and the server's /metrics count; WebSocket framing adds 2-14 bytes per message on top.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from splitllm.placement import SERVER, Placement
from splitllm.planner.speculation import Speculation, decode_passes
from splitllm.runtime import protocol as wire
from splitllm.runtime.remote import close_message, open_message

# The server's session ids are `s{connection}-{12 hex digits}`; connection numbers stay short.
SESSION_ID = "s1-000000000000"
ID_DTYPE = "int64"  # token ids go up as int64 (torch.long)
STAT_S = 0.12345678901234567  # a float of the `closed` stats, as long as a typical repr


def tensor_frame_bytes(header: dict[str, Any], shape: Sequence[int], dtype: str) -> int:
    """Length of the binary frame `encode_tensor` builds for a tensor of this shape and dtype."""
    full = {**header, "dtype": dtype, "shape": list(shape)}
    return len(wire.encode_frame(full)) + math.prod(shape) * wire.ALL_DTYPES[dtype].itemsize


def forward_bytes(*, units: tuple[int, int], positions: tuple[int, int],
                  shape: Sequence[int], dtype: str, seq: int) -> int:
    """A `forward` message: client -> server, ids [1, T] or hidden states [1, T, D]."""
    header = {"type": "forward", "session": SESSION_ID, "seq": seq, "units": list(units),
              "positions": list(positions), "return_logits": False, "return_hidden": True}
    return tensor_frame_bytes(header, shape, dtype)


def hidden_reply_bytes(*, units: tuple[int, int], positions: tuple[int, int],
                       shape: Sequence[int], dtype: str, seq: int) -> int:
    """A `hidden` reply: server -> client, hidden states [1, T, D] after a server segment."""
    header = {"type": "hidden", "session": SESSION_ID, "seq": seq, "units": list(units),
              "positions": list(positions)}
    return tensor_frame_bytes(header, shape, dtype)


def token_reply_bytes(*, position: int, token: int, seq: int) -> int:
    """A `token` reply: server -> client, the sampled token when the head runs on the server."""
    return len(wire.text({"type": "token", "session": SESSION_ID, "seq": seq,
                          "position": position, "token": token}))


@dataclass(frozen=True)
class RequestBytes:
    """What crosses the network over a whole generation (one prefill, G - 1 decode steps)."""

    ids_up: float  # the token ids, when unit 0 runs on the server
    hidden_up: tuple[float, ...]  # hidden states after unit l in `forward` messages
    hidden_down: tuple[float, ...]  # ... and in `hidden` replies
    token_down: float  # the sampled token, when the head runs on the server

    @property
    def hidden(self) -> tuple[float, ...]:
        """Bytes after unit l in either direction (the planner has one size per unit): the mean."""
        return tuple((up + down) / 2 for up, down in zip(self.hidden_up, self.hidden_down,
                                                         strict=True))


@dataclass(frozen=True)
class WireFormat:
    """What sets the sizes: the model's units and hidden size, and the wire dtype."""

    n_units: int
    hidden_size: int
    wire_dtype: str  # canonical name: float32, bfloat16, float16
    vocab_size: int


def request_bytes(fmt: WireFormat, prompt_tokens: int, new_tokens: int, *,
                  speculation: Speculation | None = None) -> RequestBytes:
    """Bytes per crossing of a generation, from the frames its messages are sent in.

    Header lengths depend a little on digit counts (seq, positions, token ids): they are taken at
    the middle decode step, which is within a few bytes of every step's. With speculation each
    decode pass carries k + 1 positions (the replies' token lists are not counted).
    """
    decode = decode_passes(max(new_tokens, 1) - 1, speculation)
    width = speculation.positions_per_pass if speculation else 1
    passes = 1 + decode
    mid = prompt_tokens + max(new_tokens, 1) // 2  # position of the middle decode step
    seq = passes  # a typical sequence number (one forward per server segment and pass)
    spans = [((0, prompt_tokens), prompt_tokens, 1)]  # (positions, tokens, messages)
    if passes > 1:
        spans.append(((mid, mid + width), width, decode))
    d, n = fmt.hidden_size, fmt.n_units

    def over_passes(message: Callable[..., int], units: tuple[int, int], dtype: str,
                    hidden: bool) -> float:
        return float(sum(count * message(units=units, positions=span, dtype=dtype, seq=seq,
                                         shape=(1, tokens, d) if hidden else (1, tokens))
                         for span, tokens, count in spans))

    ids_up = over_passes(forward_bytes, (0, n), ID_DTYPE, hidden=False)
    cuts = range(1, n)  # a crossing before unit `cut`: the next unit runs on the other side
    hidden_up = [over_passes(forward_bytes, (cut, n), fmt.wire_dtype, hidden=True)
                 for cut in cuts]
    hidden_down = [over_passes(hidden_reply_bytes, (0, cut), fmt.wire_dtype, hidden=True)
                   for cut in cuts]
    token = fmt.vocab_size // 2
    token_down = (token_reply_bytes(position=prompt_tokens, token=token, seq=seq)
                  + (passes - 1) * token_reply_bytes(position=mid + 1, token=token, seq=seq))
    return RequestBytes(ids_up=ids_up, hidden_up=tuple(hidden_up),
                        hidden_down=tuple(hidden_down), token_down=float(token_down))


@dataclass(frozen=True)
class SessionBytes:
    """The messages that open and close a generation's session on the server (none: 0)."""

    open_up: int  # `open`
    open_down: int  # `opened`
    close_up: int  # `close`
    close_down: int  # `closed`, with the session's stats

    @property
    def total(self) -> int:
        """Both round trips, both directions."""
        return self.open_up + self.open_down + self.close_up + self.close_down


NO_SESSION = SessionBytes(0, 0, 0, 0)


def session_bytes(placement: Placement, unit_names: Sequence[str], *, wire_dtype: str,
                  prompt_tokens: int, new_tokens: int,
                  sampling: wire.Sampling | None = None) -> SessionBytes:
    """The session's four messages as the client and the server build them (no server unit:
    no session). The stats' digit counts are typical ones (a few bytes either way)."""
    segments = [[s.start, s.stop] for s in placement.segments() if s.side == SERVER]
    if not segments:
        return NO_SESSION
    opened = {"type": "opened", "session": SESSION_ID, "placement": str(placement),
              "server_segments": segments, "units": list(unit_names), "wire_dtype": wire_dtype}
    sampled = new_tokens if placement.sides[-1] == SERVER else 0
    closed = {"type": "closed", "session": SESSION_ID,
              "stats": {"busy_s": STAT_S, "cpu_s": STAT_S,
                        "tokens_processed": len(segments) * (prompt_tokens + new_tokens - 1),
                        "tokens_sampled": sampled}}
    return SessionBytes(
        open_up=len(wire.text(open_message(placement, wire_dtype, sampling or wire.Sampling()))),
        open_down=len(wire.text(opened)), close_up=len(wire.text(close_message(SESSION_ID))),
        close_down=len(wire.text(closed)))
