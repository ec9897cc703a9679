"""Serve config files checked strictly: a `serve deploy` config or a KubeRay RayService's
`serveConfigV2`.

Ray's `ServeDeploySchema` accepts unknown keys (`num_replica`, `proxy_locaton`, `hots` all pass), so
validating against it catches no misspelling. `problems` also walks the config against the fields
the schema's models declare, recursively, and reports every key none of them declares, then builds
this project's application from its arguments (`cluster.ray_serve.build_app` refuses unknown ones).

    python -m cluster.serve_config deploy/k8s/serve/rayservice.yaml     # exit 1 and one line per problem
"""
from __future__ import annotations

import argparse
import inspect
import sys
import types
import typing
from pathlib import Path
from typing import Any


def _models(annotation: Any) -> list[Any]:
    """The pydantic model classes an annotation admits (through Optional, Union, List, Dict)."""
    from pydantic import BaseModel

    if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for a in typing.get_args(annotation) for m in _models(a)]


def unknown_keys(value: Any, annotation: Any, path: str = "") -> list[str]:
    """Dotted paths of keys in `value` that the pydantic model(s) of `annotation` do not declare."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            if _models(arg) and isinstance(value, (dict, list)):
                return unknown_keys(value, arg, path)
        return []
    if origin in (list, typing.List) and isinstance(value, list):
        (item,) = typing.get_args(annotation) or (Any,)
        return [p for i, v in enumerate(value) for p in unknown_keys(v, item, f"{path.rstrip('.')}[{i}].")]
    if origin in (dict, typing.Dict) and isinstance(value, dict):
        args = typing.get_args(annotation)
        return [p for k, v in value.items() for p in unknown_keys(v, args[1], f"{path}{k}.")] if len(args) == 2 else []
    models = _models(annotation)
    if not models or not isinstance(value, dict):
        return []
    fields = models[0].model_fields
    by_name = dict(fields) | {f.alias: f for f in fields.values() if f.alias}
    out = []
    for key, v in value.items():
        if key not in by_name:
            out.append(f"{path}{key}")
        else:
            out.extend(unknown_keys(v, by_name[key].annotation, f"{path}{key}."))
    return out


def problems(config: dict) -> list[str]:
    """Every problem of a Serve config, one line each (empty when it is sound): keys no schema
    model declares, `ServeDeploySchema` validation errors, and this project's application refusing
    its arguments."""
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    out = [f"unknown key {p!r} (not a field of Ray's Serve schema: misspelt?)" for p in unknown_keys(config, ServeDeploySchema)]
    try:
        ServeDeploySchema.model_validate(config)
    except ValidationError as e:
        out += [f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()]
    for app in config.get("applications") or []:
        if app.get("import_path") == "cluster.ray_serve:build_app":
            from cluster.ray_serve import build_app

            try:
                build_app(dict(app.get("args") or {}))
            except (TypeError, ValueError) as e:
                out.append(f"application {app.get('name')!r}: {e}")
    return out


def load(path: Path) -> dict:
    """A Serve config from a Serve config file or from a RayService manifest's serveConfigV2."""
    import yaml

    doc = yaml.safe_load(Path(path).read_text())
    if isinstance(doc, dict) and doc.get("kind") == "RayService":
        return yaml.safe_load(doc["spec"]["serveConfigV2"])
    return doc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Check a Serve config (or a RayService manifest's serveConfigV2) strictly")
    ap.add_argument("path", type=Path)
    args = ap.parse_args(argv)
    found = problems(load(args.path))
    for line in found:
        sys.stdout.write(f"{args.path}: {line}\n")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
