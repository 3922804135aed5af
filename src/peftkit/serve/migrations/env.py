"""Alembic's environment for the service's database: run with the connection :func:`peftkit.serve.db.migrate`
passes in (no alembic.ini, no URL of its own)."""

from alembic import context

from peftkit.serve.db import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
