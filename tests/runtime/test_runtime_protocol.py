"""The wire format: tensors survive a round trip bit for bit; bad frames get precise errors."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from splitllm.runtime import protocol as wire


@pytest.mark.parametrize("dtype", list(wire.ALL_DTYPES.values()))
def test_tensor_frames_round_trip_exactly(dtype: torch.dtype) -> None:
    source = (torch.randn(1, 3, 8) * 100).to(dtype)
    frame = wire.encode_tensor({"type": "forward", "session": "s", "seq": 1, "units": [1, 3],
                                "positions": [4, 7]}, source)
    header, payload = wire.parse_binary(frame)
    assert isinstance(header, wire.ForwardHeader)
    assert header.positions == (4, 7) and header.shape == [1, 3, 8]
    decoded = wire.decode_tensor(header, payload)
    assert decoded.dtype == dtype and torch.equal(decoded, source)


def test_frame_layout_is_length_header_payload() -> None:
    frame = wire.encode_tensor({"type": "forward", "session": "s", "seq": 0, "units": [0, 2],
                                "positions": [0, 2]}, torch.tensor([[7, 9]], dtype=torch.int32))
    (length,) = struct.unpack_from("<I", frame)
    header = json.loads(frame[4:4 + length])
    assert header["dtype"] == "int32" and header["shape"] == [1, 2]
    assert frame[4 + length:] == struct.pack("<ii", 7, 9)  # little-endian, C order


def forward_frame(payload: bytes = b"", **changes: object) -> bytes:
    header = {"type": "forward", "session": "s", "seq": 0, "units": [1, 2],
              "positions": [0, 1], "dtype": "float32", "shape": [1, 1, 2], **changes}
    return wire.encode_frame(header, payload)


@pytest.mark.parametrize(("frame", "code", "fragment"), [
    (b"\x01", "bad_frame", "shorter"),
    (struct.pack("<I", 10**6) + b"{}", "bad_frame", "header length"),
    (struct.pack("<I", 3) + b"abc", "bad_frame", "not UTF-8 JSON"),
    (struct.pack("<I", 2) + b"[]", "bad_frame", "JSON object"),
    (struct.pack("<I", 60_000) + b"[" * 60_000, "bad_frame", "not UTF-8 JSON"),  # too deep
    (wire.encode_frame({"type": "nonsense"}), "bad_message", "unknown message type"),
    (forward_frame(bytes(4)), "bad_shape", "need 8"),
    (forward_frame(bytes(8), dtype="float64"), "bad_dtype", "dtype 'float64'"),
    (forward_frame(bytes(8), shape=[1, -1, -8]), "bad_shape", "negative"),
    (forward_frame(bytes(8), pickle=True), "bad_message", "Extra inputs"),
    (forward_frame(bytes(8), seq=-1), "bad_message", "seq"),
])
def test_bad_binary_frames_are_rejected(frame: bytes, code: str, fragment: str) -> None:
    with pytest.raises(wire.ProtocolError, match=fragment) as info:
        wire.parse_binary(frame)
    assert info.value.code == code


@pytest.mark.parametrize(("text", "code"), [
    ("not json", "bad_frame"),
    ("[1, 2]", "bad_frame"),
    ("[" * 60_000, "bad_frame"),  # nesting past the recursion limit
    ('{"type": "forward"}', "bad_message"),  # tensors only travel in binary frames
    ('{"type": "open"}', "bad_message"),  # no placement
    ('{"type": "open", "placement": "CS", "sampling": {"top_p": 0}}', "bad_message"),
])
def test_bad_text_frames_are_rejected(text: str, code: str) -> None:
    with pytest.raises(wire.ProtocolError) as info:
        wire.parse_text(text)
    assert info.value.code == code


def test_wire_dtype_names() -> None:
    assert wire.wire_dtype_name("bf16") == "bfloat16"
    assert wire.wire_dtype_name("FP16") == "float16"
    with pytest.raises(wire.ProtocolError):
        wire.wire_dtype_name("int8")
