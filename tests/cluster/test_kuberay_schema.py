"""KubeRay manifests: the ray.io objects against the RayCluster / RayJob CRD subset in tests/data
(jsonschema), their pod templates and ConfigMaps against Kubernetes' own schemas
(kubernetes-validate), Ray's own KubeRay autoscaler config built from them, no secret in plain
text, and a RayJob that runs the spec its ConfigMap holds. Each validator is shown to fail on a
broken manifest."""

from __future__ import annotations

import copy
import re
import secrets

import jsonschema
import pytest
import ray
from cluster_checks import (
    CLUSTER,
    TOKEN_ENV,
    check_kuberay_accelerators,
    check_rayjob,
    cluster_spec,
    containers,
    crd_schema,
    load_docs,
    plain_text_secrets,
    pod_templates,
    ray_autoscaling_config,
    ray_doc,
    validate_core,
    validate_crd,
    validate_pod_template,
)

MANIFESTS = sorted(CLUSTER.glob("kuberay-*.yaml"))
JOBS = [p for p in MANIFESTS if ray_doc(load_docs(p))["kind"] == "RayJob"]
ids = lambda p: p.name


@pytest.fixture(scope="module")
def schema():
    return crd_schema()


def _kinds(doc):
    limits = [g["template"]["spec"]["containers"][0]["resources"]["limits"]
              for g in cluster_spec(doc).get("workerGroupSpecs", [])]
    return {"tpu" if "google.com/tpu" in lim else "gpu" for lim in limits}


def test_manifests_cover_clusters_and_jobs_on_tpu_and_gpu():
    have = {(ray_doc(load_docs(p))["kind"], k) for p in MANIFESTS
            for k in _kinds(ray_doc(load_docs(p)))}
    assert have >= {("RayCluster", "tpu"), ("RayCluster", "gpu"), ("RayJob", "tpu"),
                    ("RayJob", "gpu")}


@pytest.mark.parametrize("path", MANIFESTS, ids=ids)
def test_ray_object_matches_the_crd_subset(path, schema):
    validate_crd(ray_doc(load_docs(path)), schema)


def _job():
    return copy.deepcopy(ray_doc(load_docs(CLUSTER / "kuberay-job-tpu.yaml")))


def _cluster():
    return copy.deepcopy(ray_doc(load_docs(CLUSTER / "kuberay-tpu.yaml")))


def _set(path, value):
    def apply(doc):
        *parents, last = path
        node = doc
        for p in parents:
            node = node[p]
        if value is KeyError:
            del node[last]
        else:
            node[last] = value
        return doc
    return apply


@pytest.mark.parametrize("make, broken, match", [
    (_cluster, _set(["spec", "workerGroupSpecs", 0, "minReplicas"], "0"),
     r"workerGroupSpecs\[0\]\.minReplicas: '0' is not of type 'integer'"),
    (_cluster, _set(["spec", "headGroupSpec", "rayStartParams", "num-cpus"], 0),
     r"rayStartParams\['num-cpus'\]: 0 is not of type 'string'"),
    (_cluster, _set(["spec", "workerGroupSpecs", 0, "maxReplica"], 8),
     r"'maxReplica' was unexpected"),
    (_cluster, _set(["spec", "workerGroupSpecs", 0, "groupName"], KeyError),
     r"'groupName' is a required property"),
    (_cluster, _set(["spec", "authOptions", "mode"], "tokens"),
     r"authOptions\.mode: 'tokens' is not one of"),
    (_job, _set(["spec", "entrypoint"], KeyError), r"'entrypoint' is a required property"),
    (_job, _set(["spec", "rayClusterSpec", "headGroupSpec", "template", "spec", "containers"],
                []), r"containers: \[\] should be non-empty"),
], ids=["replicas-as-string", "ray-start-param-not-string", "typo-key", "no-group-name",
        "bad-auth-mode", "job-without-entrypoint", "no-containers"])
def test_crd_subset_rejects_a_broken_manifest(schema, make, broken, match):
    with pytest.raises(ValueError, match=match):
        validate_crd(broken(make()), schema)


@pytest.mark.parametrize("path", MANIFESTS, ids=ids)
def test_core_kubernetes_objects_validate(path):
    docs = load_docs(path)
    doc = ray_doc(docs)
    for where, template in pod_templates(doc):
        validate_pod_template(template, f"{path.name} {where}")
    for other in docs:
        if other is not doc:
            validate_core(other, f"{path.name} {other['kind']}")


