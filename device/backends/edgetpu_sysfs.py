"""What sysfs says about Edge TPUs: which are plugged in, and how hot the PCIe ones are.

Pure reads of small text files under a root that callers pass (``/sys`` and
``/dev`` on a device, a temporary tree in the tests); nothing is opened that
libedgetpu would claim, so the running service, ``check-config`` and the
operator's diagnostics can all call these while the accelerator is in use.

- USB Accelerator: it enumerates as ``1a6e:089a`` (Global Unichip, no firmware)
  until libedgetpu uploads its firmware on first use, then as ``18d1:9302``
  (Google). Both ids must be allowed by udev and by the unit's device policy.
- PCIe/M.2 (the gasket + apex kernel modules): ``/sys/class/apex/apex_N`` and
  ``/dev/apex_N``. The apex driver reports ``temp`` in millidegrees Celsius and,
  when its ``temp_poll_interval`` is above 0, lowers the chip's clock at each
  ``trip_pointN_temp`` it passes (dynamic frequency scaling: 500 MHz, then /2,
  /4, /8). With polling off (the driver's default) it never throttles by itself,
  and the chip's own ``hw_temp_warn1/2`` alarms are the only protection.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

#: (vendor, product) -> what the USB Accelerator is doing
USB_IDS = {
    ("1a6e", "089a"): "no firmware yet (libedgetpu loads it on first use, then it re-enumerates as 18d1:9302)",
    ("18d1", "9302"): "firmware loaded",
}
#: the driver's default DFS trip points (apex_driver.c), for the docs and for trees that lack them
DEFAULT_TRIP_POINTS_C = (85.0, 90.0, 95.0)


@dataclass(frozen=True)
class EdgeTpuDevice:
    """One Edge TPU as the kernel sees it."""

    kind: str                  # "usb" or "pci"
    name: str                  # "2-1" (USB port path) or "apex_0"
    #: the device node libedgetpu opens: /dev/bus/usb/BBB/DDD or /dev/apex_N
    node: str
    #: USB: the vendor:product id now; PCIe: ""
    usb_id: str = ""
    state: str = ""
    #: USB link speed in Mbit/s (480: a USB 2 port, 5000 and more: USB 3); None for PCIe
    speed_mbps: int | None = None
    #: None: the node does not exist; else whether this process may open it read-write
    accessible: bool | None = None
    #: PCIe: the process that holds the device now (the gasket driver allows one), "PID (name)"; else ""
    owner: str = ""

    def describe(self) -> str:
        if self.kind == "usb":
            speed = f", {self.speed_mbps} Mbit/s" if self.speed_mbps else ""
            slow = " (a USB 2 port: use a USB 3 port or a powered USB 3 hub)" if self.speed_mbps == 480 else ""
            where = f"USB {self.name} {self.usb_id}: {self.state}{speed}{slow}"
        else:
            where = f"PCIe {self.name} ({self.state})" + (f", held by {self.owner}" if self.owner else "")
        if self.accessible is None:
            return f"{where}, but {self.node} does not exist"
        return where + ("" if self.accessible else f", but this process may not open {self.node} read-write "
                                                     f"(its group, and this user's groups)")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _int(path: Path) -> int | None:
    text = _read(path)
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def _node_state(node: Path) -> bool | None:
    if not node.exists():
        return None
    return os.access(node, os.R_OK | os.W_OK)


def _owner(apex: Path, proc: Path) -> str:
    """The gasket driver's ``device_owner`` (a PID) while ``is_device_owned`` is 1, with the process name."""
    if _int(apex / "is_device_owned") != 1:
        return ""
    pid = _int(apex / "device_owner")
    if pid is None:
        return "another process"
    name = _read(proc / str(pid) / "comm")
    return f"PID {pid}" + (f" ({name})" if name else "")


