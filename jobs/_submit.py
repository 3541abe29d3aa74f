"""What the jobs/ scripts share: how a command becomes one Ray job on a running cluster.

The three scripts differ only in the command that runs on the cluster. Everything else is one
piece of code here, so that they cannot drift apart:

- where the dashboard is (`--address`, else RAY_API_SERVER_ADDRESS / RAY_ADDRESS, else
  http://127.0.0.1:8265) and which token it wants (`--token-file`, RAY_AUTH_MODE,
  RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token), sent as a bearer header;
- what travels with the job: this working tree as `working_dir` (the submitted version of the
  package, its configs and these scripts), and the storage settings copied *by name* from this
  shell into the job's `env_vars` (credentials only with `--aws-credentials`: the nodes should
  have their own), so that no secret value is ever on a command line or printed;
- what the user sees: the job id and the commands that follow, stop or inspect it; `--wait`
  streams the job's output and exits with its status (0 SUCCEEDED, 1 FAILED or STOPPED);
  `--dry-run` prints the job that would be submitted (variable names only) and contacts nothing.

Exit codes: 0 submitted (or succeeded with --wait), 1 the job failed, 2 bad usage or an
unreachable/unauthorised dashboard or a missing variable (one line on stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
DEFAULT_TOKEN_FILE = Path("~/.ray/auth_token")
# The standard AWS variables the package reads (memkd_ray/storage/s3.py). The settings are
# copied when set; the credentials only on request: Ray keeps a job's env_vars in its record
# (dashboard) and its runtime-env agent logs them on every node, so nodes should hold their own.
AWS_SETTINGS = (
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE",
)
AWS_CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
# Never shipped: environments, VCS, data, local results, caches. Ray matches these with
# gitignore syntax against paths relative to the repository root: a pattern without a
# leading "/" matches at any depth ("data/" would drop memkd_ray/data/ too), so everything
# that names a top-level folder is anchored; only caches are matched everywhere.
WORKING_DIR_EXCLUDES = [
    "/.git", "/.venv", "/venv", "/data/", "/memkd-store/", "/build/", "/dist/",
    "__pycache__/", ".pytest_cache/", ".ruff_cache/", "*.egg-info/",
]
EXIT_FAILED = 1
EXIT_USAGE = 2


def job_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """The argument parser every submit script starts from (same exit-code contract)."""
    return argparse.ArgumentParser(
        prog=prog, description=doc.splitlines()[0],
        epilog="Exit codes: 0 submitted (with --wait: succeeded), 1 the job failed, 2 bad "
        "usage, unreachable dashboard, or a missing variable.")


class SubmitError(Exception):
    """A one-line reason to stop before (or instead of) submitting; exit code 2."""


@dataclass(frozen=True)
class Job:
    """One Ray job as the JobSubmissionClient takes it (env values stay out of `repr`)."""

    entrypoint: str
    runtime_env: dict[str, Any]
    env_names: tuple[str, ...]
    entrypoint_num_cpus: float
    entrypoint_num_gpus: float
    entrypoint_resources: dict[str, float] | None
    metadata: dict[str, str]

    def describe(self) -> dict[str, Any]:
        """The job as --dry-run prints it: variables by name, never by value."""
        env = {name: f"<from local ${name}>" for name in self.env_names}
        return {
            "entrypoint": self.entrypoint,
            "runtime_env": {**self.runtime_env, "env_vars": env},
            "entrypoint_num_cpus": self.entrypoint_num_cpus,
            "entrypoint_num_gpus": self.entrypoint_num_gpus,
            "entrypoint_resources": self.entrypoint_resources,
            "metadata": self.metadata,
        }


# Command line ----------------------------------------------------------------------------


def add_cluster_arguments(parser: argparse.ArgumentParser, entrypoint_cpus: float) -> None:
    """Options every script takes: the cluster, the storage, what ships, how to wait."""
    group = parser.add_argument_group("cluster")
    group.add_argument("--address", help="the cluster's dashboard, http://HOST:8265 (default: "
                       f"$RAY_API_SERVER_ADDRESS, $RAY_ADDRESS or {DEFAULT_ADDRESS})")
    group.add_argument("--token-file", type=Path, help="file holding the cluster's auth token "
                       "(default: $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token "
                       "when RAY_AUTH_MODE=token)")
    group.add_argument("--storage", required=True,
                       help="results and registry: s3://bucket/prefix or a path on the nodes")
    group.add_argument("--env", dest="env_names", action="append", default=[], metavar="NAME",
                       help="copy this variable from your environment into the job (by name)")
    group.add_argument("--no-aws-env", dest="aws_env", action="store_false",
                       help="copy no AWS_* variable (by default the endpoint, region and "
                       "profile name are copied when set)")
    group.add_argument("--aws-credentials", action="store_true",
                       help="also copy AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and "
                       "AWS_SESSION_TOKEN, for nodes without credentials of their own (Ray "
                       "shows and logs a job's variables: prefer a Secret or instance role)")
    group.add_argument("--working-dir", type=Path, default=REPO,
                       help="tree shipped as the job's working_dir (default: this repository)")
    group.add_argument("--pip", action="append", default=[], metavar="REQUIREMENT",
                       help="extra pip requirement installed for the job")
    group.add_argument("--python", default="python",
                       help="Python on the cluster nodes that has the package's dependencies")
    group.add_argument("--entrypoint-num-cpus", type=float, default=entrypoint_cpus)
    group.add_argument("--entrypoint-num-gpus", type=float, default=0.0)
    group.add_argument("--entrypoint-resources", type=json.loads, metavar="JSON",
                       help='custom resources for the driver, e.g. \'{"head": 1}\'')
    group.add_argument("--submission-id", help="job id to use (default: Ray makes one)")
    group.add_argument("--wait", action="store_true",
                       help="stream the job's output and exit with its status")
    group.add_argument("--dry-run", action="store_true",
                       help="print the job that would be submitted and stop")


def config_in_tree(config: str, working_dir: Path) -> str:
    """A config file of the shipped tree, as the path the job sees (relative to working_dir).

    The job runs in the unpacked working_dir, so only files inside it exist there; a renamed or
    missing config fails here, before anything is submitted. A relative path is taken from the
    current directory, else from working_dir (so `configs/x.yaml` works from anywhere).
    """
    if not working_dir.is_dir():
        raise SubmitError(f"--working-dir {working_dir}: not a directory")
    path = Path(config)
    if not path.is_absolute():
        path = path if (Path.cwd() / path).is_file() else working_dir / path
    path = path.resolve()
    root = working_dir.resolve()
    if not path.is_file():
        raise SubmitError(f"config {config}: file not found")
    if not path.is_relative_to(root):
        raise SubmitError(f"config {config}: not inside the shipped working dir {root}")
    return path.relative_to(root).as_posix()


def cli_command(python: str, *args: str) -> list[str]:
    """`memkd-ray ARGS` run by the cluster's Python from the shipped tree (the submitted code,
    not whatever version the nodes have installed)."""
    return [python, "-m", "memkd_ray.cli", *args]


def repeated(flag: str, values: Sequence[str]) -> list[str]:
    return [item for value in values for item in (flag, value)]


def shell_sequence(commands: Sequence[Sequence[str]]) -> str:
    """One shell line running every command even if one fails; non-zero if any failed."""
    if len(commands) == 1:
        return shlex.join(commands[0])
    steps = " ".join(f"{shlex.join(command)} || status=1;" for command in commands)
    return f"status=0; {steps} exit $status"


# Building the job ------------------------------------------------------------------------


def job_env_names(args: argparse.Namespace) -> tuple[str, ...]:
    """Names of the variables copied into the job; a named one that is unset is an error."""
    names = list(dict.fromkeys(args.env_names))
    for name in names:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise SubmitError(f"--env {name}: not a variable name")
        if name not in os.environ:
            raise SubmitError(f"--env {name}: not set in this environment")
    if args.aws_env and args.storage.startswith("s3://"):
        copied = AWS_SETTINGS
        if args.aws_credentials:
            keys = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
            if keys - os.environ.keys():
                missing = sorted(keys - os.environ.keys())[0]
                raise SubmitError(f"--aws-credentials: {missing} is not set")
            copied += AWS_CREDENTIALS
        names += [name for name in copied if name in os.environ and name not in names]
    elif args.aws_credentials:
        raise SubmitError("--aws-credentials needs an s3:// --storage and no --no-aws-env")
    return tuple(names)


def build_job(args: argparse.Namespace, entrypoint: str, script: str) -> Job:
    if not args.working_dir.is_dir():
        raise SubmitError(f"--working-dir {args.working_dir}: not a directory")
    runtime_env: dict[str, Any] = {
        "working_dir": str(args.working_dir.resolve()),
        "excludes": WORKING_DIR_EXCLUDES,
    }
    if args.pip:
        runtime_env["pip"] = list(args.pip)
    return Job(
        entrypoint=entrypoint,
        runtime_env=runtime_env,
        env_names=job_env_names(args),
        entrypoint_num_cpus=args.entrypoint_num_cpus,
        entrypoint_num_gpus=args.entrypoint_num_gpus,
        entrypoint_resources=args.entrypoint_resources,
        metadata={"submitted_by": f"jobs/{script}", "memkd_ray_version": package_version()},
    )


def package_version() -> str:
    """The version in pyproject.toml of the shipped tree (the submitter may lack the package)."""
    text = (REPO / "pyproject.toml").read_text()
    match = re.search(r'^version\s*=\s*"([^"]+)"', text, re.MULTILINE)
    return match.group(1) if match else "unknown"


# The dashboard ---------------------------------------------------------------------------


def resolve_address(args: argparse.Namespace) -> str:
    """--address, else the variables Ray's own CLI reads; Ray's client would let those
    variables override an explicit address, so they are cleared once resolved."""
    address = (args.address or os.environ.get("RAY_API_SERVER_ADDRESS")
               or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS)
    os.environ.pop("RAY_API_SERVER_ADDRESS", None)
    os.environ.pop("RAY_ADDRESS", None)
    if "://" not in address:  # host:port means the dashboard here, as in the help
        address = f"http://{address}"
    return address.rstrip("/")


def load_token(token_file: Path | None) -> str | None:
    """The cluster token, from the same places as Ray's own CLI, or None for no auth.

    RAY_AUTH_MODE=disabled sends none; RAY_AUTH_MODE=token requires one; unset sends one only
    if given explicitly (--token-file, RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH).
    """
    if token_file is not None:
        return _read_token(token_file, "--token-file")
    mode = os.environ.get("RAY_AUTH_MODE", "").strip().lower()
    if mode == "disabled":
        return None
    if token := os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return token
    if path := os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return _read_token(Path(path), "RAY_AUTH_TOKEN_PATH")
    if mode == "token":
        default = DEFAULT_TOKEN_FILE.expanduser()
        if default.is_file():
            return _read_token(default, str(DEFAULT_TOKEN_FILE))
        raise SubmitError("RAY_AUTH_MODE=token but no token found: set RAY_AUTH_TOKEN or "
                          "RAY_AUTH_TOKEN_PATH, write it to ~/.ray/auth_token, or pass "
                          "--token-file")
    return None


def _read_token(path: Path, source: str) -> str:
    try:
        token = path.expanduser().read_text().strip()
    except OSError as exc:
        raise SubmitError(f"{source} {path}: cannot read the token ({exc.strerror})") from None
    if not token:
        raise SubmitError(f"{source} {path}: the token file is empty")
    return token


def connect(address: str, token: str | None) -> Any:
    """A JobSubmissionClient that has reached the dashboard, or a one-line SubmitError."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return JobSubmissionClient(address, headers=headers)
    except AuthenticationError as exc:
        if str(exc).startswith("Authentication required"):
            raise SubmitError(f"the dashboard at {address} requires a token: export "
                              "RAY_AUTH_MODE=token with RAY_AUTH_TOKEN_PATH (or "
                              "~/.ray/auth_token), or pass --token-file") from None
        raise SubmitError(f"the dashboard at {address} rejected the token") from None
    except ConnectionError:
        raise SubmitError(f"cannot reach the Ray dashboard at {address} (is the cluster up, "
                          "and is this its dashboard address, http://HOST:8265?)") from None
    except Exception as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SubmitError(f"the Ray dashboard at {address}: {reason}") from None


