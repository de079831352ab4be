"""Protocol fuzzing against a live server: thousands of generated frames, every reply defined.

Frames are well-formed headers of every message type with wrong (or right) values, headers
with garbage around them, and random bytes and text. The server must answer each one with a
defined reply or a defined error, never drop the connection, and hold nothing afterwards.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

import httpx
import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from runtime_kit import TIMEOUT_S, RawClient, metrics, wait_for

from splitllm.runtime import protocol as wire
from splitllm.runtime.guards import PRE_AUTH_FRAME_BYTES
from splitllm.runtime.hosting import BackgroundServer
from splitllm.runtime.models import LoadedModel

SESSION = "$session"  # replaced by the live session's id when a frame is sent
ERROR_CODES = {"bad_frame", "bad_message", "bad_placement", "bad_units", "bad_positions",
               "bad_shape", "bad_dtype", "bad_values", "too_large", "unknown_session", "busy",
               "idle_timeout", "internal", "unauthorized"}  # docs/protocol.md, Errors
REPLY_TYPES = {"opened", "closed", "pong", "probe_reply", "hidden", "done", "token", "logits"}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**80), 2**80) | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=3),
    max_leaves=6)


def pair(lo: int, hi: int) -> st.SearchStrategy[Any]:
    return st.lists(st.integers(lo, hi), min_size=2, max_size=2)


FIELD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "session": st.just(SESSION) | st.text(max_size=12),
    "seq": st.integers(-2, 2**64),
    "units": pair(-1, 7),
    "positions": pair(-2, 300),
    "dtype": st.sampled_from(["float32", "float16", "bfloat16", "int64", "int32", "float64"]),
    "shape": st.lists(st.integers(-2, 70), max_size=4),
    "return_logits": st.booleans(),
    "return_hidden": st.booleans(),
    "placement": st.text(alphabet="CSX", max_size=8),
    "wire_dtype": st.sampled_from(["fp32", "bf16", "fp16", "int8"]),
    "sampling": st.fixed_dictionaries({}, optional={
        "temperature": st.floats(-1.0, 200.0), "top_p": st.floats(-0.5, 1.5),
        "seed": st.integers(-1, 2**64)}),
    "protocol": st.integers(0, 2),
    "token": st.text(max_size=8),
    "t": json_values,
    "reply_bytes": st.integers(-1, 2 * wire.MAX_PROBE_REPLY_BYTES),
}
KINDS = {
    "open": ["protocol", "placement", "wire_dtype", "sampling", "token"],
    "close": ["session"],
    "ping": ["t"],
    "forward": ["session", "seq", "units", "positions", "dtype", "shape", "return_logits",
                "return_hidden"],
    "probe": ["reply_bytes"],
}


@st.composite
def headers(draw: st.DrawFn) -> dict[str, Any]:
    """A header: a real type with plausible or arbitrary values, sometimes an extra field."""
    kind = draw(st.sampled_from([*KINDS, "nonsense"]))
    header: dict[str, Any] = {"type": kind}
    for field in KINDS.get(kind, []):
        if draw(st.integers(0, 9)) < 8:  # usually present
            header[field] = draw(FIELD_VALUES[field] | json_values if draw(st.booleans())
                                 else FIELD_VALUES[field])
    header.update(draw(st.dictionaries(st.text(max_size=6), json_values, max_size=1)))
    return header


def sized_payload(header: dict[str, Any], seed: int) -> bytes:
    """Arbitrary bytes of the size the header's dtype and shape declare (empty if they don't)."""
    shape, dtype = header.get("shape"), wire.ALL_DTYPES.get(str(header.get("dtype")))
    if dtype is None or not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= 4096 for d in shape):
        return b""
    size = dtype.itemsize
    for d in shape:
        size *= d
    return hashlib.shake_128(seed.to_bytes(8, "little")).digest(min(size, 256 * 1024))


@st.composite
def frames(draw: st.DrawFn) -> tuple[str, Any]:
    """('text', header), ('binary', (header, payload)) or ('raw', str | bytes)."""
    choice = draw(st.integers(0, 9))
    if choice < 4:
        return "text", draw(headers())
    if choice < 8:
        header = draw(headers())
        payload = (sized_payload(header, draw(st.integers(0, 2**63 - 1)))
                   if draw(st.booleans()) else draw(st.binary(max_size=512)))
        return "binary", (header, payload)
    raw = draw(st.binary(max_size=256) | st.text(max_size=256) | st.builds(
        lambda h, p: wire.HEADER_LEN.pack(len(h)) + h + p, st.binary(max_size=64),
        st.binary(max_size=64)))
    return "raw", raw


def with_session(value: Any, session: str) -> Any:
    if value == SESSION:
        return session
    if isinstance(value, dict):
        return {k: with_session(v, session) for k, v in value.items()}
    return value


def encode(frame: tuple[str, Any], session: str) -> str | bytes:
    kind, body = frame
    if kind == "text":
        return json.dumps(with_session(body, session))
    if kind == "binary":
        header, payload = body
        return wire.encode_frame(with_session(header, session), payload)
    return body  # type: ignore[no-any-return]


# uvicorn's keepalive pings draw from the global `random` in the server's thread: hypothesis
# sees its state change while a frame is being drawn and warns of `random` in strategies.
server_thread_uses_random = pytest.mark.filterwarnings(
    "ignore::hypothesis.errors.HypothesisDeprecationWarning")
FUZZ_SETTINGS = settings(max_examples=2000, deadline=None, derandomize=True, database=None,
                         suppress_health_check=list(HealthCheck))


class Fuzzer:
    """One connection with a live session; reconnects if a frame ever kills the connection."""

    def __init__(self, server: BackgroundServer) -> None:
        self.server = server
        self.sent = 0
        self.connect()

    def connect(self) -> None:
        self.client = RawClient(self.server.ws_url)
        self.session = self.client.open("CCSSSS")

    def replies_to(self, data: str | bytes) -> list[dict[str, Any]]:
        """Every message the server sends in answer to one frame (a ping marks the end)."""
        self.sent += 1
        marker = f"sync-{self.sent}"
        try:
            self.client.send(data)
            self.client.send_json({"type": "ping", "t": marker})
            replies = []
            while True:
                reply = self.client.recv()[0]
                if reply.get("type") == "pong" and reply.get("t") == marker:
                    break
                replies.append(reply)
        except Exception:
            self.connect()  # so the next example starts clean
            raise
        return replies


@server_thread_uses_random
def test_thousands_of_generated_frames_get_defined_replies(
        tiny_llama: LoadedModel, make_server: Callable[..., BackgroundServer]) -> None:
    server = make_server(tiny_llama)
    rss_before = psutil.Process().memory_info().rss
    fuzzer = Fuzzer(server)

    @FUZZ_SETTINGS
    @given(frame=frames())
    def one(frame: tuple[str, Any]) -> None:
        replies = fuzzer.replies_to(encode(frame, fuzzer.session))
        assert 1 <= len(replies) <= 2, replies
        for reply in replies:
            assert reply["type"] in REPLY_TYPES | {"error"}, reply
            if reply["type"] == "error":
                assert reply["code"] in ERROR_CODES and reply["fatal"] is False, reply

    one()
    assert fuzzer.sent >= 2000
    assert httpx.get(server.http_url + "/health", timeout=TIMEOUT_S).status_code == 200
    fuzzer.client.close()
    wait_for(lambda: metrics(server.http_url)["splitllm_open_sessions"] == 0)
    values = metrics(server.http_url)
    assert values["splitllm_kv_cache_bytes"] == 0
    assert psutil.Process().memory_info().rss < rss_before * 1.1


@server_thread_uses_random
def test_generated_frames_before_auth_are_all_fatal(
        tiny_llama: LoadedModel, make_server: Callable[..., BackgroundServer]) -> None:
    server = make_server(tiny_llama, tokens=("s3cret",))
    answered = 0

    @settings(FUZZ_SETTINGS, max_examples=300)
    @given(frame=frames())
    def one(frame: tuple[str, Any]) -> None:
        nonlocal answered
        client = RawClient(server.ws_url)
        data = encode(frame, "s1-000000000000")
        client.send(data)
        if len(data) > PRE_AUTH_FRAME_BYTES:  # refused by the transport, never parsed
            with pytest.raises(Exception, match="1009"):
                client.recv()
            return
        answered += 1
        assert client.expect_error("unauthorized")["fatal"] is True
        with pytest.raises(Exception, match="1008"):
            client.recv()

    one()
    values = metrics(server.http_url, "s3cret")
    assert answered >= 250
    assert values['splitllm_errors_total{code="unauthorized"}'] == answered
    assert values["splitllm_open_sessions"] == 0
