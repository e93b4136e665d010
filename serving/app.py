"""The video API on Ray Serve: a FastAPI ingress in front of N engine replicas.

Each engine replica is its own Serve deployment (`engine-0` .. `engine-{N-1}`, one replica
each, restarted by Serve when it dies), so the ingress can send every call about a job to the
replica that holds it: a job id names its replica (`video_<slot>_<hex>`). A small Ray actor, the
job registry, remembers every id the ingress handed out; an id the registry knows but its
replica does not (the replica died and Serve started a fresh one) is reported failed, never
left pending, and an id neither knows is a 404.

Endpoints (OpenAI's Videos API, which the `openai` SDK drives unchanged): POST /v1/videos (JSON
or multipart/form-data), GET /v1/videos (cursor pages), GET /v1/videos/{id},
GET /v1/videos/{id}/content, DELETE /v1/videos/{id} (cancels a running job, then deletes it);
GET /metrics, GET /healthz; the OpenAPI document is at /openapi.json and the docs at /docs.
Every error has OpenAI's body (`sencache.serving.errors`).
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
from typing import Annotated, Any, Literal

import ray
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import RayServeException
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException

from sencache import __version__
from sencache.runtime.errors import BadInput, RankFailure
from sencache.runtime.scheduler import Batching
from sencache.serving import guard, metrics
from sencache.serving.errors import error_body, error_response
from sencache.serving.form import parse_body
from sencache.serving.options import ServeOptions
from sencache.serving.rank_workers import RankSetup, RankWorkers
from sencache.serving.schema import ErrorBody, VideoDeleted, VideoJob, VideoList, VideoRequest, json_field
from sencache.serving.service import NotReady, QueueFull, UnknownJob, Variant, VideoService

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
    gone: str | None = None
    """For a 404: why the replica no longer holds the job (expired, deleted), None when it never did."""


MEDIA: dict[str, str] = {"video": "video/mp4", "thumbnail": "image/png", "frames": "application/octet-stream"}
"""The media type of each content variant."""


def _error(
    status: int, message: str, *, param: str | None = None, code: str | None = None, retry_after: int | None = None
) -> Reply:
    headers = {} if retry_after is None else {"Retry-After": str(retry_after)}
    return Reply(status, error_body(status, message, param=param, code=code), headers)


def _refused(error: BadInput) -> Reply:
    """422 for a request the engine refuses, naming the request body's field at fault as `param`."""
    field = json_field(error.param)
    return _error(422, error.worded(field), param=field, code="invalid_value")


def _invalid(errors: list[Any]) -> Reply:
    """422 for a body or query the schema refuses: the errors as `field: reason` with at most a short
    prefix of any input (`guard.worded`), `param` the first one's field, `code` its kind."""
    places = [".".join(str(part) for part in e["loc"] if part not in ("body", "query", "path")) for e in errors]
    message = guard.worded(errors)
    return _error(422, message, param=places[0] or None if places else None, code=errors[0]["type"] if errors else None)


def _missing(error: UnknownJob) -> Reply:
    """404 for a job this replica does not hold; `gone` says it once did (so the registry is not asked)."""
    code = f"video_{error.gone or 'not_found'}"
    return Reply(404, error_body(404, str(error), param="video_id", code=code), gone=error.gone)


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
    """One engine (one bundle on one device, or on the ranks of `ranks`) and its jobs, as a Ray
    Serve replica. Over several ranks the replica is rank 0; when its group breaks, the next
    health check or job opens the engine again on a new group (`rank_workers`)."""

    def __init__(
        self,
        engine_dir: str,
        slot: int,
        max_queue: int,
        batching: Batching,
        threads: int,
        backend: str,
        device: str,
        ranks: RankSetup | None = None,
    ) -> None:
        from sencache.runtime.api import Engine

        self.workers = None if ranks is None else RankWorkers(ranks, batching)
        self._mending = threading.Lock()
        engine = (
            Engine.from_bundle(engine_dir, backend=backend, device=device, threads=threads, batching=batching)
            if self.workers is None
            else self.workers.open()
        )
        manifest = engine.model.bundle.manifest
        self.service = VideoService(
            engine, model=manifest.model, defaults=manifest.defaults, slot=slot, max_queue=max_queue
        )

    async def submit(self, body: dict[str, Any]) -> Reply:
        request = VideoRequest.model_validate(body)
        try:
            await asyncio.to_thread(self._mend)
            job = await asyncio.to_thread(self.service.submit, request)
        except BadInput as e:
            return _refused(e)
        except QueueFull as e:
            return _error(429, str(e), code="queue_full", retry_after=e.retry_after)
        except Exception as e:  # the rank group broke and could not be rebuilt, or broke just now
            if self.service.engine.broken is None:
                raise
            return _error(503, f"the engine's rank group failed: {e}", code="rank_group_failed", retry_after=1)
        return Reply(200, job.model_dump())

    async def check_health(self) -> None:
        """Serve's health check: a broken rank group is rebuilt here; a replica that cannot rebuild
        it raises, so Serve replaces the replica (and its placement group)."""
        await asyncio.to_thread(self._mend)

    def _mend(self) -> None:
        """When the engine's rank group broke: the engine again on a new group (once, under a lock)."""
        with self._mending:
            if self.workers is not None and self.service.engine.broken is not None:
                self.service.reopen(self.workers.reopen(self.service.engine))

    async def status(self, job_id: str) -> Reply:
        return await self._about(job_id, self.service.status)

    async def delete(self, job_id: str) -> Reply:
        return await self._about(job_id, self.service.delete)

    async def jobs(self) -> list[tuple[float, dict[str, Any]]]:
        return [(created, job.model_dump()) for created, job in await asyncio.to_thread(self.service.jobs)]

    async def content(self, job_id: str, variant: Variant) -> Reply:
        try:
            data = await asyncio.to_thread(self.service.content, job_id, variant)
        except UnknownJob as e:
            return _missing(e)
        except NotReady as e:
            return _error(409, str(e), code="video_not_ready")
        return Reply(200, data, media_type=MEDIA[variant])

    async def metrics(self) -> dict[str, Any]:
        return await asyncio.to_thread(self.service.metrics)

    async def _about(self, job_id: str, action: Any) -> Reply:
        try:
            job = await asyncio.to_thread(action, job_id)
        except UnknownJob as e:
            return _missing(e)
        return Reply(200, job.model_dump())

    async def close(self) -> None:
        """Stop admitting and cancel what is queued or running (on the server's shutdown)."""
        await asyncio.to_thread(self._close)

    def _close(self) -> None:
        """Close the engine; over several ranks, that lets the workers go, then they end."""
        try:
            with contextlib.suppress(RankFailure):  # a broken group has nothing more to say
                self.service.close()
        finally:
            if self.workers is not None:
                self.workers.kill()

    def __del__(self) -> None:
        self._close()


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

    def forget(self, job_id: str) -> None:
        self.jobs.pop(job_id, None)


