"""Checks shared by the cluster tests: load manifests, validate them (CRD-subset schema, core
Kubernetes schemas, Ray's own KubeRay config builder), find plain-text secrets, read the Dockerfile.

Every check raises ValueError with one line naming the file's part and what is wrong.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dockerfile
import jsonschema
import kubernetes_validate
import ray
import tomllib
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
SCHEMA = ROOT / "tests" / "data" / "kuberay-v1.schema.json"
K8S_VERSION = "1.34"  # a Kubernetes release kubernetes-validate ships and GKE's channels offer
TOKEN_ENV = "RAY_AUTH_TOKEN"

Doc = dict[str, Any]


# -- loading ------------------------------------------------------------------------------------

def load_docs(path: Path) -> list[Doc]:
    """All YAML documents of a manifest file (a RayJob file also holds its ConfigMap)."""
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]


def ray_doc(docs: list[Doc]) -> Doc:
    """The one ray.io object of a manifest file."""
    found = [d for d in docs if str(d.get("apiVersion", "")).startswith("ray.io/")]
    if len(found) != 1:
        raise ValueError(f"expected exactly one ray.io object, found {len(found)}")
    return found[0]


def cluster_spec(doc: Doc) -> Doc:
    """The RayCluster spec: the object's own, or a RayJob's spec.rayClusterSpec."""
    return doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]


def pod_templates(doc: Doc) -> Iterator[tuple[str, Doc]]:
    """(where, pod template) for the head, every worker group and a RayJob's submitter."""
    spec = cluster_spec(doc)
    yield "headGroupSpec.template", spec["headGroupSpec"]["template"]
    for g in spec.get("workerGroupSpecs", []):
        yield f"workerGroupSpecs[{g['groupName']}].template", g["template"]
    if doc["kind"] == "RayJob" and "submitterPodTemplate" in doc["spec"]:
        yield "submitterPodTemplate", doc["spec"]["submitterPodTemplate"]


def containers(template: Doc) -> list[Doc]:
    spec = template["spec"]
    return list(spec.get("initContainers", [])) + list(spec["containers"])


# -- validation ---------------------------------------------------------------------------------

def crd_schema() -> Doc:
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    return schema


def validate_crd(doc: Doc, schema: Doc) -> None:
    """The ray.io object against the RayCluster / RayJob CRD subset (tests/data)."""
    err = jsonschema.exceptions.best_match(
        jsonschema.Draft202012Validator(schema).iter_errors(doc))
    if err is not None:
        raise ValueError(f"{doc.get('kind')} {err.json_path}: {err.message}")


def validate_core(obj: Doc, where: str) -> None:
    """A core Kubernetes object (ConfigMap, Secret, PodTemplate, ...) against Kubernetes' own
    schema, strictly: unknown fields are errors, as `kubectl apply` makes them."""
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        raise ValueError(f"{where} {e.json_path}: {e.message} (Kubernetes {K8S_VERSION})") from None


def validate_pod_template(template: Doc, where: str) -> None:
    """A pod template inside a Ray object, checked as the PodTemplate it is."""
    validate_core({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"},
                   "template": template}, where)


def ray_autoscaling_config(doc: Doc) -> Doc:
    """The autoscaling config Ray's KubeRay autoscaler derives from this cluster (Ray's own code,
    offline); it validates the result with Ray's cluster-config schema."""
    from ray.autoscaler._private.kuberay.autoscaling_config import (
        _derive_autoscaling_config_from_ray_cr,
    )

    cr = {"apiVersion": doc["apiVersion"], "kind": "RayCluster",
          "metadata": {"name": doc["metadata"]["name"], "namespace": "default"},
          "spec": copy.deepcopy(cluster_spec(doc))}
    return _derive_autoscaling_config_from_ray_cr(cr)


