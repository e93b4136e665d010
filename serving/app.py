"""The video API on Ray Serve: a FastAPI ingress in front of N engine replicas.

Each engine replica is its own Serve deployment (`engine-0` .. `engine-{N-1}`, one replica
each, restarted by Serve when it dies), so the ingress can send every call about a job to the
replica that holds it: a job id names its replica (`video_<slot>_<hex>`). A small Ray actor, the
job registry, remembers every id the ingress handed out; an id the registry knows but its
replica does not (the replica died and Serve started a fresh one) is reported failed, never
left pending, and an id neither knows is a 404.

Endpoints (OpenAI Videos API shape): POST /v1/videos, GET /v1/videos/{id},
GET /v1/videos/{id}/content, DELETE /v1/videos/{id}, GET /metrics, GET /healthz; the OpenAPI
document is at /openapi.json and the docs at /docs.
"""

import asyncio
import contextlib
import ipaddress
import itertools
import logging
import os
import signal
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import ray
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import RayServeException
from ray.serve.handle import DeploymentHandle

from sencache import __version__
from sencache.runtime.errors import BadInput
from sencache.runtime.scheduler import Batching
from sencache.serving import guard, metrics
from sencache.serving.options import ServeOptions
from sencache.serving.schema import ErrorBody, VideoJob, VideoRequest, json_field
from sencache.serving.service import NotReady, QueueFull, UnknownJob, VideoService

APP_NAME = "sencache"
REGISTRY = "sencache-job-registry"
CALL_TIMEOUT_S = 60.0
"""Longest wait for a replica's answer (one that is restarting answers once it is up)."""
_REPLICA_GONE = (RayActorError, RayServeException, asyncio.TimeoutError)


@dataclass(frozen=True)
class Reply:
    """A replica's answer: an HTTP status and a JSON body (or the bytes of a file)."""

    status: int
    body: dict[str, Any] | bytes
    headers: dict[str, str] = field(default_factory=dict)
    media_type: str = "application/json"


def _error(status: int, detail: str, headers: dict[str, str] | None = None) -> Reply:
    return Reply(status, {"detail": detail}, headers or {})


def _refused(error: BadInput) -> Reply:
    """422 for a request the engine refuses, naming the request body's field at fault."""
    field = json_field(error.param)
    return Reply(422, {"detail": error.worded(field), **({"field": field} if field else {})})


def _response(reply: Reply) -> Response:
    """(Defined above the ingress: Serve freezes the FastAPI app when the class is decorated.)"""
    if isinstance(reply.body, bytes):
        return Response(reply.body, status_code=reply.status, media_type=reply.media_type, headers=reply.headers)
    return JSONResponse(reply.body, status_code=reply.status, headers=reply.headers)


def _refusal(status: int, detail: str) -> Response:
    """The error answer of the body guard (`guard.BodyGuard`)."""
    return _response(_error(status, detail))


def _body_limit() -> int:
    """The ingress's body limit in bytes (`sencache serve --max-body-mb`), read in its replica."""
    limit: int = serve.get_replica_context().servable_object.max_body
    return limit


