"""A run configuration written back as TOML (what `retrieval config` prints, what a submitted job and
an experiment level read), such that `pipelines.config.load_config` reads it back equal."""
from __future__ import annotations

import json
from typing import Any

from .config import RunConfig, config_to_dict


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def config_to_toml(cfg: RunConfig) -> str:
    """The configuration as TOML that `load_config` reads back to an equal RunConfig."""
    data = config_to_dict(cfg)
    lines = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for k, v in data.items():
        if isinstance(v, dict):
            lines += ["", f"[{k}]"] + [f"{kk} = {_toml_value(vv)}" for kk, vv in v.items()]
    return "\n".join(lines) + "\n"
