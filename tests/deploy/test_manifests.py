"""deploy/: the compose file, the KubeRay RayService, Prometheus and Grafana provisioning
parse, and what they name matches the code: image, ports, env names, secret keys, the
Serve import path and its args, the CLI commands, the mounted paths and the datasource."""

from __future__ import annotations

import importlib
import re
import shutil
import subprocess
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
import ray
import typer
import yaml

from core.settings import Settings
from gateway.config import GatewayArgs

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
IMAGE = f"bqg-gateway:{version('backdoor-quarantine-gateway')}"


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return dict(_yaml(DEPLOY / "compose.yaml"))


@pytest.fixture(scope="module")
def rayservice() -> dict[str, Any]:
    docs = list(yaml.safe_load_all((DEPLOY / "kuberay" / "rayservice.yaml").read_text()))
    (service,) = [d for d in docs if d["kind"] == "RayService"]
    return dict(service)


def _containers(service: dict[str, Any]) -> list[dict[str, Any]]:
    cluster = service["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def _check_settings_env(env: dict[str, Any], where: str) -> None:
    """Every BQG_* name is a Settings field, and its literal value validates."""
    fields = Settings.model_fields
    values: dict[str, Any] = {}
    for name, value in env.items():
        if not name.startswith("BQG_"):
            continue
        field = name.removeprefix("BQG_").lower()
        assert field in fields, f"{where}: {name} is not a setting (core/settings.py)"
        if isinstance(value, str) and "${" not in value:
            values[field] = value
    Settings(**values)  # raises on a wrong type or range


def _check_cli(argv: list[str]) -> None:
    """``argv`` parses with this project's console script (unknown options raise)."""
    module = {"gateway": "local.cli", "trainer": "trainer.cli"}[argv[0]]
    cli = typer.main.get_command(importlib.import_module(module).app)
    sub = cli.commands[argv[1]]  # type: ignore[attr-defined]
    sub.make_context(argv[1], list(argv[2:]))


def _check_serve_config(config: dict[str, Any]) -> None:
    app = config["applications"][0]
    module, _, attr = app["import_path"].partition(":")
    assert app["import_path"] == "gateway.app:build_app"
    assert callable(getattr(importlib.import_module(module), attr))
    GatewayArgs(**app["args"])  # the builder's typed args accept them


def test_compose_wires_the_gateway_postgres_prometheus_and_grafana(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"gateway", "postgres", "prometheus", "grafana"}
    gateway = services["gateway"]
    assert gateway["image"] == IMAGE
    assert (ROOT / gateway["build"]["dockerfile"]).exists()
    _check_cli(gateway["command"])
    env = gateway["environment"]
    _check_settings_env(env, "compose gateway")
    assert env["BQG_DB"].startswith("postgresql+psycopg://")
    assert "@postgres:5432/" in env["BQG_DB"]
    assert env["BQG_DB"].rsplit("/", 1)[1] == services["postgres"]["environment"]["POSTGRES_DB"]
    published = {int(p.split(":")[1]) for p in gateway["ports"]}
    assert int(env["BQG_HTTP_PORT"]) in published
    # every named volume is declared, every bind mount exists in the repo
    for name, service in services.items():
        for mount in service.get("volumes", []):
            source = mount.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name} mounts {source}, which is missing"
            else:
                assert source in compose["volumes"], f"{name}: volume {source} is not declared"