class EngineReplica:
    """One engine (one bundle on one device) and its jobs, as a Ray Serve replica."""

    def __init__(
        self, engine_dir: str, slot: int, max_queue: int, batching: Batching, threads: int, backend: str, device: str
    ) -> None:
        from sencache.runtime.api import Engine

        engine = Engine.from_bundle(engine_dir, backend=backend, device=device, threads=threads, batching=batching)
        manifest = engine.model.bundle.manifest
        self.service = VideoService(
            engine, model=manifest.model, defaults=manifest.defaults, slot=slot, max_queue=max_queue
        )

    async def submit(self, body: dict[str, Any]) -> Reply:
        request = VideoRequest.model_validate(body)
        try:
            job = await asyncio.to_thread(self.service.submit, request)
        except BadInput as e:
            return _refused(e)
        except QueueFull as e:
            return _error(429, str(e), {"Retry-After": str(e.retry_after)})
        return Reply(200, job.model_dump())

    async def status(self, job_id: str) -> Reply:
        return await self._about(job_id, self.service.status)

    async def cancel(self, job_id: str) -> Reply:
        return await self._about(job_id, self.service.cancel)

    async def content(self, job_id: str, variant: Literal["video", "frames"]) -> Reply:
        try:
            data = await asyncio.to_thread(self.service.content, job_id, variant)
        except UnknownJob as e:
            return Reply(404, {"detail": str(e), "expired": e.expired})
        except NotReady as e:
            return _error(409, str(e))
        return Reply(200, data, media_type="video/mp4" if variant == "video" else "application/octet-stream")

    async def metrics(self) -> dict[str, Any]:
        return await asyncio.to_thread(self.service.metrics)

    async def _about(self, job_id: str, action: Any) -> Reply:
        try:
            job = await asyncio.to_thread(action, job_id)
        except UnknownJob as e:
            return Reply(404, {"detail": str(e), "expired": e.expired})
        return Reply(200, job.model_dump())

    async def close(self) -> None:
        """Stop admitting and cancel what is queued or running (on the server's shutdown)."""
        await asyncio.to_thread(self.service.close)

    def __del__(self) -> None:
        self.service.close()


@ray.remote(num_cpus=0)
class JobRegistry:
    """Every job id handed out (its submission's description), the oldest forgotten past `capacity`."""

    def __init__(self, capacity: int = 20_000) -> None:
        self.capacity = capacity
        self.jobs: OrderedDict[str, dict[str, Any]] = OrderedDict()

    def add(self, job: dict[str, Any]) -> None:
        self.jobs[job["id"]] = job
        while len(self.jobs) > self.capacity:
            self.jobs.popitem(last=False)

    def get(self, job_id: str) -> dict[str, Any] | None:
        return self.jobs.get(job_id)


api = FastAPI(
    title="sencache video API",
    version=__version__,
    description="Text-to-video generation on the SenCache step-level engine, in the shape of OpenAI's Videos API. "
    "Jobs at different denoising steps share every engine pass, each with its own cache.",
)
api.add_middleware(guard.BodyGuard, max_bytes=_body_limit, refusal=_refusal)


@api.exception_handler(RequestValidationError)
async def _invalid(request: Request, error: RequestValidationError) -> Response:
    """422 for a body the schema refuses, quoting no more than a short prefix of any input."""
    return _response(_error(422, guard.worded(error.errors())))


_ERRORS = {404: {"model": ErrorBody}, 422: {"model": ErrorBody}, 429: {"model": ErrorBody}, 503: {"model": ErrorBody}}


