"""The Kubernetes templates in deploy/k8s, checked offline.

kubernetes-validate (the Kubernetes JSON schemas it bundles, strict: unknown fields are errors)
stands in for the API server, and each check is shown to fail on a broken copy. The other
tests hold the manifests to what deploy/k8s/README.md promises: the shutdown arithmetic, the
probes, a hardened pod, credentials only from a Secret, and an HPA ceiling that the database's
max_connections can carry. Nothing here runs a cluster: `kubectl apply --dry-run=server` and a
rollout are the README's commands for yours.
"""

from __future__ import annotations

import copy
import ipaddress
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from serverhooks import conf
from tests.support import procs

pytestmark = pytest.mark.deploy

K8S = procs.REPO / "deploy" / "k8s"
MANIFESTS = ("configmap.yaml", "deployment.yaml", "hpa.yaml", "pdb.yaml", "service.yaml")
# The oldest Kubernetes minor the templates support. A field or API newer than this fails here.
KUBERNETES_VERSION = "1.30.0"
COMMON_LABELS = ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/component")
CREDENTIAL_NAME = re.compile(r"PASSWORD|SECRET|DATABASE_URL", re.I)


def _kubernetes_validate() -> ModuleType:
    try:
        import kubernetes_validate
    except ImportError:
        pytest.fail("kubernetes-validate is missing: it comes with the test extras", pytrace=False)
    module: ModuleType = kubernetes_validate
    return module


def _load(name: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((K8S / name).read_text()) if doc]


def _one(name: str) -> dict[str, Any]:
    docs = _load(name)
    assert len(docs) == 1, f"{name}: expected one resource, found {len(docs)}"
    return docs[0]


def _config() -> dict[str, str]:
    data: dict[str, str] = _one("configmap.yaml")["data"]
    return data


def _pod_spec() -> dict[str, Any]:
    spec: dict[str, Any] = _one("deployment.yaml")["spec"]["template"]["spec"]
    return spec


def _container() -> dict[str, Any]:
    containers: list[dict[str, Any]] = _pod_spec()["containers"]
    assert len(containers) == 1, "one container: the probes, hook and env checks below look at it"
    return containers[0]


def _prestop_seconds(container: dict[str, Any]) -> int:
    """The pause of the preStop hook: `exec: sleep N` (or via a shell), or the `sleep` action."""
    hook = container["lifecycle"]["preStop"]
    if "sleep" in hook:
        return int(hook["sleep"]["seconds"])
    command = " ".join(hook["exec"]["command"])
    found = re.search(r"(?:^|[\s/])sleep\s+(\d+)\b", command)
    assert found, f"preStop does not pause: {command!r}"
    return int(found.group(1))


def _sessions_per_worker(config: dict[str, str]) -> int:
    threads = int(config.get("GUNICORN_THREADS", "1"))
    if config.get("GUNICORN_WORKER_CLASS") == "gevent":
        default = next(setting.default for setting in conf.SETTINGS if setting.key == "POOL_SIZE")
        pool = int(config.get("SERVERHOOKS_POOL_SIZE", default))
        return max(threads, pool)
    return threads


def _readme_sizing() -> dict[str, int]:
    """The README's sizing table: {quantity: value}."""
    text = (K8S / "README.md").read_text()
    section = text.split("## Sizing", 1)[1]
    rows = re.findall(r"^\| ([^|]+?) \| (\d+) \|", section, flags=re.M)
    table = {label: int(value) for label, value in rows}
    assert table, "README.md's Sizing section has no table"
    return table


def _quantity(value: str | int) -> float:
    """A Kubernetes resource quantity as a number (cores or bytes)."""
    text = str(value)
    suffixes = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "k": 1e3, "M": 1e6, "G": 1e9}
    for suffix, factor in suffixes.items():
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


# ---- the schemas, and that they can fail --------------------------------------------------


def test_the_directory_holds_exactly_the_checked_manifests() -> None:
    assert sorted(path.name for path in K8S.glob("*.y*ml")) == sorted(MANIFESTS)


@pytest.mark.parametrize("name", MANIFESTS)
def test_manifest_passes_the_kubernetes_schemas_strictly(name: str) -> None:
    kv = _kubernetes_validate()
    for resource in _load(name):
        # validate() raises on an error, and on a kind/apiVersion it has no schema for.
        assert kv.validate(resource, KUBERNETES_VERSION, strict=True) == "1.30"