def test_prometheus_scrapes_the_ports_the_gateway_exports(compose: dict[str, Any]) -> None:
    config = _yaml(DEPLOY / "prometheus" / "prometheus.yml")
    env = compose["services"]["gateway"]["environment"]
    targets = {
        job["job_name"]: [t for sc in job["static_configs"] for t in sc["targets"]]
        for job in config["scrape_configs"]
    }
    assert targets == {
        "bqg-gateway": [f"gateway:{env['BQG_METRICS_PORT']}"],
        "bqg-watcher": [f"gateway:{env['BQG_WATCHER_METRICS_PORT']}"],
    }
    for rules in config["rule_files"]:
        assert (DEPLOY / "prometheus" / rules).exists()
    prom = compose["services"]["prometheus"]
    assert "./prometheus:/etc/prometheus:ro" in prom["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prom["command"]
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    exposed = set(re.search(r"^EXPOSE (.+)$", dockerfile, re.M).group(1).split())  # type: ignore[union-attr]
    assert exposed == {
        env["BQG_HTTP_PORT"],
        env["BQG_METRICS_PORT"],
        env["BQG_WATCHER_METRICS_PORT"],
    }


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_promtool_accepts_the_config_and_the_alert_rules() -> None:
    for args in (
        ["check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")],
        ["check", "rules", str(DEPLOY / "prometheus" / "alerts.yml")],
    ):
        done = subprocess.run(["promtool", *args], capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr


def test_grafana_provisioning_matches_the_compose_mounts(compose: dict[str, Any]) -> None:
    grafana = compose["services"]["grafana"]
    mounts = dict(m.split(":")[:2] for m in grafana["volumes"])
    provisioning = DEPLOY / "grafana" / "provisioning"
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    (provider,) = _yaml(provisioning / "dashboards" / "bqg.yml")["providers"]
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(provider["options"]["path"] + "/")
    assert (DEPLOY / "grafana" / "dashboards" / Path(home).name).exists()
    (source,) = _yaml(provisioning / "datasources" / "prometheus.yml")["datasources"]
    host, port = re.fullmatch(r"http://([\w-]+):(\d+)", source["url"]).groups()  # type: ignore[union-attr]
    assert host in compose["services"]
    assert any(p.endswith(f"{port}:{port}") for p in compose["services"][host]["ports"])


def test_serve_configs_import_the_app_with_args_it_accepts(rayservice: dict[str, Any]) -> None:
    _check_serve_config(_yaml(DEPLOY / "serve.yaml"))
    _check_serve_config(yaml.safe_load(rayservice["spec"]["serveConfigV2"]))


def test_rayservice_matches_the_image_env_secret_ports_and_ray(rayservice: dict[str, Any]) -> None:
    cluster = rayservice["spec"]["rayClusterConfig"]
    assert rayservice["apiVersion"] == "ray.io/v1"
    assert cluster["rayVersion"] == ray.__version__
    containers = _containers(rayservice)
    assert {c["image"] for c in containers} == {IMAGE}
    secret = _yaml(DEPLOY / "kuberay" / "secret.example.yaml")
    for c in containers:
        env = _env(c)
        _check_settings_env(env, f"rayservice container {c['name']}")
        for value in env.values():
            if isinstance(value, dict) and "secretKeyRef" in value:
                ref = value["secretKeyRef"]
                assert ref["name"] == secret["metadata"]["name"]
                assert ref["key"] in secret["stringData"]
        assert "BQG_DB" in env, f"{c['name']} has no database URL"
    head = cluster["headGroupSpec"]
    head_containers = {c["name"]: c for c in head["template"]["spec"]["containers"]}
    serve_config = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    ports = {p["name"]: p["containerPort"] for p in head_containers["ray-head"]["ports"]}
    assert ports["serve"] == serve_config["http_options"]["port"]
    head_env = _env(head_containers["ray-head"])
    assert (
        int(head["rayStartParams"]["metrics-export-port"])
        == int(head_env["BQG_METRICS_PORT"])
        == ports["metrics"]
    )
    watcher = head_containers["watcher"]
    _check_cli(watcher["command"])
    watcher_env = _env(watcher)
    assert watcher_env["RAY_ADDRESS"].endswith(f":{ports['gcs']}")
    assert int(watcher_env["BQG_WATCHER_METRICS_PORT"]) == watcher["ports"][0]["containerPort"]
    gpu = [g for g in cluster["workerGroupSpecs"] if "num-gpus" in g["rayStartParams"]]
    assert gpu and gpu[0]["minReplicas"] == 0 and float(watcher_env["BQG_REPAIR_GPUS"]) >= 1
    for group in cluster["workerGroupSpecs"]:
        claims = {
            v["persistentVolumeClaim"]["claimName"] for v in group["template"]["spec"]["volumes"]
        }
        assert claims == {"bqg-store"}, "every node reads the same model bundles"


def test_the_image_copies_every_package_the_distribution_installs() -> None:
    """A package missing from the Dockerfile's COPY lines installs nothing in the image, and
    its console scripts fail there (the `gateway` script lives in `local`)."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    copied = set(re.findall(r"^COPY (\w+) \1$", (DEPLOY / "Dockerfile").read_text(), re.M))
    assert packages <= copied, f"deploy/Dockerfile does not copy {sorted(packages - copied)}"


def _deploy_texts() -> dict[str, str]:
    return {
        str(p.relative_to(ROOT)): p.read_text()
        for p in sorted(DEPLOY.rglob("*"))
        if p.is_file() and p.suffix in ("", ".yaml", ".yml", ".example", ".json")
    }


def test_no_deploy_file_turns_ray_auth_off_or_opens_the_dashboard() -> None:
    """Ray's token authentication on, its dashboard on localhost, in every deploy file."""
    texts = _deploy_texts()
    assert "deploy/Dockerfile" in texts and "deploy/compose.yaml" in texts
    for name, text in texts.items():
        for mode in re.findall(r"RAY_AUTH_MODE\W+(?:value:\s*)?(\w+)", text):
            assert mode == "token", f"{name}: RAY_AUTH_MODE={mode}"
        for host in re.findall(r"dashboard-host\W+([\d.]+)", text):
            assert host == "127.0.0.1", f"{name}: the dashboard listens on {host}"
        assert "--dashboard-host=0.0.0.0" not in text and "include-dashboard true" not in text


def test_compose_publishes_only_the_gateway_and_asks_for_every_secret(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    for name, service in services.items():
        for port in service.get("ports", []):
            if name != "gateway":
                assert port.startswith("127.0.0.1:"), f"{name} publishes {port} on every interface"
    env = services["gateway"]["environment"]
    assert env["RAY_AUTH_MODE"] == "token"
    for secret in ("RAY_AUTH_TOKEN", "BQG_ADMIN_TOKEN"):
        assert re.fullmatch(r"\$\{\w+:\?.+\}", env[secret]), f"{secret} must come from deploy/.env"
    grafana = services["grafana"]
    assert re.fullmatch(r"\$\{\w+:\?.+\}", grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD"])
    for name in ("grafana", "postgres"):  # each refuses a placeholder before it starts
        assert "change-me" in " ".join(services[name]["entrypoint"]), name


def test_the_image_runs_as_a_user_and_no_secret_is_written_down(
    rayservice: dict[str, Any],
) -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    users = re.findall(r"^USER (\S+)", dockerfile, re.M)
    assert users and users[-1] not in ("root", "0"), "the image must not run as root"
    for c in _containers(rayservice):
        env = _env(c)
        assert env["RAY_AUTH_MODE"] == "token", c["name"]
        for name in ("BQG_DB", "BQG_ADMIN_TOKEN", "RAY_AUTH_TOKEN"):
            if name in env:
                assert isinstance(env[name], dict) and "secretKeyRef" in env[name], (
                    c["name"],
                    name,
                )
    serve_config = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    args = serve_config["applications"][0]["args"]
    assert "admin_token" not in args and "db" not in args  # Ray shows app args to its clients
