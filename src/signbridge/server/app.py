"""The HTTP API: SignPath's crypto-provider routes under ``/Api``, plus the timestamp authority.

Starlette serves every route. The two signing routes are plain ASGI endpoints, and the front door
(:class:`ServiceApp`) hands POSTs to them straight away: they are the service's hot path, where
Starlette's middleware, router and request objects would cost as much as the application itself.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import json
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers, UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import __version__
from ..errors import SignbridgeError
from . import metrics
from .audit import AuditLog
from .audit_chain import GENESIS, AuditEntry
from .checkpoints import CheckpointSigner, checkpoint_row, write_checkpoint
from .database import open_engine
from .jsonlog import ACCESS_LOGGER, AUDIT_LOGGER
from .key_signer import KeySigner
from .keystores.factory import open_keystore
from .openapi import openapi_document
from .problems import PROBLEM_CONTENT_TYPE, Problem, bad_request
from .readiness import check_readiness
from .requests import get, parse_fast_signing_payload, parse_sign_hash
from .service import Caller, SigningService
from .settings import ServerSettings
from .timestamp_authority import TimestampAuthority, load_timestamp_authority

log = logging.getLogger("signbridge.server")
access_log = logging.getLogger(ACCESS_LOGGER)
audit_log = logging.getLogger(AUDIT_LOGGER)

MAX_TIMESTAMP_QUERY = 64 * 1024
READINESS_TIMEOUT = 10.0


@dataclass(frozen=True)
class RunOptions:
    """How ``server run`` asked the workers to behave (passed through the environment)."""

    access_log: bool = False  # a JSON access line per request, written by the app (not uvicorn)
    audit_log: bool = False  # a log line per signing attempt, once its audit record is committed
    operations_routes: bool = True  # /Api/metrics and /Api/readyz on the API's own address

    @classmethod
    def from_env(cls) -> RunOptions:
        return cls(
            access_log=os.environ.get("SIGNBRIDGE_ACCESS_LOG") == "json",
            audit_log=os.environ.get("SIGNBRIDGE_AUDIT_LOG") == "1",
            operations_routes=os.environ.get("SIGNBRIDGE_METRICS_ADDRESS") is None,
        )

Parse = Callable[[], tuple[Any, Callable[[Any], bytes]]]
"""Turns a request read off the wire into (HashSigningRequest, echo); raises Problem. Echo turns
the SignResult into the response's JSON body."""

ReadRequest = Callable[[Scope, dict[bytes, bytes], Receive], Awaitable[Parse]]
"""Reads a signing route's request (scope, headers by lower-case name, body) into its Parse."""


def problem_response(problem: Problem) -> JSONResponse:
    return JSONResponse(
        problem.body(), status_code=problem.status, media_type=PROBLEM_CONTENT_TYPE, headers=problem.headers
    )


def _too_large(limit: int) -> Problem:
    return Problem(413, f"The request body is larger than the service accepts ({limit} bytes).")


async def read_limited(receive: Receive, declared: str | None, limit: int) -> bytes:
    """The body, read from ASGI messages; refused with 413 as soon as its declared or received size exceeds ``limit``."""
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    parts, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        if not message.get("more_body", False):
            return b"".join((*parts, chunk)) if parts else chunk
        parts.append(chunk)


async def read_body(request: Request, limit: int) -> bytes:
    return await read_limited(request.receive, request.headers.get("content-length"), limit)


_JSON = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))
_SIGN_HASH_RESPONSE = b'{"signingRequestId":"%s","hashSigningData":{"hash":"%s"},"hashSigningResult":{"signature":"%s"}}'


async def send_body(send: Send, status: int, body: bytes, content_type: bytes = b"application/json",
                    headers: dict[str, str] | None = None) -> None:
    raw_headers = [(b"content-type", content_type), (b"content-length", b"%d" % len(body))]
    if headers:
        raw_headers += [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()]
    start: Message = {"type": "http.response.start", "status": status, "headers": raw_headers}
    await send(start)
    await send({"type": "http.response.body", "body": body})


async def send_json(send: Send, status: int, content: Any, content_type: bytes = b"application/json",
                    headers: dict[str, str] | None = None) -> None:
    await send_body(send, status, _JSON.encode(content).encode(), content_type, headers)


async def send_problem(send: Send, problem: Problem) -> None:
    await send_json(send, problem.status, problem.body(), PROBLEM_CONTENT_TYPE.encode(), problem.headers)


