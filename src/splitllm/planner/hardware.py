"""Device and link profiles: presets (with their sources), roofline times, JSON profiles."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from splitllm.errors import UserError


@dataclass(frozen=True)
class DeviceProfile:
    """A device: roofline peaks, memory for a model, and the share of peak it reaches."""

    name: str
    peak_flops_per_s: float
    mem_bandwidth_bytes_per_s: float
    mem_capacity_bytes: float
    efficiency: float = 0.5

    def time_s(self, flops: float, mem_bytes: float) -> float:
        """Roofline: compute time or memory time, whichever is larger, over efficiency."""
        return max(flops / self.peak_flops_per_s, mem_bytes / self.mem_bandwidth_bytes_per_s) / (
            self.efficiency
        )


@dataclass(frozen=True)
class LinkProfile:
    """A network path between a client and the server."""

    name: str
    uplink_bytes_per_s: float
    downlink_bytes_per_s: float
    rtt_s: float


GB = 1e9
MBIT = 1e6 / 8

DEVICE_PRESETS: dict[str, DeviceProfile] = {
    # Snapdragon 8 Gen 2 class phone: Adreno 740 ~ 2 TFLOP/s fp16 usable, LPDDR5X 4x16-bit
    # @ 4.2 GHz = 67 GB/s; an app can hold ~3 GB of model on an 8-12 GB phone.
    "phone": DeviceProfile("phone", 2.0e12, 67 * GB, 3 * GB, 0.3),
    # Apple M2 laptop: GPU 3.6 TFLOP/s fp32 (Apple spec), 100 GB/s unified memory, 16 GB.
    "laptop": DeviceProfile("laptop", 3.6e12, 100 * GB, 12 * GB, 0.4),
    # NVIDIA Jetson Orin Nano 8 GB: 1024 CUDA cores @ 625 MHz ~ 2.6 TFLOP/s fp16, LPDDR5 68 GB/s.
    "edge-box": DeviceProfile("edge-box", 2.6e12, 68 * GB, 6 * GB, 0.4),
    # NVIDIA A100 80 GB SXM: 312 TFLOP/s bf16 dense, HBM2e 2.039 TB/s (NVIDIA datasheet).
    "datacenter-gpu": DeviceProfile("datacenter-gpu", 312e12, 2039 * GB, 80 * GB, 0.5),
}

LINK_PRESETS: dict[str, LinkProfile] = {
    # LTE medians (Opensignal mobile reports): ~25 Mbit/s down, ~8 Mbit/s up, ~50 ms RTT.
    "4g": LinkProfile("4g", 8 * MBIT, 25 * MBIT, 0.050),
    # 5G mid-band medians: ~150 Mbit/s down, ~20 Mbit/s up, ~25 ms RTT.
    "5g": LinkProfile("5g", 20 * MBIT, 150 * MBIT, 0.025),
    # Home Wi-Fi 5 to a nearby edge server: ~100 Mbit/s up, ~200 Mbit/s down, ~5 ms RTT.
    "wifi": LinkProfile("wifi", 100 * MBIT, 200 * MBIT, 0.005),
    # Gigabit Ethernet within a building: 1 Gbit/s each way, ~0.5 ms RTT.
    "lan": LinkProfile("lan", 1000 * MBIT, 1000 * MBIT, 0.0005),
}


def _preset(kind: str, table: dict[str, Any], name: str) -> Any:
    if name in table:
        return table[name]
    path = Path(name)
    if path.suffix == ".json" and path.is_file():
        return load_profile(path)
    raise UserError(f"unknown {kind} {name!r}: use one of {', '.join(table)} or a .json profile")


def device_preset(name: str) -> DeviceProfile:
    """A named device preset, or a device profile JSON file."""
    profile = _preset("device", DEVICE_PRESETS, name)
    if not isinstance(profile, DeviceProfile):
        raise UserError(f"{name}: not a device profile")
    return profile


def link_preset(name: str) -> LinkProfile:
    """A named link preset, or a link profile JSON file."""
    profile = _preset("link", LINK_PRESETS, name)
    if not isinstance(profile, LinkProfile):
        raise UserError(f"{name}: not a link profile")
    return profile


def save_profile(profile: DeviceProfile | LinkProfile, path: Path) -> None:
    """Write a device or link profile as JSON (`kind` tells which)."""
    kind = "device" if isinstance(profile, DeviceProfile) else "link"
    path.write_text(json.dumps({"kind": kind, **asdict(profile)}, indent=2) + "\n")


def load_profile(path: Path) -> DeviceProfile | LinkProfile:
    """Read a profile written by `save_profile` (or by hand, from measurements)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"profile {path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise UserError(f"profile {path}: expected a JSON object")
    kind = data.pop("kind", None)
    cls: type[DeviceProfile] | type[LinkProfile]
    cls = {"device": DeviceProfile, "link": LinkProfile}.get(kind)  # type: ignore[assignment]
    if cls is None:
        raise UserError(f"profile {path}: field 'kind' must be 'device' or 'link'")
    data.setdefault("name", path.stem)
    fields = set(cls.__dataclass_fields__)
    for key in set(data) - fields:
        raise UserError(f"profile {path}: unknown field {key!r}")
    for key in fields - set(data) - {"efficiency"}:
        raise UserError(f"profile {path}: missing field {key!r}")
    for key, value in data.items():
        if key == "name":
            continue
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not number or not math.isfinite(value) or value <= 0:
            raise UserError(f"profile {path}: field {key!r} must be a positive number")
    return cls(**data)