def test_the_readme_command_validates_every_manifest() -> None:
    command = f"kubernetes-validate --strict -k {KUBERNETES_VERSION} deploy/k8s/*.yaml"
    assert command in (K8S / "README.md").read_text()
    _kubernetes_validate()
    out = subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", "-k", KUBERNETES_VERSION]
        + [f"deploy/k8s/{name}" for name in MANIFESTS],
        cwd=procs.REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    # The CLI only warns (exit 0) on a kind it has no schema for: require a pass for each.
    assert out.stdout.count(" passed for resource ") == len(MANIFESTS), out.stdout
    assert "WARN" not in out.stdout and "ERROR" not in out.stdout, out.stdout


def test_validation_rejects_a_wrong_field_type() -> None:
    kv = _kubernetes_validate()
    broken = _one("deployment.yaml")
    broken["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "eight thousand"
    with pytest.raises(kv.ValidationError, match="eight thousand"):
        kv.validate(broken, KUBERNETES_VERSION, strict=True)


def test_strict_validation_rejects_an_unknown_field() -> None:
    kv = _kubernetes_validate()
    broken = _one("deployment.yaml")
    container = broken["spec"]["template"]["spec"]["containers"][0]
    container["livenesProbe"] = container.pop("livenessProbe")  # a typo the API server would drop
    kv.validate(copy.deepcopy(broken), KUBERNETES_VERSION, strict=False)  # only --strict notices
    with pytest.raises(kv.ValidationError, match="livenesProbe"):
        kv.validate(broken, KUBERNETES_VERSION, strict=True)


def test_validation_rejects_an_api_the_pinned_kubernetes_no_longer_serves() -> None:
    kv = _kubernetes_validate()
    old = _one("hpa.yaml")
    old["apiVersion"] = "autoscaling/v2beta2"  # removed in Kubernetes 1.26
    with pytest.raises(kv.SchemaNotFoundError):
        kv.validate(old, KUBERNETES_VERSION, strict=True)


def test_the_cli_fails_on_a_broken_manifest(tmp_path: Path) -> None:
    _kubernetes_validate()
    broken = tmp_path / "deployment.yaml"
    text, count = re.subn(
        r"^(\s*terminationGracePeriodSeconds:) \d+$", r"\1 soon", (K8S / "deployment.yaml").read_text(), flags=re.M
    )
    assert count == 1
    broken.write_text(text)
    out = subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", "-k", KUBERNETES_VERSION, str(broken)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 0, out.stdout
    assert "ERROR" in out.stdout and "terminationGracePeriodSeconds" in out.stdout, out.stdout


# ---- the pod -------------------------------------------------------------------------------


def test_probes_hit_ping_on_8000_and_liveness_is_the_more_tolerant() -> None:
    container = _container()
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert 8000 in ports.values()
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container[kind]
        get = probe["httpGet"]
        assert get["path"] == "/ping", kind
        assert ports.get(get["port"], get["port"]) == 8000, kind
    readiness, liveness = container["readinessProbe"], container["livenessProbe"]

    def tolerance(probe: dict[str, Any]) -> int:
        return int(probe.get("periodSeconds", 10)) * int(probe.get("failureThreshold", 3))

    assert tolerance(liveness) > tolerance(readiness)
    assert liveness.get("timeoutSeconds", 1) >= readiness.get("timeoutSeconds", 1)
    # Gunicorn replaces a stuck worker after GUNICORN_TIMEOUT; liveness must not beat it to it.
    assert tolerance(liveness) > int(_config()["GUNICORN_TIMEOUT"])


def test_termination_grace_covers_prestop_and_gunicorn_graceful_timeout() -> None:
    pod = _pod_spec()
    pause = _prestop_seconds(_container())
    graceful = int(_config()["GUNICORN_GRACEFUL_TIMEOUT"])
    grace = int(pod["terminationGracePeriodSeconds"])
    assert pause > 0
    assert grace > graceful + pause, (grace, graceful, pause)
    # The comment that states the arithmetic says the same numbers.
    text = (K8S / "deployment.yaml").read_text()
    stated = re.search(
        r"terminationGracePeriodSeconds = (\d+) \(preStop\) \+ (\d+) \(graceful_timeout\) \+ (\d+)", text
    )
    assert stated, "deployment.yaml states the grace period arithmetic"
    assert (int(stated.group(1)), int(stated.group(2))) == (pause, graceful)
    assert sum(int(part) for part in stated.groups()) == grace


def test_requests_and_limits_are_set() -> None:
    resources = _container()["resources"]
    for resource in ("cpu", "memory"):
        request, limit = resources["requests"][resource], resources["limits"][resource]
        assert 0 < _quantity(request) <= _quantity(limit), (resource, request, limit)


def test_pod_runs_non_root_on_a_read_only_root_filesystem() -> None:
    pod, container = _pod_spec(), _container()
    effective = {**pod.get("securityContext", {}), **container["securityContext"]}
    assert effective["runAsNonRoot"] is True
    assert isinstance(effective["runAsUser"], int) and effective["runAsUser"] > 0
    assert isinstance(effective["runAsGroup"], int) and effective["runAsGroup"] > 0
    assert effective["readOnlyRootFilesystem"] is True
    assert effective["allowPrivilegeEscalation"] is False
    assert effective.get("privileged", False) is False
    assert effective["capabilities"]["drop"] == ["ALL"] and not effective["capabilities"].get("add")
    assert effective["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod.get("automountServiceAccountToken") is False
    # The same numeric user and group as the image's runtime stage runs as.
    dockerfile = (procs.REPO / "deploy" / "docker" / "Dockerfile").read_text()
    runtime = next(stage for stage in re.split(r"^FROM ", dockerfile, flags=re.M) if " AS runtime" in stage)
    user = re.findall(r"^USER (\S+)", runtime, flags=re.M)[-1]
    if not re.fullmatch(r"\d+:\d+", user):  # a name: the ids its useradd/groupadd pin
        uid = re.search(r"useradd [^\n]*--uid (\d+)", runtime)
        gid = re.search(r"groupadd [^\n]*--gid (\d+)", runtime)
        assert uid and gid, f"the image's user {user} has no pinned uid and gid to match"
        user = f"{uid.group(1)}:{gid.group(1)}"
    assert f"{effective['runAsUser']}:{effective['runAsGroup']}" == user


def test_only_tmp_dev_shm_and_the_metrics_dir_are_writable_and_the_heartbeat_goes_there() -> None:
    pod, container = _pod_spec(), _container()
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    mounts = {mount["mountPath"]: volumes[mount["name"]] for mount in container["volumeMounts"]}
    assert set(mounts) == {"/tmp", "/dev/shm", "/run/prometheus"}
    env = {variable["name"]: variable.get("value") for variable in container["env"]}
    assert env["PROMETHEUS_MULTIPROC_DIR"] in mounts, "prometheus_client's files need a writable directory"
    assert all("emptyDir" in volume for volume in mounts.values())
    assert mounts["/dev/shm"]["emptyDir"]["medium"] == "Memory"
    assert all(volume["emptyDir"].get("sizeLimit") for volume in mounts.values())
    assert _config()["GUNICORN_WORKER_TMP_DIR"] in mounts


def test_image_is_pinned() -> None:
    image = _container()["image"]
    name, _, tag = image.split("@", 1)[0].rpartition(":")
    assert name and "/" not in tag, f"{image}: no tag"
    assert tag != "latest" and re.fullmatch(r"v?\d+(\.\d+)*([-.]\w+)*", tag), f"{image}: pin a version tag"


# ---- credentials -----------------------------------------------------------------------------


def test_credentials_come_only_from_a_secret() -> None:
    container = _container()
    names = set()
    for variable in container.get("env", []):
        names.add(variable["name"])
        if CREDENTIAL_NAME.search(variable["name"]):
            assert "value" not in variable, f"{variable['name']} is a literal"
            assert set(variable["valueFrom"]) == {"secretKeyRef"}, variable
    assert {"DATABASE_URL", "DJANGO_SECRET_KEY"} <= names
    for source in container.get("envFrom", []):
        assert set(source) == {"configMapRef"}, source
    assert not [key for key in _config() if CREDENTIAL_NAME.search(key)]


_URL_WITH_PASSWORD = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@]+:[^/\s@]+@", re.I)
_SECRET_KEY_NAME = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|API_?KEY|PRIVATE_?KEY|CREDENTIAL", re.I)
_TOKEN = re.compile(r"[A-Za-z0-9+/=_-]{32,}")


def _looks_like_credential(key: str, value: str) -> bool:
    if _URL_WITH_PASSWORD.search(value) or "-----BEGIN" in value:
        return True
    if _SECRET_KEY_NAME.search(key) and value.strip():
        return True
    # A long random-looking token: upper and lower case letters and digits together.
    return any(
        re.search(r"[A-Z]", token) and re.search(r"[a-z]", token) and re.search(r"\d", token)
        for token in _TOKEN.findall(value)
    )


def _literals(node: Any, key: str = "") -> list[tuple[str, str]]:
    """Every (key, string) leaf; an env entry's value is keyed by the variable's name."""
    if isinstance(node, dict):
        if isinstance(node.get("name"), str) and isinstance(node.get("value"), str):
            return [(node["name"], node["value"])]
        return [leaf for child_key, child in node.items() for leaf in _literals(child, str(child_key))]
    if isinstance(node, list):
        return [leaf for item in node for leaf in _literals(item, key)]
    return [(key, node)] if isinstance(node, str) else []


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("DATABASE_URL", "postgres://app:hunter2@db:5432/app", True),
        ("url", "mysql://root:pw@mariadb/test", True),
        ("DB_PASSWORD", "changeme", True),
        ("anything", "Zq8vR2mX7pL4tN9wK3yB6cF1hJ5dG0sA", True),
        ("tls", "-----BEGIN PRIVATE KEY-----", True),
        ("DATABASE_URL", "postgres://db:5432/app", False),
        ("image", "registry.example.com/serverhooks-app:0.1.0", False),
        ("app.kubernetes.io/name", "serverhooks-app", False),
        ("GUNICORN_FORWARDED_ALLOW_IPS", "10.244.0.0/16", False),
        ("key", "django-secret-key", False),
    ],
)
def test_the_credential_detector(key: str, value: str, expected: bool) -> None:
    assert _looks_like_credential(key, value) is expected


