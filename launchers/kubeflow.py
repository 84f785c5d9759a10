"""executor.kind=kubernetes: a Kubeflow PyTorchJob (training-operator, kubeflow.org/v1).

The manifests: a Secret holding the values of `executor.kubernetes.env_vars` (when there are
any), a ConfigMap holding the resolved recipe, and the PyTorchJob, one pod per node (a Master,
plus `nodes - 1` Workers), each running

    torchrun --nnodes=$PET_NNODES --nproc-per-node=$PET_NPROC_PER_NODE
             --node-rank=$PET_NODE_RANK --master-addr=$MASTER_ADDR --master-port=$MASTER_PORT
             -m WORKER_MODULE /etc/falcon-recipe/recipe.yaml

with the rendezvous variables the training operator sets in every pod (from
spec.nprocPerNode, the replica counts and the Master's `pytorchjob-port`, which is
`executor.kubernetes.master_port`). Pods are built
with the official `kubernetes` client's models; environment values reach the container only as
`valueFrom.secretKeyRef` references (to that Secret, or to the user's own for `secret_env`):
the recipe in the ConfigMap and the printed manifests show their names with the values masked.
A pod restarted by the operator (restartPolicy,
runPolicy.backoffLimit) resumes from the latest checkpoint in `train.run_dir`, which is
why run_dir belongs on a PersistentVolumeClaim.

NeMo-Run 0.11.1's KubeflowExecutor is not used: it emits a TrainJob (Training Operator
v2, trainer.kubeflow.org), not a PyTorchJob, and needs a kubeconfig just to be built.
"""

from __future__ import annotations

import copy
import os
import re
import time
import warnings
from typing import Any

import yaml

from falcon_h1.errors import ConfigValueError
from launchers.config import ExecutorConfig, KubernetesConfig
from launchers.job import MASKED_ENV_VALUE, RECIPE_FILE_NAME, Job
from launchers.result import ClusterError, LaunchResult

API_GROUP, API_VERSION, PLURAL = "kubeflow.org", "v1", "pytorchjobs"
CONTAINER_NAME = "pytorch"  # the training operator finds the container by this name
PORT_NAME = "pytorchjob-port"  # ...and the rendezvous port by this one
RESTART_POLICIES = ("Always", "OnFailure", "Never", "ExitCode")
RECIPE_MOUNT = "/etc/falcon-recipe"
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # also a valid Secret data key
DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
APP_LABEL = "falcon-h1-train"


