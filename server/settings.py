"""Server settings (command line options of `python -m server`)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

KIB, MIB = 1024, 1024 * 1024


@dataclasses.dataclass
class Settings:
    data_dir: Path = Path("server-data")
    db_url: str | None = None            # default: sqlite:///<data_dir>/server.db
    lease_s: float = 300.0               # a leased task's agent silent this long -> task lost
    telemetry_interval_s: float = 5.0    # what agents are told; offline after 3 x this without contact
    offline_after_s: float | None = None  # default 3 x telemetry_interval_s
    agent_image: str = "sly-agent:latest"
    public_url: str | None = None        # server address put in run_command (default: the request's base URL)
    max_poll_wait_s: float = 60.0
    json_body_limit: int = 1 * MIB
    logs_body_limit: int = 32 * MIB
    project_body_limit: int = 64 * MIB   # POST of a project or a task result: annotations travel inline
    db_pool_size: int | None = None      # database connections (and threads doing database work) per process;
                                         # default: 1 on SQLite, 10 on PostgreSQL (pool_size)
    workers: int = 1                     # uvicorn worker processes (more than one needs PostgreSQL)
    log_page_bytes: int = 1 * MIB        # a log page or SSE batch stops past this many bytes (always >= 1 line)
    migrate: bool = True                 # upgrade the schema at start (a --workers parent does it once for all)
    log_quota_bytes: int = 256 * MIB     # log bytes stored per task; later lines are dropped (0: no quota)
    blob_quota_bytes: int = 0            # bytes the blob store may hold; a PUT past it gets 507 (0: no quota)
    blob_grace_s: float = 24 * 3600.0    # an unreferenced blob (or partial upload) this old is collected
    telemetry_full_s: float = 3600.0     # history: every point this long, then one a minute
    telemetry_keep_s: float = 86400.0    # history: nothing older than this
    telemetry_min_gap_s: float | None = None  # history: at most one point per this (default interval / 2)
    log_retention_days: float = 0.0      # log lines of tasks final this long ago are deleted; 0: kept forever
    contact_flush_s: float = 1.0         # contact, leases, telemetry and poll rows are written this often (batched)
    housekeeping_s: float = 60.0         # how often the retention job runs (server/retention.py)
    echo_endpoint: bool = False          # mount POST /api/v1/_echo (the benchmark's ingest baseline)
    admin_token: str | None = None       # filled in by load_admin_token()
    metrics_token: str | None = None     # /metrics needs 'Authorization: Bearer <it>' when set
    docs: bool = False                   # serve /docs (Swagger UI, whose assets come from a CDN)

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
