"""The files that run indexing and serving past one machine (deploy/), checked without a cluster.

- every Kubernetes manifest validates against the schemas of Kubernetes K8S_VERSION
  (kubernetes-validate, offline, strict: an unknown field is an error);
- every `convirt` command parses with the real CLI parsers (no abbreviations): a container's
  process with `$(VAR)` expanded as the kubelet does, for each completion index of the Indexed Job;
  the Slurm scripts run by bash with fake `sbatch`, `srun` and `convirt` on PATH, as Slurm would
  run them for each array task;
- the pieces agree: N shards (completions == parallelism == N of --shard I/N; Slurm's array), the
  merge names every shard root once and writes the root the API serves, with the bundle the
  shards were built with, on the same volume; the API mounts it read-only, its probes and port are
  the app's, its CONVIRT_* variables are settings and its API key comes from a Secret.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path, PurePosixPath

import kubernetes_validate
import pytest
import yaml
from commands import (
    DOCKERFILES,
    ROOT,
    cli_error,
    cli_parsers,
    container_variables,
    env_instructions,
    exact_flags,
    image_entrypoint_and_cmd,
    process_invocations,
    status_before_loading,
)

K8S = ROOT / "deploy" / "k8s"
SLURM = ROOT / "deploy" / "slurm"
# Pinned: the oldest release the manifests are written for (backoffLimitPerIndex is GA in 1.33)
# and one whose schemas kubernetes-validate ships.
K8S_VERSION = "1.33"
KUSTOMIZATION = K8S / "kustomization.yaml"
MANIFESTS = sorted(p for p in K8S.glob("*.yaml") if p != KUSTOMIZATION)
INDEX_JOB, MERGE_JOB, API = K8S / "index-job.yaml", K8S / "merge-job.yaml", K8S / "api.yaml"
STORAGE = K8S / "storage.yaml"
ARRAY, MERGE, SUBMIT = SLURM / "index-array.sbatch", SLURM / "merge.sbatch", SLURM / "submit.sh"
SLURM_SCRIPTS = [ARRAY, MERGE, SUBMIT]
COMPLETION_INDEX_ANNOTATION = "metadata.annotations['batch.kubernetes.io/job-completion-index']"


# ---------------------------------------------------------------------------------------------
# Kubernetes: reading the manifests


def documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def only(path: Path, kind: str) -> dict:
    found = [doc for doc in documents(path) if doc["kind"] == kind]
    assert len(found) == 1, f"{path.name}: expected one {kind}, found {len(found)}"
    return found[0]


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def the_container(workload: dict) -> dict:
    containers = pod_spec(workload)["containers"]
    assert len(containers) == 1, f"{workload['metadata']['name']}: one container expected"
    return containers[0]


def workloads() -> list[tuple[str, dict]]:
    """(file name, resource) of every resource with a pod template."""
    return [
        (path.name, doc)
        for path in MANIFESTS
        for doc in documents(path)
        if "template" in doc.get("spec", {})
    ]


@cache
def image_dockerfiles() -> dict[str, Path]:
    """Image name -> Dockerfile, from the `docker build -f FILE -t NAME` line of each Dockerfile."""
    found = {}
    for path in DOCKERFILES.values():
        match = re.search(r"docker build -f (\S+) -t (\S+)", path.read_text())
        assert match and ROOT / match[1] == path, f"{path.name}: no `docker build -f` line"
        found[match[2]] = path
    return found


def dockerfile_of(container: dict) -> Path:
    name = container["image"].rpartition(":")[0] or container["image"]
    images = image_dockerfiles()
    assert name in images, f"{container['name']}: image {name} is none of {sorted(images)}"
    return images[name]


def env_declared(container: dict) -> dict[str, dict]:
    return {item["name"]: item for item in container.get("env", [])}


def expand(text: str, values: dict[str, str]) -> str:
    """The kubelet's expansion of command and args: $(VAR) when VAR is declared, $$ -> $."""
    return re.sub(
        r"\$\$|\$\((\w+)\)",
        lambda m: "$" if m[0] == "$$" else values.get(m[1], m[0]),
        text,
    )


