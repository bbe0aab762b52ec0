"""Cost tables (seconds an image per backbone) for ``--dry-run --costs``."""
