"""How `sencache serve` runs, and the checks that need neither torch nor Ray: the bundle's manifest,
the numbers, and that the address can be listened on. The command runs them before it imports the
server, so a bad bundle path, a port in use or a bad host is refused in a second."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sencache.runtime.errors import BadInput
from sencache.runtime.manifest import read_manifest
from sencache.runtime.parallel.config import ParallelConfig
from sencache.serving.guard import MB, default_max_body

if TYPE_CHECKING:
    from sencache.runtime.scheduler import Batching  # imports torch: a type only here


@dataclass(frozen=True)
class ServeOptions:
    """How `sencache serve` runs: the bundle, the address, the replicas, their ranks and queue, the body limit."""

    engine: Path
    host: str = "127.0.0.1"
    port: int = 8000
    replicas: int = 1
    max_queue: int = 64
    batching: Batching = "step"
    threads: int = 1
    backend: str = "auto"
    device: str = "cpu"
    max_body_mb: float | None = None
    """None: the bundle's `default_max_body`."""
    gpus_per_replica: int = 1
    """Ranks of each replica's engine, one per GPU (on the CPU: one process each)."""
    parallel: str | None = None
    """How each replica's engine splits over its ranks ("sp=2,cfg=2"); its world is `gpus_per_replica`."""

    def check(self) -> int:
        """BadInput for a bundle without a valid manifest, a number out of range, ranks that do not
        match `parallel`, or an address this machine cannot listen on (a bad host, a port in use);
        the body limit in bytes otherwise."""
        manifest, _ = read_manifest(self.engine)
        for name, low in (("replicas", 1), ("max_queue", 1), ("threads", 0), ("gpus_per_replica", 1)):
            if getattr(self, name) < low:
                raise BadInput(f"{name} must be >= {low}, got {getattr(self, name)}", param=name)
        config = ParallelConfig.parse(self.parallel)
        if config.world != self.gpus_per_replica:
            raise BadInput(
                f"parallel {config} is {config.world} rank(s), one per GPU of a replica; gpus_per_replica is "
                f"{self.gpus_per_replica}",
                param="parallel",
            )
        if config.sp > 1 and manifest.backend != "torch":
            raise BadInput(
                f"parallel {config}: sequence parallelism runs on torch bundles; {self.engine} is {manifest.backend}",
                param="parallel",
            )
        if self.max_body_mb is not None and not 0 < self.max_body_mb < float("inf"):
            raise BadInput(f"max_body_mb must be > 0, got {self.max_body_mb}", param="max_body_mb")
        if not 0 < self.port < 65536:
            raise BadInput(f"port must be in [1, 65535], got {self.port}", param="port")
        _check_listen(self.host, self.port)
        return default_max_body(manifest.shapes.text) if self.max_body_mb is None else int(self.max_body_mb * MB)


def _check_listen(host: str, port: int) -> None:
    """Bind host:port as the HTTP server will (SO_REUSEADDR, like uvicorn) and let it go again."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise BadInput(f"host {host!r} cannot be listened on: {e}", param="host") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as e:
            raise BadInput(f"cannot listen on {host}:{port}: {e.strerror}") from None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` that nothing listens on now (the OS's pick): for a rank group's
    rendezvous, and for servers started in tests."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port
