"""launch(executor=kubernetes): the PyTorchJob, ConfigMap and env Secret manifests.

Validated with jsonschema against the published PyTorchJob CRD schema
(data/kubeflow.org_pytorchjobs.openapi_v3.yaml) and core/v1 schemas derived from the
kubernetes client's models (data/core_v1_pod.schema.json), with unknown fields refused
as the API server's strict field validation does. The pod command is run with the
environment the training operator sets in each pod (pkg/controller.v1/pytorch/envvar.go:
PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK, MASTER_ADDR, MASTER_PORT) and a fake
torchrun, whose argv torch's own torchrun parser reads. Submission goes to a fake API
server on 127.0.0.1.
"""

from __future__ import annotations

import copy
import json
import os
import stat
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import jsonschema
import pytest
import yaml
from conftest import HERE
from torch.distributed.run import get_args_parser

from falcon_h1.errors import ConfigValueError
from launchers import ClusterError, validate_executor
from recipes.launch import launch

DATA = HERE / "data"
ENV_VALUE = "pw-6c1d9e-only-in-the-secret"


def _refuse_unknown_fields(node):
    """Strict field validation: an object schema with listed properties allows no others."""
    if isinstance(node, dict):
        if "properties" in node and "additionalProperties" not in node:
            node["additionalProperties"] = False
        for value in node.values():
            _refuse_unknown_fields(value)
    elif isinstance(node, list):
        for value in node:
            _refuse_unknown_fields(value)


def _core_definitions() -> dict:
    return json.loads((DATA / "core_v1_pod.schema.json").read_text())["$defs"]


@pytest.fixture(scope="module")
def pytorchjob_schema():
    schema = yaml.safe_load((DATA / "kubeflow.org_pytorchjobs.openapi_v3.yaml").read_text())
    _refuse_unknown_fields(schema)
    schema["$defs"] = _core_definitions()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


@pytest.fixture(scope="module")
def configmap_schema():
    return jsonschema.Draft202012Validator({"$ref": "#/$defs/V1ConfigMap", "$defs": _core_definitions()})


@pytest.fixture
def kube_recipe(recipe):
    recipe.executor.kind = "kubernetes"
    kube = recipe.executor.kubernetes
    kube.image = "ghcr.io/example/falcon-h1-train:0.1"
    kube.namespace = "llm"
    kube.nodes = 3
    kube.gpus_per_node = 8
    recipe.executor.nproc_per_node = 8  # as configs/executor/kubernetes.yaml has it
    kube.cpu = "48"
    kube.memory = "900Gi"
    kube.pvcs = {"shared-runs": "/runs", "datasets": "/data"}
    kube.env_vars = {"NCCL_DEBUG": "INFO", "SERVICE_PASSWORD": ENV_VALUE}
    kube.secret_env = {"WANDB_API_KEY": "wandb-credentials:api-key", "HF_TOKEN": "hf:token"}
    kube.service_account = "trainer"
    recipe.train.run_dir = "exp/falcon-3n"
    return recipe


def manifests_by_kind(rendered: str) -> dict[str, dict]:
    return {manifest["kind"]: manifest for manifest in yaml.safe_load_all(rendered)}


def manifests(recipe) -> tuple[dict, dict]:
    """The ConfigMap and the PyTorchJob of a dry run."""
    by_kind = manifests_by_kind(launch(recipe, dryrun=True).rendered)
    return by_kind["ConfigMap"], by_kind["PyTorchJob"]


def test_manifests_match_the_published_schemas(kube_recipe, pytorchjob_schema, configmap_schema):
    configmap, job = manifests(kube_recipe)
    pytorchjob_schema.validate(job)
    configmap_schema.validate(configmap)
    assert (job["apiVersion"], job["kind"]) == ("kubeflow.org/v1", "PyTorchJob")


