"""Server settings, each declared once: its default, its command line option and its help.

A field with `help` is an option of `python -m server` (`--<name with dashes>`, or `flag`);
the others are fixed here or filled in at start. `server.__main__` builds its parser from this.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

MIB, GIB = 1024 * 1024, 1024 * 1024 * 1024


def option(default, help: str, *, flag: str | None = None, env: str | None = None):
    """A setting that is also a command line option (`flag` overrides `--<name>`; `env` names an
    environment variable that gives the default)."""
    return dataclasses.field(default=default, metadata={"help": help, "flag": flag, "env": env})


@dataclasses.dataclass
class Settings:
    data_dir: Path = option(
        Path("server-data"), "data dir: SQLite db, blobs, admin_token (default ./server-data)", flag="--data"
    )
    db_url: str | None = option(None, "SQLAlchemy database URL (default: SQLite in the data dir)", flag="--db")
    db_pool_size: int | None = option(
        None,
        "database connections per process, and threads doing database work (default: 1 on SQLite, which "
        "takes one writer at a time, 10 on PostgreSQL)",
    )
    workers: int = option(
        1, "server processes on this port (more than 1 needs PostgreSQL: --db postgresql+psycopg://...)"
    )
    log_page_bytes: int = option(
        1 * MIB, "a log page or live-log batch stops past this many bytes (at least one line; default 1 MiB)"
    )
    lease_s: float = option(300.0, "a leased task whose agent is silent this long becomes lost")
    telemetry_interval_s: float = option(5.0, "agents' telemetry interval; offline after 3 missed")
    offline_after_s: float | None = option(None, "override: offline after this many silent seconds")
    telemetry_full_s: float = option(3600.0, "telemetry history: every point for this long")
    telemetry_keep_s: float = option(
        86400.0, "telemetry history: one point a minute after --telemetry-full-s, until this age"
    )
    telemetry_min_gap_s: float | None = option(
        None, "telemetry history: at most one point per node per this (default: half the interval)"
    )
    log_retention_days: float = option(
        0.0, "delete the log lines of tasks that ended this many days ago (0: keep forever)"
    )
    contact_flush_s: float = option(
        1.0,
        "nodes' contact, lease renewals, telemetry and open-poll rows are written in one batch this often "
        "(default 1 s; at most 5 s, or a third of the offline window and of the lease where those are longer; "
        "a crash loses at most this much of them)",
    )
    housekeeping_s: float = option(60.0, "how often retention and pruning run")
    log_quota_bytes: int = option(
        256 * MIB, "log bytes stored per task; past it one marker line, later lines dropped (0: none; default 256 MiB)"
    )
    blob_quota_bytes: int | None = option(
        None,
        "bytes the blob store may hold; an upload past it gets 507 (0: no quota; default: 80%% of the size of "
        "the data dir's filesystem, measured at start)",
    )
    results_max_files: int = option(
        1_000_000,
        "files one task's results may name: its models' files, projects' "
        "items and artifacts; a results post past it gets 413 results_limit "
        "(0: no limit; default 1,000,000)",
    )
    results_max_bytes: int = option(
        100 * GIB,
        "bytes (the files' sizes added up) one task's results may name; a "
        "results post past it gets 413 results_limit (0: no limit; default "
        "100 GiB)",
    )
    blob_grace_s: float = option(
        24 * 3600.0, "unreferenced blobs and partial uploads older than this are deleted (default 86400)"
    )
    agent_image: str = option("sly-agent:latest", "image name in the docker run_command")
    public_url: str | None = option(None, "server address for agents (run_command); default: the request's URL")
    echo_endpoint: bool = option(
        False, "mount POST /api/v1/_echo, which reads a body and discards it (benchmarks only)"
    )
    metrics_token: str | None = option(
        None,
        "/metrics answers only 'Authorization: Bearer <this>' (env SERVER_METRICS_TOKEN); default: /metrics is open",
        env="SERVER_METRICS_TOKEN",
    )
    project_body_limit: int = option(
        64 * MIB,
        "bytes of one project upload or task results body, after gzip "
        "(annotations travel inline); at most 2 bodies over 1 MiB are "
        "decoded at once per process (default 64 MiB)",
    )
    docs: bool = option(
        False, "serve the Swagger UI at /docs (it loads its assets from a CDN); /openapi.json is always served"
    )
    # Fixed, or filled in at start:
    max_poll_wait_s: float = 60.0
    json_body_limit: int = 1 * MIB
    logs_body_limit: int = 32 * MIB
    migrate: bool = True  # upgrade the schema at start (a --workers parent does it once for all)
    admin_token: str | None = None  # filled in by load_admin_token()

    def problems(self) -> list[str]:
        """What is wrong with these settings, as sentences naming the options (empty: nothing)."""
        out = []
        if (self.db_pool_size is not None and self.db_pool_size < 1) or self.workers < 1 or self.log_page_bytes < 1:
            out.append("--db-pool-size, --workers and --log-page-bytes must be at least 1")
        if self.results_max_files < 0 or self.results_max_bytes < 0 or (self.blob_quota_bytes or 0) < 0:
            out.append("--results-max-files, --results-max-bytes and --blob-quota-bytes must not be negative")
        most = max(5.0, min(self.offline_after, self.lease_s) / 3)  # 5 s with the defaults
        if not 0.01 <= self.contact_flush_s <= most:
            out.append(
                f"--contact-flush-s must be between 0.01 and {most:g}: 5 s, or a third of the offline window "
                f"(--offline-after-s) and of the lease (--lease-s) where those are longer"
            )
        return out

    @property
    def database_url(self) -> str:
        return self.db_url or f"sqlite:///{Path(self.data_dir).resolve() / 'server.db'}"

    @property
    def pool_size(self) -> int:
        """SQLite takes one writer at a time: with several threads, writers wait in SQLite's busy
        handler, which sleeps in steps of up to 100 ms, and the fleet benchmark's pickup p50 was
        twice one thread's (docs/benchmarks.md). PostgreSQL serves many connections at once."""
        if self.db_pool_size is not None:
            return self.db_pool_size
        return 1 if self.database_url.startswith("sqlite") else 10

    @property
    def blob_gc_every_s(self) -> float:
        """How often the blob collector runs: a quarter of the grace, between 1 s and an hour."""
        return max(1.0, min(3600.0, self.blob_grace_s / 4))

    @property
    def telemetry_min_gap(self) -> float:
        return self.telemetry_min_gap_s if self.telemetry_min_gap_s is not None else self.telemetry_interval_s / 2

    @property
    def offline_after(self) -> float:
        return self.offline_after_s if self.offline_after_s is not None else 3 * self.telemetry_interval_s


def options() -> list[dataclasses.Field]:
    """The settings that are command line options, in declaration order."""
    return [f for f in dataclasses.fields(Settings) if f.metadata.get("help")]