@pytest.mark.parametrize("broken, match", [
    (lambda t: t["spec"]["containers"][0]["ports"][0].update(containerPort="6379"),
     r"containerPort: '6379' is not of type 'integer'"),
    (lambda t: t["spec"].update(nodeSelectr={"a": "b"}), r"'nodeSelectr' was unexpected"),
    (lambda t: t["spec"]["containers"][0].pop("name"), r"'name' is a required property"),
    (lambda t: t["spec"]["containers"][0]["env"][1]["valueFrom"]["secretKeyRef"].update(
        keyy="auth_token"), r"'keyy' was unexpected"),
], ids=["port-as-string", "typo-field", "container-without-name", "typo-in-secret-ref"])
def test_core_validation_rejects_a_broken_pod_template(broken, match):
    template = copy.deepcopy(cluster_spec(_cluster())["headGroupSpec"]["template"])
    broken(template)
    with pytest.raises(ValueError, match=match):
        validate_pod_template(template, "head")


def test_core_validation_rejects_a_broken_configmap():
    cm = copy.deepcopy(load_docs(CLUSTER / "kuberay-job-tpu.yaml")[0])
    cm["data"]["job.yaml"] = {"input": "gs://b/x"}  # ConfigMap data values are strings
    with pytest.raises(ValueError, match=r"data\['job\.yaml'\]: .* is not of type 'string'"):
        validate_core(cm, "ConfigMap")


@pytest.mark.parametrize("path", MANIFESTS, ids=ids)
def test_rays_kuberay_autoscaler_reads_the_cluster(path):
    doc = ray_doc(load_docs(path))
    spec = cluster_spec(doc)
    assert spec["rayVersion"] == ray.__version__
    cfg = ray_autoscaling_config(doc)  # Ray's own derivation, validated by Ray
    types = cfg["available_node_types"]
    assert types["headgroup"]["resources"]["CPU"] == 0
    for g in spec["workerGroupSpecs"]:
        res = types[g["groupName"]]["resources"]
        assert res.get("TPU", 0) > 0 or res.get("GPU", 0) > 0
        assert any(k.startswith("accelerator_type:") for k in res)
    check_kuberay_accelerators(doc)


@pytest.mark.parametrize("group, broken, match", [
    (1, lambda g: g["rayStartParams"].update(
        resources='"{\\"TPU\\": 8, \\"TPU-v6e-16-head\\": 1, \\"accelerator_type:TPU-V6E\\": 1}"'),
     r"'TPU-v6e-8-head' is None, expected 1"),
    (0, lambda g: g["rayStartParams"].update(
        resources='"{\\"TPU\\": 8, \\"TPU-v5litepod-8-head\\": 1, '
                  '\\"accelerator_type:TPU-V5E\\": 1}"'),
     r"'accelerator_type:TPU-V5LITEPOD' is None, expected 1"),
    (0, lambda g: g["template"]["spec"]["containers"][0]["resources"]["limits"].update(
        {"google.com/tpu": "4"}), r"google.com/tpu 4 is not the 8 chips of a 2x4 host"),
    (0, lambda g: g["template"]["spec"]["nodeSelector"].pop(
        "cloud.google.com/gke-tpu-topology"), r"accelerator and topology node selectors"),
], ids=["wrong-head-resource", "accelerator-type-ray-does-not-name", "half-a-host", "no-topology"])
def test_accelerator_check_rejects_a_group_that_claims_what_its_nodes_lack(group, broken, match):
    doc = _cluster()
    broken(cluster_spec(doc)["workerGroupSpecs"][group])
    with pytest.raises(ValueError, match=match):
        check_kuberay_accelerators(doc)


@pytest.mark.parametrize("path", MANIFESTS, ids=ids)
def test_no_secret_in_plain_text(path):
    docs = load_docs(path)
    assert plain_text_secrets(docs) == []
    doc = ray_doc(docs)
    auth = cluster_spec(doc)["authOptions"]
    assert auth["mode"] == "token"  # the operator hands the token to autoscaler and submitter
    for where, template in pod_templates(doc):
        for c in containers(template):
            env = {e["name"]: e for e in c.get("env", [])}
            assert env["RAY_AUTH_MODE"]["value"] == "token", where
            ref = env[TOKEN_ENV]["valueFrom"]["secretKeyRef"]
            # the Secret KubeRay's authOptions reads, under the key it reads (auth_token)
            assert (ref["name"], ref["key"]) == (auth["secretName"], "auth_token"), where