def test_a_wrong_field_type_or_unknown_field_fails_validation(kube_recipe, pytorchjob_schema, configmap_schema):
    _, job = manifests(kube_recipe)
    broken = copy.deepcopy(job)
    broken["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] = "2"  # int32 in the CRD
    assert not pytorchjob_schema.is_valid(broken)
    broken = copy.deepcopy(job)
    broken["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["ports"][0][
        "containerPort"
    ] = "23456"
    assert not pytorchjob_schema.is_valid(broken)
    broken = copy.deepcopy(job)
    container = broken["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    container["volumeMount"] = container.pop("volumeMounts")  # typo'd field name
    assert not pytorchjob_schema.is_valid(broken)
    broken = copy.deepcopy(job)
    del broken["spec"]["pytorchReplicaSpecs"]  # required by the CRD
    assert not pytorchjob_schema.is_valid(broken)
    assert not configmap_schema.is_valid({"apiVersion": "v1", "kind": "ConfigMap", "data": {"recipe.yaml": 3}})


def test_replicas_resources_volumes_and_secrets(kube_recipe):
    configmap, job = manifests(kube_recipe)
    spec = job["spec"]
    assert job["metadata"]["namespace"] == "llm"
    assert spec["nprocPerNode"] == "8"
    assert spec["runPolicy"]["backoffLimit"] == 3
    replicas = spec["pytorchReplicaSpecs"]
    assert {kind: r["replicas"] for kind, r in replicas.items()} == {"Master": 1, "Worker": 2}  # 3 nodes
    assert {r["restartPolicy"] for r in replicas.values()} == {"OnFailure"}
    for replica in replicas.values():
        pod = replica["template"]["spec"]
        assert pod["serviceAccountName"] == "trainer"
        (container,) = pod["containers"]
        assert container["name"] == "pytorch" and container["image"] == "ghcr.io/example/falcon-h1-train:0.1"
        assert container["ports"] == [{"containerPort": 23456, "name": "pytorchjob-port"}]
        assert container["resources"]["limits"] == {"nvidia.com/gpu": "8", "cpu": "48", "memory": "900Gi"}
        env = {item["name"]: item for item in container["env"]}
        assert env["NCCL_DEBUG"] == {
            "name": "NCCL_DEBUG",
            "valueFrom": {"secretKeyRef": {"name": f"{job['metadata']['name']}-env", "key": "NCCL_DEBUG"}},
        }
        assert env["WANDB_API_KEY"] == {
            "name": "WANDB_API_KEY",
            "valueFrom": {"secretKeyRef": {"name": "wandb-credentials", "key": "api-key"}},
        }
        assert "value" not in env["HF_TOKEN"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        claims = {
            volumes[name]["persistentVolumeClaim"]["claimName"]: path
            for path, name in mounts.items()
            if "persistentVolumeClaim" in volumes[name]
        }
        assert claims == {"shared-runs": "/runs", "datasets": "/data"}
        assert volumes[mounts["/etc/falcon-recipe"]]["configMap"]["name"] == configmap["metadata"]["name"]
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    # The recipe travels in the ConfigMap, with run_dir placed on the first PVC.
    recipe = yaml.safe_load(configmap["data"]["recipe.yaml"])
    assert recipe["train"]["run_dir"] == "/runs/exp/falcon-3n"
    assert recipe["executor"]["kubernetes"]["image"] == "ghcr.io/example/falcon-h1-train:0.1"


def test_env_vars_values_reach_the_pods_only_through_a_secret(kube_recipe):
    result = launch(kube_recipe, dryrun=True)
    by_kind = manifests_by_kind(result.rendered)
    assert list(by_kind) == ["Secret", "ConfigMap", "PyTorchJob"]  # created in this order
    secret, job = by_kind["Secret"], by_kind["PyTorchJob"]
    assert (secret["apiVersion"], secret["type"], secret["metadata"]["namespace"]) == ("v1", "Opaque", "llm")
    assert secret["metadata"]["name"] == f"{job['metadata']['name']}-env"
    assert secret["stringData"] == {"NCCL_DEBUG": "***", "SERVICE_PASSWORD": "***"}  # printed masked
    recipe = yaml.safe_load(by_kind["ConfigMap"]["data"]["recipe.yaml"])
    assert recipe["executor"]["kubernetes"]["env_vars"] == {"NCCL_DEBUG": "***", "SERVICE_PASSWORD": "***"}
    assert ENV_VALUE not in result.rendered and ENV_VALUE not in result.recipe_yaml and ENV_VALUE not in str(result)


def test_env_var_names_are_checked(kube_recipe):
    kube_recipe.executor.kubernetes.env_vars = {"NOT-A-NAME": "x"}
    with pytest.raises(ConfigValueError, match="executor.kubernetes.env_vars.*'NOT-A-NAME' is not an environment"):
        validate_executor(kube_recipe.executor)


def test_single_node_job_has_only_a_master(kube_recipe):
    kube_recipe.executor.kubernetes.nodes = 1
    _, job = manifests(kube_recipe)
    assert list(job["spec"]["pytorchReplicaSpecs"]) == ["Master"]


def test_pod_command_runs_torchrun_with_the_operator_rendezvous(kube_recipe, tmp_path):
    result = launch(kube_recipe, dryrun=True)
    job = manifests_by_kind(result.rendered)["PyTorchJob"]
    container = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    fake_torchrun = tmp_path / "torchrun"
    fake_torchrun.write_text('#!/bin/bash\nprintf "%s\\n" "$@" > "$ARGV_FILE"\n')
    fake_torchrun.chmod(fake_torchrun.stat().st_mode | stat.S_IXUSR)
    operator_env = {  # worker replica 1 of a 3-node job, as envvar.go sets them
        "PET_NNODES": "3",
        "PET_NPROC_PER_NODE": job["spec"]["nprocPerNode"],
        "PET_NODE_RANK": "2",
        "MASTER_ADDR": f"{job['metadata']['name']}-master-0",
        "MASTER_PORT": "23456",
    }
    argv_file = tmp_path / "argv"
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "ARGV_FILE": str(argv_file), **operator_env}

    subprocess.run(container["command"], env=env, check=True, timeout=30)

    args = get_args_parser().parse_args(argv_file.read_text().splitlines())
    assert (args.nnodes, args.nproc_per_node, args.node_rank) == ("3", "8", 2)
    assert (args.master_addr, args.master_port) == (operator_env["MASTER_ADDR"], 23456)
    assert args.module and args.training_script == "recipes.worker"
    assert args.training_script_args == [result.recipe_path]
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert os.path.dirname(result.recipe_path) in mounts
    assert result.pod_name == f"{job['metadata']['name']}-master-0"
    assert result.logs_command == f"kubectl logs -n llm -f {result.pod_name}"


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("image", None, ["executor.kubernetes.image = None", "container image is required"]),
        ("nodes", 0, ["executor.kubernetes.nodes = 0", ">= 1"]),
        ("restart_policy", "Sometimes", ["executor.kubernetes.restart_policy = 'Sometimes'", "OnFailure"]),
        (
            "secret_env",
            {"WANDB_API_KEY": "wandb"},
            ["executor.kubernetes.secret_env['WANDB_API_KEY'] = 'wandb'", "SECRET_NAME:KEY"],
        ),
        ("namespace", "LLM_team", ["executor.kubernetes.namespace = 'LLM_team'"]),
        ("gpus_per_node", 4, ["executor.nproc_per_node = 8 disagrees with executor.kubernetes.gpus_per_node = 4"]),
    ],
)
def test_invalid_settings_are_named(kube_recipe, field, value, words):
    setattr(kube_recipe.executor.kubernetes, field, value)
    with pytest.raises(ConfigValueError) as raised:
        validate_executor(kube_recipe.executor)
    for word in words:
        assert word in str(raised.value)


