"""One module per schema version (Alembic reads them by path; this file makes them a package)."""
