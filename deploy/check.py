"""`python -m deploy.check`: the deploy kit checked offline, before anything reaches a cluster.

- Every manifest in deploy/kuberay/ against the fields the KubeRay v1 CRDs require (a small schema: required
  fields, types, known spec fields, so a typo is not silently pruned by the API server);
- rayVersion equals the image's Ray (deploy/Dockerfile RAY_VERSION) and the Ray installed here;
- token authentication on; credentials only from Secrets; a GPU worker group with autoscaling bounds;
- each RayJob's entrypoint is a command `cdm` accepts, and the config it names is in the image and validates.
Errors are one line naming the file and field, exit status 2.
"""

from __future__ import annotations

import re
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from cdm_dist.errors import first_line

ROOT = Path(__file__).resolve().parent.parent

# The RayClusterSpec and RayJobSpec fields of KubeRay's ray.io/v1 CRDs (v1.5-v1.7).
CLUSTER_FIELDS = {
    "authOptions", "autoscalerOptions", "enableInTreeAutoscaling", "gcsFaultToleranceOptions", "headGroupSpec",
    "headServiceAnnotations", "managedBy", "rayVersion", "suspend", "upgradeStrategy", "workerGroupSpecs",
}  # fmt: skip
JOB_FIELDS = {
    "activeDeadlineSeconds", "backoffLimit", "clusterSelector", "deletionStrategy", "entrypoint",
    "entrypointNumCpus", "entrypointNumGpus", "entrypointResources", "jobId", "managedBy", "metadata",
    "rayClusterSpec", "runtimeEnvYAML", "shutdownAfterJobFinishes", "submissionMode", "submitterConfig",
    "submitterPodTemplate", "suspend", "ttlSecondsAfterFinished",
}  # fmt: skip
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}
SECRET_NAMES = re.compile(r"URI|URL|STORAGE|PASSWORD|TOKEN|SECRET|KEY", re.IGNORECASE)


class ManifestError(ValueError):
    """A manifest (or the image) breaks a rule: the message names the file and field."""


def _get(node: Any, path: str, kind: type | tuple[type, ...], where: str, required: bool = True) -> Any:
    """The value at a dotted path, of the given type (ManifestError naming `where: path` otherwise)."""
    value = node
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            if required:
                raise ManifestError(f"{where}: {path}: required")
            return None
        value = value[part]
    if not isinstance(value, kind):
        raise ManifestError(f"{where}: {path}: expected {getattr(kind, '__name__', kind)}, got {value!r}")
    return value


def image_ray_version(dockerfile: Path) -> str:
    """The Ray version the image is built on (ARG RAY_VERSION=...)."""
    match = re.search(r"^ARG RAY_VERSION=(\S+)$", dockerfile.read_text(), re.MULTILINE)
    if match is None:
        raise ManifestError(f"{dockerfile}: no ARG RAY_VERSION=...")
    return match.group(1)


def image_folders(dockerfile: Path) -> set[str]:
    """The project folders the image copies into its working directory (COPY ... SRC ./DST lines)."""
    copied = set()
    for line in dockerfile.read_text().splitlines():
        words = line.split()
        if words[:1] == ["COPY"]:
            copied.update(w.strip("./") for w in words[1:-1] if not w.startswith("--"))
    return copied


def check_pod(template: Any, where: str, secrets_only: bool = True) -> list[dict[str, Any]]:
    """A pod template's containers: each named, with an image; credential-like env vars only from Secrets."""
    containers = _get(template, "spec.containers", list, where)
    if not containers:
        raise ManifestError(f"{where}: spec.containers: empty")
    for i, container in enumerate(containers):
        here = f"{where}: spec.containers[{i}]"
        _get(container, "name", str, here)
        _get(container, "image", str, here)
        for env in container.get("env", []):
            if secrets_only and SECRET_NAMES.search(env.get("name", "")) and "value" in env:
                raise ManifestError(f"{here}: env {env['name']}: a credential must come from a Secret (valueFrom)")
    return containers