def container_argv(container: dict, completion_index: int | None = None) -> list[str]:
    """The process a container runs: the image's ENTRYPOINT/CMD as Kubernetes overrides them
    (command replaces both, args replaces CMD), with $(VAR) expanded."""
    entrypoint, cmd = image_entrypoint_and_cmd(dockerfile_of(container))
    if "command" in container:
        argv = [*container["command"], *container.get("args", [])]
    else:
        argv = [*entrypoint, *container.get("args", cmd)]
    values = {k: v["value"] for k, v in env_declared(container).items() if "value" in v}
    completion = env_declared(container).get("JOB_COMPLETION_INDEX", {})
    if completion_index is not None and completion:
        values["JOB_COMPLETION_INDEX"] = str(completion_index)
    return [expand(arg, values) for arg in argv]


def convirt_commands(container: dict, completion_index: int | None = None) -> list[list[str]]:
    return process_invocations(container_argv(container, completion_index))


def parsed(argv: list[str]):
    return exact_flags(cli_parsers()[argv[0]]()).parse_args(argv[1:])


def effective_env(container: dict) -> dict[str, str | dict]:
    """The container's environment: the image's ENV, then the manifest's env (valueFrom as is)."""
    env: dict[str, str | dict] = dict(env_instructions(dockerfile_of(container), stage_only=True))
    for name, item in env_declared(container).items():
        env[name] = item.get("value", item.get("valueFrom"))
    return env


def mount_of(container: dict, path: str) -> dict:
    """The volume mount a path lies on (the deepest one)."""
    mounts = [
        m
        for m in container.get("volumeMounts", [])
        if PurePosixPath(path).is_relative_to(m["mountPath"])
    ]
    assert mounts, f"{container['name']}: {path} is on no mounted volume"
    return max(mounts, key=lambda m: len(m["mountPath"]))


def location(spec: dict, container: dict, path: str) -> tuple[str, str, bool]:
    """(claim, path inside the claim, read-only) of a path as a container sees it."""
    mount = mount_of(container, path)
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    claim = volume["persistentVolumeClaim"]
    inside = PurePosixPath(mount.get("subPath", "")) / PurePosixPath(path).relative_to(
        mount["mountPath"]
    )
    read_only = bool(mount.get("readOnly")) or bool(claim.get("readOnly"))
    return claim["claimName"], inside.as_posix(), read_only


def port_number(container: dict, port: int | str) -> int:
    """A probe's or a Service's port, by number or by the container port's name."""
    if isinstance(port, int):
        return port
    named = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
    assert port in named, f"{container['name']}: no container port named {port!r}"
    return named[port]


# ---------------------------------------------------------------------------------------------
# Kubernetes: the schemas


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_validates_against_the_kubernetes_schemas(path):
    docs = documents(path)
    assert docs, f"{path.name}: no resource"
    problems = []
    for doc in docs:
        where = f"{path.name}: {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as err:
            field = ".".join(str(p) for p in err.path) or "(top)"
            problems.append(f"{where}: {field}: {err.message} (Kubernetes {K8S_VERSION})")
        except kubernetes_validate.SchemaNotFoundError as err:
            problems.append(f"{where}: {err.message}")
    assert not problems, "\n".join(problems)


def test_kustomization_applies_the_volumes_and_the_api_but_no_job():
    kustomization = yaml.safe_load(KUSTOMIZATION.read_text())
    assert kustomization["kind"] == "Kustomization"
    listed = [K8S / name for name in kustomization["resources"]]
    for path in listed:
        assert path.is_file(), f"kustomization.yaml: {path.name} does not exist"
    assert set(listed) == {STORAGE, API}, "apply -k: the long-lived resources, never the Jobs"
    names = [(d["kind"], d["metadata"]["name"]) for p in MANIFESTS for d in documents(p)]
    assert len(names) == len(set(names)), f"a resource defined twice: {names}"


def test_every_claim_is_defined_and_allows_how_it_is_mounted():
    claims = {
        d["metadata"]["name"]: d for d in documents(STORAGE) if d["kind"] == "PersistentVolumeClaim"
    }
    for name, workload in workloads():
        spec = pod_spec(workload)
        pods = workload["spec"].get("parallelism", workload["spec"].get("replicas", 1))
        for volume in spec.get("volumes", []):
            claim_name = volume["persistentVolumeClaim"]["claimName"]
            assert claim_name in claims, f"{name}: claim {claim_name} is not in storage.yaml"
            modes = set(claims[claim_name]["spec"]["accessModes"])
            mounts = [
                m
                for c in spec["containers"]
                for m in c.get("volumeMounts", [])
                if m["name"] == volume["name"]
            ]
            writes = any(not m.get("readOnly") for m in mounts) and not volume[
                "persistentVolumeClaim"
            ].get("readOnly")
            if writes:
                assert "ReadWriteMany" in modes or pods == 1, (
                    f"{name}: {pods} pods on any node write {claim_name}, which is {modes}"
                )
            else:
                assert modes & {"ReadOnlyMany", "ReadWriteMany"}, (
                    f"{name}: {claim_name} ({modes}) cannot be mounted by pods on several nodes"
                )


