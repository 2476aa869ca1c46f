"""Offline checks of the deployment files: cluster.yaml against the cluster launcher's own schema
(and Ray's own config validation), k8s/rayjob.yaml against a RayJob schema written here, and
every job command in them and in the README parsed by the job's real argument parser."""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import shlex

import jsonschema
import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLUSTER_YAML = os.path.join(REPO, "cluster.yaml")
RAYJOB_YAML = os.path.join(REPO, "k8s", "rayjob.yaml")
README = os.path.join(REPO, "README.md")

# Anything that looks like a credential: an access key id, a secret, a session token, a password.
SECRET_RE = re.compile(
    r"\b(AKIA|ASIA)[A-Z0-9]{16}\b|aws_secret|secret_access_key|session_token|password", re.IGNORECASE
)


def load_cluster() -> dict:
    with open(CLUSTER_YAML) as f:
        return yaml.safe_load(f)


def load_rayjobs() -> list[dict]:
    with open(RAYJOB_YAML) as f:
        return [d for d in yaml.safe_load_all(f) if d]


# --- cluster.yaml ----------------------------------------------------------------------------------


def test_cluster_yaml_matches_the_launchers_schema():
    import ray.autoscaler

    with open(os.path.join(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json")) as f:
        schema = json.load(f)
    jsonschema.validate(load_cluster(), schema)


def test_cluster_yaml_passes_rays_own_validation_with_defaults_filled_in():
    """What `ray up` does before it talks to AWS: fill in the provider's defaults, then validate."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(copy.deepcopy(load_cluster()))
    validate_config(config)
    assert config["provider"]["type"] == "aws"


def test_cluster_yaml_layout():
    cfg = load_cluster()
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("CPU") == 0, "the head runs no tasks"
    workers = {name: t for name, t in types.items() if name != cfg["head_node_type"]}
    gpu = [t for t in workers.values() if t["resources"].get("GPU", 0) >= 1]
    cpu = [t for t in workers.values() if t["resources"].get("GPU", 0) == 0 and t["resources"].get("CPU", 0) >= 1]
    assert gpu and cpu, "a GPU worker group and a CPU (decode) worker group"
    for t in workers.values():
        assert 0 <= t["min_workers"] <= t["max_workers"]
        # workers reach S3 through an instance profile, never through keys
        assert "IamInstanceProfile" in t["node_config"]
    assert sum(t["max_workers"] for t in workers.values()) <= cfg["max_workers"]


def test_cluster_yaml_installs_the_package_and_holds_no_credentials():
    cfg = load_cluster()
    setup = " ".join(cfg["setup_commands"])
    assert "pip install" in setup and "/home/ray/ovsam_ray" in setup
    assert cfg["file_mounts"]["/home/ray/ovsam_ray"] == "."
    assert any("--head" in c for c in cfg["head_start_ray_commands"])
    assert any("$RAY_HEAD_IP" in c for c in cfg["worker_start_ray_commands"])
    with open(CLUSTER_YAML) as f:
        assert not SECRET_RE.search(f.read())


# --- k8s/rayjob.yaml -------------------------------------------------------------------------------

_CONTAINER = {
    "type": "object",
    "required": ["name", "image", "resources"],
    "properties": {
        "name": {"type": "string"},
        "image": {"type": "string", "minLength": 1},
        "resources": {
            "type": "object",
            "required": ["limits"],
            "properties": {"limits": {"type": "object", "minProperties": 1}, "requests": {"type": "object"}},
        },
    },
}
_POD_TEMPLATE = {
    "type": "object",
    "required": ["spec"],
    "properties": {
        "spec": {
            "type": "object",
            "required": ["containers"],
            "properties": {"containers": {"type": "array", "minItems": 1, "items": _CONTAINER}},
        }
    },
}
# KubeRay passes rayStartParams to `ray start` as strings and rejects other types.
_START_PARAMS = {"type": "object", "additionalProperties": {"type": "string"}}

#: The parts of KubeRay's RayJob CRD (ray.io/v1) these examples rely on.
RAYJOB_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "ray.io/v1"},
        "kind": {"const": "RayJob"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {"name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"}},
        },
        "spec": {
            "type": "object",
            "required": ["entrypoint", "rayClusterSpec"],
            "properties": {
                "entrypoint": {"type": "string", "pattern": r"jobs/(label|train_cotrain|train_distill)\.py"},
                "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
                "shutdownAfterJobFinishes": {"type": "boolean"},
                "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
                "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
                "backoffLimit": {"type": "integer", "minimum": 0},
                "rayClusterSpec": {
                    "type": "object",
                    "required": ["headGroupSpec", "workerGroupSpecs"],
                    "properties": {
                        "rayVersion": {"type": "string"},
                        "enableInTreeAutoscaling": {"type": "boolean"},
                        "headGroupSpec": {
                            "type": "object",
                            "required": ["rayStartParams", "template"],
                            "properties": {"rayStartParams": _START_PARAMS, "template": _POD_TEMPLATE},
                        },
                        "workerGroupSpecs": {
                            "type": "array",
                            "minItems": 1,
                            "items": {
                                "type": "object",
                                "required": ["groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"],
                                "properties": {
                                    "groupName": {"type": "string"},
                                    "replicas": {"type": "integer", "minimum": 0},
                                    "minReplicas": {"type": "integer", "minimum": 0},
                                    "maxReplicas": {"type": "integer", "minimum": 1},
                                    "rayStartParams": _START_PARAMS,
                                    "template": _POD_TEMPLATE,
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}


def test_rayjobs_match_the_schema_and_have_gpu_workers():
    jobs = [d for d in load_rayjobs() if d.get("kind") == "RayJob"]
    assert {j["metadata"]["name"] for j in jobs} >= {"ovsam-label"}
    for job in jobs:
        jsonschema.validate(job, RAYJOB_SCHEMA)
        cluster = job["spec"]["rayClusterSpec"]
        assert cluster["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0"
        gpus = [
            c["resources"]["limits"].get("nvidia.com/gpu")
            for g in cluster["workerGroupSpecs"]
            for c in g["template"]["spec"]["containers"]
        ]
        assert any(int(n or 0) >= 1 for n in gpus), f"{job['metadata']['name']}: no GPU worker group"
        for g in cluster["workerGroupSpecs"]:
            assert g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"]
    label = next(j for j in jobs if j["metadata"]["name"] == "ovsam-label")
    assert "jobs/label.py" in label["spec"]["entrypoint"]


def test_rayjob_schema_rejects_broken_manifests():
    job = next(d for d in load_rayjobs() if d.get("kind") == "RayJob")
    for mutate in (
        lambda j: j.update(apiVersion="ray.io/v1alpha1"),
        lambda j: j["spec"].pop("entrypoint"),
        lambda j: j["spec"].update(entrypoint="python train.py"),
        lambda j: j["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}),
        lambda j: j["spec"]["rayClusterSpec"].update(workerGroupSpecs=[]),
    ):
        broken = copy.deepcopy(job)
        mutate(broken)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, RAYJOB_SCHEMA)


def test_rayjobs_use_a_service_account_and_hold_no_credentials():
    docs = load_rayjobs()
    accounts = {d["metadata"]["name"] for d in docs if d.get("kind") == "ServiceAccount"}
    for job in (d for d in docs if d.get("kind") == "RayJob"):
        cluster = job["spec"]["rayClusterSpec"]
        for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
            assert group["template"]["spec"].get("serviceAccountName") in accounts
    with open(RAYJOB_YAML) as f:
        assert not SECRET_RE.search(f.read())


# --- every job command parses with the job's own parser ----------------------------------------------


def _shell_words(command: str) -> list[str]:
    """``command`` as the job supervisor's shell splits it; fails on unquoted pipes/redirects."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    words = list(lexer)
    bad = [w for w in words if w and set(w) <= set("|&;<>()")]
    assert not bad, f"unquoted shell operator {bad} in: {command}"
    return words


def check_job_command(words: list[str]) -> str:
    """Parse a job's argv (``python jobs/X.py ...`` or ``ovsam-ray eval ...``) into its config."""
    if words[0].startswith("python") and words[1].endswith("jobs/label.py"):
        from ovsam_ray.cli.label import add_label_args, label_config

        parser = argparse.ArgumentParser(exit_on_error=False)
        add_label_args(parser)
        label_config(parser.parse_args(words[2:]))
        return "label"
    if words[0].startswith("python") and re.search(r"jobs/train_(cotrain|distill)\.py$", words[1]):
        training = pytest.importorskip("ovsam_ray.cli.train")
        stage = "cotrain" if "cotrain" in words[1] else "distill"
        parser = getattr(training, f"{stage}_parser")()
        getattr(training, f"{stage}_config_from_args")(parser.parse_args(words[2:]))
        return stage
    if words[:3] == ["python", "-m", "ovsam_ray.cli"] or words[0] == "ovsam-ray":
        from ovsam_ray.cli import build_parser

        args = words[3:] if words[0] == "python" else words[1:]
        build_parser().parse_args(args)
        return args[0]
    raise AssertionError(f"not a job command: {words}")


def test_rayjob_entrypoints_parse():
    kinds = [
        check_job_command(_shell_words(d["spec"]["entrypoint"])) for d in load_rayjobs() if d.get("kind") == "RayJob"
    ]
    assert "label" in kinds


def _readme_submit_commands() -> list[str]:
    with open(README) as f:
        text = f.read()
    text = text[text.index("## Scaling") :]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.DOTALL):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split(" #", 1)[0].strip()
            if line.startswith("ray job submit"):
                commands.append(line)
    return commands


def test_readme_ray_job_submit_commands_parse():
    """The README's "Scaling" `ray job submit` commands are what users paste: each entry point
    must accept its flags, and every job has one."""
    commands = _readme_submit_commands()
    kinds = set()
    for command in commands:
        words = _shell_words(command)
        assert "--" in words, command
        kinds.add(check_job_command(words[words.index("--") + 1 :]))
    assert {"label", "eval"} <= kinds
    if os.path.exists(os.path.join(REPO, "jobs", "train_cotrain.py")):
        assert {"cotrain", "distill"} <= kinds