def check_cluster_spec(spec: Any, where: str, ray_version: str) -> None:
    """A RayClusterSpec: version, token auth, head and worker groups, a GPU group with autoscaling bounds."""
    if not isinstance(spec, dict):
        raise ManifestError(f"{where}: expected a mapping")
    unknown = sorted(set(spec) - CLUSTER_FIELDS)
    if unknown:
        raise ManifestError(f"{where}: unknown fields {unknown} (the API server would drop them)")
    version = _get(spec, "rayVersion", str, where)
    if version != ray_version:
        raise ManifestError(f"{where}: rayVersion {version} differs from the image's Ray {ray_version}")
    if _get(spec, "authOptions.mode", str, where, required=False) != "token":
        raise ManifestError(f"{where}: authOptions.mode: must be token (Ray token authentication)")
    head = _get(spec, "headGroupSpec", dict, where)
    _get(head, "rayStartParams", dict, f"{where}.headGroupSpec", required=False)
    images = [c["image"] for c in check_pod(_get(head, "template", dict, where), f"{where}.headGroupSpec.template")]
    gpu_groups = 0
    for i, group in enumerate(_get(spec, "workerGroupSpecs", list, where)):
        here = f"{where}.workerGroupSpecs[{i}]"
        _get(group, "groupName", str, here)
        low, high = _get(group, "minReplicas", int, here), _get(group, "maxReplicas", int, here)
        replicas = _get(group, "replicas", int, here, required=False)
        if not 0 <= low <= (replicas if replicas is not None else low) <= high:
            raise ManifestError(
                f"{here}: need 0 <= minReplicas <= replicas <= maxReplicas, got {low}/{replicas}/{high}"
            )
        containers = check_pod(_get(group, "template", dict, here), f"{here}.template")
        images += [c["image"] for c in containers]
        gpus = [c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu") for c in containers]
        gpu_groups += any(g is not None and int(g) >= 1 for g in gpus)
    if not gpu_groups:
        raise ManifestError(f"{where}: workerGroupSpecs: no group with nvidia.com/gpu limits")
    stale = [image for image in images if ray_version not in image.split(":")[-1]]
    if stale:
        raise ManifestError(f"{where}: images {stale} are not tagged with Ray {ray_version}")


def check_entrypoint(entrypoint: str, where: str, root: Path, copied: set[str]) -> list[str]:
    """A RayJob entrypoint: `python -m deploy.entrypoint run|tune CONFIG ...`, accepted by cdm's parser, its config in
    the image and valid. Returns the argument list after the module."""
    from cdm_cli.main import build_parser
    from cdm_dist.driver.campaign import load_config
    from cdm_dist.errors import InputError

    words = shlex.split(entrypoint)
    if words[:3] != ["python", "-m", "deploy.entrypoint"]:
        raise ManifestError(f"{where}: entrypoint: must start with `python -m deploy.entrypoint`, got {entrypoint!r}")
    args = words[3:]
    command = args if args[:1] in (["run"], ["tune"]) else ["run", *args]
    try:
        parsed = build_parser().parse_args(command)
    except SystemExit:
        raise ManifestError(f"{where}: entrypoint: cdm does not accept {shlex.join(command)!r}") from None
    config = Path(parsed.config)
    if config.is_absolute() or config.parts[0] not in copied or not (root / config).is_file():
        raise ManifestError(f"{where}: entrypoint: config {config} is not in the image (deploy/Dockerfile COPY)")
    try:
        load_config(root / config, parsed.overrides)
    except InputError as exc:
        raise ManifestError(f"{where}: entrypoint: {exc}") from None
    return args


def check_manifest(path: Path, root: Path, ray_version: str, copied: set[str]) -> str:
    """One manifest file (RayCluster or RayJob); returns its kind."""
    try:
        documents = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except yaml.YAMLError as exc:
        raise ManifestError(f"{path}: not YAML ({first_line(exc)})") from None
    if len(documents) != 1:
        raise ManifestError(f"{path}: expected one resource, found {len(documents)}")
    (doc,) = documents
    where = str(path.relative_to(root) if path.is_relative_to(root) else path)
    if _get(doc, "apiVersion", str, where) != "ray.io/v1":
        raise ManifestError(f"{where}: apiVersion: expected ray.io/v1")
    kind = _get(doc, "kind", str, where)
    _get(doc, "metadata.name", str, where)
    spec = _get(doc, "spec", dict, where)
    if kind == "RayCluster":
        check_cluster_spec(spec, f"{where}: spec", ray_version)
    elif kind == "RayJob":
        unknown = sorted(set(spec) - JOB_FIELDS)
        if unknown:
            raise ManifestError(f"{where}: spec: unknown fields {unknown} (the API server would drop them)")
        mode = spec.get("submissionMode", "K8sJobMode")
        if mode not in SUBMISSION_MODES:
            raise ManifestError(f"{where}: spec.submissionMode: {mode!r} is not one of {sorted(SUBMISSION_MODES)}")
        check_entrypoint(_get(spec, "entrypoint", str, where), where, root, copied)
        check_cluster_spec(_get(spec, "rayClusterSpec", dict, where), f"{where}: spec.rayClusterSpec", ray_version)
    else:
        raise ManifestError(f"{where}: kind: expected RayCluster or RayJob, got {kind!r}")
    return kind


def check(root: Path = ROOT, installed_ray: str | None = None) -> list[tuple[Path, str]]:
    """Every manifest under root/deploy/kuberay against the image at root/deploy/Dockerfile."""
    dockerfile = root / "deploy" / "Dockerfile"
    if not dockerfile.is_file():
        raise ManifestError(f"{dockerfile}: not found (is --root the project folder?)")
    ray_version, copied = image_ray_version(dockerfile), image_folders(dockerfile)
    if installed_ray is not None and installed_ray != ray_version:
        raise ManifestError(f"{dockerfile}: RAY_VERSION {ray_version} differs from the installed Ray {installed_ray}")
    manifests = sorted((root / "deploy" / "kuberay").glob("*.yaml"))
    kinds = [(path, check_manifest(path, root, ray_version, copied)) for path in manifests]
    if not kinds:
        raise ManifestError(f"{root / 'deploy' / 'kuberay'}: no manifests")
    return kinds


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    import ray

    parser = argparse.ArgumentParser(prog="python -m deploy.check", description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=str(ROOT), help="the project folder (default: this checkout)")
    args = parser.parse_args(argv)
    try:
        checked = check(Path(args.root).resolve(), ray.__version__)
    except ManifestError as exc:
        print(f"deploy.check: {exc}", file=sys.stderr)
        return 2
    for path, kind in checked:
        print(f"ok {kind} {path.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
