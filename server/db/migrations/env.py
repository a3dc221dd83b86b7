"""Alembic environment: runs the migrations on the server's database.

The server passes its own connection in `config.attributes["connection"]` (server/db/migrate.py);
the `alembic` command line names the database with `-x db=URL` (default: the SQLite file of the
default data dir). SQLite migrations run in batch mode, since SQLite alters few things in place.
"""

from __future__ import annotations

import logging.config

from alembic import context

from server import db

DEFAULT_URL = "sqlite:///server-data/server.db"

config = context.config
target_metadata = db.metadata


def _url() -> str:
    return (
        context.get_x_argument(as_dictionary=True).get("db") or config.get_main_option("sqlalchemy.url") or DEFAULT_URL
    )


def _configure(**kw) -> None:
    url = kw.get("url")
    dialect = kw["connection"].dialect.name if "connection" in kw else url.split(":", 1)[0].split("+", 1)[0]
    context.configure(target_metadata=target_metadata, render_as_batch=dialect == "sqlite", compare_type=True, **kw)


def run_offline() -> None:
    """`alembic upgrade head --sql`: print the SQL instead of running it."""
    _configure(url=_url(), literal_binds=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection=connection)
        with context.begin_transaction():
            context.run_migrations()
        return
    if config.config_file_name is not None:
        logging.config.fileConfig(config.config_file_name, disable_existing_loggers=False)
    engine = db.make_engine(_url())
    try:
        with engine.connect() as conn:
            _configure(connection=conn)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
