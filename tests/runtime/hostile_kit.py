"""Helpers for attacking a server in tests: raw-socket WebSocket clients and a healthy neighbour."""

from __future__ import annotations

import json
import random
import select
import socket
from typing import Any

import torch
from runtime_kit import TIMEOUT_S, RawClient, random_prompt
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.protocol import State
from websockets.uri import parse_uri

from splitllm.placement import Placement
from splitllm.runtime.decoding import (
    LocalPipe,
    SplitPipe,
    decode_one_token,
    generate_tokens,
    prefill,
)
from splitllm.runtime.hosting import BackgroundServer
from splitllm.runtime.kvcache import kv_capacity
from splitllm.runtime.models import LoadedModel
from splitllm.runtime.protocol import encode_tensor
from splitllm.runtime.remote import RemoteSession
from splitllm.runtime.transport import WebSocketTransport
from splitllm.runtime.units import UnitStack

ALL_SERVER = "SSSSSS"  # the tiny llama's 6 units (embed, 4 blocks, head), all on the server


def ids(tokens: list[int]) -> torch.Tensor:
    return torch.tensor([tokens], dtype=torch.long)  # [1, T]


def kv_bytes(loaded: LoadedModel, tokens: int) -> int:
    """KV cache an all-server session reserves at a context length (whole blocks)."""
    stack = UnitStack(loaded.model)
    return sum(stack.kv_bytes(unit, kv_capacity(tokens)) for unit in range(stack.n_units))


def token_of(reply: dict[str, Any]) -> int:
    assert reply["type"] == "token", reply
    return int(reply["token"])


class Greedy:
    """An all-server session on a raw connection, driven one forward at a time."""

    def __init__(self, loaded: LoadedModel, client: RawClient, seed: int, prompt_tokens: int = 9,
                 new_tokens: int = 6) -> None:
        self.client = client
        self.prompt = random_prompt(random.Random(seed), prompt_tokens)
        self.want = list(generate_tokens(LocalPipe(loaded.model), self.prompt, new_tokens))
        self.session = client.open(ALL_SERVER)
        self.got: list[int] = []

    def prefill_frame(self) -> bytes:
        return encode_tensor({"type": "forward", "session": self.session, "seq": 1,
                              "units": [0, 6], "positions": [0, len(self.prompt)]},
                             ids(self.prompt))

    def send_prefill(self) -> None:
        self.client.send(self.prefill_frame())

    def decode(self) -> None:
        """One more token (the first comes from the prefill's reply)."""
        if not self.got:
            self.got.append(token_of(self.client.recv()[0]))
            return
        position = len(self.prompt) + len(self.got) - 1
        self.client.forward(self.session, (0, 6), (position, position + 1), ids(self.got[-1:]),
                            seq=len(self.got) + 1)
        self.got.append(token_of(self.client.recv()[0]))

    def finish(self) -> list[int]:
        while len(self.got) < len(self.want):
            self.decode()
        return self.got


class SocketClient:
    """A WebSocket client on a raw TCP socket (websockets' sans-I/O protocol) that reads only
    when asked: with a tiny receive buffer it stands for a client that stops reading."""

    def __init__(self, server: BackgroundServer, authorization: str | None = None,
                 receive_buffer_bytes: int | None = None) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if receive_buffer_bytes is not None:  # before connect, so the window starts small
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer_bytes)
        self.sock.settimeout(TIMEOUT_S)
        self.sock.connect((server.host, server.port))
        self.protocol = ClientProtocol(parse_uri(server.ws_url + "/v1/session"), max_size=None)
        request = self.protocol.connect()
        if authorization is not None:
            request.headers["Authorization"] = authorization
        self.protocol.send_request(request)
        self._flush()
        while not any(isinstance(event, Response) for event in self._read()):
            pass
        assert self.protocol.state is State.OPEN, self.protocol.handshake_exc

    def _flush(self) -> None:
        self.sock.sendall(b"".join(self.protocol.data_to_send()))

    def _read(self) -> list[Any]:
        data = self.sock.recv(65536)
        if data:
            self.protocol.receive_data(data)
        else:
            self.protocol.receive_eof()
        self._flush()  # the protocol's own answers: pongs, the closing handshake
        return list(self.protocol.events_received())

    def send_json(self, message: dict[str, Any]) -> None:
        self.protocol.send_text(json.dumps(message).encode())
        self._flush()

    def send_binary(self, data: bytes, fin: bool = True) -> None:
        self.protocol.send_binary(data, fin=fin)
        self._flush()

    def send_partial_binary(self, payload: bytes, sent_bytes: int) -> None:
        """Begin a binary frame carrying `payload`, but send only its first `sent_bytes` bytes."""
        self.protocol.send_binary(payload)
        self.sock.sendall(b"".join(self.protocol.data_to_send())[:sent_bytes])

    def send_continuation(self, data: bytes, fin: bool) -> None:
        self.protocol.send_continuation(data, fin=fin)
        self._flush()

    def close_code(self) -> int | None:
        """Read until the server closes the connection; the close code it sent (None: none)."""
        while self.protocol.state is not State.CLOSED:
            try:
                self._read()
            except OSError:  # reset: the server aborted instead of closing
                return None
            if self.protocol.close_rcvd is not None:
                return self.protocol.close_rcvd.code
        return None

    def messages(self) -> list[dict[str, Any]]:
        """The text messages received up to the server's close."""
        found: list[dict[str, Any]] = []
        while self.protocol.state is not State.CLOSED:
            for event in self._read():
                if isinstance(event, Frame) and event.opcode is Opcode.TEXT:
                    found.append(json.loads(event.data))
        return found

    def close(self) -> None:
        self.sock.close()


def closed_by_server(socks: list[socket.socket]) -> int:
    """How many of these sockets (which never get data) the server has closed or reset."""
    readable, _, _ = select.select(socks, [], [], 0)
    return len(readable)


class HealthySession:
    """A split generation started before an attack and finished after it."""

    def __init__(self, loaded: LoadedModel, server: BackgroundServer, token: str | None = None,
                 seed: int = 40, new_tokens: int = 6) -> None:
        stack = UnitStack(loaded.model)
        self.prompt = random_prompt(random.Random(seed), 9)
        self.want = list(generate_tokens(LocalPipe(loaded.model), self.prompt, new_tokens))
        self.transport = WebSocketTransport(server.ws_url, token=token)
        placement = Placement("CSSCSS")
        self.remote = RemoteSession(self.transport, placement, stack.n_units, timeout_s=TIMEOUT_S)
        self.pipe = SplitPipe(stack, placement, self.remote)
        self.got = [prefill(self.pipe, self.prompt)]

    def finish(self) -> list[int]:
        """Decode the rest and close: the tokens it generated."""
        for position in range(len(self.prompt), len(self.prompt) + len(self.want) - 1):
            self.got.append(decode_one_token(self.pipe, self.got[-1], position))
        self.remote.close()
        self.transport.close()
        return self.got
