"""Alembic migrations for the control-plane store; run them with ``control.db.migrate``."""
