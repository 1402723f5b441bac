"""Options shared by several commands: where the deployment is, and which database to reach."""
from __future__ import annotations

import functools
from typing import Callable

import click


def deployment_options(function: Callable) -> Callable:
    @click.option("--app-dir", metavar="DIR", help="BookGen's directory (default /opt/bookgen, BOOKGEN_KIT_APP_DIR).")
    @click.option("--env-file", metavar="FILE", help="The .env (default APP_DIR/.env).")
    @click.option("--log-dir", "log_dirs", multiple=True, metavar="DIR",
                  help="BookGen's log directory (default /var/log/bookgen; repeatable).")
    @functools.wraps(function)
    def wrapper(*args, app_dir=None, env_file=None, log_dirs=(), **kwargs):
        from toolkit.config import deployment

        kwargs["deployment"] = deployment(app_dir, env_file, list(log_dirs) or None,
                                          kwargs.pop("health_url", None))
        return function(*args, **kwargs)

    return wrapper


def database_options(function: Callable) -> Callable:
    @click.option("--dsn", metavar="DSN", help="libpq connection string or URL (host must be an IP or localhost).")
    @click.option("--container", metavar="NAME", help="Run psql inside this container (e.g. bookgen-db).")
    @functools.wraps(function)
    def wrapper(*args, dsn=None, container=None, **kwargs):
        kwargs["database_choice"] = {"dsn": dsn, "container": container}
        return function(*args, **kwargs)

    return wrapper


def target_factory(deployment, database_choice):
    from toolkit.db.target import resolve

    return lambda: resolve(deployment, database_choice["dsn"], database_choice["container"])