def ray_start_resources(group: Doc) -> dict[str, float]:
    """A group's rayStartParams `resources`, in KubeRay's quoted JSON form."""
    raw = group.get("rayStartParams", {}).get("resources")
    return json.loads(raw.strip("'\"").replace('\\"', '"')) if raw else {}


# -- plain-text secrets -------------------------------------------------------------------------

_SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSW|CREDENTIAL|API_?KEY|ACCESS_?KEY|PRIVATE_?KEY",
                          re.IGNORECASE)
_CREDENTIAL = re.compile(
    r"(?<![0-9a-fA-F])[0-9a-fA-F]{32,}(?![0-9a-fA-F])"  # hex tokens (Ray's are 64 hex chars)
    r"|(?:ghp|gho|ghs|github_pat)_[A-Za-z0-9_]{20,}|xox[abprs]-[A-Za-z0-9-]{10,}"
    r"|\b(?:AKIA|ASIA)[0-9A-Z]{16}\b|\bya29\.[\w-]{20,}|\bAIza[0-9A-Za-z_-]{35}"
    r"|-----BEGIN [A-Z ]*PRIVATE KEY-----")


def _long_random_word(s: str) -> bool:
    """A run of 24+ base64 characters with upper, lower and digits and no separator."""
    return any(re.search(r"[a-z]", w) and re.search(r"[A-Z]", w) and re.search(r"\d", w)
               for w in re.findall(r"[A-Za-z0-9+/=]{24,}", s))


def looks_like_credential(s: str) -> bool:
    return bool(_CREDENTIAL.search(s)) or _long_random_word(s)


