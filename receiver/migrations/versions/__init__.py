"""The migrations, oldest first: ``0001_baseline``, ``0002_drop_watch_missing_reads``."""