def test_no_literal_in_any_manifest_looks_like_a_credential() -> None:
    checked = 0
    for name in MANIFESTS:
        for resource in _load(name):
            assert resource["kind"] != "Secret", f"{name}: ship no Secret; the README says how to create it"
            for key, value in _literals(resource):
                checked += 1
                assert not _looks_like_credential(key, value), f"{name}: {key}={value!r} looks like a credential"
    assert checked > 50, checked


# ---- configuration and wiring ----------------------------------------------------------------


def test_configmap_sets_the_gunicorn_environment_that_gunicorn_conf_reads() -> None:
    config = _config()
    required = {
        "WEB_CONCURRENCY",
        "GUNICORN_WORKER_CLASS",
        "GUNICORN_THREADS",
        "GUNICORN_TIMEOUT",
        "GUNICORN_GRACEFUL_TIMEOUT",
        "GUNICORN_BIND",
        "GUNICORN_CONTROL_SOCKET_DISABLE",
        "GUNICORN_FORWARDED_ALLOW_IPS",
        "SERVERHOOKS_POOL_SIZE",
        "CONN_MAX_AGE",
    }
    assert required <= set(config), required - set(config)
    # Every key is read by someone: no typo silently falls back to a default.
    gunicorn_conf = (procs.REPO / "gunicorn.conf.py").read_text()
    known = set(re.findall(r"""(?:environ\.get|environ\[|_env_bool)\(?["'](\w+)["']""", gunicorn_conf))
    known |= {setting.env_var for setting in conf.SETTINGS}
    known |= set(re.findall(r"""environ\.get\(["'](\w+)["']""", (procs.REPO / "tests/project/settings.py").read_text()))
    assert set(config) <= known, set(config) - known
    assert config["GUNICORN_BIND"] == "0.0.0.0:8000"
    assert config["GUNICORN_CONTROL_SOCKET_DISABLE"] == "1"
    assert config["GUNICORN_WORKER_CLASS"] in {"sync", "gthread", "gevent"}
    trusted = [part.strip() for part in config["GUNICORN_FORWARDED_ALLOW_IPS"].split(",")]
    assert "*" not in trusted
    for part in trusted:
        network = ipaddress.ip_network(part, strict=True)  # Gunicorn >= 24.1.1 refuses host bits too
        assert network.prefixlen > 0, f"{part} trusts every address"