api = FastAPI(
    title="sencache video API",
    version=__version__,
    description="Text-to-video generation on the SenCache step-level engine, in the shape of OpenAI's Videos API. "
    "Jobs at different denoising steps share every engine pass, each with its own cache.",
)
api.add_middleware(guard.BodyGuard, max_bytes=_body_limit, refusal=_refusal)


_ERRORS = {404: {"model": ErrorBody}, 422: {"model": ErrorBody}, 429: {"model": ErrorBody}, 503: {"model": ErrorBody}}
_BODY = {"schema": {"$ref": "#/components/schemas/VideoRequest"}}


@api.exception_handler(RequestValidationError)
async def _invalid_request(request: Request, error: RequestValidationError) -> Response:
    """A query or path the schema refuses: 422 in OpenAI's error shape."""
    return _response(_invalid(list(error.errors())))


@api.exception_handler(HTTPException)
async def _http_error(request: Request, error: HTTPException) -> Response:
    """Starlette's own errors (an unknown path 404, a wrong method 405) in OpenAI's error shape."""
    return error_response(error.status_code, str(error.detail), headers=error.headers)


def _openapi() -> dict[str, Any]:
    """The OpenAPI document, with the request body's schema (read by hand, so FastAPI does not list it)."""
    if api.openapi_schema is None:
        doc = get_openapi(title=api.title, version=api.version, description=api.description, routes=api.routes)
        schema = VideoRequest.model_json_schema(ref_template="#/components/schemas/{model}")
        doc["components"]["schemas"].update({**schema.pop("$defs"), "VideoRequest": schema})
        api.openapi_schema = doc
    return api.openapi_schema


