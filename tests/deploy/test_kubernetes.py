"""deploy/kubernetes/ and deploy/kserve/, verified without a cluster.

Every Kubernetes object is validated against the official schemas of a pinned release
(kubernetes-validate), the InferenceService against the types of KServe's own pinned SDK
(and its embedded Kubernetes types against the same official schemas), and each
container's command is run here on the host with the environment its manifest gives it:
the probes the manifest names must answer 200 on the port it names.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import fields
from functools import cache
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import requests
import yaml
from referencing import Registry, Resource

from app.auth import TokenFile, TokenFileError
from app.config import Config
from tests.conftest import ROOT, free_port
from tests.deploy.kubernetes import proxy_configmap
from tests.deploy.test_proxy import start_nginx
from tests.test_compose import final_stage

KUBERNETES = "1.34.0"  # the release the manifests are validated for
BASE = ROOT / "deploy" / "kubernetes"
KSERVE = ROOT / "deploy" / "kserve" / "inferenceservice.yaml"
KSERVE_GRPC = ROOT / "deploy" / "kserve" / "inferenceservice-grpc.yaml"
RETRAIN = BASE / "retrain" / "job.yaml"
LITE = ROOT / "deploy" / "kubernetes-lite"  # an overlay: the api on the lite image
SECURITY = "mnist-security"  # the ConfigMap made from security.env
WORKER_MIB = 700  # resident memory of one TensorFlow worker (BENCHMARKS.md: 674 MB)


def documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


@cache
def generated_config_maps() -> dict[str, dict[str, str]]:
    """The kustomization's configMapGenerator ConfigMaps' data, by name, read from their
    env files as kustomize reads them (KEY=value lines; # comments and blank lines)."""
    generators = yaml.safe_load((BASE / "kustomization.yaml").read_text())["configMapGenerator"]
    maps = {}
    for generator in generators:
        data = maps.setdefault(generator["name"], {})
        for name in generator["envs"]:
            for line in (BASE / name).read_text().splitlines():
                if line.strip() and not line.startswith("#"):
                    key, _, value = line.partition("=")
                    data[key] = value
    return maps


@pytest.fixture(scope="module")
def base() -> dict[tuple[str, str], dict]:
    """Every object the kustomization applies, by (kind, name), its generated ConfigMaps
    under their names before kustomize adds the hash (it renames the references too)."""
    objects = {("ConfigMap", name): {"apiVersion": "v1", "kind": "ConfigMap",
                                     "metadata": {"name": name}, "data": data}
               for name, data in generated_config_maps().items()}
    for resource in yaml.safe_load((BASE / "kustomization.yaml").read_text())["resources"]:
        for doc in documents(BASE / resource):
            objects[doc["kind"], doc["metadata"]["name"]] = doc
    return objects


def pod(obj: dict) -> dict:
    return obj["spec"]["template"]["spec"]


def container(obj: dict) -> dict:
    (only,) = pod(obj)["containers"]
    return only


def cpu(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def mebibytes(quantity: str) -> float:
    units = {"Mi": 1, "Gi": 1024}
    return float(quantity[:-2]) * units[quantity[-2:]]


def environment(spec: dict) -> dict[str, str]:
    """The container's env as the kubelet resolves it (literal values, resourceFieldRef,
    configMapKeyRef to a generated ConfigMap)."""
    resolved = {}
    for var in spec.get("env", []):
        if "value" in var:
            resolved[var["name"]] = var["value"]
        elif "configMapKeyRef" in var["valueFrom"]:
            ref = var["valueFrom"]["configMapKeyRef"]
            resolved[var["name"]] = generated_config_maps()[ref["name"]][ref["key"]]
        else:
            ref = var["valueFrom"]["resourceFieldRef"]
            assert ref["containerName"] == spec["name"]
            group, _, resource = ref["resource"].partition(".")
            value = cpu(spec["resources"][group][resource]) / cpu(ref.get("divisor", "1"))
            resolved[var["name"]] = str(math.ceil(value))
    return resolved


def test_kustomization_lists_every_manifest():
    listed = yaml.safe_load((BASE / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted(p.name for p in BASE.glob("*.yaml")
                                    if p.name != "kustomization.yaml")


@pytest.mark.parametrize("path", sorted(p.relative_to(ROOT) for p in BASE.rglob("*.yaml")
                                        if p.name != "kustomization.yaml"), ids=str)
def test_manifest_is_valid_for_the_pinned_kubernetes(path):
    for doc in documents(ROOT / path):
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)


def strategic_merge(base: object, patch: object) -> object:
    """Kubernetes' strategic merge as it applies to a Deployment's pod template: mappings
    merge key by key, lists of named items (containers) merge by name."""
    if isinstance(base, dict) and isinstance(patch, dict):
        return {**base, **{k: strategic_merge(base.get(k), v) for k, v in patch.items()}}
    if isinstance(base, list) and isinstance(patch, list) and all(
            isinstance(item, dict) and "name" in item for item in base + patch):
        patched = {item["name"]: item for item in patch}
        return [strategic_merge(item, patched.get(item["name"], {})) for item in base]
    return patch


def test_the_lite_overlay_runs_the_api_on_the_lite_image_and_training_on_the_full_one(base):
    overlay = yaml.safe_load((LITE / "kustomization.yaml").read_text())
    assert overlay["resources"] == [os.path.relpath(BASE, LITE)]
    (patch_file,) = (entry["path"] for entry in overlay["patches"])
    patch = yaml.safe_load((LITE / patch_file).read_text())
    api = strategic_merge(base["Deployment", "mnist-api"], patch)
    kubernetes_validate.validate(api, KUBERNETES, strict=True)
    assert container(api)["image"] == "mnist-serving:lite"
    assert container(api)["env"] == container(base["Deployment", "mnist-api"])["env"]
    limits = container(api)["resources"]["limits"]
    assert mebibytes(limits["memory"]) >= 2 * 200 + 100  # two ≤ 200 MiB workers, a master
    assert container(base["Job", "mnist-train"])["image"] == "mnist-serving:latest"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="needs kubectl (its kustomize)")
@pytest.mark.parametrize("folder", [BASE, LITE], ids=["base", "lite"])
def test_kustomize_builds_it_naming_the_generated_config_map_everywhere(folder):
    """What `kubectl apply -k` applies: the overlay builds (a base holding its overlay is a
    cycle kustomize refuses), and each reference to mnist-security has the hashed name."""
    built = subprocess.run(["kubectl", "kustomize", str(folder)], capture_output=True,
                           text=True, timeout=120)
    assert built.returncode == 0, built.stderr[-2000:]
    objects = [doc for doc in yaml.safe_load_all(built.stdout) if doc]
    (security,) = [o["metadata"]["name"] for o in objects if o["kind"] == "ConfigMap"
                   and o["metadata"]["name"].startswith(f"{SECURITY}-")]
    refs = [var["valueFrom"]["configMapKeyRef"]["name"] for o in objects
            if o["kind"] == "Deployment" for var in container(o)["env"]
            if "configMapKeyRef" in var.get("valueFrom", {})]
    assert len(refs) == len(generated_config_maps()[SECURITY]) and set(refs) == {security}


def test_proxy_configmap_carries_deploy_nginx_byte_for_byte():
    assert (BASE / "proxy-configmap.yaml").read_text() == proxy_configmap(), \
        "deploy/nginx changed: run `make kubernetes-proxy-config`"


def secret_volume(deployment: dict, path: str) -> dict:
    """The Secret volume mounted where ``path`` lies."""
    (mount,) = [m for m in container(deployment)["volumeMounts"]
                if path.startswith(m["mountPath"] + "/")]
    assert mount["readOnly"] is True
    (volume,) = [v for v in pod(deployment)["volumes"] if v["name"] == mount["name"]]
    return volume["secret"]


def test_each_security_control_is_a_line_of_security_env_off_while_empty(base):
    """Every key of the generated ConfigMap reaches, by its own name, a container that
    reads it (the api's Config, or start.sh for nginx); every one starts empty: off."""
    settings = generated_config_maps()[SECURITY]
    assert set(settings.values()) == {""}
    read = {}
    for name in ("mnist-api", "mnist-proxy"):
        for var in container(base["Deployment", name])["env"]:
            ref = var.get("valueFrom", {}).get("configMapKeyRef")
            if ref and ref["name"] == SECURITY:
                assert ref["key"] == var["name"] and "optional" not in ref  # a typo is loud
                read[var["name"]] = name
    assert sorted(read) == sorted(settings)
    start_sh = (ROOT / "deploy" / "nginx" / "start.sh").read_text()
    for setting, reader in read.items():
        assert (setting.lower() in {f.name for f in fields(Config)} if reader == "mnist-api"
                else f"#   {setting} " in start_sh), setting


@pytest.mark.parametrize(("deployment", "settings", "secret"), [
    ("mnist-api", {"AUTH_TOKENS_FILE": "/etc/mnist-auth/tokens"}, "mnist-api-tokens"),
    ("mnist-proxy", {"TLS_CERT_FILE": "/etc/mnist-tls/tls.crt",
                     "TLS_KEY_FILE": "/etc/mnist-tls/tls.key"}, "mnist-proxy-tls"),
], ids=["tokens", "tls"])
def test_security_env_paths_lie_in_an_optional_secret_that_must_exist_once_set(
        deployment, settings, secret, base, tmp_path):
    """The paths README gives are in the Secret's volume, mounted whether or not the
    Secret exists; set while it does not (an empty folder there), the container refuses
    to start rather than run open."""
    readme = (ROOT / "README.md").read_text()
    for setting, path in settings.items():
        assert f"{setting}={path}" in readme
        assert secret_volume(base["Deployment", deployment], path) == \
            {"secretName": secret, "optional": True}
    empty = {k: str(tmp_path / Path(v).name) for k, v in settings.items()}
    if deployment == "mnist-api":
        with pytest.raises(TokenFileError, match="cannot be read"):
            TokenFile(Path(empty["AUTH_TOKENS_FILE"]))
    else:
        (tmp_path / "nginx").mkdir()
        nginx = start_nginx(tmp_path / "nginx", **empty)
        assert nginx.wait(timeout=30) == 1
        assert f"cannot read {empty['TLS_CERT_FILE']}" in (tmp_path / "nginx" / "nginx.log"
                                                            ).read_text()


def test_api_deployment_is_sized_and_hardened(base):
    deployment = base["Deployment", "mnist-api"]
    api = container(deployment)
    env = environment(api)
    assert deployment["spec"]["replicas"] == 2
    assert int(env["WORKERS"]) == math.ceil(cpu(api["resources"]["limits"]["cpu"]))
    assert int(env["WORKERS"]) * int(env["TF_THREADS"]) <= cpu(api["resources"]["limits"]["cpu"])
    assert mebibytes(api["resources"]["requests"]["memory"]) >= int(env["WORKERS"]) * WORKER_MIB
    assert mebibytes(api["resources"]["limits"]["memory"]) > \
        mebibytes(api["resources"]["requests"]["memory"])
    assert api["startupProbe"]["httpGet"]["path"] == "/ready"
    assert api["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert api["livenessProbe"]["httpGet"]["path"] == "/health"
    graceful = int(re.search(r"^graceful_timeout = (\d+)", (ROOT / "app" / "gunicorn.conf.py")
                             .read_text(), flags=re.M).group(1))
    pause = int(api["lifecycle"]["preStop"]["exec"]["command"][1])
    assert pod(deployment)["terminationGracePeriodSeconds"] > pause + graceful
    assert_hardened(pod(deployment), api)


def assert_hardened(pod_spec: dict, spec: dict) -> None:
    """Non-root, no token, read-only root with emptyDir for the paths the app writes."""
    assert pod_spec["automountServiceAccountToken"] is False
    assert pod_spec["securityContext"]["runAsNonRoot"] is True
    assert pod_spec["securityContext"]["runAsUser"] >= 100
    assert spec["securityContext"]["readOnlyRootFilesystem"] is True
    assert spec["securityContext"]["allowPrivilegeEscalation"] is False
    assert spec["securityContext"]["capabilities"]["drop"] == ["ALL"]
    empty = {v["name"] for v in pod_spec["volumes"] if "emptyDir" in v}
    writable = {m["mountPath"] for m in spec["volumeMounts"] if m["name"] in empty}
    assert "/tmp" in writable  # gunicorn's heartbeat files, metrics, the rendered config
    assert all(value.startswith("/tmp/") for name, value in environment(spec).items()
               if name in {"PROMETHEUS_MULTIPROC_DIR", "KERAS_HOME", "NGINX_PREFIX"})


def claim(obj: dict) -> tuple[str, dict]:
    """The models volume's claim and its mount."""
    (volume,) = [v for v in pod(obj)["volumes"] if "persistentVolumeClaim" in v]
    (mount,) = [m for m in container(obj)["volumeMounts"] if m["name"] == volume["name"]]
    return volume["persistentVolumeClaim"]["claimName"], mount


def test_training_job_writes_the_claim_the_api_reads(base):
    job, deployment = base["Job", "mnist-train"], base["Deployment", "mnist-api"]
    (job_claim, job_mount), (api_claim, api_mount) = claim(job), claim(deployment)
    assert job_claim == api_claim and ("PersistentVolumeClaim", api_claim) in base
    assert api_mount["readOnly"] is True and not job_mount.get("readOnly")
    assert environment(container(job))["MODELS_DIR"] == job_mount["mountPath"]
    assert environment(container(deployment))["MODELS_DIR"] == api_mount["mountPath"]
    train = container(job)
    assert train["command"] + train["args"] == ["python", "-m", "training.fit", "--if-missing"]
    assert_hardened(pod(job), train)


def test_retrain_job_is_the_training_job_without_if_missing(base):
    (retrain,) = documents(RETRAIN)
    train = base["Job", "mnist-train"]
    assert container(retrain)["args"] == []
    container(retrain)["args"] = ["--if-missing"]
    assert retrain["spec"]["template"] == train["spec"]["template"]


def test_service_hpa_and_pdb_select_the_api(base):
    deployment = base["Deployment", "mnist-api"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    service, pdb = base["Service", "mnist-api"], base["PodDisruptionBudget", "mnist-api"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["minAvailable"] < deployment["spec"]["replicas"]
    hpa = base["HorizontalPodAutoscaler", "mnist-api"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == "mnist-api"
    assert hpa["spec"]["minReplicas"] == deployment["spec"]["replicas"]
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    for port in service["spec"]["ports"]:
        assert port["targetPort"] in {p["name"] for p in container(deployment)["ports"]}


def test_proxy_forwards_to_the_api_service_with_the_same_body_limit(base):
    proxy, api = container(base["Deployment", "mnist-proxy"]), container(base["Deployment",
                                                                              "mnist-api"])
    (api_port,) = [p for p in base["Service", "mnist-api"]["spec"]["ports"]
                   if p["name"] == "http"]
    assert environment(proxy)["UPSTREAM"] == f"mnist-api:{api_port['port']}"
    assert environment(proxy)["MAX_CONTENT_LENGTH"] == environment(api)["MAX_CONTENT_LENGTH"]
    assert proxy["command"] == ["/etc/mnist-nginx/start.sh"]
    assert_hardened(pod(base["Deployment", "mnist-proxy"]), proxy)


def test_proxy_stops_gracefully_once_its_endpoints_have_drained(base):
    """preStop runs stop.sh (serve DRAIN_SECONDS on, then SIGQUIT and wait for nginx to
    go), and the grace period outlasts the drain and nginx's own shutdown timeout."""
    deployment = base["Deployment", "mnist-proxy"]
    proxy = container(deployment)
    assert proxy["lifecycle"]["preStop"]["exec"]["command"] == ["/etc/mnist-nginx/stop.sh"]
    drain = int(environment(proxy).get("DRAIN_SECONDS", 5))
    template = (ROOT / "deploy" / "nginx" / "nginx.conf.template").read_text()
    shutdown = int(re.search(r"worker_shutdown_timeout (\d+)s;", template).group(1))
    assert pod(deployment)["terminationGracePeriodSeconds"] > drain + shutdown


# --- the InferenceService against KServe's own types ------------------------------------

@cache
def kserve_types() -> dict[str, dict[str, str]]:
    """JSON field → type for every model class of the pinned KServe SDK, read from its
    generated sources (openapi_types and attribute_map) without importing the package."""
    spec = importlib.util.find_spec("kserve")
    assert spec, "the KServe SDK is missing: `make install` installs it (--no-deps)"
    types = {}
    for source in Path(spec.submodule_search_locations[0], "models").glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.ClassDef):
                tables = {t.targets[0].id: ast.literal_eval(t.value) for t in node.body
                          if isinstance(t, ast.Assign) and isinstance(t.targets[0], ast.Name)
                          and t.targets[0].id in {"openapi_types", "attribute_map"}}
                if len(tables) == 2:
                    types[node.name] = {tables["attribute_map"][field]: kind
                                        for field, kind in tables["openapi_types"].items()}
    return types


@cache
def kubernetes_definitions() -> tuple[dict, Registry]:
    folder = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    text = (folder / f"v{KUBERNETES}-local-strict" / "_definitions.json").read_text()
    definitions = json.loads(text)
    return definitions, Resource.from_contents(definitions) @ Registry()


def kubernetes_type(name: str) -> str:
    """KServe's name for a Kubernetes type (V1Container) → its definition's key."""
    definitions, _ = kubernetes_definitions()
    match = re.fullmatch(r"(?:K8sIoApi(\w+?))?(V\d\w*?)([A-Z]\w*)", name)
    group, version, kind = match.groups()
    suffix = f".{group.lower()}." if group else "."
    keys = [k for k in definitions["$defs"]
            if k.endswith(f"{suffix}{version.lower()}.{kind}")]
    assert len(keys) == 1, f"{name}: {keys}"
    return keys[0]


def check(value, kind: str, where: str) -> None:
    """Raise AssertionError where ``value`` is not of KServe's type ``kind``."""
    if kind.startswith("list["):
        assert isinstance(value, list), f"{where}: expected a list"
        for index, item in enumerate(value):
            check(item, kind[5:-1], f"{where}[{index}]")
    elif kind.startswith("dict("):
        assert isinstance(value, dict), f"{where}: expected a mapping"
        for key, item in value.items():
            check(item, kind[5:-1].split(", ", 1)[1], f"{where}.{key}")
    elif kind in {"str", "int", "bool", "float", "object", "ResourceQuantity"}:
        expected = {"str": str, "int": int, "bool": bool, "float": (int, float),
                    "object": object, "ResourceQuantity": (str, int, float)}[kind]
        assert isinstance(value, expected), f"{where}: expected {kind}, got {value!r}"
    elif kind in kserve_types():
        assert isinstance(value, dict), f"{where}: expected a {kind} mapping"
        fields = kserve_types()[kind]
        unknown = set(value) - set(fields)
        assert not unknown, f"{where}: {sorted(unknown)} are not fields of {kind}"
        for key, item in value.items():
            check(item, fields[key], f"{where}.{key}")
    else:  # a Kubernetes type: the official schema
        definitions, registry = kubernetes_definitions()
        schema = {"$ref": f"{definitions['$id']}#/$defs/{kubernetes_type(kind)}"}
        try:
            jsonschema.Draft202012Validator(schema, registry=registry).validate(value)
        except jsonschema.ValidationError as err:
            raise AssertionError(f"{where}: {err.message}") from None


def test_inference_service_matches_kserves_own_schema():
    (isvc,) = documents(KSERVE)
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    assert isvc["kind"] == "InferenceService"
    check(isvc, "V1beta1InferenceService", "InferenceService")


def test_the_grpc_inference_service_is_the_http_one_routing_grpc():
    """Knative routes one port per container: the twin routes gRPC (KServe's h2c on
    8081, probed over grpc.health.v1), and is otherwise the same container."""
    (isvc,) = documents(KSERVE_GRPC)
    check(isvc, "V1beta1InferenceService", "InferenceService")
    (http,) = documents(KSERVE)[0]["spec"]["predictor"]["containers"]
    (serving,) = isvc["spec"]["predictor"]["containers"]
    assert serving["ports"] == [{"name": "h2c", "containerPort": 8081, "protocol": "TCP"}]
    assert environment(serving)["GRPC_PORT"] == "8081" == environment(http)["GRPC_PORT"]
    for probe in ("readinessProbe", "livenessProbe"):
        assert serving[probe]["grpc"] == {"port": 8081}
    different = {"ports", "readinessProbe", "livenessProbe"}
    assert {k: v for k, v in serving.items() if k not in different} == \
        {k: v for k, v in http.items() if k not in different}


def test_the_schema_check_rejects_what_kserve_would(tmp_path):
    (isvc,) = documents(KSERVE)
    isvc["spec"]["predictor"]["minReplica"] = 1  # a typo KServe's API would reject
    with pytest.raises(AssertionError, match="minReplica"):
        check(isvc, "V1beta1InferenceService", "InferenceService")
    (isvc,) = documents(KSERVE)
    isvc["spec"]["predictor"]["containers"][0]["readinessProbe"]["httpGet"]["pth"] = "/"
    with pytest.raises(AssertionError, match="pth"):
        check(isvc, "V1beta1InferenceService", "InferenceService")


def test_inference_service_is_where_kserve_expects_it():
    (isvc,) = documents(KSERVE)
    predictor = isvc["spec"]["predictor"]
    (serving,) = predictor["containers"]
    env = environment(serving)
    assert serving["name"] == "kserve-container"
    assert env["PORT"] == "8080" and env["MODELS_DIR"] == "/mnt/models"
    assert env["STORAGE_URI"].startswith("pvc://")
    assert [p["containerPort"] for p in serving["ports"]] == [8080]
    assert serving["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": 8080}
    assert serving["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": 8080}
    assert int(env["WORKERS"]) == math.ceil(cpu(serving["resources"]["limits"]["cpu"]))
    assert mebibytes(serving["resources"]["requests"]["memory"]) >= \
        int(env["WORKERS"]) * WORKER_MIB
    assert serving["securityContext"]["readOnlyRootFilesystem"] is True
    Config.from_env(env)  # every setting it gives is one the app accepts


# --- each container's command, run on the host --------------------------------------------

def run_as_container(spec: dict, mounts: dict[str, Path], port: str, log: Path
                     ) -> tuple[subprocess.Popen, dict]:
    """Start the image's entrypoint (or the manifest's command) with the manifest's env;
    container paths under ``mounts`` are mapped to host folders, PORT to ``port``."""
    image = final_stage(ROOT / "Dockerfile")

    def host(value: str) -> str:
        for inside, outside in mounts.items():
            if value == inside or value.startswith(inside + "/"):
                return str(outside) + value[len(inside):]
        return value

    env = {**os.environ, **{k: v for k, v in image["env"].items() if k != "PATH"}}
    env.update({k: host(v) for k, v in environment(spec).items()})
    env["PORT"] = port
    env["GRPC_PORT"] = str(free_port())  # each worker binds it with SO_REUSEPORT
    argv = spec.get("command") or image["entrypoint"]
    argv = argv + (spec.get("args") or ([] if "command" in spec else image["cmd"]))
    executable = sys.executable if argv[0] == "python" else str(
        Path(sys.executable).parent / argv[0])
    handle = open(log, "wb")  # noqa: SIM115 - closed by the caller through the process
    process = subprocess.Popen([executable, *map(host, argv[1:])], cwd=ROOT, env=env,
                               stdout=handle, stderr=subprocess.STDOUT)
    process.log_handle = handle
    return process, env


def probe_until_ok(process: subprocess.Popen, url: str, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert process.poll() is None, "the container's command exited"
        try:
            if requests.get(url, timeout=3).status_code == 200:
                return
        except requests.RequestException:  # not listening yet
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} never answered 200")


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    process.wait(timeout=60)
    process.log_handle.close()


def probe_port(spec: dict, port: int | str) -> int:
    """The number a probe's port names, through the container's named ports."""
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in spec["ports"] if p["name"] == port]
    return number


@pytest.mark.parametrize("manifest", ["deployment", "inferenceservice"])
def test_container_answers_its_probes_on_its_port(manifest, base, fit_run, tmp_path):
    if manifest == "deployment":
        spec = container(base["Deployment", "mnist-api"])
        mounts = {"/app/models": fit_run.models_dir}
    else:
        (isvc,) = documents(KSERVE)
        (spec,) = isvc["spec"]["predictor"]["containers"]
        mounts = {"/mnt/models": fit_run.models_dir}  # where KServe puts STORAGE_URI
    mounts["/tmp"] = tmp_path / "tmp"  # the emptyDir
    mounts["/tmp"].mkdir()
    probes = [spec[name] for name in ("startupProbe", "readinessProbe", "livenessProbe")
              if name in spec]
    ports = {probe_port(spec, probe["httpGet"]["port"]) for probe in probes}
    assert ports == {int(environment(spec)["PORT"])}
    port = str(free_port())
    process, env = run_as_container(spec, mounts, port, tmp_path / "server.log")
    try:
        for probe in probes:
            probe_until_ok(process, f"http://127.0.0.1:{port}{probe['httpGet']['path']}")
        assert os.listdir(env["PROMETHEUS_MULTIPROC_DIR"])  # the metrics went to the emptyDir
        check_grpc_health(env["GRPC_PORT"])
        if manifest == "deployment":
            check_proxy_pod_in_front(base, port, tmp_path)
    finally:
        stop(process)


def check_grpc_health(port: str) -> None:
    """The container's gRPC server answers grpc.health.v1 as a Kubernetes gRPC probe asks."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                           timeout=30, wait_for_ready=True)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING


def test_the_grpc_port_is_declared_where_the_api_serves_it(base):
    spec = container(base["Deployment", "mnist-api"])
    assert probe_port(spec, "grpc") == int(environment(spec)["GRPC_PORT"])
    service = base["Service", "mnist-api"]
    (port,) = [p for p in service["spec"]["ports"] if p["name"] == "grpc"]
    assert port["targetPort"] == "grpc" and port["appProtocol"] == "kubernetes.io/h2c"


def check_proxy_pod_in_front(base: dict, api_port: str, tmp_path: Path) -> None:
    """The nginx pod's command, with its env and its ConfigMap (= deploy/nginx/), in front
    of the api: its probe port answers, and /ready comes through it."""
    deployment = base["Deployment", "mnist-proxy"]
    spec = container(deployment)
    (config,) = [m for m in spec["volumeMounts"] if m["name"] == "config"]
    env = environment(spec)
    for probe in ("readinessProbe", "livenessProbe"):
        assert probe_port(spec, spec[probe]["tcpSocket"]["port"]) == int(env["PORT"])
    (tmp_path / "proxy-tmp").mkdir()
    port = str(free_port())
    env.update(PORT=port, UPSTREAM=f"127.0.0.1:{api_port}",  # the Service, here on loopback
               NGINX_PREFIX=env["NGINX_PREFIX"].replace("/tmp", str(tmp_path / "proxy-tmp"), 1))
    command = [spec["command"][0].replace(config["mountPath"], str(ROOT / "deploy" / "nginx"))]
    with open(tmp_path / "proxy.log", "wb") as log:
        nginx = subprocess.Popen(command, env={**os.environ, **env}, stdout=log,
                                 stderr=subprocess.STDOUT)
        try:
            probe_until_ok(nginx, f"http://127.0.0.1:{port}/ready", seconds=30)
        finally:
            nginx.terminate()
            nginx.wait(timeout=30)


def test_training_job_command_finds_the_model_already_on_the_claim(base, fit_run, tmp_path):
    spec = container(base["Job", "mnist-train"])
    (tmp_path / "tmp").mkdir()
    mounts = {"/app/models": fit_run.models_dir, "/tmp": tmp_path / "tmp"}
    process, _ = run_as_container(spec, mounts, "0", tmp_path / "train.log")
    assert process.wait(timeout=300) == 0, (tmp_path / "train.log").read_text()[-3000:]
    process.log_handle.close()
    assert "not training" in (tmp_path / "train.log").read_text()