class _ManifestDumper(yaml.SafeDumper):
    """Readable manifests: no YAML anchors, multi-line strings (the recipe) as `|` blocks."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _represent_str(dumper: yaml.SafeDumper, text: str):
    style = "|" if "\n" in text else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


_ManifestDumper.add_representer(str, _represent_str)


def to_yaml(manifests: list[dict]) -> str:
    return yaml.dump_all(manifests, Dumper=_ManifestDumper, sort_keys=False)


def _fail(key: str, value: Any, allowed: str, message: str) -> None:
    raise ConfigValueError(key, value, allowed, message)


def _nproc_per_node(executor: ExecutorConfig) -> int:
    kube = executor.kubernetes
    return kube.gpus_per_node if kube.gpus_per_node > 0 else executor.nproc_per_node


def validate(executor: ExecutorConfig) -> None:
    kube = executor.kubernetes
    if not kube.image:
        _fail("executor.kubernetes.image", kube.image, "a container image",
              f"executor.kubernetes.image = {kube.image!r}: a container image is required (one with this project "
              "and its dependencies installed: `docker build -t IMAGE .` in the repository builds one from its Dockerfile).")
    if not isinstance(kube.nodes, int) or kube.nodes < 1:
        _fail("executor.kubernetes.nodes", kube.nodes, "an integer >= 1",
              f"executor.kubernetes.nodes = {kube.nodes!r} is not allowed: "
              "the number of pods (nodes) must be an integer >= 1.")
    if not isinstance(kube.gpus_per_node, int) or kube.gpus_per_node < 0:
        _fail("executor.kubernetes.gpus_per_node", kube.gpus_per_node, "an integer >= 0",
              f"executor.kubernetes.gpus_per_node = {kube.gpus_per_node!r} is not allowed: "
              "an integer >= 0 (0 = CPU pods).")
    nproc = executor.nproc_per_node
    if not isinstance(nproc, int) or nproc < 1:
        _fail("executor.nproc_per_node", nproc, "an integer >= 1",
              f"executor.nproc_per_node = {nproc!r} is not allowed: an integer >= 1.")
    if kube.gpus_per_node > 0 and nproc not in (1, kube.gpus_per_node):
        _fail("executor.nproc_per_node", nproc, f"1 or executor.kubernetes.gpus_per_node = {kube.gpus_per_node}",
              f"executor.nproc_per_node = {nproc} disagrees with executor.kubernetes.gpus_per_node = "
              f"{kube.gpus_per_node}: a GPU pod runs one worker process per GPU; set nproc_per_node to "
              f"{kube.gpus_per_node} (or 1, which means the same here).")
    if not DNS_LABEL.fullmatch(kube.namespace or "") or len(kube.namespace) > 63:
        _fail("executor.kubernetes.namespace", kube.namespace, "a lowercase DNS label of at most 63 characters",
              f"executor.kubernetes.namespace = {kube.namespace!r} is not a Kubernetes namespace name "
              "(a lowercase DNS label of at most 63 characters).")
    if kube.restart_policy not in RESTART_POLICIES:
        _fail("executor.kubernetes.restart_policy", kube.restart_policy, ", ".join(RESTART_POLICIES),
              f"executor.kubernetes.restart_policy = {kube.restart_policy!r} is not allowed: "
              f"one of {', '.join(RESTART_POLICIES)}.")
    if not isinstance(kube.backoff_limit, int) or kube.backoff_limit < 0:
        _fail("executor.kubernetes.backoff_limit", kube.backoff_limit, "an integer >= 0",
              f"executor.kubernetes.backoff_limit = {kube.backoff_limit!r} is not allowed: an integer >= 0.")
    port = kube.master_port
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        _fail("executor.kubernetes.master_port", port, "1..65535",
              f"executor.kubernetes.master_port = {port!r} is not a TCP port: use 1..65535.")
    for env_name in [*kube.env_vars, *kube.secret_env]:
        if not ENV_NAME.fullmatch(str(env_name)):
            _fail("executor.kubernetes.env_vars", env_name, "environment variable names ([A-Za-z_][A-Za-z0-9_]*)",
                  f"executor.kubernetes.env_vars / secret_env key {env_name!r} is not an environment variable name "
                  "([A-Za-z_][A-Za-z0-9_]*).")
    for env_name, reference in kube.secret_env.items():
        secret, _, key = str(reference).partition(":")
        if not secret or not key:
            _fail(f"executor.kubernetes.secret_env[{env_name!r}]", reference, "'SECRET_NAME:KEY'",
                  f"executor.kubernetes.secret_env[{env_name!r}] = {reference!r} is not allowed: use "
                  "'SECRET_NAME:KEY' (the value is read from that Kubernetes secret at run time).")
    for claim, mount_path in kube.pvcs.items():
        if not str(mount_path).startswith("/"):
            _fail(f"executor.kubernetes.pvcs[{claim!r}]", mount_path, "an absolute mount path",
                  f"executor.kubernetes.pvcs[{claim!r}] = {mount_path!r} is not allowed: the mount path must be "
                  "absolute.")


def _run_dir_in_pod(kube: KubernetesConfig, run_dir: str) -> str:
    mounts = [str(path).rstrip("/") for path in kube.pvcs.values()]
    if not mounts:
        warnings.warn(
            "executor.kubernetes.pvcs is empty: checkpoints in train.run_dir are lost when a pod ends, so a "
            "restarted pod starts training from scratch.",
            stacklevel=3,
        )
        return run_dir
    if not os.path.isabs(run_dir):
        return os.path.join(mounts[0], run_dir)
    if not any(run_dir == mount or run_dir.startswith(mount + "/") for mount in mounts):
        _fail("train.run_dir", run_dir, "a directory on one of executor.kubernetes.pvcs' mount paths",
              f"train.run_dir = {run_dir!r} is not on any PersistentVolumeClaim mount (executor.kubernetes.pvcs = "
              f"{dict(kube.pvcs)}): a restarted pod could not resume from its checkpoints. Put run_dir under one "
              "of the mount paths, or give a relative run_dir (placed under the first one).")
    return run_dir


def _job_name(name: str) -> str:
    # Pod and service names are <job>-master-0 / <job>-worker-N: keep them DNS labels.
    base = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:36] or "falcon"
    return f"{base}-{time.strftime('%m%d%H%M%S')}"


def _worker_script(kube: KubernetesConfig, worker_module: str) -> str:
    torchrun = (
        "torchrun --nnodes=${PET_NNODES} --nproc-per-node=${PET_NPROC_PER_NODE} --node-rank=${PET_NODE_RANK} "
        "--master-addr=${MASTER_ADDR} --master-port=${MASTER_PORT} --max-restarts=0 "
        f"-m {worker_module} {RECIPE_MOUNT}/{RECIPE_FILE_NAME}"
    )
    return " && ".join(["set -e", *kube.setup_commands, f"exec {torchrun}"])


def _env_from_secrets(kube: KubernetesConfig, env_secret_name: str):
    from kubernetes import client

    references = {str(name): (env_secret_name, str(name)) for name in kube.env_vars}
    for env_name, reference in kube.secret_env.items():
        secret, _, key = str(reference).partition(":")
        references[str(env_name)] = (secret, key)
    return [
        client.V1EnvVar(
            name=env_name,
            value_from=client.V1EnvVarSource(secret_key_ref=client.V1SecretKeySelector(name=secret, key=key)),
        )
        for env_name, (secret, key) in references.items()
    ]


def _pod_template(kube: KubernetesConfig, configmap_name: str, env_secret_name: str, worker_module: str,
                  labels: dict):
    from kubernetes import client

    env = _env_from_secrets(kube, env_secret_name)
    limits: dict[str, str] = {}
    requests: dict[str, str] = {}
    if kube.gpus_per_node > 0:
        limits["nvidia.com/gpu"] = str(kube.gpus_per_node)
    for resource, amount in (("cpu", kube.cpu), ("memory", kube.memory)):
        if amount is not None:
            limits[resource] = requests[resource] = str(amount)

    volumes = [
        client.V1Volume(name="recipe", config_map=client.V1ConfigMapVolumeSource(name=configmap_name)),
        # NCCL and DataLoader workers need more shared memory than the container default (64 MiB).
        client.V1Volume(name="dshm", empty_dir=client.V1EmptyDirVolumeSource(medium="Memory")),
    ]
    mounts = [
        client.V1VolumeMount(name="recipe", mount_path=RECIPE_MOUNT, read_only=True),
        client.V1VolumeMount(name="dshm", mount_path="/dev/shm"),
    ]
    for index, (claim, mount_path) in enumerate(kube.pvcs.items()):
        volume_name = f"pvc-{index}"
        volumes.append(
            client.V1Volume(
                name=volume_name,
                persistent_volume_claim=client.V1PersistentVolumeClaimVolumeSource(claim_name=str(claim)),
            )
        )
        mounts.append(client.V1VolumeMount(name=volume_name, mount_path=str(mount_path)))

    container = client.V1Container(
        name=CONTAINER_NAME,
        image=kube.image,
        command=["bash", "-c", _worker_script(kube, worker_module)],
        env=env or None,
        ports=[
            client.V1ContainerPort(name=PORT_NAME, container_port=kube.master_port)
        ],
        resources=client.V1ResourceRequirements(limits=limits or None, requests=requests or None),
        volume_mounts=mounts,
    )
    spec = client.V1PodSpec(
        containers=[container],
        volumes=volumes,
        service_account_name=kube.service_account,
    )
    return client.V1PodTemplateSpec(metadata=client.V1ObjectMeta(labels=labels), spec=spec)


def build_manifests(job: Job, recipe_yaml: str) -> tuple[dict | None, dict, dict]:
    """(Secret of the env_vars values or None when there are none, ConfigMap, PyTorchJob) as plain
    dicts; `recipe_yaml` must already name the pod's run_dir."""
    from kubernetes import client

    kube = job.executor.kubernetes
    job_name = _job_name(job.name)
    configmap_name, env_secret_name = f"{job_name}-recipe", f"{job_name}-env"
    labels = {"app.kubernetes.io/name": APP_LABEL, "app.kubernetes.io/instance": job_name}
    serialize = client.ApiClient().sanitize_for_serialization

    secret = None
    if kube.env_vars:
        secret = serialize(client.V1Secret(
            api_version="v1",
            kind="Secret",
            metadata=client.V1ObjectMeta(name=env_secret_name, namespace=kube.namespace, labels=labels),
            type="Opaque",
            string_data={str(name): str(value) for name, value in kube.env_vars.items()},
        ))
    configmap = client.V1ConfigMap(
        api_version="v1",
        kind="ConfigMap",
        metadata=client.V1ObjectMeta(name=configmap_name, namespace=kube.namespace, labels=labels),
        data={RECIPE_FILE_NAME: recipe_yaml},
    )
    template = serialize(_pod_template(kube, configmap_name, env_secret_name, job.worker_module, labels))
    replicas = {"Master": 1, "Worker": kube.nodes - 1}
    pytorch_job = {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": "PyTorchJob",
        "metadata": {"name": job_name, "namespace": kube.namespace, "labels": labels},
        "spec": {
            "nprocPerNode": str(_nproc_per_node(job.executor)),
            "runPolicy": {"backoffLimit": kube.backoff_limit, "cleanPodPolicy": "None"},
            "pytorchReplicaSpecs": {
                kind: {"replicas": count, "restartPolicy": kube.restart_policy, "template": copy.deepcopy(template)}
                for kind, count in replicas.items()
                if count > 0
            },
        },
    }
    return secret, serialize(configmap), pytorch_job