def test_run_dir_off_the_volumes_is_refused(kube_recipe):
    kube_recipe.train.run_dir = "/tmp/run"
    with pytest.raises(ConfigValueError, match=r"train.run_dir = '/tmp/run' is not on any PersistentVolumeClaim"):
        launch(kube_recipe, dryrun=True)


class _FakeKubernetesApi(BaseHTTPRequestHandler):
    """Records requests and answers like the API server does for a created object."""

    requests: list[tuple[str, str, dict]] = []

    def _answer(self):
        length = int(self.headers.get("Content-Length", 0))
        body = json.loads(self.rfile.read(length) or b"{}")
        self.requests.append((self.command, self.path, body))
        answer = dict(body, metadata=dict(body.get("metadata", {}), uid="uid-1234"))
        payload = json.dumps(answer).encode()
        self.send_response(201 if self.command == "POST" else 200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_POST = do_PATCH = _answer

    def log_message(self, *args):
        pass


# kubernetes 36's REST layer calls urllib3 1.26's deprecated getheader(); not ours to fix.
@pytest.mark.filterwarnings("ignore:HTTPResponse.getheader:DeprecationWarning")
def test_submission_creates_the_secret_the_configmap_and_the_pytorchjob(kube_recipe, tmp_path, monkeypatch):
    server = HTTPServer(("127.0.0.1", 0), _FakeKubernetesApi)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    kubeconfig = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "fake", "cluster": {"server": f"http://127.0.0.1:{server.server_port}"}}],
        "users": [{"name": "me", "user": {"token": "not-a-secret"}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "me"}}],
        "current-context": "fake",
    }
    (tmp_path / "kubeconfig").write_text(yaml.safe_dump(kubeconfig))
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "kubeconfig"))
    _FakeKubernetesApi.requests = []
    try:
        result = launch(kube_recipe)
    finally:
        server.shutdown()
        server.server_close()

    (post_secret, secret_body), (post_map, map_body), (post_job, job_body), (patch_map, map_patch), (
        patch_secret, secret_patch) = [((method, path), body) for method, path, body in _FakeKubernetesApi.requests]
    assert post_secret == ("POST", "/api/v1/namespaces/llm/secrets")
    assert secret_body["stringData"] == {"NCCL_DEBUG": "INFO", "SERVICE_PASSWORD": ENV_VALUE}
    assert post_map == ("POST", "/api/v1/namespaces/llm/configmaps")
    assert post_job == ("POST", "/apis/kubeflow.org/v1/namespaces/llm/pytorchjobs")
    assert ENV_VALUE not in json.dumps([map_body, job_body])  # only the Secret holds the value
    assert patch_map == ("PATCH", f"/api/v1/namespaces/llm/configmaps/{map_body['metadata']['name']}")
    assert patch_secret == ("PATCH", f"/api/v1/namespaces/llm/secrets/{secret_body['metadata']['name']}")
    assert job_body["metadata"]["name"] == result.job_id and not result.dryrun
    for patch_body in (map_patch, secret_patch):
        owner = patch_body["metadata"]["ownerReferences"][0]
        assert (owner["kind"], owner["name"], owner["uid"]) == ("PyTorchJob", result.job_id, "uid-1234")


