"""Files: what --include names, and the BookGen app directory's configuration."""
from __future__ import annotations

import fnmatch
import os

from toolkit.evidence.collectors.base import CollectionContext, Collector, Emitter

APP_CONFIG_PATTERNS = (".env", ".env.*", "docker-compose*.yml", "docker-compose*.yaml", "compose*.yml",
                       "compose*.yaml", "*.conf", "*.ini", "*.toml", "*.cfg", "Dockerfile*", "alembic.ini",
                       "*.service", "nginx*.conf")
APP_BULK_DIRS = ("bios", "docx", "backups")


class AppConfigCollector(Collector):
    name = "app"
    rank = 60
    profiles = ("triage", "full")
    budget_seconds = 60.0
    description = "BookGen's configuration in the app directory (.env, compose files, other config)"

    def run(self, context: CollectionContext, emit: Emitter) -> None:
        app = context.deployment.app_dir
        host_app = context.host_path(app)
        try:
            names = sorted(os.listdir(host_app))
        except FileNotFoundError:
            emit.skip(app, "no app directory", "skip")
            return
        except OSError as error:
            emit.skip(app, "cannot list: %s" % error.strerror)
            return
        emit.path(host_app, app, context.max_file_size)
        for name in names:
            if name in APP_BULK_DIRS:
                continue
            if any(fnmatch.fnmatchcase(name, pattern) for pattern in APP_CONFIG_PATTERNS):
                emit.path(os.path.join(host_app, name), os.path.join(app, name), context.max_file_size)
        env_file = context.deployment.env_path
        if not env_file.startswith(app.rstrip("/") + "/"):
            emit.path(context.host_path(env_file), env_file, context.max_file_size)


class IncludeCollector(Collector):
    name = "include"
    rank = 70
    budget_seconds = 3600.0
    description = "the paths given with --include, recursively, symlinks kept as symlinks"

    def run(self, context: CollectionContext, emit: Emitter) -> None:
        for logical in context.includes:
            logical = os.path.normpath("/" + logical.lstrip("/")) if context.root not in ("", "/") else \
                os.path.abspath(logical)
            emit.tree(context.host_path(logical), logical, context.max_file_size)
