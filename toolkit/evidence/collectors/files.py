"""Files: what --include names, and the BookGen app directory's configuration (read through context.fs)."""
from __future__ import annotations

import fnmatch
import os
import posixpath

from toolkit.evidence.collectors.base import CollectionContext, Collector, Emitter
from toolkit.host.hostfs import Refused

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
        app = posixpath.normpath("/" + context.deployment.app_dir.lstrip("/"))
        try:
            names = context.fs.listdir(app)
        except FileNotFoundError:
            emit.skip(app, "no app directory", "skip")
            return
        except (OSError, Refused) as error:
            emit.refusal(app, error)
            return
        emit.file(app, context.max_file_size)
        for name in names:
            if name in APP_BULK_DIRS:
                continue
            if any(fnmatch.fnmatchcase(name, pattern) for pattern in APP_CONFIG_PATTERNS):
                emit.file(posixpath.join(app, name), context.max_file_size)
        env_file = context.deployment.env_path
        if not env_file.startswith(app.rstrip("/") + "/"):
            emit.file(env_file, context.max_file_size)


class IncludeCollector(Collector):
    name = "include"
    rank = 70
    budget_seconds = 3600.0
    description = "the paths given with --include, recursively, symlinks kept as symlinks"

    def run(self, context: CollectionContext, emit: Emitter) -> None:
        for logical in context.includes:
            logical = posixpath.normpath("/" + logical.lstrip("/")) if context.root not in ("", "/") else \
                os.path.abspath(logical)
            try:
                context.fs.lstat(logical)
            except FileNotFoundError:
                emit.skip(logical, "--include path does not exist", "error")
                continue
            except (OSError, Refused):
                pass  # emit.tree records why, and a symlink met on the way as such
            emit.tree(logical, context.max_file_size)
