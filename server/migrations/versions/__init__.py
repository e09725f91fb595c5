"""The job store's schema revisions, oldest first (Alembic reads them by file, in order of
their ``down_revision``)."""
