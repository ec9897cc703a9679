"""Validate a manifest against a CustomResourceDefinition's OpenAPI v3 schema the way a Kubernetes
API server with strict field validation (`kubectl apply`'s default) does, using jsonschema.

A CRD's structural schema differs from JSON Schema in a few places, honoured here:
- unknown fields are rejected unless the object declares `x-kubernetes-preserve-unknown-fields`
  (or is a map: `additionalProperties`);
- `x-kubernetes-int-or-string: true` accepts an integer or a string;
- `nullable: true` also accepts null;
- a `required` property that has a `default` is filled in by the server before validation;
- the resource's own top-level `metadata` is ObjectMeta, checked by the server apart from the CRD.
CEL rules (`x-kubernetes-validations`) are not evaluated: `cel_paths` lists where they are, so a
test can keep manifests off those fields.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

OBJECT_META = {"type": "object", "properties": {"name": {"type": "string"}, "namespace": {"type": "string"},
                                               "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                                               "annotations": {"type": "object", "additionalProperties": {"type": "string"}}},
               "additionalProperties": False}


def to_json_schema(node: Any) -> Any:
    """Structural-schema node -> equivalent JSON Schema node (recursively)."""
    if isinstance(node, list):
        return [to_json_schema(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: to_json_schema(v) for k, v in node.items() if not k.startswith("x-kubernetes-") and k not in ("nullable", "description")}
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.pop("anyOf", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if node.get("type") == "object" and "additionalProperties" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    props = node.get("properties") or {}
    if "required" in out:
        out["required"] = [r for r in out["required"] if "default" not in props.get(r, {})]
    return out


def load_crd(crd_path: Path) -> dict:
    """A CRD file, parsed with libyaml when available (the files are megabytes)."""
    return yaml.load(Path(crd_path).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def crd_schema(crd: dict, version: str = "v1") -> tuple[str, dict]:
    """(kind, JSON Schema) of a loaded CRD's `version`."""
    (ver,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    schema = to_json_schema(ver["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = OBJECT_META
    return crd["spec"]["names"]["kind"], schema


def cel_paths(crd: dict, version: str = "v1") -> list[tuple[str, ...]]:
    """Property paths (from the resource root) that carry CEL rules this validator cannot evaluate."""
    (ver,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    found = []

    def walk(node: dict, path: tuple[str, ...]) -> None:
        if node.get("x-kubernetes-validations"):
            found.append(path)
        for name, sub in (node.get("properties") or {}).items():
            walk(sub, path + (name,))
        if isinstance(node.get("items"), dict):
            walk(node["items"], path + ("[]",))

    walk(ver["schema"]["openAPIV3Schema"], ())
    return found


def has_path(doc: Any, path: tuple[str, ...]) -> bool:
    """Whether `doc` sets the property at `path` ("[]" = any list item)."""
    if not path:
        return True
    head, rest = path[0], path[1:]
    if head == "[]":
        return isinstance(doc, list) and any(has_path(x, rest) for x in doc)
    return isinstance(doc, dict) and head in doc and has_path(doc[head], rest)


def validation_errors(doc: dict, schema: dict) -> list[str]:
    """Every schema violation of `doc`, as 'path: message' lines (empty when it validates)."""
    import jsonschema

    v = jsonschema.Draft7Validator(schema)
    return sorted(f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message[:300]}" for e in v.iter_errors(doc))