def test_gunicorn_resolves_the_configmap_as_intended() -> None:
    config = _config()
    env = {"PATH": os.environ.get("PATH", ""), "DJANGO_SETTINGS_MODULE": "tests.project.settings", **config}
    out = subprocess.run(
        [sys.executable, "-m", "gunicorn", "--print-config", "-c", "gunicorn.conf.py", "tests.project.wsgi"],
        cwd=procs.REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    resolved = dict(re.findall(r"^(\w+)\s+= (.*)$", out.stdout, flags=re.M))
    assert resolved["workers"] == config["WEB_CONCURRENCY"]
    assert resolved["worker_class"] == config["GUNICORN_WORKER_CLASS"]
    assert resolved["threads"] == config["GUNICORN_THREADS"]
    assert resolved["timeout"] == config["GUNICORN_TIMEOUT"]
    assert resolved["graceful_timeout"] == config["GUNICORN_GRACEFUL_TIMEOUT"]
    assert resolved["bind"] == repr([config["GUNICORN_BIND"]])
    assert resolved["control_socket_disable"] == "True"
    assert resolved["worker_tmp_dir"] == config["GUNICORN_WORKER_TMP_DIR"]
    assert "*" not in resolved["forwarded_allow_ips"]


def test_labels_selectors_and_references_agree() -> None:
    resources = {name: _one(name) for name in MANIFESTS}
    deployment = resources["deployment.yaml"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    common = {key: pod_labels[key] for key in COMMON_LABELS}
    for name, resource in resources.items():
        labels = resource["metadata"]["labels"]
        assert {key: labels.get(key) for key in COMMON_LABELS} == common, name
        assert labels.get("app.kubernetes.io/part-of") == pod_labels["app.kubernetes.io/part-of"], name
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector == common
    assert resources["service.yaml"]["spec"]["selector"] == common
    assert resources["service.yaml"]["spec"]["type"] == "ClusterIP"
    assert resources["pdb.yaml"]["spec"]["selector"]["matchLabels"] == common
    target = resources["hpa.yaml"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    container = _container()
    assert [source["configMapRef"]["name"] for source in container["envFrom"]] == [
        resources["configmap.yaml"]["metadata"]["name"]
    ]
    port_names = {port["name"] for port in container["ports"]}
    assert {port["targetPort"] for port in resources["service.yaml"]["spec"]["ports"]} <= port_names


# ---- sizing ----------------------------------------------------------------------------------


def test_hpa_max_replicas_fits_the_readme_max_connections() -> None:
    config, table = _config(), _readme_sizing()
    hpa = _one("hpa.yaml")["spec"]
    strategy = _one("deployment.yaml")["spec"]["strategy"]["rollingUpdate"]
    workers, per_worker = int(config["WEB_CONCURRENCY"]), _sessions_per_worker(config)
    per_pod = workers * per_worker
    max_replicas, surge = int(hpa["maxReplicas"]), int(strategy["maxSurge"]) + 1  # + 1 pod still draining
    max_connections = table["max_connections"]
    budget = max_connections - table["reserved for everything else"]

    # The brief's bound, and the stricter one the README derives maxReplicas from.
    assert max_replicas * per_pod < max_connections
    assert (max_replicas + surge) * per_pod <= budget
    assert (max_replicas + 1 + surge) * per_pod > budget, "maxReplicas is the largest that fits"

    # The table's worked numbers are the manifests' numbers.
    assert table["workers per pod"] == workers
    assert table["sessions per worker"] == per_worker
    assert table["sessions per pod"] == per_pod
    assert table["budget for this Deployment"] == budget
    assert table["extra pods during a rollout"] == surge
    assert table["HPA maxReplicas"] == max_replicas
    assert table["sessions at maxReplicas"] == max_replicas * per_pod
    assert table["sessions at the peak of a rollout"] == (max_replicas + surge) * per_pod
    assert int(hpa["minReplicas"]) >= 2, "one pod may be drained (pdb.yaml) while another serves"


def test_the_sizing_arithmetic_counts_gevent_pool_slots() -> None:
    assert _sessions_per_worker({"GUNICORN_WORKER_CLASS": "gthread", "GUNICORN_THREADS": "4"}) == 4
    assert _sessions_per_worker({"GUNICORN_WORKER_CLASS": "sync"}) == 1
    assert _sessions_per_worker({"GUNICORN_WORKER_CLASS": "gevent"}) == 10  # serverhooks' default
    assert _sessions_per_worker({"GUNICORN_WORKER_CLASS": "gevent", "SERVERHOOKS_POOL_SIZE": "25"}) == 25