def _slot(job_id: str, replicas: int) -> int | None:
    parts = job_id.split("_")
    if len(parts) != 3 or parts[0] != "video" or not parts[1].isdigit() or int(parts[1]) >= replicas:
        return None
    return int(parts[1])


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256)
@serve.ingress(api)
class VideoAPI:
    """The HTTP ingress: validates requests, spreads new jobs over the replicas, routes the rest."""

    def __init__(self, replicas: list[DeploymentHandle], max_body: int) -> None:
        self.replicas = replicas
        self.max_body = max_body
        self.registry = JobRegistry.options(name=REGISTRY, get_if_exists=True, lifetime="detached").remote()
        self._turn = itertools.cycle(range(len(replicas)))

    @api.post("/v1/videos", response_model=VideoJob, responses=_ERRORS, summary="Create a video job")
    async def create(self, request: VideoRequest) -> Response:
        """Queue one video; 422 with the reason if the engine refuses it (never queued), 429 with
        Retry-After when every replica's queue is full."""
        first = next(self._turn)
        order = [(first + k) % len(self.replicas) for k in range(len(self.replicas))]
        waits: list[int] = []
        for slot in order:
            try:
                reply = await asyncio.wait_for(self.replicas[slot].submit.remote(request.model_dump()), CALL_TIMEOUT_S)
            except _REPLICA_GONE:
                continue
            if reply.status == 429:
                waits.append(int(reply.headers["Retry-After"]))
                continue
            if reply.status == 200:
                self.registry.add.remote(reply.body)
            return _response(reply)
        if waits:
            return _response(
                _error(
                    429, f"every replica's queue is full; retry after {min(waits)} s", {"Retry-After": str(min(waits))}
                )
            )
        return _response(_error(503, "no engine replica is up"))

    @api.get("/v1/videos/{video_id}", response_model=VideoJob, responses=_ERRORS, summary="A video job's status")
    async def retrieve(self, video_id: str) -> Response:
        """Status, progress (percent of steps), step / steps and NFE so far."""
        return await self._route(video_id, "status")

    @api.delete("/v1/videos/{video_id}", response_model=VideoJob, responses=_ERRORS, summary="Cancel a video job")
    async def cancel(self, video_id: str) -> Response:
        """Cancel a queued or running job; its rows are free at the next step. An ended job is left as it is."""
        return await self._route(video_id, "cancel")

    @api.get(
        "/v1/videos/{video_id}/content",
        responses={200: {"content": {"video/mp4": {}}}, 409: {"model": ErrorBody}, **_ERRORS},
        summary="A completed video",
    )
    async def content(
        self,
        video_id: str,
        variant: Literal["video", "frames"] = Query(
            "video", description="video: MP4 (H.264); frames: float32 [T, H, W, 3] in [0, 1] as .npy"
        ),
    ) -> Response:
        """The MP4 of a completed job, or its raw frames; 409 while it is not completed."""
        return await self._route(video_id, "content", variant)

    @api.get("/metrics", summary="Prometheus metrics")
    async def metrics(self) -> Response:
        """Queue depth, active rows, steps per second, NFE run and saved, reuse ratio, request
        latency and queue wait histograms, per replica."""
        snapshots = await asyncio.gather(*(self._metrics(h) for h in self.replicas))
        return Response(metrics.render(dict(enumerate(snapshots))), media_type=metrics.CONTENT_TYPE)

    @api.get("/healthz", summary="Liveness")
    async def healthz(self) -> Response:
        """200 when every replica answers, 503 with the ones that do not otherwise."""
        snapshots = await asyncio.gather(*(self._metrics(h, timeout=5.0) for h in self.replicas))
        down = [slot for slot, s in enumerate(snapshots) if s is None]
        body = {"status": "ok" if not down else "degraded", "replicas": len(self.replicas), "down": down}
        return JSONResponse(body, status_code=200 if not down else 503)

    async def _metrics(self, handle: DeploymentHandle, timeout: float = CALL_TIMEOUT_S) -> dict[str, Any] | None:
        try:
            return await asyncio.wait_for(handle.metrics.remote(), timeout)
        except _REPLICA_GONE:
            return None

    async def _route(self, video_id: str, method: str, *args: Any) -> Response:
        slot = _slot(video_id, len(self.replicas))
        if slot is None:
            return _response(_error(404, f"no video {video_id!r}"))
        try:
            reply = await asyncio.wait_for(getattr(self.replicas[slot], method).remote(video_id, *args), CALL_TIMEOUT_S)
        except _REPLICA_GONE as e:
            reply = None
            gone = f"its engine replica died ({type(e).__name__})"
        else:
            gone = "its engine replica died and was restarted"
        if reply is not None and not (reply.status == 404 and not reply.body.get("expired")):
            return _response(reply)
        job = await self.registry.get.remote(video_id)
        if job is None:
            return _response(reply or _error(404, f"no video {video_id!r}"))
        failed = VideoJob.model_validate({**job, "status": "failed", "error": {"message": f"failed: {gone}"}})
        if method == "content":
            return _response(_error(409, f"video {video_id} failed: {gone}"))
        return _response(Reply(200, failed.model_dump()))