def _masked(secret: dict) -> dict:
    """The Secret as a dry run prints it: the names, not the values."""
    return {**secret, "stringData": {name: MASKED_ENV_VALUE for name in secret["stringData"]}}


def _load_kube_config():
    from kubernetes import config as kube_config

    try:
        # The client reads $KUBECONFIG when it is imported; read it now instead.
        kube_config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))
    except Exception as kubeconfig_error:
        try:
            kube_config.load_incluster_config()
        except Exception:
            raise ClusterError(
                f"No Kubernetes credentials: loading ~/.kube/config (or $KUBECONFIG) failed with "
                f"{kubeconfig_error!s}, and this is not a pod with a service account. Nothing was submitted."
            ) from kubeconfig_error


def submit(secret: dict | None, configmap: dict, pytorch_job: dict) -> None:
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    _load_kube_config()
    namespace = pytorch_job["metadata"]["namespace"]
    try:
        if secret is not None:
            client.CoreV1Api().create_namespaced_secret(namespace, secret)
        client.CoreV1Api().create_namespaced_config_map(namespace, configmap)
        created = client.CustomObjectsApi().create_namespaced_custom_object(
            API_GROUP, API_VERSION, namespace, PLURAL, pytorch_job
        )
    except ApiException as error:
        hint = " Is the Kubeflow training operator (PyTorchJob CRD) installed?" if error.status == 404 else ""
        raise ClusterError(
            f"The Kubernetes API refused the job (HTTP {error.status} {error.reason}): {error.body}.{hint}"
        ) from error
    # Let the recipe ConfigMap and the env Secret be deleted together with the job.
    owner = {
        "apiVersion": pytorch_job["apiVersion"],
        "kind": pytorch_job["kind"],
        "name": pytorch_job["metadata"]["name"],
        "uid": created["metadata"]["uid"],
    }
    owned = {"metadata": {"ownerReferences": [owner]}}
    try:
        client.CoreV1Api().patch_namespaced_config_map(configmap["metadata"]["name"], namespace, owned)
        if secret is not None:
            client.CoreV1Api().patch_namespaced_secret(secret["metadata"]["name"], namespace, owned)
    except ApiException:
        pass  # cosmetic: the ConfigMap and Secret just outlive the job


def launch(job: Job, dryrun: bool) -> LaunchResult:
    run_dir = _run_dir_in_pod(job.executor.kubernetes, job.run_dir)
    recipe_yaml = job.recipe_yaml_for(run_dir)
    secret, configmap, pytorch_job = build_manifests(job, recipe_yaml)
    name, namespace = pytorch_job["metadata"]["name"], pytorch_job["metadata"]["namespace"]
    master_pod = f"{name}-master-0"
    result = LaunchResult(
        kind="kubernetes",
        dryrun=dryrun,
        run_dir=run_dir,
        recipe_yaml=recipe_yaml,
        recipe_path=f"{RECIPE_MOUNT}/{RECIPE_FILE_NAME}",
        rendered=to_yaml([_masked(secret), configmap, pytorch_job] if secret else [configmap, pytorch_job]),
        job_id=name,
        pod_name=master_pod,
        logs_command=f"kubectl logs -n {namespace} -f {master_pod}",
    )
    if not dryrun:
        submit(secret, configmap, pytorch_job)
    return result


def manifests_from(result: LaunchResult) -> list[dict[str, Any]]:
    """The manifests of a (dry-run) result, parsed back from its YAML."""
    return list(yaml.safe_load_all(result.rendered))
