"""What a request and the background jobs share in one server process, each part named for what
it is: the settings, the database and its threads, the blob store, console sessions and the
sign-in throttle, wake-ups, the batched contact writes, the agent rows kept in memory, the live
log feed and the metrics. Routes get it through `StateDep` (server/http/deps.py).

What several replicas must agree on lives in the database: stops delivered
(`tasks.stop_delivered`), open polls (`polls`), refusals (`agents.refusing`) and settings
versions (`agents.settings_version`). Wake-ups of long-polls and log followers go through
`server.wakeups` (in process, and across replicas on PostgreSQL with LISTEN/NOTIFY).
"""

from __future__ import annotations

from server.agents.contact import Contacts
from server.agents.rows import AgentRows
from server.auth.service import Sessions, SignInThrottle
from server.blobs import refs as blob_refs
from server.blobs.store import BlobStore
from server.db import migrate
from server.db.runner import Database
from server.logs.feed import LogHub
from server.metrics import Metrics
from server.settings import Settings
from server.wakeups import Wakeups


class ServerState:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.db = Database(settings)
        if settings.migrate:
            migrate.upgrade(self.db.engine)
        self.blobs = BlobStore(settings.data_dir / "blobs", quota=settings.blob_quota_bytes)
        with self.db.engine.begin() as conn:
            blob_refs.fill_if_empty(conn)
        self.admin_token: str = settings.admin_token or ""
        self.sessions = Sessions(self.db.engine, self.admin_token)
        self.signin_throttle = SignInThrottle()
        self.wakeups = self.db.wakeups = Wakeups(self.db.engine)
        self.agent_rows = AgentRows(self.db)
        self.wakeups.agent_changed = self.agent_rows.forget
        self.contacts = Contacts(self.db.engine, settings)
        self.log_hub = LogHub(self)
        self.closing = False  # set at shutdown: long-polls and log followers answer now
        self.metrics = Metrics(self.contacts.m_rows_dropped)

    def close_waits(self) -> None:
        """Shutdown: every waiting long-poll answers and every log follower ends now, so the
        server's graceful stop has no request left to cancel (and logs no error)."""
        self.closing = True
        self.wakeups.agents.wake_all()
        self.wakeups.tasks.wake_all()
        self.log_hub.close()

    def refresh_metrics(self) -> None:
        """Write the contact batch, then read the gauges /metrics shows (a database thread)."""
        self.contacts.flush()
        self.metrics.refresh(self.db.engine, self.settings.offline_after)
