"""The Label Studio ML-backend HTTP protocol (Flask): /health /setup /predict /webhook /versions.

With ``BASIC_AUTH_USER`` / ``BASIC_AUTH_PASS`` set (Label Studio's *Connect Model* dialog sends
them: "Use authentication"), every endpoint wants them; ``/health`` without an Authorization
header answers only ``{"status": "UP"}``, so a load balancer can probe it. Request bodies stop at
``ADCLICK_MAX_REQUEST_MB`` (413).

Every bad input gets a 4xx JSON ``{"error": "..."}``; an unexpected exception a 500 JSON with a
message (and a logged traceback); the worker never dies on a request.

Label Studio 1.23.2 throws our JSON body away on non-2xx answers and only shows
``"<code> Client Error: <reason phrase> for url: ..."`` to the annotator, so the message is also
sent as the HTTP reason phrase (ASCII, one line, shortened).
"""
from __future__ import annotations

import base64
import hmac
import logging
import os
import re
import time
from dataclasses import dataclass

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException

from .budget import max_request_bytes, request_budget
from .errors import BackendError, BadRequest, TooLarge
from .model import Backend

logger = logging.getLogger(__name__)

_REASON_MAX = 400


def _reason(message: str) -> str:
    """A safe HTTP reason phrase: printable ASCII, one line, bounded."""
    s = message.encode("ascii", "replace").decode("ascii")
    s = re.sub(r"[\x00-\x1f\x7f]+", " ", s).strip()
    if len(s) > _REASON_MAX:
        s = s[: _REASON_MAX - 3] + "..."
    return s or "Error"


def _loggable(text: str, limit: int = 300) -> str:
    """``text`` with control characters escaped and bounded: a request path or message written to
    the log cannot start a forged log line."""
    s = re.sub(r"[\x00-\x1f\x7f]", lambda m: f"\\x{ord(m.group()):02x}", str(text))
    return s if len(s) <= limit else s[: limit - 3] + "..."


def error_response(status: int, message: str) -> Response:
    resp = jsonify({"error": message, "status": status})
    resp.status = f"{int(status)} {_reason(message)}"
    return resp


def _core_error_status(e: Exception) -> tuple[int, str] | None:
    """Map the core's deliberate errors to HTTP statuses."""
    try:
        from adclick_core.utils.errors import (
            AdclickError,
            CheckpointError,
            EmptyBankError,
            InputError,
            MissingWeightsError,
        )
    except ImportError:  # pragma: no cover - the core is part of the package
        return None
    if isinstance(e, InputError):
        return 400, str(e)
    if isinstance(e, EmptyBankError):
        return 409, str(e)
    if isinstance(e, MissingWeightsError):
        return 503, f"model weights are missing: {e}"
    if isinstance(e, CheckpointError):
        return 503, f"the model checkpoint cannot be used: {e}"
    if isinstance(e, AdclickError):
        return 400, str(e)
    return None


@dataclass(frozen=True)
class BasicAuth:
    """HTTP Basic credentials every request must carry."""

    user: str
    password: str

    @classmethod
    def from_env(cls) -> "BasicAuth | None":
        user, password = os.environ.get("BASIC_AUTH_USER", ""), os.environ.get("BASIC_AUTH_PASS", "")
        if bool(user) != bool(password):
            raise RuntimeError("set both BASIC_AUTH_USER and BASIC_AUTH_PASS, or neither")
        return cls(user, password) if user else None

    def accepts(self, header: str | None) -> bool:
        """Whether an ``Authorization`` header carries these credentials (constant time)."""
        scheme, _, encoded = (header or "").partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, sep, password = base64.b64decode(encoded.strip(), validate=True).decode("utf-8").partition(":")
        except (ValueError, UnicodeDecodeError):
            return False
        ok_user = hmac.compare_digest(user.encode(), self.user.encode())
        ok_pass = hmac.compare_digest(password.encode(), self.password.encode())
        return bool(sep) and ok_user and ok_pass