def find_edgetpus(sysfs: Path | str = "/sys", dev: Path | str = "/dev",
                  proc: Path | str = "/proc") -> tuple[EdgeTpuDevice, ...]:
    """USB Accelerators (either id) and PCIe Edge TPUs present now, USB first, each in name order."""
    sysfs, dev, proc = Path(sysfs), Path(dev), Path(proc)
    found = []
    usb = sysfs / "bus" / "usb" / "devices"
    for d in sorted(usb.iterdir()) if usb.is_dir() else ():
        ids = (_read(d / "idVendor"), _read(d / "idProduct"))
        if ids not in USB_IDS:
            continue
        bus, num = _int(d / "busnum"), _int(d / "devnum")
        node = dev / "bus" / "usb" / f"{bus or 0:03d}" / f"{num or 0:03d}"
        found.append(EdgeTpuDevice("usb", d.name, str(node), usb_id=":".join(ids), state=USB_IDS[ids],
                                   speed_mbps=_int(d / "speed"), accessible=_node_state(node)))
    apex = sysfs / "class" / "apex"
    for d in sorted(apex.iterdir()) if apex.is_dir() else ():
        node = dev / d.name
        status = _read(d / "status")   # the gasket driver's ALIVE / DEAD / LAMED
        found.append(EdgeTpuDevice("pci", d.name, str(node), state=f"driver status {status}" if status else
                                   "apex driver loaded", accessible=_node_state(node), owner=_owner(d, proc)))
    return tuple(found)


@dataclass(frozen=True)
class ApexThermal:
    """Temperature and throttling of one PCIe/M.2 Edge TPU (``/sys/class/apex/apex_N``)."""

    name: str
    #: the chip's temperature now, °C; None when the driver does not report it
    temp_c: float | None
    #: the driver's DFS trip points, °C, lowest first
    trip_points_c: tuple[float, ...]
    #: ms between the driver's temperature checks; 0: it never throttles; None: unknown (older driver)
    poll_interval_ms: int | None
    #: the chip's hardware alarms (hw_temp_warn1: interrupt, hw_temp_warn2: shutdown line), °C, and whether each is on
    hw_warn_c: tuple[tuple[float, bool], ...]

    @property
    def trip_points_passed(self) -> int:
        """How many trip points the temperature is at or above (0-3)."""
        if self.temp_c is None:
            return 0
        return sum(self.temp_c >= t for t in self.trip_points_c)

    @property
    def throttling(self) -> bool:
        """The driver has lowered the clock: polling is on (or unknown) and a trip point is passed."""
        return self.poll_interval_ms != 0 and self.trip_points_passed > 0

    @property
    def clock_divider(self) -> int:
        """1 at the full clock, then 2, 4, 8 as the driver passes each trip point."""
        return 1 << self.trip_points_passed if self.throttling else 1

    def as_status(self) -> dict:
        """A small JSON-able dict for the retained status (``status["edgetpu"]``)."""
        return {"name": self.name, "temp_c": self.temp_c, "throttling": self.throttling,
                "clock_divider": self.clock_divider, "trip_points_c": list(self.trip_points_c),
                "dfs": None if self.poll_interval_ms is None else self.poll_interval_ms > 0}


def _millic(path: Path) -> float | None:
    value = _int(path)
    return None if value is None else value / 1000.0


def read_apex_thermal(sysfs: Path | str = "/sys") -> tuple[ApexThermal, ...]:
    """One record per ``apex_N`` under ``sysfs/class/apex``; () where there is none (USB, no PCIe card)."""
    apex = Path(sysfs) / "class" / "apex"
    out = []
    for d in sorted(apex.iterdir()) if apex.is_dir() else ():
        trips = tuple(t for t in (_millic(d / f"trip_point{i}_temp") for i in range(3)) if t is not None)
        warns = []
        for i in (1, 2):
            limit = _millic(d / f"hw_temp_warn{i}")
            if limit is not None:
                warns.append((limit, _int(d / f"hw_temp_warn{i}_en") == 1))
        out.append(ApexThermal(name=d.name, temp_c=_millic(d / "temp"), trip_points_c=tuple(sorted(trips)),
                               poll_interval_ms=_int(d / "temp_poll_interval"), hw_warn_c=tuple(warns)))
    return tuple(out)