# Submitting and following ----------------------------------------------------------------


def submit(args: argparse.Namespace, entrypoint: str, script: str) -> int:
    """Build, then print (--dry-run) or submit the job; with --wait follow it to the end."""
    address = resolve_address(args)
    job = build_job(args, entrypoint, script)
    if args.dry_run:
        print(json.dumps({"address": address, **job.describe()}, indent=2))
        return 0
    client = connect(address, load_token(args.token_file))
    env_vars = {name: os.environ[name] for name in job.env_names}
    try:
        job_id = client.submit_job(
            entrypoint=job.entrypoint,
            runtime_env={**job.runtime_env, "env_vars": env_vars},
            metadata=job.metadata,
            submission_id=args.submission_id,
            entrypoint_num_cpus=job.entrypoint_num_cpus,
            entrypoint_num_gpus=job.entrypoint_num_gpus,
            entrypoint_resources=job.entrypoint_resources,
        )
    except (RuntimeError, ValueError) as exc:  # duplicate id, working_dir too large, ...
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SubmitError(f"the cluster refused the job: {reason}") from None
    print_submitted(address, job_id, job.env_names)
    if not args.wait:
        return 0
    status = follow(client, job_id)
    message = (client.get_job_info(job_id).message or "").strip()
    reason = f" ({message.splitlines()[0]})" if status != "SUCCEEDED" and message else ""
    print(f"job {job_id}: {status}{reason}")
    return 0 if status == "SUCCEEDED" else EXIT_FAILED