def _json_body() -> dict:
    # Only a JSON content type: a cross-site form or text/plain POST (which a browser sends without
    # asking) must not reach /webhook or /train when authentication is off.
    if not request.is_json:
        raise BadRequest(f"the request body must be JSON with Content-Type application/json, "
                         f"got {request.mimetype or 'none'!r}", status=415)
    try:
        data = request.get_json(silent=True)
    except RecursionError:  # the parser's own depth limit: nested past Python's stack
        raise BadRequest("the request body is nested too deeply") from None
    if data is None:
        raise BadRequest("the request body must be JSON")
    if not isinstance(data, dict):
        raise BadRequest("the request body must be a JSON object")
    return data


def create_app(backend: Backend | None = None) -> Flask:
    """The Flask app. ``backend`` defaults to one configured from the environment."""
    app = Flask("adclick_ml_backend")
    app.json.sort_keys = False
    backend = backend or Backend()
    app.config["ADCLICK_BACKEND"] = backend
    app.config["MAX_CONTENT_LENGTH"] = max_request_bytes()
    auth = BasicAuth.from_env()
    max_tasks = int(float(os.environ.get("ADCLICK_MAX_TASKS", "1000")))
    wsgi_app = app.wsgi_app

    def with_budget(environ, start_response):  # every request: a deadline and a decode budget (budget.py)
        with request_budget():
            return wsgi_app(environ, start_response)

    app.wsgi_app = with_budget

    @app.before_request
    def _authenticate():
        request.environ["adclick.authenticated"] = auth is None or auth.accepts(request.headers.get("Authorization"))
        if request.environ["adclick.authenticated"]:
            return None
        if request.path in ("/", "/health") and "Authorization" not in request.headers:
            return None  # a probe; wrong credentials get their 401, which Label Studio explains
        backend.stats["errors_4xx"] += 1
        logger.warning("%s %s -> 401: no or wrong Basic credentials from %s", request.method, _loggable(request.path),
                       request.remote_addr)
        where = ("Label Studio sends webhooks without them: add the header 'Authorization: Basic ...' to this "
                 "backend's webhook in Settings > Webhooks" if request.path == "/webhook"
                 else "in Label Studio, Model > Connect Model > Use authentication")
        resp = error_response(401, f"this ML backend needs HTTP Basic credentials (BASIC_AUTH_USER / "
                                   f"BASIC_AUTH_PASS): {where}")
        resp.headers["WWW-Authenticate"] = 'Basic realm="ADClick ML backend", charset="UTF-8"'
        return resp

    @app.errorhandler(BackendError)
    def _backend_error(e: BackendError):
        if e.status >= 500:
            backend.stats["errors_5xx"] += 1
            logger.error("%s %s -> %d: %s", request.method, _loggable(request.path), e.status, _loggable(e.message))
        else:
            backend.stats["errors_4xx"] += 1
            logger.warning("%s %s -> %d: %s", request.method, _loggable(request.path), e.status, _loggable(e.message))
        return error_response(e.status, e.message)

    @app.errorhandler(HTTPException)
    def _http_error(e: HTTPException):
        code = e.code or 500
        msg = e.description or e.name
        if code == 413:
            msg = (f"the request body is above ADCLICK_MAX_REQUEST_MB "
                   f"({(app.config['MAX_CONTENT_LENGTH'] or 0) / 2**20:.0f} MB)")
        elif code == 404:
            msg = f"no such endpoint {request.path}; this ML backend serves /health /setup /predict /webhook /adapt /versions"
        elif code == 405:
            msg = f"{request.method} is not allowed on {request.path}"
        return error_response(code, msg)

    @app.errorhandler(Exception)
    def _unexpected(e: Exception):
        mapped = _core_error_status(e)
        if mapped is not None:
            status, msg = mapped
            (logger.warning if status < 500 else logger.error)("%s %s -> %d: %s", request.method,
                                                               _loggable(request.path), status, _loggable(msg))
            backend.stats["errors_4xx" if status < 500 else "errors_5xx"] += 1
            return error_response(status, msg)
        backend.stats["errors_5xx"] += 1
        logger.exception("%s %s failed", request.method, _loggable(request.path))
        return error_response(500, f"internal error in the ADClick backend: {type(e).__name__}: {e}")

    @app.get("/")
    @app.get("/health")
    def health():
        if not request.environ.get("adclick.authenticated"):
            return jsonify({"status": "UP", "auth": "Basic credentials required for details"})
        return jsonify(backend.health())

    @app.post("/setup")
    def setup():
        data = _json_body()
        schema = data.get("schema") or data.get("label_config")
        model = backend.model_for(
            data.get("project"), label_config=schema, hostname=data.get("hostname"),
            access_token=data.get("access_token"),
        )
        out = model.setup()
        logger.info("setup project %s -> %s", model.project_id, out.get("model_version"))
        return jsonify(out)

    @app.post("/validate")
    def validate():  # older Label Studio versions call this when a backend is added
        data = _json_body()
        from .convert import parse_label_config

        parse_label_config(data.get("config") or data.get("schema"))
        return jsonify({"status": "ok"})

    @app.post("/predict")
    def predict():
        t0 = time.perf_counter()
        data = _json_body()
        tasks = data.get("tasks")
        if not isinstance(tasks, list) or not tasks:
            raise BadRequest("'tasks' must be a non-empty list of Label Studio tasks")
        if len(tasks) > max_tasks:
            raise TooLarge(f"{len(tasks)} tasks in one /predict, above ADCLICK_MAX_TASKS ({max_tasks})")
        params = data.get("params") if isinstance(data.get("params"), dict) else {}
        context = params.get("context", data.get("context"))
        project = data.get("project")
        if project is None and isinstance(tasks[0], dict):
            project = tasks[0].get("project")
        model = backend.model_for(project, label_config=data.get("label_config"))
        results = model.predict(tasks, context=context)
        if len(results) != len(tasks):  # Label Studio drops everything on a mismatch
            raise RuntimeError(f"{len(results)} results for {len(tasks)} tasks")
        logger.debug("predict %d task(s) in %.0f ms", len(tasks), (time.perf_counter() - t0) * 1e3)
        return jsonify({"results": results, "model_version": model.model_version})

    @app.post("/webhook")
    def webhook():
        data = _json_body()
        action = data.get("action")
        if not isinstance(action, str) or not action:
            raise BadRequest("webhook body needs an 'action'")
        project = data.get("project")
        if project is None:
            return jsonify({"status": "ignored", "message": "no project in the webhook"}), 200
        label_config = project.get("label_config") if isinstance(project, dict) else None
        model = backend.model_for(project, label_config=label_config)
        out = model.fit(action, data)
        logger.info("webhook %s project %s -> %s", _loggable(str(action)), model.project_id, out.get("status"))
        return jsonify(out), 200

    @app.post("/train")
    def train():  # Label Studio 1.23 sends START_TRAINING to /webhook; kept for older versions
        data = _json_body()
        model = backend.model_for(data.get("project"), label_config=data.get("label_config"))
        return jsonify(model.fit("START_TRAINING", data)), 200

    @app.post("/adapt")
    def adapt():  # on demand; adaptation also starts by itself once a project has enough references
        data = _json_body()
        model = backend.model_for(data.get("project"), label_config=data.get("label_config"))
        model.config  # a project without a usable config cannot adapt: 4xx with the reason
        return jsonify(model.adapt.start("requested with POST /adapt")), 200

    @app.route("/versions", methods=["GET", "POST"])
    def versions():
        return jsonify({"versions": backend.versions(),
                        "training": {m.project_id: m.seg.status() for m in backend.models()}})

    return app
