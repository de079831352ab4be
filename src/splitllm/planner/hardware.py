"""Device and link profiles: presets (with their sources), roofline times, JSON profiles."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from splitllm.errors import UserError
from splitllm.planner.network import Amount, Link


@dataclass(frozen=True, kw_only=True)
class DeviceProfile:
    """A device: roofline peaks, memory for a model, and the share of peak it reaches."""

    name: str
    peak_flops_per_s: float
    mem_bandwidth_bytes_per_s: float
    mem_capacity_bytes: float
    efficiency: float = 0.5

    def time_s(self, flops: Amount, mem_bytes: Amount) -> Amount:
        """Roofline: compute time or memory time, whichever is larger, over efficiency.

        Elementwise on arrays (one unit's decode steps at once); plain floats stay plain (the
        simulator's batched server calls this per step).
        """
        compute_s = flops / self.peak_flops_per_s
        memory_s = mem_bytes / self.mem_bandwidth_bytes_per_s
        if isinstance(compute_s, np.ndarray):
            return np.maximum(compute_s, memory_s) / self.efficiency
        return max(compute_s, memory_s) / self.efficiency


GB = 1e9
MBIT = 1e6 / 8

DEVICE_PRESETS: dict[str, DeviceProfile] = {
    # Snapdragon 8 Gen 2 class phone: Adreno 740 ~ 2 TFLOP/s fp16 usable, LPDDR5X 4x16-bit
    # @ 4.2 GHz = 67 GB/s; an app can hold ~3 GB of model on an 8-12 GB phone.
    "phone": DeviceProfile(name="phone", peak_flops_per_s=2.0e12,
                           mem_bandwidth_bytes_per_s=67 * GB, mem_capacity_bytes=3 * GB,
                           efficiency=0.3),
    # Apple M2 laptop: GPU 3.6 TFLOP/s fp32 (Apple spec), 100 GB/s unified memory, 16 GB.
    "laptop": DeviceProfile(name="laptop", peak_flops_per_s=3.6e12,
                            mem_bandwidth_bytes_per_s=100 * GB, mem_capacity_bytes=12 * GB,
                            efficiency=0.4),
    # NVIDIA Jetson Orin Nano 8 GB: 1024 CUDA cores @ 625 MHz ~ 2.6 TFLOP/s fp16, LPDDR5 68 GB/s.
    "edge-box": DeviceProfile(name="edge-box", peak_flops_per_s=2.6e12,
                              mem_bandwidth_bytes_per_s=68 * GB, mem_capacity_bytes=6 * GB,
                              efficiency=0.4),
    # NVIDIA A100 80 GB SXM: 312 TFLOP/s bf16 dense, HBM2e 2.039 TB/s (NVIDIA datasheet).
    "datacenter-gpu": DeviceProfile(name="datacenter-gpu", peak_flops_per_s=312e12,
                                    mem_bandwidth_bytes_per_s=2039 * GB,
                                    mem_capacity_bytes=80 * GB, efficiency=0.5),
}

LINK_PRESETS: dict[str, Link] = {
    # LTE medians (Opensignal mobile reports): ~25 Mbit/s down, ~8 Mbit/s up, ~50 ms RTT.
    "4g": Link(name="4g", uplink_bytes_per_s=8 * MBIT,
               downlink_bytes_per_s=25 * MBIT, rtt_s=0.050),
    # 5G mid-band medians: ~150 Mbit/s down, ~20 Mbit/s up, ~25 ms RTT.
    "5g": Link(name="5g", uplink_bytes_per_s=20 * MBIT,
               downlink_bytes_per_s=150 * MBIT, rtt_s=0.025),
    # Home Wi-Fi 5 to a nearby edge server: ~100 Mbit/s up, ~200 Mbit/s down, ~5 ms RTT.
    "wifi": Link(name="wifi", uplink_bytes_per_s=100 * MBIT,
                 downlink_bytes_per_s=200 * MBIT, rtt_s=0.005),
    # Gigabit Ethernet within a building: 1 Gbit/s each way, ~0.5 ms RTT.
    "lan": Link(name="lan", uplink_bytes_per_s=1000 * MBIT,
                downlink_bytes_per_s=1000 * MBIT, rtt_s=0.0005),
}


def _preset(kind: str, table: dict[str, Any], name: str) -> Any:
    if name in table:
        return table[name]
    path = Path(name)
    if path.suffix == ".json":
        if not path.is_file():
            raise UserError(f"{kind} profile {name}: no such file")
        return load_profile(path)
    raise UserError(f"unknown {kind} {name!r}: use one of {', '.join(table)} or a .json profile")


def device_preset(name: str) -> DeviceProfile:
    """A named device preset, or a device profile JSON file."""
    profile = _preset("device", DEVICE_PRESETS, name)
    if not isinstance(profile, DeviceProfile):
        raise UserError(f"{name}: not a device profile")
    return profile


def link_preset(name: str) -> Link:
    """A named link preset, or a link profile JSON file."""
    profile = _preset("link", LINK_PRESETS, name)
    if not isinstance(profile, Link):
        raise UserError(f"{name}: not a link profile")
    return profile


def save_profile(profile: DeviceProfile | Link, path: Path) -> None:
    """Write a device or link profile as JSON (`kind` tells which)."""
    kind = "device" if isinstance(profile, DeviceProfile) else "link"
    path.write_text(json.dumps({"kind": kind, **asdict(profile)}, indent=2) + "\n")


def load_profile(path: Path) -> DeviceProfile | Link:
    """Read a profile written by `save_profile` (or by hand, from measurements)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"profile {path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise UserError(f"profile {path}: expected a JSON object")
    kind = data.pop("kind", None)
    cls: type[DeviceProfile] | type[Link]
    cls = {"device": DeviceProfile, "link": Link}.get(kind)  # type: ignore[assignment]
    if cls is None:
        raise UserError(f"profile {path}: field 'kind' must be 'device' or 'link'")
    data.setdefault("name", path.stem)
    fields = set(cls.__dataclass_fields__)
    for key in set(data) - fields:
        raise UserError(f"profile {path}: unknown field {key!r}")
    for key in fields - set(data) - {"efficiency", "visit_s"}:
        raise UserError(f"profile {path}: missing field {key!r}")
    for key, value in data.items():
        if key == "name":
            continue
        number = isinstance(value, int | float) and not isinstance(value, bool)
        zero_ok = key == "visit_s"  # a cost that may be nothing
        if not number or not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
            raise UserError(f"profile {path}: field {key!r} must be a positive number")
    return cls(**data)