def _with_literal_token(doc):
    env = cluster_spec(doc)["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    env[1] = {"name": TOKEN_ENV, "value": secrets.token_hex(32)}
    return [doc]


def _token_from_configmap(doc):
    env = cluster_spec(doc)["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["env"]
    env[1] = {"name": TOKEN_ENV, "valueFrom": {"configMapKeyRef": {"name": "c", "key": "t"}}}
    return [doc]


def _committed_secret(doc):
    return [{"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "gemma-batch-ray-token"},
             "stringData": {"auth_token": "raycluster_secret"}}, doc]


def _token_in_args(doc):
    c = cluster_spec(doc)["headGroupSpec"]["template"]["spec"]["containers"][0]
    c["args"] = [f"export RAY_AUTH_TOKEN={secrets.token_hex(32)} && $KUBERAY_GEN_RAY_START_CMD"]
    return [doc]


def _aws_key_in_job_spec(docs_job):
    cm = copy.deepcopy(load_docs(CLUSTER / "kuberay-job-tpu.yaml")[0])
    cm["data"]["job.yaml"] += "# AKIAIOSFODNN7EXAMPLE\n"
    return [cm, docs_job]


@pytest.mark.parametrize("make, plant, match", [
    (_cluster, _with_literal_token,
     r"RAY_AUTH_TOKEN: a secret variable must come from a secretKeyRef"),
    (_cluster, _token_from_configmap, r"RAY_AUTH_TOKEN: a secret variable must come from"),
    (_cluster, _committed_secret, r"Secret gemma-batch-ray-token: a Secret with data"),
    (_cluster, _token_in_args, r"args\[0\]: holds what looks like a credential"),
    (_job, _aws_key_in_job_spec,
     r"ConfigMap gemma-batch-job-tpu\.data\.job\.yaml: holds what looks like a credential"),
], ids=["literal-env-token", "token-from-configmap", "committed-secret", "token-in-args",
        "key-in-configmap"])
def test_secret_check_flags_a_planted_secret(make, plant, match):
    found = plain_text_secrets(plant(make()))
    assert any(re.search(match, f) for f in found), found


@pytest.mark.parametrize("path", JOBS, ids=ids)
def test_rayjob_runs_the_spec_of_its_configmap(path):
    docs = load_docs(path)
    job = ray_doc(docs)
    spec = check_rayjob(docs)  # entrypoint -> mounted ConfigMap key -> a valid JobSpec
    assert spec["resume"] is True  # a retried attempt (backoffLimit) finishes the same run
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    assert job["spec"]["backoffLimit"] >= 1


def _job_docs():
    return load_docs(CLUSTER / "kuberay-job-tpu.yaml")


def _mutate_job(fn):
    docs = _job_docs()
    fn(docs)
    return docs


@pytest.mark.parametrize("broken, match", [
    (lambda d: d[1]["spec"].update(entrypoint="python -m jobs.cli run /home/ray/job/job.yaml"),
     r"is not `gemma-batch run FILE`"),
    (lambda d: d[1]["spec"].update(entrypoint="gemma-batch run /etc/job.yaml"),
     r"nothing is mounted at /etc in the head container"),
    (lambda d: d[0]["metadata"].update(name="other"),
     r"ConfigMap 'gemma-batch-job-tpu' key 'job.yaml', which this manifest does not define"),
    (lambda d: d[0]["data"].update({"job.yaml": d[0]["data"]["job.yaml"] + "batch_sise: 8\n"}),
     r"ConfigMap gemma-batch-job-tpu job.yaml: batch_sise: Extra inputs are not permitted"),
    (lambda d: d[0]["data"].update({"job.yaml": d[0]["data"]["job.yaml"].replace(
        "num_actors: 2", "num_actors: 3")}),
     r"asks for 3 actors but the job's cluster always has only 2 fitting hosts"),
    (lambda d: d[0]["data"].update({"job.yaml": d[0]["data"]["job.yaml"].replace(
        "TPU-V6E", "TPU-V5LITEPOD")}), r"no worker group fits the spec's resources"),
], ids=["not-gemma-batch", "spec-not-mounted", "configmap-missing", "bad-spec",
        "more-actors-than-hosts", "wrong-accelerator"])
def test_rayjob_check_rejects_a_broken_job(broken, match):
    with pytest.raises(ValueError, match=match):  # the spec's own SpecError is a ValueError
        check_rayjob(_mutate_job(broken))


def test_schema_is_a_valid_draft_2020_12_schema(schema):
    assert {"RayClusterSpec", "RayJobSpec", "HeadGroupSpec", "WorkerGroupSpec",
            "RayStartParams", "PodTemplateSpec"} <= set(schema["$defs"])
    broken = copy.deepcopy(schema)
    broken["$defs"]["int32"]["type"] = "integr"
    with pytest.raises(jsonschema.exceptions.SchemaError, match=r"'integr' is not valid"):
        jsonschema.Draft202012Validator.check_schema(broken)
