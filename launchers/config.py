"""The `cluster` config group: where and how a run is launched (conf/cluster/*.yaml).

`ClusterConfig` is the typed schema (the root schema in recipes/engine/config.py nests it under `cluster`, so an
unknown key fails at composition); `validate_cluster(cfg)` checks what types cannot and returns every
problem at once, each naming its key and the fix.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional

KINDS = ("local", "slurm")


@dataclass
class ClusterConfig:
    # local: torchrun on this machine; slurm: an sbatch job (one srun task = one torchrun agent per node)
    kind: str = "local"
    nodes: int = 1
    # processes (ranks) per node; on GPU nodes = gpus_per_node
    nproc_per_node: int = 1
    # GPUs to allocate per node (0 = CPU job: no --gpus-per-node line)
    gpus_per_node: int = 0
    # CPUs of the node task that runs the node's torchrun (all its ranks); null = derived: every CPU of the node
    # with exclusive=true (srun --cpus-per-task=$SLURM_CPUS_ON_NODE), else one per rank
    cpus_per_task: Optional[int] = None
    # memory per node (Slurm --mem); null = derived: 0 (all of the node's memory) with exclusive=true
    mem: Optional[str] = None
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    time: str = "04:00:00"  # Slurm time limit: MM, HH:MM:SS or D-HH:MM:SS
    job_name: str = "nemotune"
    # sbatch scripts and per-job logs (%x-%j.out); relative paths are taken from the submit directory
    output_dir: str = "work/launch"
    exclusive: bool = False
    # seconds before the time limit at which Slurm sends SIGUSR1 to the training ranks (0 = never)
    signal_seconds_before_timeout: int = 120
    # allow the job to requeue itself after a pre-timeout checkpoint (and write logs in append mode)
    requeue: bool = True
    # rendezvous: c10d on the head node of the allocation (slurm) or on rdzv_endpoint (local multi-node)
    master_port: int = 29500
    rdzv_backend: str = "c10d"
    rdzv_endpoint: Optional[str] = None  # local multi-node only, host:port of node 0
    node_rank: int = 0  # local multi-node only
    max_restarts: int = 0
    # exported into the job / torchrun environment, e.g. {NCCL_IB_DISABLE: "0", NCCL_DEBUG: WARN}
    env: Dict[str, str] = field(default_factory=dict)
    # pyxis/enroot container for every srun task (image: registry path or a .sqsh file)
    container: bool = False
    container_image: Optional[str] = None
    container_mounts: List[str] = field(default_factory=list)  # "src:dst[:flags]"
    container_workdir: Optional[str] = None
    # the directory the training runs in (null = the submit directory; in a container: container_workdir)
    workdir: Optional[str] = None
    # interpreter that runs torchrun (null = this interpreter; `python` inside a container)
    python: Optional[str] = None
    # what torchrun starts: a module (`-m`) or a .py script; null = nemotune.recipes.lora_sft (nemotune.recipes.two_stage
    # for an experiment with stages)
    module: Optional[str] = None
    # shell lines run before srun (module load ..., source env)
    setup: List[str] = field(default_factory=list)
    sbatch_args: List[str] = field(default_factory=list)  # extra #SBATCH lines, e.g. --reservation=x
    srun_args: List[str] = field(default_factory=list)
    # per-rank output: every line prefixed with its node (srun --label) and local rank (torchrun --tee, which
    # also writes each rank's stdout/stderr under <output_dir>/ranks/)
    rank_logs: bool = True

    def derived_cpus_per_task(self) -> Optional[str]:
        """What the node task asks for: the configured count, all of an exclusive node's CPUs, or one per rank."""
        if self.cpus_per_task is not None:
            return str(self.cpus_per_task)
        return None if self.exclusive else str(self.nproc_per_node)

    def derived_mem(self) -> Optional[str]:
        if self.mem not in (None, ""):
            return str(self.mem)
        return "0" if self.exclusive else None


def cluster_config(node: Any) -> ClusterConfig:
    """The typed cluster config of a composed `cluster` node (DictConfig), a dict or a ClusterConfig: the one
    place the launchers take values and defaults from. Interpolations (${run.name}) are resolved first."""
    if isinstance(node, ClusterConfig):
        return node
    from omegaconf import DictConfig, OmegaConf

    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ClusterConfig), dict(node)))


CLUSTER_KEYS = tuple(f.name for f in fields(ClusterConfig))
_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


def time_limit_seconds(value: str) -> Optional[int]:
    """Slurm's time formats (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) in seconds; None if invalid."""
    value = str(value).strip()
    if value in ("infinite", "UNLIMITED"):
        return None
    m = _TIME.match(value)
    if not m:
        return -1
    days, a, b, c = m.groups()
    parts = [int(x) for x in (a, b, c) if x is not None]
    if days is None:
        h, mi, s = {1: (0, parts[0], 0), 2: (0, *parts), 3: tuple(parts)}[len(parts)]
    else:
        h, mi, s = (parts + [0, 0])[:3]
    return int(days or 0) * 86400 + h * 3600 + mi * 60 + s


