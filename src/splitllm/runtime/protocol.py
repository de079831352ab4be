"""The wire format between a splitllm client and server (docs/protocol.md is the spec).

Control messages are WebSocket text frames holding one JSON object. Tensor messages are binary
frames: a 4-byte little-endian header length, a UTF-8 JSON header, then the raw tensor bytes
(C order, little-endian) whose dtype and shape the header states. Nothing on the wire is ever
unpickled.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError, field_validator

from splitllm import dtypes

PROTOCOL_VERSION = 1
SESSION_PATH = "/v1/session"

# Canonical names (splitllm.dtypes) are torch's own.
WIRE_DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in dtypes.FLOATS}
ID_DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in dtypes.TOKEN_IDS}
ALL_DTYPES = {**WIRE_DTYPES, **ID_DTYPES}
DTYPE_NAMES = {dtype: name for name, dtype in ALL_DTYPES.items()}

HEADER_LEN = struct.Struct("<I")
MAX_HEADER_BYTES = 64 * 1024  # a binary frame's JSON header, and a whole text frame
MAX_PROBE_REPLY_BYTES = 1024 * 1024
MIN_TEMPERATURE = 1e-3  # below it logits / temperature overflows: use 0 (greedy) instead
MAX_ECHOED_SESSION_CHARS = 64

# JSON integers on the wire: no booleans, no floats, and within int64 (any other language's
# client can hold them; Python would take 4,000-digit literals).
WireInt = Annotated[int, Field(strict=True, gt=-(2**63), lt=2**63)]
Count = Annotated[int, Field(strict=True, ge=0, lt=2**63)]


class ProtocolError(Exception):
    """A message the receiver cannot accept: sent back as an `error` message."""

    def __init__(self, code: str, message: str, fatal: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.fatal = fatal


class Message(BaseModel):
    """A validated message: unknown fields are errors, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Sampling(Message):
    """How the side that holds the LM head picks the next token (temperature 0: greedy)."""

    temperature: float = Field(default=0.0, ge=0.0, le=100.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: Count | None = None

    @field_validator("temperature")
    @classmethod
    def _greedy_or_safe(cls, temperature: float) -> float:
        if 0.0 < temperature < MIN_TEMPERATURE:
            raise ValueError(f"must be 0 (greedy) or at least {MIN_TEMPERATURE}")
        return temperature


class OpenMessage(Message):
    """Client -> server: open a session that runs the S units of `placement`."""

    type: Literal["open"]
    protocol: WireInt = PROTOCOL_VERSION
    placement: str = Field(min_length=1, max_length=4096)
    wire_dtype: str = "float32"
    sampling: Sampling = Sampling()
    token: str | None = None  # for clients that cannot set an Authorization header


class CloseMessage(Message):
    """Client -> server: end a session and free its caches."""

    type: Literal["close"]
    session: str


class PingMessage(Message):
    """Client -> server: answered by a `pong` carrying the same `t` (RTT measurement)."""

    type: Literal["ping"]
    t: WireInt | Annotated[float, Field(allow_inf_nan=False)] | str | None = None


class TensorHeader(Message):
    """Header fields shared by every tensor frame: the tensor's dtype and shape."""

    dtype: str
    shape: list[WireInt] = Field(max_length=4)

    def payload_bytes(self) -> int:
        """Bytes the payload must have."""
        return math.prod(self.shape) * ALL_DTYPES[self.dtype].itemsize


class ForwardHeader(TensorHeader):
    """Client -> server: run units [start, stop) on this input at positions [p0, p1)."""

    type: Literal["forward"]
    session: str
    seq: Count
    units: tuple[WireInt, WireInt]
    positions: tuple[WireInt, WireInt]
    return_logits: StrictBool = False
    return_hidden: StrictBool = True  # False: output not needed (a prompt chunk's last blocks)
    # Speculative decoding: the segment forgets what it holds from p0 on before running...
    rollback: StrictBool = False
    # ...and the head returns its next token after every position, not just the last.
    verify: StrictBool = False


class ProbeHeader(Message):
    """Client -> server: any payload up; `reply_bytes` bytes come back (bandwidth probe)."""

    type: Literal["probe"]
    reply_bytes: Count = 0


TEXT_MESSAGES: dict[str, type[Message]] = {
    "open": OpenMessage, "close": CloseMessage, "ping": PingMessage,
}
BINARY_MESSAGES: dict[str, type[Message]] = {"forward": ForwardHeader, "probe": ProbeHeader}


def _validate(kinds: dict[str, type[Message]], data: dict[str, Any]) -> Message:
    kind = data.get("type")
    cls = kinds.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ProtocolError("bad_message", f"unknown message type {kind!r} "
                            f"(expected one of {', '.join(kinds)})")
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "message"
        raise ProtocolError("bad_message", f"{kind}: {where}: {first['msg']}") from None


def _json_object(raw: str, what: str) -> dict[str, Any]:
    """The JSON object in `raw`; ProtocolError for anything else, absurd nesting included."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # ValueError: also an integer of 5,000 digits
        raise ProtocolError("bad_frame", f"{what} is not UTF-8 JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ProtocolError("bad_frame", f"{what} must be a JSON object")
    return data


def split_frame(frame: bytes) -> tuple[dict[str, Any], memoryview]:
    """(header, payload) of a binary frame, without interpreting the header."""
    if len(frame) < HEADER_LEN.size:
        raise ProtocolError("bad_frame", "binary frame shorter than its 4-byte header length")
    (header_len,) = HEADER_LEN.unpack_from(frame)
    if header_len > MAX_HEADER_BYTES or HEADER_LEN.size + header_len > len(frame):
        raise ProtocolError("bad_frame", f"binary frame header length {header_len} is invalid "
                            f"(frame has {len(frame)} bytes, header limit {MAX_HEADER_BYTES})")
    raw = bytes(frame[HEADER_LEN.size:HEADER_LEN.size + header_len])
    try:
        decoded = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError("bad_frame", f"binary frame header is not UTF-8 JSON: {exc}") from None
    header = _json_object(decoded, "binary frame header")
    return header, memoryview(frame)[HEADER_LEN.size + header_len:]


def frame_header(data: str | bytes) -> tuple[dict[str, Any], memoryview]:
    """(header, payload) of any frame; a text frame is all header, with an empty payload.

    Only a bounded amount of JSON is ever parsed: a binary frame's header and a whole text frame
    are at most MAX_HEADER_BYTES.
    """
    if isinstance(data, bytes):
        return split_frame(data)
    if len(data) > MAX_HEADER_BYTES:
        raise ProtocolError("too_large", f"text frame of {len(data)} characters is over the "
                            f"limit of {MAX_HEADER_BYTES}")
    return _json_object(data, "text frame"), memoryview(b"")


def parse_message(header: dict[str, Any], payload: memoryview | None) -> Message:
    """The validated message of a frame's header; `payload` is None for a text frame."""
    if payload is None:
        return _validate(TEXT_MESSAGES, header)
    message = _validate(BINARY_MESSAGES, header)
    if isinstance(message, TensorHeader):
        check_tensor_header(message, len(payload))
    return message


def parse_text(text: str) -> Message:
    """A control message from a text frame."""
    return parse_message(frame_header(text)[0], None)


def parse_binary(frame: bytes) -> tuple[Message, memoryview]:
    """A validated tensor message header and its payload."""
    header, payload = split_frame(frame)
    return parse_message(header, payload), payload


def reply_ids(header: dict[str, Any]) -> tuple[str | None, int | None]:
    """The session and seq a frame's header named, if well-formed (an error echoes them)."""
    session, seq = header.get("session"), header.get("seq")
    return (session if isinstance(session, str) and len(session) <= MAX_ECHOED_SESSION_CHARS
            else None,
            seq if isinstance(seq, int) and not isinstance(seq, bool) and 0 <= seq < 2**63
            else None)


def check_tensor_header(header: TensorHeader, payload_len: int) -> None:
    """The dtype is known, the shape is non-negative and the payload has the right size."""
    if header.dtype not in ALL_DTYPES:
        raise ProtocolError("bad_dtype", f"dtype {header.dtype!r}: use one of "
                            f"{', '.join(ALL_DTYPES)}")
    if any(d < 0 for d in header.shape):
        raise ProtocolError("bad_shape", f"shape {header.shape} has a negative dimension")
    expected = header.payload_bytes()
    if payload_len != expected:
        raise ProtocolError("bad_shape", f"payload has {payload_len} bytes; dtype {header.dtype} "
                            f"and shape {header.shape} need {expected}")


def encode_frame(header: dict[str, Any], payload: bytes | memoryview = b"") -> bytes:
    """A binary frame: header length, JSON header, payload."""
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    return b"".join((HEADER_LEN.pack(len(raw)), raw, payload))


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """Raw little-endian bytes of a tensor in C order."""
    flat = tensor.detach().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes()


def encode_tensor(header: dict[str, Any], tensor: torch.Tensor) -> bytes:
    """A binary frame carrying `tensor`; dtype and shape are added to the header."""
    full = {**header, "dtype": DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape)}
    return encode_frame(full, tensor_bytes(tensor))


def decode_tensor(header: TensorHeader, payload: bytes | memoryview) -> torch.Tensor:
    """The tensor a checked header describes, copied out of the frame."""
    raw = np.frombuffer(payload, dtype=np.uint8).copy()  # [nbytes]
    return torch.from_numpy(raw).view(ALL_DTYPES[header.dtype]).reshape(header.shape)


def text(message: dict[str, Any]) -> str:
    """A control message as a text frame."""
    return json.dumps(message, separators=(",", ":"))


def error_message(err: ProtocolError, session: str | None = None, seq: int | None = None) -> str:
    """The `error` text frame for a ProtocolError."""
    body: dict[str, Any] = {"type": "error", "code": err.code, "message": err.message,
                            "fatal": err.fatal}
    if session is not None:
        body["session"] = session
    if seq is not None:
        body["seq"] = seq
    return text(body)


def wire_dtype_name(name: str) -> str:
    """Canonical wire dtype name from float32/fp32/bf16/bfloat16/fp16/float16."""
    canonical = dtypes.canonical(name, dtypes.FLOATS)
    if canonical is None:
        raise ProtocolError("bad_dtype", f"wire dtype {name!r}: use float32, bf16 or fp16")
    return canonical
