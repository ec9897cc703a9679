"""deploy/ is written and linted, not run (no Docker engine or Kubernetes here): the cluster
launcher YAML against Ray's own schema, the KubeRay manifests' structure and the commands and
Serve config they carry against this code, the container recipe's instructions against the tree."""
from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
IMAGE_PREFIX = "ghcr.io/example/retrieval-indexer:"


def _load(name: str) -> dict:
    return yaml.safe_load((DEPLOY / name).read_text())


def test_cluster_launcher_yaml_matches_rays_schema():
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    cfg = _load("ray-cluster.yaml")
    jsonschema.validate(cfg, schema)
    assert cfg["docker"]["image"].startswith(IMAGE_PREFIX)
    head = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "RAY_AUTH_MODE=token" in head
    assert all("RAY_AUTH_MODE=token" in c for c in cfg["worker_start_ray_commands"] if "ray start" in c)
    with pytest.raises(jsonschema.ValidationError):  # the check can fail: a misspelt key is caught
        jsonschema.validate({**cfg, "head_start_ray_command": []}, schema)


def _pod_specs(cluster_spec: dict) -> list[dict]:
    return [cluster_spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster_spec["workerGroupSpecs"]]


def _check_ray_cluster_spec(spec: dict) -> None:
    import ray

    assert spec["rayVersion"] == ray.__version__  # the image's Ray and the operator's idea of it agree
    assert spec["authOptions"] == {"mode": "token"}
    for g in spec["workerGroupSpecs"]:
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"] and g["groupName"]
    for pod in _pod_specs(spec):
        assert pod["securityContext"]["runAsNonRoot"] is True
        for c in pod["containers"]:
            assert c["image"].startswith(IMAGE_PREFIX)
            assert c["resources"]["requests"] == c["resources"]["limits"]
            mounts = {m["name"] for m in c.get("volumeMounts", [])}
            assert mounts <= {v["name"] for v in pod.get("volumes", [])}


def test_rayjob_manifest_runs_a_real_command_on_a_real_config():
    from pipelines.cli import _parser
    from pipelines.config import load_config

    job = _load("k8s/rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    _check_ray_cluster_spec(job["spec"]["rayClusterSpec"])
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "pipelines.cli"]
    args = _parser().parse_args(argv[3:])
    assert args.command == "run"
    cfg = load_config(ROOT / Path(args.config).relative_to("/app"))  # the image holds the tree at /app
    assert cfg.extract.engine == "ray" and cfg.graph.engine == "ray"
    yaml.safe_load(job["spec"]["runtimeEnvYAML"])


def test_rayservice_serve_config_builds_this_codes_application(tmp_path):
    from ray.serve.deployment import Application
    from ray.serve.schema import ServeDeploySchema

    svc = _load("k8s/rayservice.yaml")
    assert svc["apiVersion"] == "ray.io/v1" and svc["kind"] == "RayService"
    _check_ray_cluster_spec(svc["spec"]["rayClusterSpec"])
    serve_cfg = yaml.safe_load(svc["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_cfg) if hasattr(ServeDeploySchema, "model_validate") else ServeDeploySchema.parse_obj(serve_cfg)
    (app,) = serve_cfg["applications"]
    module, attr = app["import_path"].split(":")
    builder = getattr(__import__(module, fromlist=[attr]), attr)
    built = builder(app["args"])
    assert isinstance(built, Application)
    from cluster.ray_serve import QueryService

    assert [d["name"] for d in app["deployments"]] == [QueryService.name]
    with pytest.raises(ValueError, match="unknown"):
        builder({**app["args"], "bogus": 1})


def _dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    lines, cur = [], ""
    for raw in text.splitlines():
        s = raw.strip()
        if not s or s.startswith("#"):
            continue
        cur = f"{cur} {s[:-1]}" if s.endswith("\\") else f"{cur} {s}"
        if not s.endswith("\\"):
            op, _, rest = cur.strip().partition(" ")
            lines.append((op.upper(), rest.strip()))
            cur = ""
    return lines


def test_dockerfile_lint():
    ins = _dockerfile_instructions((DEPLOY / "Dockerfile").read_text())
    ops = [op for op, _ in ins]
    known = {"FROM", "ARG", "ENV", "RUN", "WORKDIR", "COPY", "USER", "EXPOSE", "CMD", "LABEL", "ENTRYPOINT"}
    assert set(ops) <= known, set(ops) - known
    assert ops[0] == "FROM" and ":" in ins[0][1] and not ins[0][1].endswith(":latest")  # pinned base image
    assert "ADD" not in ops  # no remote fetches outside the package managers
    for op, rest in ins:
        if op == "COPY":
            *srcs, _dst = rest.split()
            for src in srcs:
                assert (ROOT / src).exists(), f"COPY source {src} missing from the tree"
        if op == "RUN" and "apt-get install" in rest:
            assert "--no-install-recommends" in rest and "rm -rf /var/lib/apt/lists" in rest and "apt-get update" in rest
            for pkg in ("petsc-dev", "libopenmpi-dev", "openmpi-bin"):
                assert pkg in rest
    run_text = " ".join(r for o, r in ins if o == "RUN")
    assert "deploy/setup.sh --petsc" in run_text and "import retrieval" in run_text
    assert ops.index("USER") > max(i for i, o in enumerate(ops) if o == "RUN" and "setup.sh" in ins[i][1])
    assert dict(ins)["USER"] not in ("root", "0")
    # the packages the code imports are all copied into the image
    copied = {r.split()[0] for o, r in ins if o == "COPY"}
    assert {"retrieval", "pipelines", "cluster", "pyproject.toml", "deploy/setup.sh"} <= copied