# ---------------------------------------------------------------------------------------------
# Kubernetes: what the containers run


def test_every_convirt_command_in_the_manifests_is_accepted_by_the_cli():
    problems, found = [], 0
    for name, workload in workloads():
        spec = workload["spec"]
        indexes = range(spec["completions"]) if spec.get("completionMode") == "Indexed" else [None]
        for container in pod_spec(workload)["containers"]:
            for index in indexes:
                for argv in convirt_commands(container, index):
                    found += 1
                    if error := cli_error(argv):
                        at = f" (completion index {index})" if index is not None else ""
                        problems.append(f"{name}{at}: convirt {shlex.join(argv)}: {error}")
    assert found, "no convirt command found in deploy/k8s"
    assert not problems, "\n".join(problems)


def test_every_variable_reference_in_the_manifests_is_declared():
    """The kubelet leaves $(VAR) as it is when the container declares no VAR: `--shard
    $(JOB_COMPLETION_INDX)/4` would reach convirt literally."""
    problems = []
    for name, workload in workloads():
        for container in pod_spec(workload)["containers"]:
            declared = set(env_declared(container))
            for arg in [*container.get("command", []), *container.get("args", [])]:
                for var in re.findall(r"(?<!\$)\$\((\w+)\)", arg):
                    if var not in declared:
                        problems.append(f"{name}: {arg!r}: {var} is not in the container's env")
    assert not problems, "\n".join(problems)


def test_every_convirt_variable_in_deploy_is_a_setting():
    known = container_variables()
    problems = [
        f"{name}: env {var} is not a setting (service/settings.py)"
        for name, workload in workloads()
        for container in pod_spec(workload)["containers"]
        for var in env_declared(container)
        if var.startswith("CONVIRT_") and var not in known
    ]
    for path in [*MANIFESTS, *SLURM_SCRIPTS]:
        problems += [
            f"{path.name}: {var} is mentioned but is no setting (service/settings.py)"
            for var in sorted(set(re.findall(r"CONVIRT_[A-Z0-9_]*[A-Z0-9]", path.read_text())))
            if var not in known
        ]
    assert not problems, "\n".join(problems)


def test_index_job_embeds_one_shard_per_completion_index_on_a_gpu():
    job = only(INDEX_JOB, "Job")
    spec = job["spec"]
    assert spec.get("completionMode") == "Indexed", "an Indexed Job: one completion per shard"
    shards = spec["completions"]
    assert spec.get("parallelism") == shards, "parallelism == completions: every shard at once"
    pod = pod_spec(job)
    assert pod["restartPolicy"] in ("Never", "OnFailure")
    if "backoffLimitPerIndex" in spec:
        assert pod["restartPolicy"] == "Never", "backoffLimitPerIndex needs restartPolicy Never"
    container = the_container(job)
    completion = env_declared(container).get("JOB_COMPLETION_INDEX")
    assert completion, "JOB_COMPLETION_INDEX must be declared in env for $(...) to expand"
    assert completion.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == (
        COMPLETION_INDEX_ANNOTATION
    ), "JOB_COMPLETION_INDEX: from the pod's completion-index annotation"

    outs = set()
    for index in range(shards):
        commands = convirt_commands(container, index)
        assert len(commands) == 1, f"index {index}: one convirt command, not {commands}"
        argv = commands[0]
        assert argv[:2] == ["index", "build"], argv
        assert cli_error(argv) is None, cli_error(argv)
        args = parsed(argv)
        assert args.shard == (index, shards), (
            f"completion index {index} of {shards} runs --shard {args.shard[0]}/{args.shard[1]}"
        )
        assert args.device.startswith("cuda"), "the shards embed on their GPU"
        outs.add(str(args.root))
    assert len(outs) == shards, f"every shard needs its own --out: {sorted(outs)}"
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == 1, "one GPU per shard"
    assert dockerfile_of(container) == DOCKERFILES["trainer"], "the CUDA image (trainer)"