def _strings(obj: Any, where: str) -> Iterator[tuple[str, str]]:
    if isinstance(obj, str):
        yield where, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _strings(v, f"{where}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _strings(v, f"{where}[{i}]")


def _env_lists(obj: Any, where: str) -> Iterator[tuple[str, list]]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == "env" and isinstance(v, list):
                yield f"{where}.env", v
            else:
                yield from _env_lists(v, f"{where}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _env_lists(v, f"{where}[{i}]")


def plain_text_secrets(docs: list[Doc]) -> list[str]:
    """Every place a manifest or config would commit a secret in plain text: a Secret with data,
    a secret-named env var given a literal value (or read from a ConfigMap), and any string that
    looks like a credential. Empty when secrets only arrive by reference (secretKeyRef)."""
    found = []
    for d in docs:
        name = (f"{d['kind']} {d.get('metadata', {}).get('name', '?')}" if "kind" in d
                else "config")
        if d.get("kind") == "Secret" and (d.get("data") or d.get("stringData")):
            found.append(f"{name}: a Secret with data is committed; create it with kubectl "
                         "from a file instead")
        for where, env in _env_lists(d, name):
            for e in env:
                if not _SECRET_NAME.search(e.get("name", "")):
                    continue
                src = e.get("valueFrom", {})
                if "value" in e or "secretKeyRef" not in src:
                    found.append(f"{where}.{e['name']}: a secret variable must come from a "
                                 "secretKeyRef, not a literal or a ConfigMap")
        for where, s in _strings(d, name):
            if looks_like_credential(s):
                found.append(f"{where}: holds what looks like a credential")
    return found


# -- the Dockerfile -----------------------------------------------------------------------------

def check_dockerfile(path: Path) -> None:
    """The worker image: official rayproject/ray base at this Ray and Python 3.11, jax[tpu] or
    jax[cuda12] chosen by ACCELERATOR, and this project installed from the copied checkout.

    The Dockerfile is read with Docker's own parser (the `dockerfile` package wraps BuildKit's)."""
    cmds = dockerfile.parse_file(str(path))
    stages = [c for c in cmds if c.cmd == "FROM"]
    if not stages:
        raise ValueError(f"{path.name}: no FROM")
    first_from = cmds.index(stages[0])
    args = {}
    for c in cmds[:first_from]:
        if c.cmd == "ARG":
            k, _, v = c.value[0].partition("=")
            args[k] = v
    if args.get("RAY_VERSION") != ray.__version__:
        raise ValueError(f"{path.name}: ARG RAY_VERSION={args.get('RAY_VERSION')!r} is not the "
                         f"installed Ray {ray.__version__}")
    accelerators = {}
    for c in stages[:-1]:
        image = c.value[0]
        alias = c.value[2] if len(c.value) == 3 and c.value[1].upper() == "AS" else ""
        m = re.fullmatch(r"rayproject/ray:\$\{RAY_VERSION\}-py(\d)(\d+)(-gpu)?", image)
        if not m or not alias.startswith("base-"):
            raise ValueError(f"{path.name}: base stage {' '.join(c.value)!r} is not "
                             "rayproject/ray:${RAY_VERSION}-py3XX[-gpu] AS base-<accelerator>")
        if (int(m.group(1)), int(m.group(2))) != (3, 11):
            raise ValueError(f"{path.name}: {image} is not Python 3.11")
        accelerators[alias.removeprefix("base-")] = image
    if set(accelerators) != {"tpu", "cuda12"}:
        raise ValueError(f"{path.name}: base stages {sorted(accelerators)} are not tpu, cuda12")
    if stages[-1].value != ("base-${ACCELERATOR}",):
        raise ValueError(f"{path.name}: the final stage is {stages[-1].value}, not "
                         "FROM base-${ACCELERATOR}")
    if args.get("ACCELERATOR") not in accelerators:
        raise ValueError(f"{path.name}: ARG ACCELERATOR default {args.get('ACCELERATOR')!r} "
                         f"is none of {sorted(accelerators)}")
    final = cmds[cmds.index(stages[-1]) + 1:]
    declared = {c.value[0].partition("=")[0] for c in final if c.cmd == "ARG"}
    if not {"RAY_VERSION", "ACCELERATOR"} <= declared:
        raise ValueError(f"{path.name}: the final stage must redeclare ARG RAY_VERSION and "
                         "ACCELERATOR to use them")
    _check_project_install(path, final)


def _check_project_install(path: Path, final: list) -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    packages = {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    needed = {"pyproject.toml", project["project"]["readme"], *packages}
    copied = set()
    for c in final:
        if c.cmd == "COPY":
            copied.update(Path(s).name for s in c.value[:-1])
    if not needed <= copied:
        raise ValueError(f"{path.name}: the image does not copy {sorted(needed - copied)} "
                         "(what pyproject.toml builds)")
    installs = []
    for c in final:
        if c.cmd == "RUN":
            for part in c.value[0].split("&&"):
                words = shlex.split(part)
                if words[:2] == ["pip", "install"]:
                    installs.append([w for w in words[2:] if not w.startswith("-")])
    if not any("." in words for words in installs):
        raise ValueError(f"{path.name}: no `pip install .`: the image does not install this "
                         "project from the copied checkout")
    wanted = {"jax[${ACCELERATOR}]", "ray[data,default]==${RAY_VERSION}"}
    if not any(wanted <= set(words) for words in installs):
        raise ValueError(f"{path.name}: the install does not pin {sorted(wanted)}")


# -- accelerators: what each node type / worker group claims, against Ray's own naming ----------

# Cloud facts Ray cannot know offline: the GPUs a machine type carries, by Ray's accelerator name.
GPU_MACHINES = {
    "g2-standard-8": ("L4", 1), "a2-ultragpu-1g": ("A100", 1), "a3-highgpu-8g": ("H100", 8),
    "g6.2xlarge": ("L4", 1), "p4d.24xlarge": ("A100", 8), "p5.48xlarge": ("H100", 8),
}
GKE_GPUS = {"nvidia-l4": "L4", "nvidia-tesla-a100": "A100", "nvidia-a100-80gb": "A100",
            "nvidia-h100-80gb": "H100", "nvidia-h100-mega-80gb": "H100"}
# Google's TPU VM software version for JAX, by Ray's TPU generation name.
TPU_RUNTIMES = {"v5litepod": "v2-alpha-tpuv5-lite", "v6e": "v2-alpha-tpuv6e"}


def ray_gpu_names() -> set[str]:
    import ray.util.accelerators as acc

    return {getattr(acc, n) for n in dir(acc) if n.startswith("NVIDIA_")}


def ray_tpu_type(generation: str) -> str:
    """Ray's accelerator type of a TPU generation: v5litepod -> TPU-V5LITEPOD (a node's
    `accelerator_type:` resource and `ray.io/accelerator-type` label)."""
    import ray.util.accelerators as acc

    name = f"TPU-{generation.upper()}"
    if name not in {getattr(acc, n) for n in dir(acc) if n.startswith("GOOGLE_TPU_")}:
        raise ValueError(f"{name} is not an accelerator type Ray knows")
    return name


def _expect(where: str, resources: dict, key: str, want: float) -> None:
    if resources.get(key) != want:
        raise ValueError(f"{where}: resource {key!r} is {resources.get(key)!r}, expected {want!r}")


def check_launcher_accelerators(cfg: Doc) -> None:
    """Each launcher worker type declares what its machine gives Ray: TPU chips, the slice's
    TPU-<type>-head, the accelerator_type resource, or the machine's GPUs; and installs the
    matching JAX into Ray's official image of this Ray version."""
    from ray._private.accelerators.tpu import (
        TPUAcceleratorManager,
        get_num_tpu_visible_chips_per_host,
        get_total_chips_from_accelerator_type,
        normalize_tpu_accelerator_type,
    )

    image = cfg["docker"]["image"]
    if image != f"rayproject/ray:{ray.__version__}-py311":
        raise ValueError(f"docker.image {image!r} is not rayproject/ray:{ray.__version__}-py311")
    for name, nt in cfg["available_node_types"].items():
        if name == cfg["head_node_type"]:
            continue
        res, nc, where = nt["resources"], nt["node_config"], f"node type {name}"
        setup = " ".join(nt.get("worker_setup_commands", []))
        if "acceleratorType" in nc:
            acc = nc["acceleratorType"]
            if not TPUAcceleratorManager.is_valid_tpu_accelerator_type(acc):
                raise ValueError(f"{where}: {acc!r} is not a TPU accelerator type")
            gen = normalize_tpu_accelerator_type(acc).split("-")[0]
            chips = get_num_tpu_visible_chips_per_host(acc)
            if get_total_chips_from_accelerator_type(acc) != chips:
                raise ValueError(f"{where}: {acc} spans several hosts; use single-host slices")
            _expect(where, res, "TPU", chips)
            _expect(where, res, f"TPU-{acc}-head", 1)
            _expect(where, res, f"accelerator_type:{ray_tpu_type(gen)}", 1)
            if nc.get("runtimeVersion") != TPU_RUNTIMES.get(gen):
                raise ValueError(f"{where}: runtimeVersion {nc.get('runtimeVersion')!r} is not "
                                 f"{TPU_RUNTIMES.get(gen)!r} (Google's JAX image for {gen})")
            if "--privileged" not in nt.get("docker", {}).get("worker_run_options", []):
                raise ValueError(f"{where}: the container must run --privileged to see the chips")
            jax = "jax[tpu]"
        else:
            machine = nc.get("machineType") or nc.get("InstanceType")
            if machine not in GPU_MACHINES:
                raise ValueError(f"{where}: {machine!r} is neither a TPU nor a known GPU machine")
            gpu, count = GPU_MACHINES[machine]
            _expect(where, res, "GPU", count)
            _expect(where, res, f"accelerator_type:{gpu}", 1)
            docker = nt.get("docker", {})
            if docker.get("worker_image") != f"rayproject/ray:{ray.__version__}-py311-gpu":
                raise ValueError(f"{where}: worker_image {docker.get('worker_image')!r} is not "
                                 f"rayproject/ray:{ray.__version__}-py311-gpu")
            if "--gpus all" not in docker.get("worker_run_options", []):
                raise ValueError(f"{where}: the container must run with --gpus all")
            jax = "jax[cuda12]"
        if f'"{jax}"' not in setup or f'"ray[data,default]=={ray.__version__}"' not in setup:
            raise ValueError(f"{where}: worker_setup_commands do not install {jax} with "
                             f"ray=={ray.__version__}")


def check_installs_checkout(cfg: Doc) -> None:
    """The launcher installs this checkout: file_mounts syncs the repository root to the nodes
    and every node's setup pip-installs that copy (gemma-batch is not on a package index)."""
    mounts = cfg.get("file_mounts", {})
    src = mounts.get("~/gemma-batch")
    if src != ".":
        raise ValueError(f"file_mounts maps ~/gemma-batch to {src!r}, not the repository root "
                         "'.' (`ray up` runs from there)")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    if project["project"]["name"] != "gemma-batch":
        raise ValueError("the repository root is not the gemma-batch project")
    if mounts.get("~/.ray/auth_token") != "~/.ray/auth_token":
        raise ValueError("file_mounts must carry the cluster token ~/.ray/auth_token")
    lists = {"setup_commands": cfg["setup_commands"]}
    for name, nt in cfg["available_node_types"].items():
        if "worker_setup_commands" in nt:
            lists[f"{name}.worker_setup_commands"] = nt["worker_setup_commands"]
    for where, cmds in lists.items():
        text = "\n".join(cmds)
        if "cp -r ~/gemma-batch /tmp/gemma-batch" not in text or \
                "pip install --no-cache-dir /tmp/gemma-batch" not in text:
            raise ValueError(f"{where}: does not pip-install the synced checkout ~/gemma-batch")


def check_kuberay_accelerators(doc: Doc) -> None:
    """Each worker group claims what its GKE nodes give: all chips of a single-host TPU slice
    with Ray's TPU-<type>-head and accelerator_type resources (as Ray's KubeRay autoscaler
    derives them from the node selectors), or the GPUs of its accelerator with its Ray name."""
    from ray._private.accelerators.tpu import get_num_chips_from_topology
    from ray.autoscaler._private.kuberay.utils import (
        gke_tpu_accelerator_to_generation,
        tpu_node_selectors_to_type,
    )

    for g in cluster_spec(doc).get("workerGroupSpecs", []):
        where = f"workerGroupSpecs[{g['groupName']}]"
        spec = g["template"]["spec"]
        limits = spec["containers"][0]["resources"]["limits"]
        declared = ray_start_resources(g)
        sel = spec.get("nodeSelector", {})
        if "google.com/tpu" in limits:
            accel = sel.get("cloud.google.com/gke-tpu-accelerator")
            topo = sel.get("cloud.google.com/gke-tpu-topology")
            if accel not in gke_tpu_accelerator_to_generation or not topo:
                raise ValueError(f"{where}: TPU pods need the GKE TPU accelerator and topology "
                                 "node selectors")
            hosts = g.get("numOfHosts", 1)
            chips = get_num_chips_from_topology(topo) // hosts
            if hosts != 1:
                raise ValueError(f"{where}: {hosts} hosts per slice; these manifests use "
                                 "single-host slices (one generator actor per host)")
            if int(limits["google.com/tpu"]) != chips:
                raise ValueError(f"{where}: google.com/tpu {limits['google.com/tpu']} is not the "
                                 f"{chips} chips of a {topo} host")
            _expect(where, declared, "TPU", chips)
            _expect(where, declared, f"TPU-{tpu_node_selectors_to_type(topo, accel)}-head", 1)
            gen = gke_tpu_accelerator_to_generation[accel]
            _expect(where, declared, f"accelerator_type:{ray_tpu_type(gen)}", 1)
        elif "nvidia.com/gpu" in limits:
            gpu = GKE_GPUS.get(sel.get("cloud.google.com/gke-accelerator", ""))
            if gpu is None or gpu not in ray_gpu_names():
                raise ValueError(f"{where}: GPU pods need a cloud.google.com/gke-accelerator "
                                 f"node selector Ray names ({sorted(GKE_GPUS)})")
            if g.get("rayStartParams", {}).get("num-gpus") != limits["nvidia.com/gpu"]:
                raise ValueError(f"{where}: num-gpus is not the pod's nvidia.com/gpu limit")
            _expect(where, declared, f"accelerator_type:{gpu}", 1)
        else:
            raise ValueError(f"{where}: neither TPU nor GPU limits")


# -- a RayJob runs the spec of its ConfigMap ----------------------------------------------------

def check_rayjob(docs: list[Doc]) -> Doc:
    """The RayJob's entrypoint runs `gemma-batch run <file>` on the head, where <file> is a key of
    a ConfigMap in the same manifest mounted there; the spec validates and fits the job's own
    cluster (accelerator, chips, type, actors). Returns the validated spec as a dict."""
    from pipeline.spec import build_spec

    job = ray_doc(docs)
    if job["kind"] != "RayJob":
        raise ValueError(f"{job['kind']} is not a RayJob")
    words = shlex.split(job["spec"]["entrypoint"])
    if words[:2] != ["gemma-batch", "run"] or len(words) < 3:
        raise ValueError(f"entrypoint {job['spec']['entrypoint']!r} is not `gemma-batch run FILE`")
    spec_file = Path(words[2])
    head = cluster_spec(job)["headGroupSpec"]["template"]["spec"]
    mount = next((m for m in head["containers"][0].get("volumeMounts", [])
                  if Path(m["mountPath"]) == spec_file.parent), None)
    if mount is None:
        raise ValueError(f"entrypoint reads {spec_file}, but nothing is mounted at "
                         f"{spec_file.parent} in the head container")
    vol = next(v for v in head.get("volumes", []) if v["name"] == mount["name"])
    items = {i["path"]: i["key"] for i in vol.get("configMap", {}).get("items", [])}
    cm_name, key = vol.get("configMap", {}).get("name"), items.get(spec_file.name)
    cm = next((d for d in docs if d.get("kind") == "ConfigMap"
               and d["metadata"]["name"] == cm_name), None)
    if cm is None or key not in cm.get("data", {}):
        raise ValueError(f"{spec_file} comes from ConfigMap {cm_name!r} key {key!r}, which this "
                         "manifest does not define")
    spec = build_spec(yaml.safe_load(cm["data"][key]), where=f"ConfigMap {cm_name} {key}")
    r = spec.resources
    fitting = []
    for g in cluster_spec(job).get("workerGroupSpecs", []):
        limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        declared = ray_start_resources(g)
        if r.accelerator_type and declared.get(f"accelerator_type:{r.accelerator_type}") != 1:
            continue
        tpu_fits = r.accelerator == "tpu" and int(limits.get("google.com/tpu", 0)) == r.tpu_chips
        gpu_fits = r.accelerator == "gpu" and \
            int(limits.get("nvidia.com/gpu", 0)) >= getattr(r, "gpus_per_actor", 1)
        if tpu_fits or gpu_fits:
            fitting.append(g)
    if not fitting:
        raise ValueError(f"no worker group fits the spec's resources ({r.accelerator}, "
                         f"type {r.accelerator_type}, {r.tpu_chips} chips)")
    hosts = sum(g["minReplicas"] * g.get("numOfHosts", 1) for g in fitting)
    if r.pool_max > hosts:
        raise ValueError(f"the spec asks for {r.pool_max} actors but the job's cluster always "
                         f"has only {hosts} fitting hosts")
    return spec.model_dump()
