"""A throwaway PostgreSQL cluster for `backup verify --restore-test --scratch-cluster`: initdb in a private
temporary directory (as the postgres user: initdb refuses root), a server on a socket in that directory only,
always stopped and removed."""
from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from typing import Optional

from toolkit.db.server import HostServer, host_tools
from toolkit.db.target import ConnectionParams
from toolkit.errors import EnvironmentProblem


class ScratchCluster:
    def __init__(self) -> None:
        initdb = [t for t in host_tools("initdb")]
        postgres = [t for t in host_tools("postgres")]
        if not initdb or not postgres:
            raise EnvironmentProblem("no PostgreSQL server binaries on this host for a scratch cluster",
                                     hint="give --dsn of a server for the restore test instead")
        self.bindir = os.path.dirname(postgres[0].path)
        try:
            self.owner = pwd.getpwnam("postgres") if os.geteuid() == 0 else pwd.getpwuid(os.geteuid())
        except KeyError:
            raise EnvironmentProblem("a scratch cluster needs a postgres user to run initdb as") from None
        self.root = tempfile.mkdtemp(prefix="bookgen-kit-scratch-")
        os.chown(self.root, self.owner.pw_uid, self.owner.pw_gid)
        self.process: Optional[subprocess.Popen] = None
        self.port = 0

    def _as_owner(self) -> dict:
        return {"user": self.owner.pw_uid, "group": self.owner.pw_gid} if os.geteuid() == 0 else {}

    def start(self) -> HostServer:
        data = os.path.join(self.root, "data")
        subprocess.run([os.path.join(self.bindir, "initdb"), "-D", data, "-U", "postgres", "-A", "trust",
                        "--no-sync", "-E", "UTF8"], check=True, capture_output=True, cwd=self.root,
                       env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"}, **self._as_owner())
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.process = subprocess.Popen(
            [os.path.join(self.bindir, "postgres"), "-D", data, "-p", str(self.port), "-k", self.root,
             "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"], stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, cwd=self.root, env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"}, **self._as_owner())
        server = HostServer(ConnectionParams("127.0.0.1", self.port, "postgres", "postgres", None))
        deadline = time.monotonic() + 30
        while True:
            try:
                server.query("SELECT 1")
                return server
            except Exception:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    self.stop()
                    raise EnvironmentProblem("the scratch cluster did not start") from None
                time.sleep(0.2)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> HostServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