def test_submission_without_credentials_is_a_clear_error(kube_recipe, tmp_path, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing-kubeconfig"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(ClusterError, match="No Kubernetes credentials.*Nothing was submitted"):
        launch(kube_recipe)


def test_master_port_is_the_rendezvous_port(kube_recipe, pytorchjob_schema):
    kube_recipe.executor.kubernetes.master_port = 29400
    _, job = manifests(kube_recipe)
    pytorchjob_schema.validate(job)
    for replica in job["spec"]["pytorchReplicaSpecs"].values():
        (container,) = replica["template"]["spec"]["containers"]
        assert container["ports"] == [{"containerPort": 29400, "name": "pytorchjob-port"}]
    kube_recipe.executor.kubernetes.master_port = 70000
    with pytest.raises(ConfigValueError, match=r"executor.kubernetes.master_port = 70000 is not a TCP port"):
        validate_executor(kube_recipe.executor)


def test_setup_commands_run_in_the_pod_before_torchrun(kube_recipe, tmp_path):
    kube_recipe.executor.kubernetes.setup_commands = ["export FROM_SETUP=1", "cd /"]
    _, job = manifests(kube_recipe)
    container = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    fake_torchrun = tmp_path / "torchrun"
    fake_torchrun.write_text('#!/bin/bash\necho "$FROM_SETUP $PWD" > "$SEEN_FILE"\n')
    fake_torchrun.chmod(fake_torchrun.stat().st_mode | stat.S_IXUSR)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "SEEN_FILE": str(tmp_path / "seen"), "PET_NNODES": "3",
           "PET_NPROC_PER_NODE": "8", "PET_NODE_RANK": "0", "MASTER_ADDR": "m", "MASTER_PORT": "23456"}
    subprocess.run(container["command"], env=env, check=True, timeout=30)
    assert (tmp_path / "seen").read_text().split() == ["1", "/"]