def test_merge_job_joins_every_shard_into_the_root_the_api_serves():
    index_job, merge_job = only(INDEX_JOB, "Job"), only(MERGE_JOB, "Job")
    deployment = only(API, "Deployment")
    index_c, merge_c, api_c = map(the_container, (index_job, merge_job, deployment))
    shards = index_job["spec"]["completions"]
    assert merge_job["spec"].get("completionMode", "NonIndexed") == "NonIndexed"
    assert merge_job["spec"].get("completions", 1) == 1 == merge_job["spec"].get("parallelism", 1)

    builds = [parsed(convirt_commands(index_c, i)[0]) for i in range(shards)]
    [merge_argv] = convirt_commands(merge_c)
    assert merge_argv[:2] == ["index", "merge"], merge_argv
    merge = parsed(merge_argv)

    def where(workload, container, path):
        return location(pod_spec(workload), container, str(path))

    written = sorted(where(index_job, index_c, b.root) for b in builds)
    read = sorted(where(merge_job, merge_c, s) for s in merge.shards)
    assert not any(ro for *_, ro in written), "the shard roots are mounted read-only"
    assert [w[:2] for w in written] == [r[:2] for r in read], (
        f"merge must name each of the {shards} shard roots exactly once:\n"
        f"built {[w[:2] for w in written]}\nmerged {[r[:2] for r in read]}"
    )
    out = where(merge_job, merge_c, merge.root)
    assert not out[2], "the merge's --out is mounted read-only"

    env = effective_env(api_c)
    served = where(deployment, api_c, env["CONVIRT_INDEX_ROOT"])
    assert served[:2] == out[:2], f"the API serves {served[:2]}, the merge writes {out[:2]}"
    model = {where(index_job, index_c, b.model)[:2] for b in builds}
    assert model == {where(deployment, api_c, env["CONVIRT_MODEL"])[:2]}, (
        "the API must load the bundle the shards were built with (else it refuses the index)"
    )
    # the index records the image paths the API opens: the archive is at the same mount path
    manifest = str(builds[0].manifest)
    archive, _, read_only = where(index_job, index_c, manifest)
    assert read_only, "the index pods mount the archive read-only"
    mount = mount_of(index_c, manifest)["mountPath"]
    assert where(deployment, api_c, mount)[:2] == where(index_job, index_c, mount)[:2], (
        f"the API must see the archive ({archive}) at {mount}, where the index pods read it"
    )


