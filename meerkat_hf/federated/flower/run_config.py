"""From Flower's run config / node config to a `FederationConfig` and the Flower-only options.

A Flower app's ``[tool.flwr.app.config]`` (and ``flwr run --run-config``) is a flat mapping of
``int | float | bool | str``; nested TOML tables arrive flattened with dots
(``[tool.flwr.app.config.mask] density = 1e-3`` -> ``"mask.density"``). We read it as:

* ``config-file``: optional YAML `FederationConfig`, relative to the app directory, for keys
  the app does not declare (Flower only lets ``--run-config`` override declared keys, and
  every declared key is applied over the file);
* ``flower.*``: options of the Flower adapter only (`FlowerOptions`);
* everything else: `FederationConfig` keys, ``-`` or ``_`` alike (``local-steps`` =
  ``local_steps``, ``model.model-name-or-path``), applied over the YAML file. TOML has no
  null: ``""`` unsets an optional field (``mask.path = ""``). In the few list/mapping fields a
  string that starts with ``[`` or ``{`` is parsed as YAML (``task.verbalizer =
  '[" bad", " good"]'``); a prompt like ``"{text}"`` stays a string.

Validation is `FederationConfig`'s: an unknown key is an error that lists the known ones.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..federation_config import ConfigError, FederationConfig, canonical_keys
from ..yaml_input import load_yaml

CONFIG_FILE_KEY = "config-file"
OPTIONS_PREFIX = "flower."

# Node config keys a SuperNode may set (`flower-supernode --node-config "client-id=3 ..."`).
NODE_CLIENT_ID = "client-id"
NODE_PARTITION_ID = "partition-id"  # set by Flower's simulation engine
NODE_DATA_FILES = "data-files"
NODE_MASK_PATH = "mask-path"
NODE_DEVICE = "device"


@dataclass
class FlowerOptions:
    """Settings of the Flower adapter that the in-process driver does not have."""

    min_nodes: int | None = None  # wait for this many SuperNodes before round 0 (None: num_clients)
    node_wait_timeout: float = 600.0  # give up waiting after this many seconds and run with who is there
    round_timeout: float | None = None  # seconds to wait for replies in a round (None: wait for all)
    server_eval: bool = True  # evaluate the global state on the server (needs the task's eval data there)
    client_mask_path: str | None = None  # where clients load the mask (None: mask.path or <output_dir>/mask)
    # Meerkat client id -> Flower node id, decided by the server's operator (run config: "0:123,1:456");
    # None: a node is bound to the id it first enrols with, for the whole run
    client_nodes: dict[int, int] | None = None

    def __post_init__(self) -> None:
        if self.min_nodes is not None and self.min_nodes < 0:
            raise ConfigError("flower.min-nodes must be >= 0")
        if self.round_timeout is not None and self.round_timeout <= 0:
            raise ConfigError("flower.round-timeout must be > 0 (or unset: wait for every reply)")
        if self.node_wait_timeout < 0:
            raise ConfigError("flower.node-wait-timeout must be >= 0")
        if isinstance(self.client_nodes, str):
            try:
                pairs = [p.split(":") for p in self.client_nodes.replace(" ", "").split(",") if p]
                self.client_nodes = {int(c): int(n) for c, n in pairs}
            except ValueError as err:
                raise ConfigError(f"flower.client-nodes must be 'client:node,...' (got {self.client_nodes!r})") from err
        if self.client_nodes is not None:
            self.client_nodes = {int(c): int(n) for c, n in self.client_nodes.items()}
            if len(set(self.client_nodes.values())) != len(self.client_nodes):
                raise ConfigError("flower.client-nodes gives one node two client ids")


def _key(k: str) -> str:
    return k.strip().replace("-", "_")


@functools.lru_cache(maxsize=1)
def _field_types() -> dict[tuple[str, ...], str]:
    """(section, field) -> the annotation (a string) of every `FederationConfig` leaf field."""
    out: dict[tuple[str, ...], str] = {}

    def visit(cls, prefix: tuple[str, ...]) -> None:
        for f in dataclasses.fields(cls):
            if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory):
                visit(f.default_factory, prefix + (f.name,))
            else:
                out[prefix + (f.name,)] = str(f.type)

    visit(FederationConfig, ())
    return out


def _value(path: tuple[str, ...], v: Any) -> Any:
    """The run config has no null and no lists/mappings. In an optional field, ``""`` means
    None (unset); in a list/mapping field, a string that starts with ``[`` or ``{`` is parsed
    as YAML (``'[" bad", " good"]'``). Other strings stay strings (a prompt ``"{text}"``)."""
    kind = _field_types().get(path)
    if kind is None or not isinstance(v, str):
        return v
    if v == "" and ("None" in kind or kind == "Any"):
        return None
    if v.lstrip()[:1] in ("[", "{") and ("list" in kind or "dict" in kind or kind == "Any"):
        return load_yaml(v, f"run config key {'.'.join(path)}")
    return v


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in flat.items():
        parts = [_key(p) for p in key.split(".")]
        target = out
        for part in parts[:-1]:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ConfigError(f"run config: {key!r} nests under a key that is not a section")
        target[parts[-1]] = _value(tuple(parts), value)
    return out


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def options_from_run_config(run_config: Mapping[str, Any]) -> FlowerOptions:
    known = {f.name for f in dataclasses.fields(FlowerOptions)}
    kwargs: dict[str, Any] = {}
    for key, value in run_config.items():
        if not key.startswith(OPTIONS_PREFIX):
            continue
        name = _key(key[len(OPTIONS_PREFIX):])
        if name not in known:
            raise ConfigError(f"run config: unknown Flower option {key!r}; known: "
                              f"{sorted(OPTIONS_PREFIX + k.replace('_', '-') for k in known)}")
        # TOML has no null: 0 / "" mean "unset" for the optional ones.
        if name in ("min_nodes", "round_timeout", "client_mask_path", "client_nodes") and value in (0, "", "none", "None"):
            value = None
        kwargs[name] = value
    return FlowerOptions(**kwargs)


def federation_config_from_run_config(run_config: Mapping[str, Any],
                                      app_dir: str | os.PathLike | None = None) -> FederationConfig:
    """The `FederationConfig` a Flower run describes (see the module docstring)."""
    data: dict[str, Any] = {}
    config_file = run_config.get(CONFIG_FILE_KEY)
    if config_file:
        path = Path(str(config_file)).expanduser()
        if not path.is_absolute() and app_dir is not None:
            path = Path(app_dir) / path
        if not path.is_file():
            raise FileNotFoundError(f"run config {CONFIG_FILE_KEY}={config_file!r}: {path} does not exist")
        data = load_yaml(path.read_text(encoding="utf-8"), str(path)) or {}
    flat = {k: v for k, v in run_config.items() if k != CONFIG_FILE_KEY and not k.startswith(OPTIONS_PREFIX)}
    # the old setting names on either side (the file's `lr:`, an app's `lr = ...`) meet the new ones here
    return FederationConfig.from_dict(_merge(canonical_keys(data), canonical_keys(_nest(flat))))


def node_client_id(node_config: Mapping[str, Any]) -> int:
    """The Meerkat client id of this SuperNode: ``client-id``, else Flower's ``partition-id``."""
    for key in (NODE_CLIENT_ID, NODE_PARTITION_ID):
        if key in node_config:
            value = node_config[key]
            try:
                return int(value)
            except (TypeError, ValueError) as err:
                raise ConfigError(f"node config {key}={value!r} is not an integer") from err
    raise ConfigError(f"this SuperNode has no {NODE_CLIENT_ID!r} in its node config: start it with "
                      f'--node-config "{NODE_CLIENT_ID}=<0..num_clients-1> {NODE_DATA_FILES}=/path/to/train.csv"')
