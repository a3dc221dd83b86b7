"""Agent settings: environment variables, an optional config file, defaults.

Every setting has an env name; `AGENT_CONFIG` may point to a JSON file with the same keys in
lower case (env wins). The table in README.md is generated from SETTINGS below (`python -m node.config`
prints it), so keep the help strings short and true.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from pathlib import Path
from urllib.parse import urlsplit

from protocol.errors import ConfigError

TOKEN_RE = re.compile(r"^[A-Za-z0-9]{32}$")


@dataclasses.dataclass(frozen=True)
class Setting:
    name: str  # attribute name and lower-case key in the config file
    env: str
    default: object
    kind: type
    help: str


SETTINGS: tuple[Setting, ...] = (
    Setting("server_address", "SERVER_ADDRESS", None, str, "Base URL of the task server, e.g. http://10.0.0.5:8700"),
    Setting("access_token", "ACCESS_TOKEN", None, str, "The node's 32-character secret token"),
    Setting(
        "host_dir",
        "AGENT_HOST_DIR",
        None,
        str,
        "Storage root as the Docker host sees it (default ~/.supervisely-agent/n-<hash of token>, "
        "with ~/.supervisely-agent/<token> a link to it); must not contain the token",
    ),
    Setting(
        "agent_dir",
        "AGENT_DIR",
        None,
        str,
        "Storage root as the agent sees it, when it runs in a container with the host dir mounted elsewhere "
        "(default: AGENT_HOST_DIR)",
    ),
    Setting("max_tasks", "MAX_TASKS", 2, int, "Tasks run at once"),
    Setting("gpus", "AGENT_GPUS", "all", str, "GPUs the agent may hand out: 'all', 'none' or a comma list of indices"),
    Setting(
        "default_task_gpus",
        "DEFAULT_TASK_GPUS",
        "all",
        str,
        "GPUs of a train, inference, custom or app task that names no count: 'all' (every free one, "
        "as the Supervisely agent), 'none', or N (at most N free ones); such a task never waits for GPUs",
    ),
    Setting("poll_wait_s", "POLL_WAIT", 25.0, float, "Long-poll wait in seconds"),
    Setting("telemetry_interval_s", "TELEMETRY_INTERVAL", 5.0, float, "Seconds between telemetry samples"),
    Setting("log_batch_lines", "LOG_BATCH_LINES", 5000, int, "Most log lines in one shipped batch"),
    Setting("log_batch_interval_s", "LOG_BATCH_INTERVAL", 0.2, float, "Longest a log line waits before it is shipped"),
    Setting("pull_policy", "PULL_POLICY", "if-not-present", str, "Image pull policy: if-not-present, always, never"),
    Setting("stop_grace_s", "STOP_GRACE", 10.0, float, "Seconds between SIGTERM and SIGKILL when a task is stopped"),
    Setting("download_workers", "DOWNLOAD_WORKERS", 8, int, "Parallel blob downloads per task"),
    Setting(
        "min_free_disk_mb",
        "MIN_FREE_DISK_MB",
        2048,
        int,
        "Free space under the storage dir below which the cache is evicted and new tasks refused",
    ),
    Setting("cache_quota_mb", "CACHE_QUOTA_MB", 0, int, "Most space the image/model cache may use (0: no quota)"),
    Setting(
        "task_dir_cleanup",
        "TASK_DIR_CLEANUP",
        "on-success",
        str,
        "Delete a finished task's data (logs kept): never, on-success, always",
    ),
    Setting(
        "restart_max", "CHILD_RESTART_MAX", 5, int, "Quick deaths of a helper process before it is given up (FATAL)"
    ),
    Setting(
        "restart_window_s", "CHILD_RESTART_WINDOW", 60.0, float, "Window in seconds in which quick deaths are counted"
    ),
    Setting("log_level", "LOG_LEVEL", "INFO", str, "Agent log level"),
    Setting(
        "helper_hung_s",
        "HELPER_HUNG_AFTER",
        120.0,
        float,
        "Seconds without a heartbeat after which telemetry or the log-shipper is killed and restarted",
    ),
    # --- task containers (docs/security-agent.md says what each one defends) ---
    Setting(
        "task_log_level",
        "TASK_LOG_LEVEL",
        "DEBUG",
        str,
        "LOG_LEVEL given to task containers "
        "(DEBUG, like the Supervisely agent: the SDK then prints a crash's traceback)",
    ),
    Setting(
        "task_shm_size",
        "TASK_SHM_SIZE",
        "5g",
        str,
        "/dev/shm size of a task that asks none (the Supervisely agent's SHM_SIZE default)",
    ),
    Setting("task_memory", "TASK_MEMORY", "0", str, "Memory limit of a task that asks none, e.g. 16g (0: none)"),
    Setting(
        "task_pids_limit",
        "TASK_PIDS_LIMIT",
        4096,
        int,
        "Most processes and threads in one task container (0: no limit)",
    ),
    Setting(
        "task_cap_drop",
        "TASK_CAP_DROP",
        "NET_RAW,MKNOD,SYS_CHROOT,AUDIT_WRITE,SETFCAP,SETPCAP",
        str,
        "Capabilities removed from task containers (comma list; 'ALL' drops every one)",
    ),
    Setting(
        "task_network", "TASK_NETWORK", "bridge", str, "Network of task containers: bridge, or none (no network at all)"
    ),
    Setting(
        "task_user",
        "TASK_USER",
        "",
        str,
        "User task containers run as, e.g. 1000:1000 (empty: the image's own, as Supervisely images expect)",
    ),
    Setting(
        "task_read_only_root",
        "TASK_READ_ONLY_ROOT",
        False,
        bool,
        "Read-only root filesystem for task containers (a tmpfs /tmp is added)",
    ),
    Setting(
        "ca_bundle",
        "CA_BUNDLE",
        "",
        str,
        "CA bundle (PEM) given read-only to task containers at /etc/sly-ca.pem, with REQUESTS_CA_BUNDLE "
        "and SSL_CERT_FILE pointing at it (empty: none)",
    ),
    # --- private registries (the Supervisely agent's names; comma lists for several registries) ---
    Setting(
        "docker_registry",
        "DOCKER_REGISTRY",
        "",
        str,
        "Registry that DOCKER_LOGIN/DOCKER_PASSWORD are for, e.g. registry.example.com:5000 (empty: Docker Hub)",
    ),
    Setting("docker_login", "DOCKER_LOGIN", "", str, "User name for pulls from DOCKER_REGISTRY"),
    Setting(
        "docker_password", "DOCKER_PASSWORD", "", str, "Password or token for pulls from DOCKER_REGISTRY (never logged)"
    ),
    Setting(
        "docker_config",
        "DOCKER_CONFIG",
        "",
        str,
        "Folder of the Docker client's config.json whose `auths` also give pull credentials (default ~/.docker)",
    ),
    Setting(
        "task_results_max_files",
        "TASK_RESULTS_MAX_FILES",
        100000,
        int,
        "Most result files one task may upload; past it the upload fails the task (0: no limit)",
    ),
    Setting(
        "task_results_max_mb",
        "TASK_RESULTS_MAX_MB",
        102400,
        int,
        "Most MB the agent may read from one task's results/ to hash or copy them, over the task's life "
        "(an unchanged file is not read again); past it the upload fails the task (0: no limit)",
    ),
)


@dataclasses.dataclass
class Config:
    server_address: str
    access_token: str = dataclasses.field(repr=False)
    host_dir: str
    agent_dir: str
    max_tasks: int = 2
    gpus: str = "all"
    default_task_gpus: str = "all"
    poll_wait_s: float = 25.0
    telemetry_interval_s: float = 5.0
    log_batch_lines: int = 5000
    log_batch_interval_s: float = 0.2
    pull_policy: str = "if-not-present"
    stop_grace_s: float = 10.0
    download_workers: int = 8
    min_free_disk_mb: int = 2048
    cache_quota_mb: int = 0
    task_dir_cleanup: str = "on-success"
    restart_max: int = 5
    restart_window_s: float = 60.0
    log_level: str = "INFO"
    helper_hung_s: float = 120.0
    task_log_level: str = "DEBUG"
    task_shm_size: str = "5g"
    task_memory: str = "0"
    task_pids_limit: int = 4096
    task_cap_drop: str = "NET_RAW,MKNOD,SYS_CHROOT,AUDIT_WRITE,SETFCAP,SETPCAP"
    task_network: str = "bridge"
    task_user: str = ""
    task_read_only_root: bool = False
    task_results_max_files: int = 100000
    task_results_max_mb: int = 102400
    ca_bundle: str = ""
    docker_registry: str = ""
    docker_login: str = ""
    docker_password: str = dataclasses.field(default="", repr=False)
    docker_config: str = ""
    # HTTP_PROXY, HTTPS_PROXY, NO_PROXY of the agent's environment (either case), given to tasks.
    proxy_env: dict = dataclasses.field(default_factory=dict)
    config_file: str | None = None
    # The documented default root named by the token: a link to root (node/storage.py makes it).
    token_link: str | None = None

    @property
    def identity(self) -> str:
        """The agent's public identity: a hash of its token (used in container labels, logs)."""
        return hashlib.sha256(self.access_token.encode()).hexdigest()[:16]

    @property
    def secrets(self) -> tuple[str, ...]:
        """Literal values no log line may show (node.masking.Masker(*config.secrets))."""
        parts = self.docker_password.split(",") if "," in self.docker_password else []
        return tuple(s for s in (self.access_token, self.docker_password, *parts) if s)

    @property
    def cap_drop(self) -> list[str]:
        return [c.strip().upper() for c in self.task_cap_drop.split(",") if c.strip()]

    # --- paths (as the agent sees them) ---
    @property
    def root(self) -> Path:
        return Path(self.agent_dir)

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    @property
    def images_dir(self) -> Path:
        return self.root / "storage" / "images"

    @property
    def models_dir(self) -> Path:
        return self.root / "storage" / "models"

    @property
    def tasks_dir(self) -> Path:
        return self.root / "tasks"

    @property
    def tmp_dir(self) -> Path:
        return self.root / "tmp"

    @property
    def state_dir(self) -> Path:
        """Agent-private state (log cursors, ...)."""
        return self.root / "state"

    def task_dir(self, task_id: int) -> Path:
        return self.tasks_dir / str(task_id)

    def host_path(self, path: str | os.PathLike) -> str:
        """Translate a path under agent_dir into the path the Docker host sees (for bind mounts)."""
        rel = os.path.relpath(os.path.abspath(path), os.path.abspath(self.agent_dir))
        if rel.startswith(".."):
            raise ValueError(f"{path} is not under the agent dir {self.agent_dir}")
        return os.path.normpath(os.path.join(self.host_dir, rel))


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


