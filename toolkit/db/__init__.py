"""PostgreSQL: targets (host or container), jobs, backups."""