def test_api_serves_the_index_read_only_behind_the_apps_probes():
    deployment = only(API, "Deployment")
    assert deployment["spec"].get("replicas", 1) >= 2, "several replicas"
    pod = pod_spec(deployment)
    container = the_container(deployment)
    assert dockerfile_of(container) == DOCKERFILES["service"]
    assert [argv[0] for argv in convirt_commands(container)] == ["serve"]

    env = effective_env(container)
    assert env.get("CONVIRT_HOST") == "0.0.0.0", "listen on the pod's address, not 127.0.0.1"
    port = int(env["CONVIRT_PORT"])
    assert [p["containerPort"] for p in container["ports"]] == [port], "containerPort != port"

    probes = {kind: container.get(kind) for kind in ("readinessProbe", "livenessProbe")}
    assert all(probes.values()), f"missing: {[k for k, v in probes.items() if not v]}"
    for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
        if probe := container.get(kind):
            get = probe["httpGet"]
            assert port_number(container, get["port"]) == port, f"{kind}: another port"
            assert status_before_loading(get["path"]) != 404, f"{kind}: no route {get['path']}"
    # readiness waits for model and index (503 until loaded); liveness must not, or a replica
    # that loads a large index is restarted forever
    assert probes["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert status_before_loading("/readyz") == 503
    assert probes["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert status_before_loading("/healthz") == 200

    for mount in container["volumeMounts"]:
        assert mount.get("readOnly") is True, f"the API mounts {mount['name']} writable"
    for volume in pod["volumes"]:
        assert volume["persistentVolumeClaim"].get("readOnly") is True, volume["name"]
    assert location(pod, container, env["CONVIRT_INDEX_ROOT"])[2]

    key = env_declared(container).get("CONVIRT_API_KEY", {})
    secret = key.get("valueFrom", {}).get("secretKeyRef")
    assert secret and "value" not in key, "CONVIRT_API_KEY comes from a Secret"
    readme = (ROOT / "docs" / "deploy.md").read_text()
    create = f"kubectl create secret generic {secret['name']}"
    assert create in readme and f"--from-literal={secret['key']}=" in readme, (
        f"docs/deploy.md: say how to create the Secret ({create} --from-literal={secret['key']}=...)"
    )

    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    service = only(API, "Service")
    assert service["spec"]["selector"].items() <= pod_labels.items(), "Service selects no pod"
    for service_port in service["spec"]["ports"]:
        target = service_port.get("targetPort", service_port["port"])
        assert port_number(container, target) == port, "the Service sends traffic elsewhere"
    for budget in [d for d in documents(API) if d["kind"] == "PodDisruptionBudget"]:
        assert budget["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
        assert budget["spec"]["minAvailable"] < deployment["spec"]["replicas"], "blocks drains"


# ---------------------------------------------------------------------------------------------
# Slurm


def sbatch_header(path: Path) -> dict[str, str]:
    """The #SBATCH options, which Slurm reads only before the first command of the script."""
    options, header = {}, True
    for line in path.read_text().splitlines()[1:]:
        text = line.strip()
        if text and not text.startswith("#"):
            header = False
        if text.startswith("#SBATCH"):
            assert header, f"{path.name}: Slurm ignores {text!r} after the first command"
            key, _, value = text.removeprefix("#SBATCH").strip().partition("=")
            options[key] = value
    return options


def array_ids(spec: str) -> list[int]:
    """Slurm's --array: 0-3, 1,3, 0-15:4, with an optional %max-running."""
    ids = []
    for part in spec.partition("%")[0].split(","):
        bounds, _, step = part.partition(":")
        first, _, last = bounds.partition("-")
        ids += range(int(first), int(last or first) + 1, int(step or 1))
    return ids


FAKE = """#!{python}
import json, os, sys
program, log = os.path.basename(sys.argv[0]), os.environ["FAKE_LOG"]
with open(log, "a") as f:
    f.write(json.dumps([program, *sys.argv[1:]]) + "\\n")
if program == "sbatch":  # job ids 4242, 4243, ... as `sbatch --parsable` prints them
    with open(log) as f:
        submitted = sum(json.loads(line)[0] == "sbatch" for line in f)
    print(str(4241 + submitted) + ";cluster")
"""


@pytest.fixture
def slurm(tmp_path):
    """Runs a script as Slurm would, in a submission directory, with fake sbatch, srun and
    convirt first on PATH; returns the commands it ran ([program, *arguments])."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("sbatch", "convirt"):
        (bin_dir / name).write_text(FAKE.format(python=sys.executable))
        (bin_dir / name).chmod(0o755)
    (bin_dir / "srun").write_text('#!/bin/sh\nexec "$@"\n')
    (bin_dir / "srun").chmod(0o755)
    submit_dir = tmp_path / "submit"
    submit_dir.mkdir()

    def run(script: Path, *args: str, **env: str) -> list[list[str]]:
        log = tmp_path / "log.jsonl"
        log.unlink(missing_ok=True)
        environment = {
            "PATH": f"{bin_dir}:/usr/bin:/bin",
            "HOME": str(tmp_path),
            "FAKE_LOG": str(log),
            "SLURM_SUBMIT_DIR": str(submit_dir),
            **env,
        }
        done = subprocess.run(
            ["bash", str(script), *args],
            cwd=submit_dir,
            env=environment,
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, f"{script.name} {args} {env}:\n{done.stdout}{done.stderr}"
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    return run


def run_array(slurm, ids: list[int], **env: str) -> list:
    """Each task of index-array.sbatch: its single `convirt index build`, parsed."""
    builds = []
    cpus = sbatch_header(ARRAY).get("--cpus-per-task", "1")
    for task in ids:
        ran = slurm(
            ARRAY,
            SLURM_ARRAY_JOB_ID="4242",
            SLURM_ARRAY_TASK_ID=str(task),
            SLURM_ARRAY_TASK_COUNT=str(len(ids)),
            SLURM_ARRAY_TASK_MIN=str(min(ids)),
            SLURM_ARRAY_TASK_MAX=str(max(ids)),
            SLURM_CPUS_PER_TASK=cpus,
            **env,
        )
        assert len(ran) == 1 and ran[0][0] == "convirt", f"task {task}: ran {ran}"
        argv = ran[0][1:]
        assert cli_error(argv) is None, (
            f"task {task}: convirt {shlex.join(argv)}: {cli_error(argv)}"
        )
        assert argv[:2] == ["index", "build"], argv
        builds.append(parsed(argv))
    return builds


def run_merge(slurm, **env: str):
    ran = slurm(MERGE, **env)
    assert len(ran) == 1 and ran[0][0] == "convirt", f"merge.sbatch ran {ran}"
    argv = ran[0][1:]
    assert cli_error(argv) is None, f"merge.sbatch: convirt {shlex.join(argv)}: {cli_error(argv)}"
    assert argv[:2] == ["index", "merge"], argv
    return parsed(argv)


def check_shards_and_merge(builds: list, merge, shards: int, where: str) -> None:
    assert sorted(b.shard for b in builds) == [(i, shards) for i in range(shards)], (
        f"{where}: the tasks run --shard {[f'{i}/{n}' for i, n in (b.shard for b in builds)]}"
    )
    assert all(b.device.startswith("cuda") for b in builds), f"{where}: embed on the GPU"
    outs = [str(b.root) for b in builds]
    assert len(set(outs)) == shards, f"{where}: every shard needs its own --out: {outs}"
    assert sorted(map(str, merge.shards)) == sorted(outs), (
        f"{where}: merge must name each shard root exactly once: {merge.shards} vs {outs}"
    )
    assert str(merge.root) not in outs


@pytest.mark.parametrize("path", SLURM_SCRIPTS, ids=lambda p: p.name)
def test_slurm_script_is_valid_bash(path):
    assert path.read_text().startswith("#!/bin/bash\n"), f"{path.name}: bash arrays and (( ))"
    done = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, f"bash -n {path.name}:\n{done.stderr}"
    assert os.access(path, os.X_OK), f"{path.name}: chmod +x"


def test_slurm_array_embeds_one_shard_per_task_and_merge_joins_them(slurm):
    header = sbatch_header(ARRAY)
    ids = array_ids(header["--array"])
    shards = len(ids)
    assert ids == list(range(shards)), f"--array={header['--array']}: shards are 0..N-1"
    assert re.fullmatch(r"gpu(:[\w-]+)?:1", header.get("--gres", "")), "--gres=gpu:1"
    assert "--array" not in sbatch_header(MERGE) and "--gres" not in sbatch_header(MERGE)
    # `sbatch index-array.sbatch`, then `sbatch merge.sbatch` with its defaults
    check_shards_and_merge(run_array(slurm, ids), run_merge(slurm), shards, "sbatch the two")


@pytest.mark.parametrize("count", [None, 6])
def test_submit_chains_the_array_and_the_merge(slurm, count):
    args = [] if count is None else [str(count)]
    submitted = slurm(SUBMIT, *args)
    assert [s[0] for s in submitted] == ["sbatch", "sbatch"], submitted
    jobs = []
    for call in submitted:
        *options, script = call[1:]
        opts = dict(option.partition("=")[::2] for option in options)
        jobs.append((Path(script).resolve(), opts))
    (array_script, array_opts), (merge_script, merge_opts) = jobs
    assert (array_script, merge_script) == (ARRAY, MERGE)
    assert "--parsable" in array_opts, "the job id is read from sbatch's output"
    assert merge_opts.get("--dependency") == "afterok:4242", (
        "the merge waits for every task of the array job (4242) to succeed"
    )
    header = sbatch_header(ARRAY)
    ids = array_ids(array_opts.get("--array", header["--array"]))
    shards = count or len(array_ids(header["--array"]))
    assert ids == list(range(shards)), f"submit.sh {args}: --array covers {ids}"

    def exported(opts):
        items = opts.get("--export", "ALL").split(",")
        assert items[0] == "ALL", "--export without ALL drops PATH and the paths"
        return dict(item.partition("=")[::2] for item in items[1:])

    builds = run_array(slurm, ids, **exported(array_opts))
    merge = run_merge(slurm, **exported(merge_opts))
    check_shards_and_merge(builds, merge, shards, f"submit.sh {shlex.join(args)}")


def test_deploy_docs_show_the_deploy_files():
    readme = (ROOT / "docs" / "deploy.md").read_text()
    named = set(re.findall(r"deploy/[\w./-]*\w", readme))
    for path in sorted(named):
        assert (ROOT / path).exists(), f"docs/deploy.md names {path}, which does not exist"
    for path in [INDEX_JOB, MERGE_JOB, SUBMIT]:
        assert str(path.relative_to(ROOT)) in named, (
            f"docs/deploy.md: show {path.relative_to(ROOT)}"
        )
