"""Where BookGen lives on this host: DESIGN.md's defaults, overridden by BOOKGEN_KIT_* variables and options."""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional

DEFAULT_APP_DIR = "/opt/bookgen"
DEFAULT_LOG_DIR = "/var/log/bookgen"
DEFAULT_HEALTH_URL = "http://127.0.0.1:8000/health"
DEFAULT_CONTAINERS = {"db": "bookgen-db", "api": "bookgen-api", "worker": "bookgen-worker", "redis": "bookgen-redis"}
COMPOSE_PROJECT = "bookgen"


@dataclass(frozen=True)
class Deployment:
    app_dir: str = DEFAULT_APP_DIR
    env_file: Optional[str] = None  # default: <app_dir>/.env
    log_dirs: List[str] = field(default_factory=lambda: [DEFAULT_LOG_DIR])
    health_url: str = DEFAULT_HEALTH_URL
    containers: Dict[str, str] = field(default_factory=lambda: dict(DEFAULT_CONTAINERS))
    database: str = "bookgen"
    compose_project: str = COMPOSE_PROJECT

    @property
    def env_path(self) -> str:
        return self.env_file or os.path.join(self.app_dir, ".env")

    @property
    def bios_dir(self) -> str:
        return os.path.join(self.app_dir, "bios")

    @property
    def docx_dir(self) -> str:
        return os.path.join(self.app_dir, "docx")

    @property
    def backups_dir(self) -> str:
        return os.path.join(self.app_dir, "backups")


def deployment(app_dir: Optional[str] = None, env_file: Optional[str] = None, log_dirs: Optional[List[str]] = None,
               health_url: Optional[str] = None) -> Deployment:
    """Options first, then BOOKGEN_KIT_APP_DIR / _ENV_FILE / _LOG_DIRS (colon-separated) / _HEALTH_URL."""
    base = Deployment()
    environ = os.environ
    app = app_dir or environ.get("BOOKGEN_KIT_APP_DIR") or base.app_dir
    logs = log_dirs or [d for d in environ.get("BOOKGEN_KIT_LOG_DIRS", "").split(":") if d] or base.log_dirs
    return replace(base, app_dir=os.path.abspath(app),
                   env_file=env_file or environ.get("BOOKGEN_KIT_ENV_FILE") or None,
                   log_dirs=[os.path.abspath(d) for d in logs],
                   health_url=health_url or environ.get("BOOKGEN_KIT_HEALTH_URL") or base.health_url)
