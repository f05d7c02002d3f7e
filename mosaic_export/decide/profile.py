"""Hardware profiles: device facts, the runtime a device runs, and the budgets to meet.

A profile is a small TOML file. Built-ins live in ``profiles/`` (installed as
``mosaic_export/profiles/*.toml``); a user passes their own file by path. Loading checks every
key: an unknown key, a missing key, a wrong type or a wrong unit fails with the file, the key and
what was expected.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

from mosaic_export import targets
from mosaic_export.core.errors import UserError
from mosaic_export.core.units import format_bytes, parse_bandwidth, parse_bytes, parse_flops, parse_seconds
from mosaic_export.decide.costmodel import Calibration, Format


@dataclass(frozen=True)
class DeviceSpec:
    memory_bytes: int  # memory the model may share with the OS and the app
    memory_bandwidth: float  # bytes/s, peak
    compute_flops: float  # FLOP/s, peak dense, at the runtime's precision
    threads: int


@dataclass(frozen=True)
class RuntimeSpec:
    """The runtime a device runs: a registered target and its type, under the key the target
    names (``quant`` for GGUF, ``dtype`` for ONNX), and the target's other keys."""

    target: str  # a registered target (targets.names())
    quant: str | None = None  # GGUF type, e.g. "Q4_K_M"
    dtype: str | None = None  # ONNX dtype
    execution_provider: str | None = None  # ONNX Runtime provider

    @property
    def format(self) -> Format:
        """The target and its type, as the cost model prices it."""
        return Format(self.target, getattr(self, targets.get(self.target).option))


@dataclass(frozen=True)
class Budgets:
    max_memory_bytes: int | None  # resident memory, KV cache at `context` included
    context: int  # tokens of context the memory budget must hold
    min_tokens_per_s: float | None  # decode speed
    max_ttft_s: float | None  # time to first token
    # Budgets given relative to the dense model ("0.9x"): (name, factor) pairs, resolved into the
    # absolute fields above by Profile.resolve_relative once the dense model is priced.
    relative: dict[str, float] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    device: DeviceSpec
    runtime: RuntimeSpec
    budgets: Budgets
    source: str  # the file it came from
    # True for a profile `mosaic-export profile detect` wrote for this machine: its predictions
    # are calibrated here and the measured figures are checked against its budgets.
    local: bool = False
    calibration: dict[str, Calibration] = dataclasses.field(default_factory=dict)  # Format.key ->

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def calibration_for(self, fmt: Format) -> Calibration:
        """Measured efficiency terms for the format if detect measured it, else nominal ones
        from the device figures."""
        return self.calibration.get(fmt.key) or Calibration.nominal(
            fmt.target, self.device.memory_bandwidth, self.device.compute_flops)

    def calibration_near(self, fmt: Format) -> Calibration:
        """The format's calibration when `profile detect` measured it; else the terms measured for
        another type of the same target (the profile's own type first), labelled as transferred: one
        machine's efficiencies move less between types than datasheet fractions miss by; else nominal."""
        own = self.calibration.get(fmt.key)
        if own is not None:
            return own
        first = self.runtime.format.key
        for key in sorted(self.calibration, key=lambda k: k != first):
            if key.startswith(f"{fmt.target}:"):
                return replace(self.calibration[key], basis=f"transferred from {key}")
        return self.calibration_for(fmt)

    def with_budgets(self, max_memory: str | None = None, min_tokens_per_s: str | float | None = None,
                     context: int | None = None, max_ttft: str | None = None) -> Profile:
        """Budgets overridden from the command line, checked like the file's. Memory, tokens/s and
        TTFT may be relative to the dense model ("0.9x"): see resolve_relative."""
        b, new = self.budgets, {}
        relative = dict(b.relative)
        given = {"max_memory": (max_memory, "--max-memory", "max_memory_bytes", parse_bytes),
                 "min_tokens_per_s": (min_tokens_per_s, "--min-tokens-per-s", "min_tokens_per_s",
                                      _tokens_per_s),
                 "max_ttft": (max_ttft, "--max-ttft", "max_ttft_s", parse_seconds)}
        for name, (value, option, field, parse) in given.items():
            if value is None:
                continue
            factor = relative_factor(value, option)
            if factor is not None:
                relative[name] = factor
                new[field] = None
            else:
                relative.pop(name, None)
                new[field] = _positive(parse(value), option, value)
        if context is not None:
            new["context"] = _positive(context, "--context", context)
        b = dataclasses.replace(b, **new, relative=dict(sorted(relative.items())))
        self._check_memory(b)
        return dataclasses.replace(self, budgets=b)

    def resolve_relative(self, dense_memory_bytes: float, dense_tokens_per_s: float,
                         dense_ttft_s: float) -> Profile:
        """Relative budgets as absolute ones: the factor times the dense model's figure (predicted
        in the target's format on this profile)."""
        b = self.budgets
        dense = {"max_memory": ("max_memory_bytes", dense_memory_bytes),
                 "min_tokens_per_s": ("min_tokens_per_s", dense_tokens_per_s),
                 "max_ttft": ("max_ttft_s", dense_ttft_s)}
        new = {dense[name][0]: factor * dense[name][1] for name, factor in b.relative.items()}
        if "max_memory_bytes" in new:
            new["max_memory_bytes"] = int(new["max_memory_bytes"])
        b = dataclasses.replace(b, **new)
        self._check_memory(b)
        return dataclasses.replace(self, budgets=b)

    def _check_memory(self, b: Budgets) -> None:
        if b.max_memory_bytes is not None and b.max_memory_bytes > self.device.memory_bytes:
            raise UserError(f"contradictory budgets: max memory {format_bytes(b.max_memory_bytes)} "
                            f"exceeds the device's memory {format_bytes(self.device.memory_bytes)} "
                            f"(profile {self.name})")


