"""deploy/k8s against KubeRay's own CustomResourceDefinitions (../shared/data/kuberay: the
RayCluster, RayJob and RayService CRDs of KubeRay v1.7.0-rc.0), validated as the API server does
with strict field validation: unknown fields rejected, structural-schema extensions honoured
(tests/deploy/kube_schema.py). Skipped, with the reason, where the CRDs are not beside the checkout."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from tests.conftest import SHARED_DATA
from tests.deploy.kube_schema import cel_paths, crd_schema, has_path, load_crd, validation_errors

CRDS = SHARED_DATA / "kuberay"
DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
MANIFESTS = sorted(p for p in (DEPLOY / "k8s").rglob("*.yaml") if yaml.safe_load(p.read_text()).get("apiVersion") == "ray.io/v1")

pytestmark = pytest.mark.skipif(not (CRDS / "ray.io_rayjobs.yaml").is_file(),
                                reason=f"KubeRay CRDs not found in {CRDS} (set RETRIEVAL_SHARED_DATA to the folder holding kuberay/)")


@pytest.fixture(scope="module")
def schemas() -> dict[str, tuple[dict, list]]:
    out = {}
    for f in ("ray.io_rayjobs.yaml", "ray.io_rayservices.yaml"):  # deploy/ holds no bare RayCluster
        crd = load_crd(CRDS / f)
        kind, schema = crd_schema(crd)
        out[kind] = (schema, cel_paths(crd))
    return out


def test_every_kuberay_manifest_is_found():
    assert {p.relative_to(DEPLOY).as_posix() for p in MANIFESTS} == {"k8s/index/rayjob.yaml", "k8s/gpu/rayjob.yaml",
                                                                     "k8s/serve/rayservice.yaml"}


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.relative_to(DEPLOY).as_posix())
def test_manifest_validates_against_the_crd(path, schemas):
    doc = yaml.safe_load(path.read_text())
    schema, cel = schemas[doc["kind"]]
    assert validation_errors(doc, schema) == []
    # CEL rules are not evaluated here: the manifests keep off the fields that carry them
    assert [p for p in cel if has_path(doc, p)] == []


def test_the_validation_catches_what_the_api_server_refuses(schemas):
    svc = yaml.safe_load((DEPLOY / "k8s/serve/rayservice.yaml").read_text())
    schema, _ = schemas["RayService"]
    old = copy.deepcopy(svc)
    old["spec"]["rayClusterSpec"] = old["spec"].pop("rayClusterConfig")  # the field name deploy/ used before
    errs = "\n".join(validation_errors(old, schema))
    assert "rayClusterSpec" in errs and "rayClusterConfig" in errs  # unknown field, and the required one missing
    job = yaml.safe_load((DEPLOY / "k8s/index/rayjob.yaml").read_text())
    schema, _ = schemas["RayJob"]
    for mutate, needle in [
        (lambda j: j["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].update(replica=2), "replica"),  # misspelt
        (lambda j: j["spec"]["rayClusterSpec"]["authOptions"].update(mode="tokens"), "tokens"),  # not in the enum
        (lambda j: j["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}), "num-cpus"),  # must be a string
        (lambda j: j["spec"].update(backoffLimit="1"), "backoffLimit"),
    ]:
        bad = copy.deepcopy(job)
        mutate(bad)
        assert needle in "\n".join(validation_errors(bad, schema)), needle
    ok = copy.deepcopy(job)  # int-or-string quantities and defaulted required fields pass
    ok["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = 8
    assert validation_errors(ok, schema) == []