def _get(cfg: Any, dotted: str, default: Any = None) -> Any:
    node = cfg
    for part in dotted.split("."):
        try:
            node = node[part] if part in node else None
        except TypeError:
            node = getattr(node, part, None)
        if node is None:
            return default
    return node


def validate_cluster(cfg: Any) -> List[str]:
    """Every problem of `cfg.cluster` (and of its fit with `cfg.parallel`), as `key: problem; fix` lines.

    `cfg` is the root config (a DictConfig or dict with `cluster` and optionally `parallel`), or a bare
    cluster mapping / ClusterConfig.
    """
    cluster = _get(cfg, "cluster")
    if cluster is None:
        cluster, cfg = cfg, {"cluster": cfg}
    if isinstance(cluster, ClusterConfig):
        from dataclasses import asdict
        cluster = asdict(cluster)
    keys = set(cluster.keys())
    problems: List[str] = []
    for key in sorted(keys - set(CLUSTER_KEYS)):
        problems.append(f"cluster.{key}: unknown key; valid keys are {', '.join(CLUSTER_KEYS)}")
    c = {k: cluster.get(k, f.default if not callable(f.default_factory) else f.default_factory())
         for f in fields(ClusterConfig) for k in [f.name]}

    if c["kind"] not in KINDS:
        problems.append(f"cluster.kind={c['kind']}: use one of {', '.join(KINDS)} (cluster=local / cluster=slurm)")
    for key in ("nodes", "nproc_per_node"):
        if not isinstance(c[key], int) or c[key] < 1:
            problems.append(f"cluster.{key}={c[key]}: must be an integer >= 1")
    if not isinstance(c["gpus_per_node"], int) or c["gpus_per_node"] < 0:
        problems.append(f"cluster.gpus_per_node={c['gpus_per_node']}: must be an integer >= 0 (0 = CPU job)")
    elif c["gpus_per_node"] > 0 and isinstance(c["nproc_per_node"], int):
        if c["nproc_per_node"] < c["gpus_per_node"]:
            problems.append(f"cluster.gpus_per_node={c['gpus_per_node']}: more GPUs requested than the "
                            f"{c['nproc_per_node']} ranks per node (cluster.nproc_per_node) use; set "
                            f"cluster.gpus_per_node={c['nproc_per_node']} or cluster.nproc_per_node="
                            f"{c['gpus_per_node']}")
        elif c["nproc_per_node"] > c["gpus_per_node"]:
            problems.append(f"cluster.nproc_per_node={c['nproc_per_node']}: more ranks per node than the "
                            f"{c['gpus_per_node']} GPUs allocated (cluster.gpus_per_node); make them equal")

    tp = _get(cfg, "parallel.tensor_model_parallel_size", 1)
    pp = _get(cfg, "parallel.pipeline_model_parallel_size", 1)
    cp = _get(cfg, "parallel.context_parallel_size", 1)
    if all(isinstance(v, int) and v >= 1 for v in (tp, pp, cp, c["nodes"], c["nproc_per_node"])):
        world, model_parallel = c["nodes"] * c["nproc_per_node"], tp * pp * cp
        if world < model_parallel:
            problems.append(f"cluster.nodes x cluster.nproc_per_node = {world} ranks: fewer than TP x PP x CP "
                            f"= {tp} x {pp} x {cp} = {model_parallel} (parallel.*); request at least "
                            f"{model_parallel} ranks or lower the parallel sizes")
        elif world % model_parallel:
            dp = world // model_parallel
            problems.append(f"cluster.nodes x cluster.nproc_per_node = {world} ranks: more than TP x PP x CP x DP "
                            f"= {model_parallel} x {dp} = {model_parallel * dp} needs (data parallel size = "
                            f"ranks / (TP x PP x CP) must be whole); request a multiple of {model_parallel} "
                            f"ranks, e.g. {model_parallel * dp} or {model_parallel * (dp + 1)}")

    if c["container"]:
        if not c["container_image"]:
            problems.append("cluster.container_image: required when cluster.container=true; set it to an "
                            "image (nvcr.io#nvidia/pytorch:25.04-py3 or /path/nemotune.sqsh) or set "
                            "cluster.container=false")
        if c["kind"] != "slurm":
            problems.append("cluster.container=true: containers are started by Slurm's pyxis (srun "
                            "--container-image); use cluster=slurm, or run inside the container yourself "
                            "with cluster.container=false")
    for mount in c["container_mounts"] or []:
        parts = str(mount).split(":")
        if len(parts) not in (2, 3) or not all(parts[:2]):
            problems.append(f"cluster.container_mounts: {mount!r} is not src:dst[:flags]; write e.g. "
                            "/lustre/data:/data:ro")
    seconds = time_limit_seconds(c["time"])
    if seconds == -1:
        problems.append(f"cluster.time={c['time']}: not a Slurm time; use MM, HH:MM:SS or D-HH:MM:SS")
    sig = c["signal_seconds_before_timeout"]
    if not isinstance(sig, int) or sig < 0:
        problems.append(f"cluster.signal_seconds_before_timeout={sig}: must be >= 0 (0 disables the signal)")
    elif seconds and seconds > 0 and sig >= seconds:
        problems.append(f"cluster.signal_seconds_before_timeout={sig}: not below the time limit "
                        f"cluster.time={c['time']} ({seconds} s); lower it or raise cluster.time")
    if not isinstance(c["master_port"], int) or not 1 <= c["master_port"] <= 65535:
        problems.append(f"cluster.master_port={c['master_port']}: must be a TCP port in 1..65535")
    if c["kind"] == "local" and isinstance(c["nodes"], int) and c["nodes"] > 1:
        if not c["rdzv_endpoint"]:
            problems.append(f"cluster.rdzv_endpoint: required for cluster=local with cluster.nodes={c['nodes']} "
                            "(run the same command on every node with host:port of node 0 and "
                            "cluster.node_rank=<i>), or use cluster=slurm")
        if not isinstance(c["node_rank"], int) or not 0 <= c["node_rank"] < c["nodes"]:
            problems.append(f"cluster.node_rank={c['node_rank']}: must be in 0..{c['nodes'] - 1}")
    problems += container_path_problems(cfg) if c["container"] else []
    for key, value in (c["env"] or {}).items():
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", str(key)):
            problems.append(f"cluster.env.{key}: not a valid environment variable name")
        elif isinstance(value, (dict, list)):
            problems.append(f"cluster.env.{key}: must be a string/number, not {type(value).__name__}")
    return problems