api.openapi = _openapi  # type: ignore[method-assign]


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

    @api.post(
        "/v1/videos",
        response_model=VideoJob,
        responses=_ERRORS,
        summary="Create a video job",
        openapi_extra={
            "requestBody": {"required": True, "content": {"application/json": _BODY, "multipart/form-data": _BODY}}
        },
    )
    async def create(self, http: Request) -> Response:
        """Queue one video (a JSON body, or a form as the `openai` SDK sends it); 422 with the
        reason if the engine refuses it (never queued), 429 with Retry-After when every replica's
        queue is full."""
        try:
            request = VideoRequest.model_validate(parse_body(http.headers.get("content-type", ""), await http.body()))
        except BadInput as e:
            return _response(_refused(e))
        except ValidationError as e:
            return _response(_invalid(e.errors()))
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
            wait = min(waits)
            message = f"every replica's queue is full; retry after {wait} s"
            return _response(_error(429, message, code="queue_full", retry_after=wait))
        return _response(_error(503, "no engine replica is up", code="no_replica"))

    @api.get("/v1/videos", response_model=VideoList, responses=_ERRORS, summary="List video jobs")
    async def list_videos(
        self,
        after: Annotated[str | None, Query(description="the last id of the previous page")] = None,
        limit: Annotated[int, Query(ge=1, le=100, description="jobs per page")] = 20,
        order: Annotated[Literal["asc", "desc"], Query(description="by submission time")] = "desc",
    ) -> Response:
        """The jobs the replicas hold (queued, running, and each replica's last 64 ended), newest
        first by default; OpenAI's cursor page. A replica that does not answer adds none."""
        held = await asyncio.gather(*(self._jobs(h) for h in self.replicas))
        jobs = [job for _, job in sorted((j for js in held for j in js), key=lambda j: (j[0], j[1]["id"]))]
        if order == "desc":
            jobs.reverse()
        start = 0
        if after is not None:
            ids = [job["id"] for job in jobs]
            if after not in ids:
                return _response(
                    _error(404, f"no video {after[:80]!r} to list after", param="after", code="video_not_found")
                )
            start = ids.index(after) + 1
        page = jobs[start : start + limit]
        body = VideoList(
            data=[VideoJob.model_validate(job) for job in page],
            first_id=page[0]["id"] if page else None,
            last_id=page[-1]["id"] if page else None,
            has_more=start + limit < len(jobs),
        )
        return JSONResponse(body.model_dump())

    @api.get("/v1/videos/{video_id}", response_model=VideoJob, responses=_ERRORS, summary="A video job's status")
    async def retrieve(self, video_id: str) -> Response:
        """Status, progress (percent of steps), step / steps and NFE so far."""
        return await self._route(video_id, "status")

    @api.delete("/v1/videos/{video_id}", response_model=VideoDeleted, responses=_ERRORS, summary="Delete a video")
    async def delete(self, video_id: str) -> Response:
        """Delete a video and its content; a queued or running job is cancelled first (its rows are
        free at the next step). Its id is a 404 afterwards."""
        response = await self._route(video_id, "delete")
        if response.status_code == 200:
            self.registry.forget.remote(video_id)
        return response

    @api.get(
        "/v1/videos/{video_id}/content",
        responses={200: {"content": {"video/mp4": {}}}, 409: {"model": ErrorBody}, **_ERRORS},
        summary="A completed video",
    )
    async def content(
        self,
        video_id: str,
        variant: Annotated[
            Variant,
            Query(
                description="video: MP4 (H.264); thumbnail: the first frame as a PNG; "
                "frames: float32 [T, H, W, 3] in [0, 1] as .npy"
            ),
        ] = "video",
    ) -> Response:
        """The MP4 of a completed job, its first frame, or its raw frames; 409 while it is not completed."""
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

    async def _jobs(self, handle: DeploymentHandle) -> list[tuple[float, dict[str, Any]]]:
        try:
            return await asyncio.wait_for(handle.jobs.remote(), CALL_TIMEOUT_S)
        except _REPLICA_GONE:
            return []

    async def _metrics(self, handle: DeploymentHandle, timeout: float = CALL_TIMEOUT_S) -> dict[str, Any] | None:
        try:
            return await asyncio.wait_for(handle.metrics.remote(), timeout)
        except _REPLICA_GONE:
            return None

    async def _route(self, video_id: str, method: str, *args: Any) -> Response:
        slot = _slot(video_id, len(self.replicas))
        if slot is None:
            return _response(_error(404, f"no video {video_id[:80]!r}", param="video_id", code="video_not_found"))
        try:
            reply = await asyncio.wait_for(getattr(self.replicas[slot], method).remote(video_id, *args), CALL_TIMEOUT_S)
        except _REPLICA_GONE as e:
            reply = None
            gone = f"its engine replica died ({type(e).__name__})"
        else:
            gone = "its engine replica died and was restarted"
        if reply is not None and not (reply.status == 404 and reply.gone is None):
            return _response(reply)
        job = await self.registry.get.remote(video_id)
        if job is None:
            return _response(
                reply or _error(404, f"no video {video_id[:80]!r}", param="video_id", code="video_not_found")
            )
        if method == "content":
            return _response(_error(409, f"video {video_id} failed: {gone}", code="video_not_ready"))
        if method == "delete":
            return _response(Reply(200, VideoDeleted(id=video_id).model_dump()))
        error = {"code": "replica_died", "message": f"failed: {gone}"}
        failed = VideoJob.model_validate({**job, "status": "failed", "error": error})
        return _response(Reply(200, failed.model_dump()))


def application(options: ServeOptions, max_body: int) -> serve.Application:
    """The Serve application: one engine deployment per replica slot behind the ingress, which
    refuses bodies over `max_body` bytes."""
    resources = {"num_gpus": 1} if options.device.startswith("cuda") else {"num_cpus": max(1, options.threads)}
    ranks = None
    placement: dict[str, Any] = {}
    if options.gpus_per_replica > 1:
        ranks = RankSetup(
            str(options.engine.resolve()), str(options.parallel), options.backend, options.device, options.threads
        )
        resources = ranks.resources()
        placement = {"placement_group_bundles": ranks.bundles(), "placement_group_strategy": "STRICT_PACK"}
    replica = serve.deployment(
        EngineReplica,
        ray_actor_options=resources,
        max_ongoing_requests=256,
        health_check_period_s=2,
        health_check_timeout_s=30,
        **placement,
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
            ranks,
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
        f"serving {options.engine} on http://{options.host}:{options.port} ({options.replicas} replica(s) of "
        f"{options.gpus_per_replica} rank(s), {options.batching} batching); API docs at /docs",
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