def _coerce(setting: Setting, raw) -> object:
    if raw is None:
        return None
    if setting.kind is bool and not isinstance(raw, bool):
        word = str(raw).strip().lower()
        if word in _TRUE or word in _FALSE:
            return word in _TRUE
        raise ConfigError(f"{setting.env}={raw!r}: use true or false")
    try:
        return setting.kind(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{setting.env}={raw!r} is not a valid {setting.kind.__name__}") from None


def check_server_address(address: str) -> str:
    """The address without a trailing slash; ConfigError unless it is an http(s) URL with a host.

    Without this, `10.0.0.5:8700` would reach requests as an unknown scheme and be reported,
    retried and backed off as "server unreachable".
    """
    address = address.strip().rstrip("/")
    parts = urlsplit(address)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(
            f"SERVER_ADDRESS={address!r} is not a URL: it must start with http:// or https:// "
            f"(e.g. http://10.0.0.5:8700)"
        )
    return address


def load_config(environ: dict | None = None) -> Config:
    """Read settings from the config file (AGENT_CONFIG) and the environment; validate them."""
    env = os.environ if environ is None else environ
    file_values: dict = {}
    config_file = env.get("AGENT_CONFIG")
    if config_file:
        try:
            file_values = json.loads(Path(config_file).read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot read config file {config_file}: {e}") from None
        if not isinstance(file_values, dict):
            raise ConfigError(f"config file {config_file} must hold a JSON object")
    values: dict = {}
    for s in SETTINGS:
        raw = env.get(s.env)
        if raw is None or raw == "":
            raw = file_values.get(s.name, s.default)
        values[s.name] = _coerce(s, raw)
    if not values["server_address"]:
        raise ConfigError("SERVER_ADDRESS is not set")
    values["server_address"] = check_server_address(values["server_address"])
    token = values["access_token"] or ""
    if not TOKEN_RE.match(token):
        raise ConfigError("ACCESS_TOKEN is not set or is not 32 letters and digits")
    values.update(_roots(values["host_dir"], values["agent_dir"], token))
    if values["pull_policy"] not in ("if-not-present", "always", "never"):
        raise ConfigError(f"PULL_POLICY={values['pull_policy']!r}: use if-not-present, always or never")
    if values["task_dir_cleanup"] not in ("never", "on-success", "always"):
        raise ConfigError(f"TASK_DIR_CLEANUP={values['task_dir_cleanup']!r}: use never, on-success or always")
    if values["max_tasks"] < 1:
        raise ConfigError("MAX_TASKS must be at least 1")
    if values["task_network"] not in ("bridge", "none"):
        raise ConfigError(f"TASK_NETWORK={values['task_network']!r}: use bridge or none")
    if values["task_pids_limit"] < 0:
        raise ConfigError("TASK_PIDS_LIMIT must be 0 (no limit) or more")
    for name in ("task_results_max_files", "task_results_max_mb"):
        if values[name] < 0:
            raise ConfigError(f"{name.upper()} must be 0 (no limit) or more")
    _check_gpus_and_network(values)
    return Config(config_file=config_file, proxy_env=proxy_env(env), **values)


def _check_gpus_and_network(values: dict) -> None:
    """DEFAULT_TASK_GPUS, CA_BUNDLE (made absolute) and the registry lists; ConfigError if wrong."""
    check_default_task_gpus(values["default_task_gpus"])
    if values["ca_bundle"]:
        values["ca_bundle"] = os.path.abspath(os.path.expanduser(values["ca_bundle"]))
        if not os.path.isfile(values["ca_bundle"]) or not os.access(values["ca_bundle"], os.R_OK):
            raise ConfigError(f"CA_BUNDLE={values['ca_bundle']!r} is not a readable file")
    registry_lists(values["docker_registry"], values["docker_login"], values["docker_password"])


PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")


def proxy_env(env) -> dict:
    """The proxy variables as a task gets them: each in both cases, upper case winning (as curl)."""
    out = {}
    for name in PROXY_VARS:
        value = env.get(name) or env.get(name.lower())
        if value:
            out[name] = out[name.lower()] = value
    return out


def check_default_task_gpus(value: str) -> int | None:
    """DEFAULT_TASK_GPUS as the most GPUs a task that names no count gets (None: all free ones)."""
    word = str(value).strip().lower()
    if word == "all":
        return None
    if word == "none":
        return 0
    if word.isdigit():
        return int(word)
    raise ConfigError(f"DEFAULT_TASK_GPUS={value!r}: use all, none or a number of GPUs")


def registry_lists(registry: str, login: str, password: str) -> list[tuple[str, str, str]]:
    """(registry, login, password) for each registry of DOCKER_REGISTRY (a comma list, as the
    Supervisely agent reads it; with one registry the login and password are taken whole)."""
    if not login and not password:
        return []
    registries = [r.strip() for r in registry.split(",")] if "," in registry else [registry.strip()]
    if len(registries) == 1:
        return [(registries[0], login, password)]
    logins, passwords = login.split(","), password.split(",")
    if not len(registries) == len(logins) == len(passwords):
        raise ConfigError(
            f"DOCKER_REGISTRY names {len(registries)} registries but DOCKER_LOGIN and DOCKER_PASSWORD "
            f"have {len(logins)} and {len(passwords)} comma-separated entries"
        )
    return [(r, u.strip(), p) for r, u, p in zip(registries, logins, passwords, strict=True)]


def hashed_root_name(token: str) -> str:
    """The default root's real name: a hash of the token, never the token itself."""
    return "n-" + hashlib.sha256(token.encode()).hexdigest()[:16]


def _roots(host_dir: str | None, agent_dir: str | None, token: str) -> dict:
    """host_dir, agent_dir and token_link. Bind sources are resolved by Docker and shown in every
    task container's /proc/self/mountinfo, so no root may name the token. The documented default
    `~/.supervisely-agent/<token>` stays usable as a link to `~/.supervisely-agent/n-<hash>`; an
    explicit root that contains the token is refused rather than silently moved."""
    default_link = str(Path.home() / ".supervisely-agent" / token)
    expand = lambda p: os.path.abspath(os.path.expanduser(p)) if p else None  # noqa: E731
    host, agent = expand(host_dir), expand(agent_dir)
    link = None
    if host in (None, default_link) and agent in (None, host):
        link = default_link
        host = agent = str(Path(default_link).with_name(hashed_root_name(token)))
    if host is None:  # AGENT_DIR alone: where the Docker host keeps that storage is unknown
        raise ConfigError("AGENT_DIR is set without AGENT_HOST_DIR: set the storage root as the Docker host sees it")
    agent = agent or host
    for env, path in (("AGENT_HOST_DIR", host), ("AGENT_DIR", agent)):
        if token in path:
            raise ConfigError(
                f"{env} contains the node's token; task containers see the storage path in "
                f"their mount table, so use a path without it (e.g. {env}="
                f"{Path(path).parent / hashed_root_name(token)})".replace(token, "<token>")
            )
    return {"host_dir": host, "agent_dir": agent, "token_link": link}


def markdown_table() -> str:
    """The configuration table of README.md (`python -m node.config` prints it)."""
    rows = ["| env | default | what |", "|---|---|---|"]
    for s in SETTINGS:
        default = "—" if s.default is None else f"`{s.default}`"
        rows.append(f"| `{s.env}` | {default} | {s.help} |")
    rows.append(
        "| `HTTP_PROXY`, `HTTPS_PROXY`, `NO_PROXY` | — | Proxies, in either case: the agent's own requests use "
        "them, and task containers get them in both cases |"
    )
    rows.append(
        "| `AGENT_CONFIG` | — | Path of a JSON file with the same settings in lower case "
        "(`max_tasks`, ...); the environment wins |"
    )
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