def relative_factor(value, option: str) -> float | None:
    """The factor of a relative budget ("0.9x" -> 0.9), None for an absolute one."""
    if not isinstance(value, str) or not value.strip().endswith("x"):
        return None
    text = value.strip()[:-1]
    try:
        factor = float(text)
    except ValueError:
        raise UserError(f"{option}: expected a factor of the dense model's figure such as 0.9x, "
                        f"got {value!r}") from None
    if not factor > 0:
        raise UserError(f"{option}: expected a positive factor, got {value!r}")
    return factor


def _tokens_per_s(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise UserError(f"--min-tokens-per-s: expected tokens/s (60) or a factor of the dense "
                        f"model's (1.15x), got {value!r}") from None


def _positive(value, option: str, given):
    if not value > 0:
        raise UserError(f"{option}: expected a positive value, got {given!r}")
    return value


# --- loading -------------------------------------------------------------------------------------

_SCHEMA: dict[str, dict[str, bool]] = {  # section -> key -> required
    "": {"name": True, "description": False, "local": False},
    "device": {"memory": True, "memory_bandwidth": True, "compute": True, "threads": True},
    "runtime": {"target": True, "quant": False, "dtype": False, "execution_provider": False},
    "budgets": {"max_memory": False, "context": True, "min_tokens_per_s": False, "max_ttft": False},
}


class _Reader:
    """Reads keys from one table, naming the file and the key in every error."""

    def __init__(self, source: str, section: str, table: Any):
        self.source, self.section = source, section
        where = f"[{section}]" if section else "the top level"
        if not isinstance(table, dict):
            raise UserError(f"{source}: expected a table {where}, got {type(table).__name__}")
        allowed = _SCHEMA[section]
        for key in table:
            if key not in allowed and not (section == "" and key in (*_SCHEMA, "calibration")):
                raise UserError(f"{source}: unknown key '{self._name(key)}' "
                                f"(expected one of: {', '.join(allowed)})")
        for key, required in allowed.items():
            if required and key not in table:
                raise UserError(f"{source}: missing key '{self._name(key)}'")
        self.table = table

    def _name(self, key: str) -> str:
        return f"{self.section}.{key}" if self.section else key

    def get(self, key: str, kind: type | tuple[type, ...], parse=None, choices=None):
        if key not in self.table:
            return None
        value = self.table[key]
        if isinstance(value, bool) or not isinstance(value, kind):
            names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise UserError(f"{self.source}: key '{self._name(key)}': expected {names}, "
                            f"got {value!r}")
        if choices is not None and value not in choices:
            raise UserError(f"{self.source}: key '{self._name(key)}': expected one of "
                            f"{', '.join(choices)}, got {value!r}")
        if parse is not None:
            try:
                value = parse(value)
            except UserError as e:
                raise UserError(f"{self.source}: key '{self._name(key)}': {e}") from None
        if isinstance(value, (int, float)) and value <= 0:
            raise UserError(f"{self.source}: key '{self._name(key)}': expected a positive value, "
                            f"got {self.table[key]!r}")
        return value


def parse_profile(data: dict[str, Any], source: str) -> Profile:
    top = _Reader(source, "", data)
    for section in ("device", "runtime", "budgets"):
        if section not in data:
            raise UserError(f"{source}: missing table [{section}]")
    dev = _Reader(source, "device", data["device"])
    rt = _Reader(source, "runtime", data["runtime"])
    bud = _Reader(source, "budgets", data["budgets"])

    runtime = _runtime(rt, source)

    budgets = Budgets(
        max_memory_bytes=bud.get("max_memory", str, parse=parse_bytes),
        context=bud.get("context", int),
        min_tokens_per_s=bud.get("min_tokens_per_s", (int, float)),
        max_ttft_s=bud.get("max_ttft", str, parse=parse_seconds),
    )
    device = DeviceSpec(
        memory_bytes=dev.get("memory", str, parse=parse_bytes),
        memory_bandwidth=dev.get("memory_bandwidth", str, parse=parse_bandwidth),
        compute_flops=dev.get("compute", str, parse=parse_flops),
        threads=dev.get("threads", int),
    )
    if budgets.max_memory_bytes is not None and budgets.max_memory_bytes > device.memory_bytes:
        raise UserError(f"{source}: budgets.max_memory ({data['budgets']['max_memory']}) exceeds "
                        f"device.memory ({data['device']['memory']})")
    local = data.get("local", False)
    if not isinstance(local, bool):
        raise UserError(f"{source}: key 'local': expected true or false, got {local!r}")
    return Profile(
        name=top.get("name", str),
        description=top.get("description", str) or "",
        device=device, runtime=runtime, budgets=budgets, source=source, local=local,
        calibration=_calibration(data.get("calibration", {}), source),
    )


def _runtime(rt: _Reader, source: str) -> RuntimeSpec:
    """[runtime]: a registered target, its type under the target's key (one of its types), and
    only the other keys that target takes."""
    target = targets.get(rt.get("target", str, choices=targets.names()))
    values = {}
    for key in _SCHEMA["runtime"]:
        if key == "target" or key not in rt.table:
            continue
        if key != target.option and key not in target.profile_keys:
            raise UserError(f"{source}: runtime.{key} is not a key of target '{target.name}' "
                            f"(it takes runtime.{target.option})")
        choices = target.types if key == target.option else target.profile_keys[key]
        values[key] = rt.get(key, str, choices=choices)
    if target.option not in values:
        raise UserError(f"{source}: missing key 'runtime.{target.option}' (target '{target.name}' "
                        f"needs a {target.noun}: {', '.join(target.types)})")
    return RuntimeSpec(target=target.name, **values)


# [calibration."gguf:Q8_0"] tables, written by `mosaic-export profile detect`.
_CALIBRATION_KEYS = {"decode_overhead": parse_seconds, "bandwidth": parse_bandwidth,
                     "prefill_overhead": parse_seconds, "prefill_compute": parse_flops,
                     "memory_base": parse_bytes, "memory_per_weight_byte": float}


def _calibration(table: Any, source: str) -> dict[str, Calibration]:
    if not isinstance(table, dict):
        raise UserError(f"{source}: expected a table [calibration]")
    out = {}
    for key, entry in table.items():
        target, _, name = key.partition(":")
        if target not in targets.names() or name not in targets.get(target).types:
            raise UserError(f"{source}: [calibration.\"{key}\"]: expected a format such as "
                            "\"gguf:Q8_0\" or \"onnx:fp32\"")
        if not isinstance(entry, dict) or set(entry) != set(_CALIBRATION_KEYS):
            raise UserError(f"{source}: [calibration.\"{key}\"] needs exactly the keys "
                            f"{', '.join(_CALIBRATION_KEYS)}")
        try:
            v = {k: parse(entry[k]) for k, parse in _CALIBRATION_KEYS.items()}
        except (UserError, TypeError, ValueError) as e:
            raise UserError(f"{source}: [calibration.\"{key}\"]: {e}") from None
        if v["bandwidth"] <= 0 or v["prefill_compute"] <= 0 or v["memory_per_weight_byte"] <= 0:
            raise UserError(f"{source}: [calibration.\"{key}\"]: rates must be positive")
        out[key] = Calibration(v["decode_overhead"], v["bandwidth"], v["prefill_overhead"],
                               v["prefill_compute"], v["memory_base"], v["memory_per_weight_byte"],
                               "measured")
    return out


def builtin_names() -> list[str]:
    folder = resources.files("mosaic_export.profiles")
    return sorted(p.name[: -len(".toml")] for p in folder.iterdir() if p.name.endswith(".toml"))


def load_profile(name_or_path: str) -> Profile:
    """A built-in profile by name (``jetson-orin``) or a user's TOML file by path."""
    path = Path(name_or_path)
    if name_or_path.endswith(".toml") or path.exists() or "/" in name_or_path:
        if not path.is_file():
            raise UserError(f"profile file not found: {name_or_path}")
        text, source = _read_text(path), str(path)
    elif name_or_path in builtin_names():
        res = resources.files("mosaic_export.profiles") / f"{name_or_path}.toml"
        text, source = res.read_text(encoding="utf-8"), f"built-in profile '{name_or_path}'"
    else:
        raise UserError(f"unknown profile '{name_or_path}': built-in profiles are "
                        f"{', '.join(builtin_names())}, or pass a .toml file by path")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{source}: not valid TOML: {e}") from None
    return parse_profile(data, source)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read profile {path}: {e}") from None
