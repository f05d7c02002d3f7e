"""OUT/run.toml: the configuration a run was given, written by every run (the main command and the
sweep) and read back by ``mosaic-export --config OUT/run.toml``, which runs it again to the same plan
and the same bytes. The file is RunConfig as it is, field for field: nested settings are tables,
and the fields that are None are listed under ``unset`` (TOML has no null).
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import replace
from pathlib import Path

from mosaic_export.core.errors import UserError
from mosaic_export.run.config import RunConfig

RUN_FILE = "run.toml"
FORMAT = "mosaic-export run"
VERSION = 1


def _value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str | Path):
        return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} to TOML")


def _flatten(obj, prefix: str, tables: dict[str, dict], unset: list[str]) -> None:
    """Each dataclass (and the budgets dict) a table named by its path; None values to ``unset``."""
    table = tables.setdefault(prefix, {})
    items = obj.items() if isinstance(obj, dict) else ((f.name, getattr(obj, f.name))
                                                        for f in dataclasses.fields(obj))
    for name, value in items:
        path = f"{prefix}.{name}" if prefix else name
        if value is None:
            unset.append(path)
        elif dataclasses.is_dataclass(value) or isinstance(value, dict):
            _flatten(value, path, tables, unset)
        else:
            table[name] = value


def _absolute(name: str | None) -> str | None:
    """A path that exists, made absolute (so that the file runs again from any folder); a name (a
    built-in profile or text, ``self``) as it is. Comma-separated sources each."""
    if name is None:
        return None
    return ",".join(str(Path(part).resolve()) if Path(part).exists() else part for part in name.split(","))


def _with_absolute_paths(config: RunConfig) -> RunConfig:
    settings = config.settings
    calibration = replace(settings.calibration, source=_absolute(settings.calibration.source))
    recover = config.recover and replace(config.recover, text=_absolute(config.recover.text))
    return replace(config, model=_absolute(config.model), profile=_absolute(config.profile),
                   plan=_absolute(config.plan), eval_text=_absolute(config.eval_text),
                   settings=replace(settings, calibration=calibration), recover=recover)


def dumps(config: RunConfig, extra: dict | None = None) -> str:
    """The TOML text of a run's configuration, its input paths made absolute; ``extra``: a [sweep]
    table (its removal targets)."""
    config = _with_absolute_paths(config)
    tables: dict[str, dict] = {}
    unset: list[str] = []
    _flatten(config, "", tables, unset)
    lines = [f"# {FORMAT}: `mosaic-export {'sweep ' if extra else ''}--config run.toml --out NEW` "
             "runs it again", f"format = {_value(FORMAT)}", f"version = {VERSION}",
             f"unset = {_value(unset)}"]
    lines += [f"{k} = {_value(v)}" for k, v in tables.pop("").items()]
    for name, table in [*tables.items(), *((("sweep", extra),) if extra else ())]:
        lines += ["", f"[{name}]", *(f"{k} = {_value(v)}" for k, v in table.items())]
    return "\n".join(lines) + "\n"


def write(folder: Path, config: RunConfig, extra: dict | None = None) -> None:
    (folder / RUN_FILE).write_text(dumps(config, extra), encoding="utf-8")


def _build(cls, data: dict, unset: set[str], prefix: str, where: str):
    """An instance of the dataclass ``cls`` from its table; every key must be one of its fields."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise UserError(f"{where}: unknown keys {', '.join(prefix + k for k in unknown)}")
    values = {}
    for f in dataclasses.fields(cls):
        path = prefix + f.name
        if path in unset:
            values[f.name] = None
        elif f.name in data:
            values[f.name] = _typed(hints[f.name], data[f.name], unset, path + ".", where)
    return cls(**values)


def _typed(hint, value, unset: set[str], prefix: str, where: str):
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    kind = next((o for o in options if o is not type(None)), hint)
    if dataclasses.is_dataclass(kind):
        return _build(kind, value, unset, prefix, where)
    origin = typing.get_origin(kind) or kind
    if origin is tuple:
        return tuple(value)
    if origin is Path:
        return Path(value)
    if origin is float and isinstance(value, int):
        return float(value)
    return value


def load(path: Path) -> tuple[RunConfig, dict | None]:
    """The RunConfig a run.toml holds, and its [sweep] table (None for a main-command run)."""
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise UserError(f"--config {path}: cannot be read: {e}") from None
    if data.pop("format", None) != FORMAT or data.pop("version", None) != VERSION:
        raise UserError(f"--config {path}: not a {FORMAT} file of version {VERSION} (OUT/{RUN_FILE})")
    unset = set(data.pop("unset", []))
    sweep = data.pop("sweep", None)
    try:
        return _build(RunConfig, data, unset, "", f"--config {path}"), sweep
    except (TypeError, ValueError) as e:
        raise UserError(f"--config {path}: {e}") from None
