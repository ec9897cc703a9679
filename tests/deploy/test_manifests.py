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


def _load(name: str) -> dict:
    return yaml.safe_load((DEPLOY / name).read_text())


def test_cluster_launcher_yaml_matches_rays_schema():
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    cfg = _load("ray-cluster.yaml")
    jsonschema.validate(cfg, schema)
    head = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "RAY_AUTH_MODE=token" in head
    assert all("RAY_AUTH_MODE=token" in c for c in cfg["worker_start_ray_commands"] if "ray start" in c)
    with pytest.raises(jsonschema.ValidationError):  # the check can fail: a misspelt key is caught
        jsonschema.validate({**cfg, "head_start_ray_command": []}, schema)


def _pod_specs(cluster_spec: dict) -> list[dict]:
    return [cluster_spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster_spec["workerGroupSpecs"]]


def _settings_images() -> dict[str, str]:
    """{image name: name:tag} from the one place the manifests' images are set."""
    comp = _load("k8s/settings/kustomization.yaml")
    assert comp["kind"] == "Component"
    return {i["name"]: f"{i['newName']}:{i['newTag']}" for i in comp["images"]}


def _containers(doc) -> list[dict]:
    """Every container (and init container) anywhere in a manifest, as kustomize's image transformer finds them."""
    found = []
    if isinstance(doc, dict):
        for k, v in doc.items():
            if k in ("containers", "initContainers") and isinstance(v, list):
                found.extend(v)
            found.extend(_containers(v))
    elif isinstance(doc, list):
        for v in doc:
            found.extend(_containers(v))
    return found


def _check_ray_cluster_spec(spec: dict) -> None:
    import ray

    assert spec["rayVersion"] == ray.__version__  # the image's Ray and the operator's idea of it agree
    assert spec["authOptions"] == {"mode": "token"}
    for g in spec["workerGroupSpecs"]:
        assert g["groupName"] and g["replicas"] >= 1
        if not spec.get("enableInTreeAutoscaling"):  # min/max only mean something to the autoscaler
            assert "minReplicas" not in g and "maxReplicas" not in g, g["groupName"]
    for pod in _pod_specs(spec):
        sc = pod["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 1000 and sc["fsGroup"] == 1000  # /data writable by uid 1000
        for c in pod["containers"]:
            assert c["resources"]["requests"] == c["resources"]["limits"]
            mounts = {m["name"] for m in c.get("volumeMounts", [])}
            assert mounts <= {v["name"] for v in pod.get("volumes", [])}


def _cluster_resources(spec: dict) -> tuple[float, float]:
    """(CPUs, GPUs) Ray sees on the workers of a RayCluster spec (the head gives none: num-cpus 0)."""
    assert spec["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0"
    cpus = gpus = 0.0
    for g in spec["workerGroupSpecs"]:
        (c,) = g["template"]["spec"]["containers"]
        lim = c["resources"]["limits"]
        cpus += g["replicas"] * float(g["rayStartParams"].get("num-cpus", lim["cpu"]))
        gpus += g["replicas"] * float(lim.get("nvidia.com/gpu", 0))
    return cpus, gpus


def _job_config(job: dict):
    from pipelines.cli import _parser
    from pipelines.config import load_config

    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:3] == ["/opt/venv/bin/python", "-m", "pipelines.cli"]  # no PATH lookup: login shells reset PATH
    args = _parser().parse_args(argv[3:])
    assert args.command == "run"
    return load_config(ROOT / Path(args.config).relative_to("/app"))  # the image holds the tree at /app


@pytest.mark.parametrize("name", ["k8s/index/rayjob.yaml", "k8s/gpu/rayjob.yaml"])
def test_rayjob_runs_a_real_command_on_a_config_that_fits_its_cluster(name):
    from cluster.ray_extract import extraction_fits

    job = _load(name)
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]["rayClusterSpec"]
    _check_ray_cluster_spec(spec)
    cfg = _job_config(job)
    assert cfg.extract.engine == "ray" and cfg.graph.engine == "ray"
    yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    cpus, gpus = _cluster_resources(spec)
    e = cfg.extract
    assert extraction_fits(actors=e.actors, actor_cpus=e.actor_num_cpus, decode_cpus=e.decode_num_cpus, cluster_cpus=cpus,
                           cluster_gpus=gpus) is None
    # decode tasks get at least a quarter of the CPUs (decoding a photo costs a fraction of its forward)
    assert cpus - e.actors * e.actor_num_cpus >= 0.25 * cpus
    if gpus:
        assert e.actors == gpus and e.device in ("auto", "cuda")  # one actor per GPU
        assert cfg.train.use_gpu and cfg.train.engine == "ray" and cfg.train.num_workers <= gpus
        assert cpus / gpus >= 8  # the documented CPU:GPU ratio that keeps decoding ahead of the GPU
        assert cfg.train.num_workers * cfg.train.cpus_per_worker <= cpus
    else:
        assert e.device != "cuda"


def test_the_sizing_check_can_fail():
    from cluster.ray_extract import extraction_fits

    # the old cluster.toml on the old RayJob: 8 actors x 4 CPUs on 16 CPUs
    assert "starve" in extraction_fits(actors=8, actor_cpus=4, decode_cpus=1, cluster_cpus=16)
    assert "starve" in extraction_fits(actors=4, actor_cpus=4, decode_cpus=1, cluster_cpus=16)  # every CPU taken
    # two cores: two actors of 0.75 leave 0.5, less than a read task's one CPU (this hung); of 0.5 they leave one
    assert "read tasks of 1 CPU" in extraction_fits(actors=2, actor_cpus=0.75, decode_cpus=0.5, cluster_cpus=2)
    assert extraction_fits(actors=2, actor_cpus=0.5, decode_cpus=0.5, cluster_cpus=2) is None
    assert "GPU" in extraction_fits(actors=4, actor_cpus=2, decode_cpus=1, cluster_cpus=64, cluster_gpus=2)
    assert extraction_fits(actors=1, actor_cpus=1, decode_cpus=0.5, cluster_cpus=2) is None  # this machine's default