def _describe(entry: AuditEntry, caller: Caller | None, parsed) -> None:  # noqa: ANN001
    if caller is not None:
        entry.user_id, entry.user_name, entry.token_id = caller.user_id, caller.user_name, caller.token_id
    if parsed is not None:
        signature = parsed.signature
        entry.project_slug, entry.policy_slug = parsed.project_slug, parsed.policy_slug
        entry.algorithm = f"{signature.scheme.value}/{signature.hash_algorithm.title}"
        if signature.scheme.value == "Ecdsa":
            entry.algorithm += f"/{signature.ecdsa_format.value}"
        entry.digest = signature.digest.hex()
        entry.client_metadata = parsed.metadata


def _audit_fields(entry: AuditEntry, seq: int | None) -> dict[str, Any]:
    """An audit record as a log line: what was decided about whom, never a credential."""
    return {
        "event": "signing", "seq": seq, "outcome": entry.outcome, "status": entry.status,
        "organizationId": entry.organization_id, "projectSlug": entry.project_slug, "signingPolicySlug": entry.policy_slug,
        "algorithm": entry.algorithm, "user": entry.user_name, "signingRequestId": entry.request_id,
        "certificateSha256": entry.certificate_sha256, "digest": entry.digest, "reason": entry.reason,
        "remoteAddress": entry.remote_address,
    }