# Paths a training job reads or writes, by key. cluster.output_dir is left out: the launcher mounts it itself.
JOB_PATH_KEYS = ("model.hf_path", "model.checkpoint", "model.tokenizer", "data.output_dir", "run.output_dir",
                 "peft.restore_from")


def _mounts(c: ClusterConfig) -> List[tuple]:
    """(source, destination) of every well-formed `src:dst[:flags]` mount."""
    pairs = []
    for mount in c.container_mounts:
        parts = str(mount).split(":")
        if len(parts) in (2, 3) and all(parts[:2]):
            pairs.append((parts[0], parts[1].rstrip("/") or "/"))
    return pairs


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def job_paths(cfg: Any) -> List[tuple]:
    """(key, path) of every path the job reads or writes that is set (a hub id is not a path)."""
    from nemotune.data_prep.tokenizer import TINY_TOKENIZER_NAME

    found = []
    for key in JOB_PATH_KEYS:
        value = _get(cfg, key)
        if value in (None, ""):
            continue
        value = str(value)
        if key == "model.tokenizer" and (value == TINY_TOKENIZER_NAME or not (
                value.startswith(("/", ".", "~")) or value.count("/") > 1)):
            continue  # a hub id (org/name) or the packaged tokenizer: not a path the job mounts
        found.append((key, value))
    return found


def container_path(c: ClusterConfig, path: str) -> str:
    """Where the job sees `path` inside the container (relative paths start at cluster.container_workdir)."""
    import posixpath

    if path.startswith("~") or posixpath.isabs(path):
        return posixpath.normpath(path)
    return posixpath.normpath(posixpath.join(c.container_workdir or "/", path))


def host_path(cluster: Any, path: str) -> str:
    """Where the submitting machine sees a path of the job: through the container mounts (the longest
    matching destination) for a container job, relative to cluster.workdir otherwise."""
    import os.path

    c = cluster_config(cluster)
    if not c.container:
        return os.path.join(c.workdir, path) if c.workdir and not os.path.isabs(path) else path
    inside = container_path(c, path)
    matches = [(src, dst) for src, dst in _mounts(c) if _inside(inside, dst)]
    if not matches:
        return path
    src, dst = max(matches, key=lambda m: len(m[1]))
    return os.path.join(os.path.abspath(src), os.path.relpath(inside, dst))


def container_path_problems(cfg: Any) -> List[str]:
    """Every path of a container job (cluster.container=true) that no cluster.container_mounts destination
    holds, naming the path and the mount to add; nothing for other jobs."""
    cluster = _get(cfg, "cluster")
    try:
        c = cluster_config(cluster)
    except Exception:  # a malformed cluster node: validate_cluster reports it
        return []
    if not c.container:
        return []
    mounts = _mounts(c)
    destinations = ", ".join(dst for _, dst in mounts) or "none"
    problems = []
    for key, value in job_paths(cfg):
        if not (value.startswith(("/", "~"))) and not c.container_workdir:
            problems.append(f"{key}={value}: a relative path in a container job needs cluster.container_workdir "
                            f"(inside a mount); set it, or give {key} as an absolute path")
            continue
        inside = container_path(c, value)
        if not any(_inside(inside, dst) for _, dst in mounts):
            root = "/" + inside.strip("/").split("/")[0]
            problems.append(f"{key}={value}: the container job cannot see {inside} (cluster.container_mounts "
                            f"destinations: {destinations}); add the mount {root}:{root} to "
                            f"cluster.container_mounts")
    return problems