def test_rayservice_serve_config_is_strictly_valid_and_builds_this_codes_application():
    from ray.serve.deployment import Application

    from cluster.ray_serve import QueryService, build_app
    from cluster.serve_config import problems

    svc = _load("k8s/serve/rayservice.yaml")
    assert svc["apiVersion"] == "ray.io/v1" and svc["kind"] == "RayService"
    _check_ray_cluster_spec(svc["spec"]["rayClusterConfig"])
    serve_cfg = yaml.safe_load(svc["spec"]["serveConfigV2"])
    assert problems(serve_cfg) == []
    (app,) = serve_cfg["applications"]
    assert app["import_path"] == "cluster.ray_serve:build_app"
    assert isinstance(build_app(app["args"]), Application)
    assert [d["name"] for d in app["deployments"]] == [QueryService.name]
    # misspellings that Ray's ServeDeploySchema alone lets through are caught, at any depth
    bad = yaml.safe_load(svc["spec"]["serveConfigV2"])
    bad["proxy_locaton"] = "EveryNode"
    bad["http_options"]["hots"] = "0.0.0.0"
    bad["applications"][0]["deployments"][0]["num_replica"] = 2
    bad["applications"][0]["deployments"][0]["ray_actor_options"]["num_cpu"] = 2
    bad["applications"][0]["args"]["limits"]["max_querys"] = 5
    found = "\n".join(problems(bad))
    for key in ("proxy_locaton", "http_options.hots", "applications[0].deployments[0].num_replica",
                "applications[0].deployments[0].ray_actor_options.num_cpu", "max_querys"):
        assert key in found, (key, found)
    bad = yaml.safe_load(svc["spec"]["serveConfigV2"])
    bad["applications"][0]["args"]["batch_wait_fraction"] = -1  # refused when the config is checked, not in the replica
    assert "must be >= 0" in "\n".join(problems(bad))


def test_storage_claims_and_images_are_defined_once_and_used_everywhere():
    """Every claim a pod mounts is defined in deploy/ (ReadWriteMany, its storage class set by the
    storage kustomization); every container image is one of the images set in settings/, which
    every kustomization includes; the Dockerfile builds those names; entrypoints and commands do
    not depend on a shell's PATH."""
    import tomllib

    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    images = _settings_images()
    assert images == {"retrieval-indexer": f"retrieval-indexer:{version}", "retrieval-indexer-cuda": f"retrieval-indexer-cuda:{version}"}
    docker = (DEPLOY / "Dockerfile").read_text()
    assert all(f"-t {ref} ." in docker for ref in images.values())
    claims, claimed = set(), set()
    for kdir in sorted(p.parent for p in (DEPLOY / "k8s").glob("*/kustomization.yaml")):
        k = _load(str((kdir / "kustomization.yaml").relative_to(DEPLOY)))
        if k["kind"] == "Component":
            continue
        assert k.get("components") == ["../settings"], kdir
        for res in k["resources"]:
            doc = yaml.safe_load((kdir / res).read_text())
            if doc["kind"] == "PersistentVolumeClaim":
                assert doc["spec"]["accessModes"] == ["ReadWriteMany"] and "storageClassName" not in doc["spec"]
                patch = yaml.safe_load(k["patches"][0]["patch"])
                assert patch == [{"op": "add", "path": "/spec/storageClassName", "value": patch[0]["value"]}] and patch[0]["value"]
                claims.add(doc["metadata"]["name"])
            for c in _containers(doc):
                assert c["image"] in images.values(), (res, c["image"])
                assert not c.get("command") or c["command"][0].startswith("/"), c["command"]
            for v in _volumes(doc):
                if "persistentVolumeClaim" in v:
                    claimed.add(v["persistentVolumeClaim"]["claimName"])
                assert not ({"secret", "configMap"} & set(v)), "secrets/configmaps referenced but not defined in deploy/"
    assert claimed and claimed <= claims
    assert "/etc/profile.d/" in docker  # login shells (KubeRay ENABLE_LOGIN_SHELL) find the venv too
    assert _load("ray-cluster.yaml")["docker"]["image"] == images["retrieval-indexer"]


def _volumes(doc) -> list[dict]:
    found = []
    if isinstance(doc, dict):
        for k, v in doc.items():
            if k == "volumes" and isinstance(v, list):
                found.extend(v)
            else:
                found.extend(_volumes(v))
    elif isinstance(doc, list):
        for v in doc:
            found.extend(_volumes(v))
    return found


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
            for pkg in ("petsc-dev", "libopenmpi-dev", "openmpi-bin", "wget"):  # wget: KubeRay's probes
                assert pkg in rest
    run_text = " ".join(r for o, r in ins if o == "RUN")
    assert "deploy/setup.sh --petsc" in run_text and "import retrieval" in run_text
    assert ops.index("USER") > max(i for i, o in enumerate(ops) if o == "RUN" and "setup.sh" in ins[i][1])
    assert dict(ins)["USER"] not in ("root", "0")
    # the packages the code imports are all copied into the image
    copied = {r.split()[0] for o, r in ins if o == "COPY"}
    assert {"retrieval", "pipelines", "cluster", "pyproject.toml", "deploy/setup.sh"} <= copied
