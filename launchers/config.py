"""The typed executor settings: the `executor` group of a recipe (configs/executor/*.yaml).

`recipes.config.RecipeConfig.executor` is an `ExecutorConfig`; the launchers read these
dataclasses and nothing else of the recipe.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

EXECUTOR_KINDS = ("local", "slurm", "kubernetes")


@dataclass
class SlurmConfig:
    account: Optional[str] = None
    partition: Optional[str] = None
    qos: Optional[str] = None
    nodes: int = 1
    gpus_per_node: int = 0
    ntasks_per_node: int = 1
    cpus_per_task: Optional[int] = None
    time: str = "01:00:00"
    container_image: Optional[str] = None
    container_mounts: list[str] = field(default_factory=list)
    env_vars: dict[str, str] = field(default_factory=dict)
    # local | ssh
    tunnel: str = "local"
    ssh_host: Optional[str] = None
    ssh_user: Optional[str] = None
    ssh_port: Optional[int] = None  # None: ssh's default (22, or the host's ~/.ssh/config entry)
    ssh_identity: Optional[str] = None
    job_dir: Optional[str] = None
    requeue: bool = True
    # Requeues of a job whose workers fail (preemption and time-limit requeues do not count).
    max_retries: int = 0
    master_port: int = 29500
    # Command prefix that sets up Python on the compute nodes (venv activate, module load).
    setup_commands: list[str] = field(default_factory=list)


@dataclass
class KubernetesConfig:
    namespace: str = "default"
    image: Optional[str] = None
    nodes: int = 1
    gpus_per_node: int = 8
    cpu: Optional[str] = None
    memory: Optional[str] = None
    # {"claim_name": "mount_path"}
    pvcs: dict[str, str] = field(default_factory=dict)
    env_vars: dict[str, str] = field(default_factory=dict)
    # Environment variables taken from Kubernetes secrets: {"ENV_NAME": "secret-name:key"}
    secret_env: dict[str, str] = field(default_factory=dict)
    restart_policy: str = "OnFailure"
    backoff_limit: int = 3
    service_account: Optional[str] = None
    # The Master's rendezvous port (the training operator's default is 23456).
    master_port: int = 23456
    # Shell commands run in each pod before torchrun (e.g. `source /opt/venv/bin/activate`).
    setup_commands: list[str] = field(default_factory=list)


@dataclass
class ExecutorConfig:
    kind: str = "local"  # one of EXECUTOR_KINDS
    nproc_per_node: int = 1
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    kubernetes: KubernetesConfig = field(default_factory=KubernetesConfig)