def application(options: ServeOptions, max_body: int) -> serve.Application:
    """The Serve application: one engine deployment per replica slot behind the ingress, which
    refuses bodies over `max_body` bytes."""
    resources = {"num_gpus": 1} if options.device.startswith("cuda") else {"num_cpus": max(1, options.threads)}
    replica = serve.deployment(
        EngineReplica,
        ray_actor_options=resources,
        max_ongoing_requests=256,
        health_check_period_s=2,
        health_check_timeout_s=30,
    )
    replicas = [
        replica.options(name=f"engine-{slot}").bind(
            str(options.engine.resolve()),
            slot,
            options.max_queue,
            options.batching,
            options.threads,
            options.backend,
            options.device,
        )
        for slot in range(options.replicas)
    ]
    return VideoAPI.bind(replicas, max_body)


def start(options: ServeOptions, num_cpus: int | None = None) -> None:
    """Start Ray on this machine (if it is not running), the HTTP proxy on host:port, and the app;
    returns once every replica is up."""
    _deploy(options, _start_ray(options, num_cpus))


def _start_ray(options: ServeOptions, num_cpus: int | None = None) -> int:
    """Check the options and the bundle, then start Ray (if it is not running); the body limit in bytes."""
    from sencache.runtime.bundle import Bundle

    max_body = options.check()
    Bundle.load(options.engine)
    if not ray.is_initialized():
        ray.init(
            address="local",
            namespace=APP_NAME,
            include_dashboard=False,
            num_cpus=num_cpus,
            log_to_driver=False,
            configure_logging=False,
            _node_ip_address=_node_ip(options.host),
        )
    return max_body


def _deploy(options: ServeOptions, max_body: int) -> None:
    """Start Serve's HTTP proxy on host:port and the app; returns once every replica is up."""
    serve.start(http_options={"host": options.host, "port": options.port})
    serve.run(application(options, max_body), name=APP_NAME, route_prefix="/", blocking=False)


def _node_ip(host: str) -> str | None:
    """The address Ray's own servers advertise: the API's when it is one address (Ray swaps a loopback
    one for this machine's; its gRPC ports listen on every interface whatever it is given), else Ray's choice."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    return None if address.is_unspecified else host


def stop() -> None:
    """Cancel every replica's queued and running jobs, then shut the app, Serve and Ray down."""
    application = serve.status().applications.get(APP_NAME)
    for name in application.deployments if application is not None else ():
        if name.startswith("engine-"):
            try:
                serve.get_deployment_handle(name, app_name=APP_NAME).close.remote().result(timeout_s=CALL_TIMEOUT_S)
            except (*_REPLICA_GONE, TimeoutError):
                continue
    serve.shutdown()
    ray.shutdown()


def serve_forever(options: ServeOptions) -> signal.Signals:
    """`sencache serve`: run until SIGINT or SIGTERM, then cancel the queued and running jobs, shut
    down quietly and return the signal (the command exits with 130). The handlers replace Ray's as
    soon as Ray is up, so a signal while the replicas start ends the server once they are up."""
    try:
        max_body = _start_ray(options)
    except SystemExit as e:  # Ray's own SIGTERM handler, which ray.init installs while it runs
        if e.code != signal.SIGTERM:
            raise
        _quietly(ray.shutdown)
        return signal.SIGTERM
    received: list[int] = []
    done = threading.Event()

    def _stop(signum: int, _: Any) -> None:
        received.append(signum)
        done.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _stop)
    _deploy(options, max_body)
    print(
        f"serving {options.engine} on http://{options.host}:{options.port} ({options.replicas} replica(s), "
        f"{options.batching} batching); API docs at /docs",
        flush=True,
    )
    while not done.wait(1.0):
        pass
    _quietly(stop)
    return signal.Signals(received[0])


def _quietly(shutdown: Callable[[], None]) -> None:
    """Run `shutdown` without Ray's chatter (it reports the actors a shutdown kills on the driver's stdout)."""
    logging.getLogger("ray").setLevel(logging.CRITICAL)
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        shutdown()