class Api:
    """The route handlers, bound to one service instance."""

    def __init__(self, settings: ServerSettings, options: RunOptions | None = None) -> None:
        self.settings = settings
        self.options = options or RunOptions()
        self.service: SigningService | None = None
        self.tsa: TimestampAuthority | None = None
        self.checkpoints: CheckpointSigner | None = None
        self.signer: KeySigner | None = None
        self._background: set[asyncio.Task[None]] = set()

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        engine = open_engine(self.settings.database_url)
        keystore = open_keystore(self.settings.data_dir, self.settings.keystore)
        observer = metrics.ServiceObserver()
        audit = AuditLog(engine, observer)
        self.service = SigningService(
            engine, keystore, audit, rate_limit_per_minute=self.settings.rate_limit_per_minute, observer=observer
        )
        with Session(engine) as session:
            self.tsa = load_timestamp_authority(session, keystore)
        self.checkpoints = self._load_checkpoint_signer()
        self.signer = KeySigner(self.settings.data_dir) if self.service.inline else None
        if self.signer is not None:
            self.signer.start()
        ticker = asyncio.create_task(self._checkpoint_ticker()) if self.checkpoints else None
        if self.checkpoints is not None:
            self._in_background(self._warm_checkpoints())
        # Each request allocates a few thousand short-lived objects; with the default thresholds the
        # cyclic collector runs every few requests and rescans everything loaded at start-up.
        gc.freeze()
        gc.set_threshold(20_000, 20, 20)
        try:
            yield
        finally:
            if ticker is not None:
                ticker.cancel()
            await audit.aclose()
            await self._checkpoint()  # a clean shutdown leaves no record uncovered
            if self.signer is not None:
                await self.signer.aclose()
            self.service.close()
            keystore.close()
            engine.dispose()
            metrics.process_exited(os.getpid())

    def _load_checkpoint_signer(self) -> CheckpointSigner | None:
        service = self.service
        assert service is not None
        with Session(service.engine) as session:
            row = checkpoint_row(session)
        return None if row is None else CheckpointSigner(row, service.keystore, self.tsa)

    async def _checkpoint(self) -> None:
        if self.checkpoints is None or self.service is None:
            return
        try:
            await run_in_threadpool(write_checkpoint, self.service.engine, self.checkpoints)
        except (SignbridgeError, SQLAlchemyError, OSError) as exc:  # the next checkpoint covers these records too
            log.error("cannot write an audit checkpoint: %s", exc)

    async def _checkpoint_ticker(self) -> None:
        while True:
            await asyncio.sleep(self.settings.audit_checkpoint_seconds)
            await self._checkpoint()

    async def _audit(self, entry: AuditEntry) -> None:
        """Commit ``entry``; every ``audit_checkpoint_records`` records, sign a checkpoint in the background."""
        service = self.service
        assert service is not None
        seq = await service.audit.append(entry)
        self._audited(entry, seq)
        if seq % self.settings.audit_checkpoint_records == 0 and self.checkpoints is not None:
            self._in_background(self._checkpoint())

    def _in_background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _warm_checkpoints(self) -> None:
        """Sign a checkpoint that is thrown away, so that the first real one, due amid the traffic,
        does not load the checkpoint and TSA keys and the thread pool's modules while holding the GIL."""
        assert self.checkpoints is not None
        try:
            await run_in_threadpool(self.checkpoints.sign, 0, GENESIS)
        except (SignbridgeError, OSError) as exc:
            log.warning("cannot sign an audit checkpoint: %s", exc)

    def _authorize(self, authorization: str | None, organization_id: str, parse: Parse, entry: AuditEntry):  # noqa: ANN202
        """Authenticate and parse; (grant, request, echo). ``entry`` learns each fact as it is established."""
        service = self.service
        assert service is not None
        try:
            parsed, echo = parse()
        except Problem as problem:
            parsed, echo, invalid = None, None, problem
        else:
            invalid = None
        # An unauthenticated caller learns nothing about its request's validity: 401 comes first.
        grant = service.authorize(
            authorization, organization_id, parsed and parsed.project_slug, parsed and parsed.policy_slug
        )
        _describe(entry, grant.caller, parsed)
        if invalid is not None:
            raise invalid
        return grant, parsed, echo

    def _authorize_and_sign(self, authorization: str | None, organization_id: str, parse: Parse, entry: AuditEntry):  # noqa: ANN202
        """Authenticate, parse and sign, all in a worker thread (keys in an HSM, or a database server:
        see ``SigningService.inline``)."""
        service = self.service
        assert service is not None
        grant, parsed, echo = self._authorize(authorization, organization_id, parse, entry)
        return echo(service.sign(grant, parsed, entry))

    async def _authorize_and_sign_inline(self, authorization: str | None, organization_id: str, parse: Parse,
                                         entry: AuditEntry):  # noqa: ANN202
        """Authenticate and parse on the event loop; only the signature itself is made in the key signer process."""
        service, signer = self.service, self.signer
        assert service is not None and signer is not None
        grant, parsed, echo = self._authorize(authorization, organization_id, parse, entry)
        loaded = service.signing_key(grant, parsed, entry)
        signature = await service.signature_from(signer, loaded, parsed.signature)
        return echo(service.granted(entry, signature))

    async def _signing_route(self, scope: Scope, receive: Receive, send: Send, read: ReadRequest) -> None:
        """Read the request, then authenticate, parse and sign it; answer only once the audit record
        is committed."""
        service = self.service
        assert service is not None
        organization_id = scope["path_params"]["organization_id"]
        client = scope.get("client")
        entry = AuditEntry(
            outcome="rejected", status=400, organization_id=organization_id.lower(), remote_address=client[0] if client else None
        )
        headers = {name: value for name, value in reversed(scope["headers"])}  # the first of repeated headers wins
        try:
            parse = await read(scope, headers, receive)
            authorization = headers.get(b"authorization")
            arguments = (authorization and authorization.decode("latin-1"), organization_id, parse, entry)
            if self.signer is not None:
                body = await self._authorize_and_sign_inline(*arguments)
            else:
                body = await run_in_threadpool(self._authorize_and_sign, *arguments)
        except ClientDisconnect:
            return  # nothing was signed, and there is nobody to answer
        except Problem as problem:
            entry.outcome, entry.status, entry.reason = problem.audit_outcome, problem.status, problem.detail
            try:
                await self._audit(entry)
            except SignbridgeError as exc:
                log.error("%s", exc)
                problem = Problem(503, "The audit log is unavailable; try again later.")
            await send_problem(send, problem)
            return
        try:
            await self._audit(entry)
        except SignbridgeError as exc:
            log.error("%s; the signature was withheld", exc)
            await send_problem(send, Problem(503, "The audit log is unavailable; the signature was not released."))
            return
        await send_body(send, 200, body)

    def _audited(self, entry: AuditEntry, seq: int) -> None:
        metrics.count_signing_request(entry)
        if self.options.audit_log:
            audit_log.info("signing request %s: %s", entry.outcome, entry.status, extra={"fields": _audit_fields(entry, seq)})

    async def _read_signing_body(self, headers: dict[bytes, bytes], receive: Receive) -> bytes:
        declared = headers.get(b"content-length")
        return await read_limited(receive, declared and declared.decode("latin-1"), self.settings.max_body_bytes)

    async def sign_hash(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def read(_scope: Scope, headers: dict[bytes, bytes], receive: Receive) -> Parse:
            body = await self._read_signing_body(headers, receive)

            def parse():  # noqa: ANN202
                parsed = parse_sign_hash(_json(body))

                def echo(result) -> bytes:  # noqa: ANN001
                    # What send_json would write: a UUID and base64 need no escaping.
                    return _SIGN_HASH_RESPONSE % (
                        result.request_id.encode(), base64.b64encode(parsed.signature.digest), base64.b64encode(result.signature)
                    )

                return parsed, echo

            return parse

        await self._signing_route(scope, receive, send, read)

    async def fast_signing_request(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def read(scope: Scope, headers: dict[bytes, bytes], receive: Receive) -> Parse:
            fields: dict = {}
            problem: Problem | None = None
            if not headers.get(b"content-type", b"").lower().startswith(b"multipart/form-data"):
                problem = Problem(415, "Send the signing request as multipart/form-data.")
            else:
                body = await self._read_signing_body(headers, receive)

                async def chunks() -> AsyncIterator[bytes]:
                    yield body

                try:
                    form = await MultiPartParser(Headers(scope=scope), chunks(), max_files=2, max_fields=32).parse()
                    fields = {key: value for key, value in form.multi_items()}
                    artifact = get(fields, "Artifact")
                    if isinstance(artifact, UploadFile):
                        fields["Artifact"] = await artifact.read()
                except (MultiPartException, ValueError, KeyError) as exc:
                    problem = bad_request(f"The multipart body is malformed: {exc}")

            def parse():  # noqa: ANN202
                if problem is not None:
                    raise problem
                return _parse_fast_signing_fields(fields)

            return parse

        await self._signing_route(scope, receive, send, read)

    async def my_signing_policies(self, request: Request) -> Response:
        service = self.service
        assert service is not None
        try:
            caller = await run_in_threadpool(
                service.authenticate, request.headers.get("authorization"), request.path_params["organization_id"]
            )
            query = dict(request.query_params)
            policies = await run_in_threadpool(
                service.my_signing_policies, caller, get(query, "projectSlug"), get(query, "signingPolicySlug")
            )
        except Problem as problem:
            return problem_response(problem)
        return JSONResponse({"signingPolicies": policies})

    async def timestamp(self, request: Request) -> Response:
        try:
            if self.tsa is None:
                raise Problem(503, "This service has no timestamp authority; create one with `signbridge admin tsa create`.")
            if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/timestamp-query":
                raise Problem(415, "Send an RFC 3161 request with Content-Type: application/timestamp-query.")
            query = await read_body(request, MAX_TIMESTAMP_QUERY)
        except Problem as problem:
            return problem_response(problem)
        reply = await run_in_threadpool(self.tsa.respond, query)
        return Response(reply, media_type="application/timestamp-reply")

    async def healthz(self, _request: Request) -> Response:
        return PlainTextResponse("Healthy")

    async def readyz(self, _request: Request) -> Response:
        service = self.service
        assert service is not None
        try:
            readiness = await asyncio.wait_for(
                run_in_threadpool(check_readiness, service.engine, service.keystore), READINESS_TIMEOUT
            )
        except TimeoutError:
            return JSONResponse({"status": "unavailable", "checks": {"timeout": f"no answer within {READINESS_TIMEOUT:g} s"}},
                                status_code=503)
        return JSONResponse(readiness.body(), status_code=200 if readiness.ready else 503)

    async def prometheus_metrics(self, _request: Request) -> Response:
        body = await run_in_threadpool(metrics.exposition)
        return Response(body, media_type=metrics.CONTENT_TYPE)

    async def openapi(self, _request: Request) -> Response:
        return JSONResponse(openapi_document(__version__))


def _json(body: bytes):  # noqa: ANN202
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise bad_request("The request body is not valid JSON.") from None
    except RecursionError:
        raise bad_request("The request body's JSON is nested too deeply.") from None


def _parse_fast_signing_fields(fields: dict):  # noqa: ANN202
    fast = get(fields, "IsFastSigningRequest")
    if not isinstance(fast, str) or fast.lower() != "true":
        raise bad_request(
            "Only fast signing requests (IsFastSigningRequest=true) are supported by this service.",
            "IsFastSigningRequest",
        )
    project, policy = get(fields, "ProjectSlug"), get(fields, "SigningPolicySlug")
    for name, value in (("ProjectSlug", project), ("SigningPolicySlug", policy)):
        if not isinstance(value, str) or not value:
            raise bad_request(f"The {name} field is required.", name)
    artifact = get(fields, "Artifact")
    if not isinstance(artifact, bytes):
        raise bad_request("The Artifact file (payload.json) is required.", "Artifact")
    payload = _json(artifact)
    parsed = parse_fast_signing_payload(project, policy, payload)

    def echo(result) -> bytes:  # noqa: ANN001
        return _JSON.encode({**payload, "Signature": base64.b64encode(result.signature).decode()}).encode()

    return parsed, echo


class Endpoint:
    """A plain ASGI endpoint for Starlette's router (a bound method would be wrapped as a Request handler)."""

    def __init__(self, handler: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.handler = handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.handler(scope, receive, send)


_SIGNING_PATH = re.compile(r"/api/v1/([^/]+)/signingrequests(/signhash)?")


class ServiceApp:
    """The ASGI application uvicorn runs. Paths are matched case-insensitively, as ASP.NET does (clients
    write Api, API or api; ours are declared in lower case); POSTs to the signing routes skip Starlette."""

    def __init__(self, api: Api, starlette: Starlette, *, access_log: bool = False) -> None:
        self.api = api
        self.starlette = starlette
        self.access_log = access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.starlette(scope, receive, send)
            return
        started = time.perf_counter()
        status = 499  # until a response starts: the client went away first

        async def send_noting_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        path = scope["path"].lower()
        match = _SIGNING_PATH.fullmatch(path) if scope["method"] == "POST" else None
        route = ("signhash" if match[2] else "signingrequests") if match else metrics.route_of(path)
        try:
            if match is None:
                await self.starlette({**scope, "path": path}, receive, send_noting_status)
                return
            scope["path_params"] = {"organization_id": match[1]}
            endpoint = self.api.sign_hash if match[2] else self.api.fast_signing_request
            try:
                await endpoint(scope, receive, send_noting_status)
            except Exception as exc:
                log.exception("unexpected error", exc_info=exc)
                await send_problem(send_noting_status, _UNEXPECTED)
        finally:
            seconds = time.perf_counter() - started
            metrics.TIMERS[route].observe(status, seconds)
            if self.access_log:
                _log_access(scope, route, status, seconds)


def _log_access(scope: Scope, route: str, status: int, seconds: float) -> None:
    client = scope.get("client")
    access_log.info(
        "%s %s %s", scope["method"], scope["path"], status,
        extra={"fields": {
            "event": "access", "method": scope["method"], "path": scope["path"], "route": route, "status": status,
            "durationMs": round(seconds * 1000, 3), "remoteAddress": client[0] if client else None,
            "httpVersion": scope.get("http_version"),
        }},
    )  # fmt: skip


async def _http_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    detail = {404: "There is no such route.", 405: "That method is not allowed on this route."}.get(
        exc.status_code, str(exc.detail)
    )
    return problem_response(Problem(exc.status_code, detail, headers=dict(exc.headers or {})))


_UNEXPECTED = Problem(500, "The service failed unexpectedly; the administrator can find details in its log.")


async def _server_error(_request: Request, exc: Exception) -> Response:
    log.exception("unexpected error", exc_info=exc)
    return problem_response(_UNEXPECTED)


def create_app(settings: ServerSettings, options: RunOptions | None = None) -> ASGIApp:
    api = Api(settings, options)
    org = "/api/v1/{organization_id}"
    operations = [
        Route("/api/readyz", api.readyz, methods=["GET"]),
        Route("/api/metrics", api.prometheus_metrics, methods=["GET"]),
    ] if api.options.operations_routes else []
    routes = [
        Route("/api/healthz", api.healthz, methods=["GET"]),
        *operations,
        Route("/api/swagger/v1/swagger.json", api.openapi, methods=["GET"]),
        Route("/api/openapi.json", api.openapi, methods=["GET"]),
        Route(f"{org}/cryptoki/mysigningpolicies", api.my_signing_policies, methods=["GET"]),
        Route(f"{org}/signingrequests", Endpoint(api.fast_signing_request), methods=["POST"]),
        Route(f"{org}/signingrequests/signhash", Endpoint(api.sign_hash), methods=["POST"]),
        Route("/api/timestamp", api.timestamp, methods=["POST"]),
    ]
    app = Starlette(
        routes=routes,
        lifespan=api.lifespan,
        exception_handlers={HTTPException: _http_error, Exception: _server_error},
    )
    return ServiceApp(api, app, access_log=api.options.access_log)


def create_app_from_env() -> ASGIApp:
    """The factory uvicorn's worker processes call: settings from ``SIGNBRIDGE_DATA_DIR``."""
    data_dir = Path(os.environ["SIGNBRIDGE_DATA_DIR"])
    settings = ServerSettings.load(data_dir, database_url=os.environ.get("SIGNBRIDGE_DATABASE_URL"))
    return create_app(settings, RunOptions.from_env())