def print_submitted(address: str, job_id: str, env_names: Sequence[str]) -> None:
    ray = f"ray job {{}} --address {shlex.quote(address)}"
    print(f"submitted job {job_id} to {address}")
    if env_names:
        print(f"  variables passed by name: {', '.join(env_names)}")
    print(f"  follow its logs: {ray.format('logs')} --follow {job_id}")
    print(f"  status:          {ray.format('status')} {job_id}")
    print(f"  stop it:         {ray.format('stop')} {job_id}")
    print("  (on a secured cluster run these with RAY_AUTH_MODE=token and the token, "
          "as for this script)")
    sys.stdout.flush()


def follow(client: Any, job_id: str, poll_s: float = 2.0) -> str:
    """Stream the job's output to stdout until it ends; return its final status."""
    import asyncio

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    try:
        asyncio.run(tail())
    except Exception as exc:  # the stream dropped (proxy, network): fall back to polling
        print(f"(log stream ended early: {type(exc).__name__}; polling the status)",
              file=sys.stderr)
    while not (status := client.get_job_status(job_id)).is_terminal():
        time.sleep(poll_s)
    return str(status)


def run(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Call a script's main; SubmitError becomes one line on stderr and exit 2."""
    prog = Path(sys.argv[0]).name
    try:
        return main(argv)
    except SubmitError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted (a submitted job keeps running; stop it with "
              "`ray job stop`)", file=sys.stderr)
        return EXIT_FAILED
