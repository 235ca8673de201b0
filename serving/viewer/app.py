"""The viewer's routes: sign-in, upload, results with Grad-CAM, feedback, and the model page.

Identity: a viewer session made at sign-in from the local users file (the cookie is a random id; the session is
held server-side, see serving.viewer.signin), or whatever the gateway itself accepts on the request (client
certificate, bearer JWT, or anonymous on the loopback demo). Every page that
shows or takes an image goes through `Gateway.predict`, so the viewer has the gateway's limits, audit and request
log; the viewer adds audit lines for sign-ins and feedback (identity and request id only, never PHI).
"""

from __future__ import annotations

import base64
import csv
import fcntl
import hashlib
import hmac
import json
import os
import secrets
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from medpipe.files import write_atomic
from medpipe.ids import REQUEST_ID_PATTERN
from serving.feedback import UNUSABLE
from serving.gateway.core import GatewayError, Principal, check_model_spec, may_call
from serving.viewer import render, signin, users as local_users

HERE = Path(__file__).resolve().parent
COOKIE = "medpipe_session"
SESSION_SECONDS = 8 * 3600  # one shift
CSV_FORMULA = ("=", "+", "-", "@", "\t", "\r")  # a spreadsheet would run a cell starting with one of these
DISCLAIMER = "For research use, not a medical device."

# Plain words for the reasons a file can be refused (keys: GatewayError codes); the gateway's own message follows.
REFUSALS = {
    "INVALID_ARGUMENT": "This file could not be read as a medical image.",
    "RESOURCE_EXHAUSTED": "The service is busy or the upload is too large; try fewer or smaller files.",
    "PERMISSION_DENIED": "Your account may not use this model.",
    "NOT_FOUND": "This model is not being served right now.",
    "UNAVAILABLE": "The model server cannot be reached right now; try again shortly.",
    "DEADLINE_EXCEEDED": "The model server took too long to answer; try again.",
}


@dataclass
class ViewerSettings:
    """What the viewer needs besides the gateway. `session_key` keys the forms' CSRF tokens: from
    MEDPIPE_VIEWER_SESSION_KEY, else a fresh random key per process (never a built-in default)."""

    users_file: Path | None = None
    feedback_dir: Path | None = None
    repository: Path | None = None
    drift_reports: Path | None = None
    models: list[str] = field(default_factory=list)
    default_model: str | None = None
    secure_cookies: bool = False
    max_files: int = 16
    session_key: bytes = field(default_factory=lambda: (os.environ.get("MEDPIPE_VIEWER_SESSION_KEY", "").encode()
                                                        or secrets.token_bytes(32)))


def settings_from_options(options) -> ViewerSettings:
    """The viewer's settings from `medpipe gateway`'s parsed flags."""
    def path(name: str) -> Path | None:
        value = getattr(options, name, None)
        return Path(value) if value else None

    models = list(getattr(options, "viewer_models", None) or [])
    return ViewerSettings(users_file=path("viewer_users"), feedback_dir=path("feedback_dir"),
                          repository=path("model_repository"), drift_reports=path("drift_reports"),
                          models=models, default_model=models[0] if models else None,
                          secure_cookies=bool(getattr(options, "tls_cert", None)))


@dataclass(frozen=True)
class Reading:
    """A prediction shown to one reader: what their feedback on it may say (kept server-side, bounded)."""

    model: str
    version: int
    outside: bool  # outside intended use: only "unusable" may be recorded
    png_sha256: str
    at: float


class Viewer:
    MAX_READINGS = 4096

    def __init__(self, gateway, settings: ViewerSettings):
        self.gateway, self.settings = gateway, settings
        self.templates = Jinja2Templates(directory=str(HERE / "templates"))
        self.sessions = signin.Sessions(SESSION_SECONDS)
        self.lockout = signin.Lockout(settings.users_file)
        self.hashes = signin.HashPool()
        self.readings: OrderedDict[tuple, Reading] = OrderedDict()
        self._readings_lock = threading.Lock()
        self._users_cache: tuple[tuple, dict] | None = None

    # ---- identity -------------------------------------------------------------------------------------------
    def users(self) -> dict[str, local_users.LocalUser]:
        """The users file, re-read whenever it changed (`medpipe viewer-users` replaces it atomically)."""
        path = self.settings.users_file
        if path is None or not path.is_file():
            return {}
        stat = path.stat()
        key = (stat.st_mtime_ns, stat.st_ino, stat.st_size)
        if self._users_cache is None or self._users_cache[0] != key:
            self._users_cache = (key, local_users.read_users(path))
        return self._users_cache[1]

    def principal(self, request: Request) -> Principal | None:
        cookie = request.cookies.get(COOKIE)
        if cookie:
            users = self.users()
            session = self.sessions.get(cookie, lambda name: users[name].password_hash if name in users else None)
            if session is not None:  # scopes as the users file says now, not as at sign-in
                return Principal(identity=session.user, scopes=users[session.user].scopes, via="session")
        try:
            return self.gateway.authenticate(request)
        except GatewayError:
            return None

    def remember(self, principal: Principal, request_id: str, reading: Reading) -> None:
        with self._readings_lock:
            self.readings[(principal.via, principal.identity, request_id)] = reading
            while len(self.readings) > self.MAX_READINGS:
                self.readings.popitem(last=False)

    def reading(self, principal: Principal, request_id: str) -> Reading | None:
        """This reader's own prediction `request_id`, if it is recent; None for anyone else's."""
        with self._readings_lock:
            reading = self.readings.get((principal.via, principal.identity, request_id))
        return reading if reading is not None and time.time() - reading.at < SESSION_SECONDS else None

    def csrf_token(self, request: Request, principal: Principal) -> str:
        basis = request.cookies.get(COOKIE) or f"{principal.via}:{principal.identity}"
        return hmac.new(self.settings.session_key, b"csrf:" + basis.encode(), hashlib.sha256).hexdigest()[:32]

    def check_csrf(self, request: Request, principal: Principal, token: str | None) -> None:
        if not token or not hmac.compare_digest(token, self.csrf_token(request, principal)):
            raise GatewayError("PERMISSION_DENIED", "the form has expired; reload the page and try again")

    def audit(self, principal: Principal | None, request: Request, event: str, **fields: Any) -> None:
        self.gateway.audit.append({
            "event": event, "door": "viewer", "identity": principal.identity if principal else None,
            "client": request.client.host if request.client else None, **fields})

    # ---- models ---------------------------------------------------------------------------------------------
    def model_choices(self, principal: Principal) -> list[str]:
        names = list(self.settings.models)
        if not names and self.settings.repository and self.settings.repository.is_dir():
            names = sorted(p.name for p in self.settings.repository.iterdir()
                           if p.is_dir() and _valid_model(p.name) and any(v.name.isdigit() for v in p.iterdir()))
        return [name for name in names if may_call(principal, name)]

    def default_model(self, choices: list[str]) -> str | None:
        if self.settings.default_model in choices:
            return self.settings.default_model
        return choices[0] if choices else None

    def version_dir(self, model: str, version: int | None = None) -> Path | None:
        if self.settings.repository is None or not _valid_model(model):
            return None
        base = self.settings.repository / model
        versions = sorted((int(p.name) for p in base.iterdir() if p.name.isdigit()), reverse=True) \
            if base.is_dir() else []
        if version is not None:
            return base / str(version) if version in versions else None
        return base / str(versions[0]) if versions else None

    # ---- feedback -------------------------------------------------------------------------------------------
    def model_labels(self, model: str, version: int) -> list[str]:
        """The model's classes, from its preprocessing settings (the one source the gateway predicts with)."""
        return [str(label) for label in self.gateway.catalog.preprocessing(model, version, timeout=10).labels]

    def write_feedback(self, request_id: str, label: str, png: bytes) -> Path:
        """FEEDBACK_DIR/confirmed.csv (request_id,label,image_path) + images/<request_id>.png: the input of
        `medpipe feedback --labels FEEDBACK_DIR/confirmed.csv`. A later answer for the same request id replaces the
        earlier one (a reader correcting themselves), so the file never holds two labels for one image."""
        folder = self.settings.feedback_dir
        if folder is None:
            raise GatewayError("UNAVAILABLE", "feedback is not enabled on this gateway (start it with --feedback-dir)")
        images = folder / "images"
        images.mkdir(parents=True, exist_ok=True)
        image_path = images / f"{request_id}.png"
        if label != UNUSABLE:
            write_atomic(image_path, png)
        labels_csv = folder / "confirmed.csv"
        row = [request_id, label, f"images/{request_id}.png" if label != UNUSABLE else ""]
        if any(cell.startswith(CSV_FORMULA) for cell in row):  # labels are checked before; never write a formula
            raise GatewayError("INVALID_ARGUMENT", "a feedback value may not start with = + - @ or a control "
                               "character")
        with open(labels_csv, "a+", newline="", encoding="utf-8") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)  # one writer at a time across the gateway's workers
            handle.seek(0)
            rows = [r for r in csv.reader(handle) if r and r[0] not in ("request_id", request_id)]
            handle.seek(0)
            handle.truncate()
            writer = csv.writer(handle)
            writer.writerows([["request_id", "label", "image_path"], *rows, row])
        return labels_csv


def _page(viewer: Viewer, request: Request, template: str, principal: Principal | None, status: int = 200,
          **context: Any) -> HTMLResponse:
    context.update(request=request, principal=principal, disclaimer=DISCLAIMER,
                   csrf=viewer.csrf_token(request, principal) if principal else "")
    response = viewer.templates.TemplateResponse(request, template, context, status_code=status)
    # The pages embed patient images: never cached, never framed, no third-party anything.
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["Content-Security-Policy"] = (
        "default-src 'none'; img-src 'self' data:; style-src 'self'; script-src 'self'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'")
    return response


def _item_view(viewer: Viewer, index: int, prediction, item) -> dict:
    size = _png_size(item.png)
    png_b64 = base64.b64encode(item.png).decode("ascii")
    outside = item.in_distribution is False or item.class_name is None
    request_id = prediction.request_id if len(prediction.items) == 1 else f"{prediction.request_id}-{index}"
    shown = not outside  # outside intended use: no class, no probabilities, no heat map, nothing preselected
    return {
        "index": index + 1, "request_id": request_id, "image": "data:image/png;base64," + png_b64, "size": size,
        "heatmap": (render.png_data_uri(render.heatmap_png(item.heatmap, size))
                    if shown and item.heatmap is not None else None),
        "class_name": item.class_name if shown else None,
        "confidence": f"{100 * item.confidence:.1f}" if shown else None, "outside": outside,
        "ood_score": None if item.ood_score is None else f"{item.ood_score:.2f}",
        "bars": render.probability_rows(item.probabilities, item.class_name) if shown else [],
        "labels": [] if outside else list(item.probabilities), "png_b64": png_b64,
    }


def _png_size(png: bytes) -> int:
    # Width from the IHDR chunk (bytes 16-20): the model's input is square.
    return int.from_bytes(png[16:20], "big") if png[:8] == b"\x89PNG\r\n\x1a\n" else 0


def build_router(gateway, settings: ViewerSettings | None = None) -> APIRouter:
    viewer = Viewer(gateway, settings or settings_from_options(gateway.options))
    router = APIRouter(prefix="/viewer")

    def signed_in(request: Request) -> Principal | RedirectResponse:
        principal = viewer.principal(request)
        return principal if principal is not None else RedirectResponse("/viewer/login", status_code=303)

    @router.get("/static/{name}")
    def static(name: str) -> Response:
        if name not in ("viewer.css", "viewer.js"):
            return Response(status_code=404)
        media = "text/css" if name.endswith(".css") else "text/javascript"
        return Response((HERE / "static" / name).read_bytes(), media_type=media,
                        headers={"Cache-Control": "max-age=3600"})

    @router.get("/login", response_class=HTMLResponse)
    def login_form(request: Request):
        return _page(viewer, request, "login.html", None, users_enabled=bool(viewer.users()))

    @router.post("/login", response_class=HTMLResponse)
    async def login(request: Request):
        from starlette.concurrency import run_in_threadpool

        form = await request.form()
        name, password = str(form.get("username", "")), str(form.get("password", ""))
        address = request.client.host if request.client else None
        users = viewer.users()
        account = name if name in users else None  # unknown names are throttled per address only

        def refuse(status: int, error: str, outcome: str):
            viewer.audit(None, request, "sign_in", outcome=outcome)
            page = _page(viewer, request, "login.html", None, status=status, users_enabled=bool(users), error=error)
            if status in (429, 503):
                page.headers["Retry-After"] = str(retry_after)
            return page

        retry_after = 5
        verdict = await run_in_threadpool(viewer.lockout.check, account, address)
        if verdict.just_locked:
            viewer.audit(None, request, "account_locked", account=account, outcome="LOCKED")
        if not verdict.allowed:
            retry_after = max(1, int(verdict.wait_s + 0.999))
            return refuse(429, "Too many failed sign-ins. Wait a while before trying again, or ask an "
                          "administrator to unlock the account.", "LOCKED" if verdict.locked else "BACKOFF")
        try:  # scrypt on its own bounded pool: sign-ins never stall the event loop (REST, other readers)
            user = await viewer.hashes.run(local_users.authenticate, users, name, password) \
                if name and password else None
        except signin.Busy:
            return refuse(503, "The service is busy signing other readers in; try again in a few seconds.",
                          "UNAVAILABLE")
        if user is None:
            if await run_in_threadpool(viewer.lockout.fail, account, address):
                viewer.audit(None, request, "account_locked", account=account, outcome="LOCKED")
            return refuse(401, "Unknown user name or wrong password.", "UNAUTHENTICATED")
        await run_in_threadpool(viewer.lockout.succeed, user.name, address)
        principal = Principal(identity=user.name, scopes=user.scopes, via="session")
        viewer.audit(principal, request, "sign_in", outcome="OK")
        response = RedirectResponse("/viewer/", status_code=303)
        response.set_cookie(COOKIE, viewer.sessions.create(user.name, user.password_hash), max_age=SESSION_SECONDS,
                            httponly=True, samesite="strict", secure=viewer.settings.secure_cookies, path="/viewer")
        return response

    @router.post("/logout")
    def logout(request: Request):
        principal = viewer.principal(request)
        cookie = request.cookies.get(COOKIE)
        if cookie:
            viewer.sessions.revoke(cookie)  # the cookie is dead server-side, whatever the browser keeps
        if principal is not None:
            viewer.audit(principal, request, "sign_out", outcome="OK")
        response = RedirectResponse("/viewer/login", status_code=303)
        response.delete_cookie(COOKIE, path="/viewer")
        return response

    @router.get("/", response_class=HTMLResponse)
    def home(request: Request):
        principal = signed_in(request)
        if isinstance(principal, RedirectResponse):
            return principal
        choices = viewer.model_choices(principal)
        return _page(viewer, request, "upload.html", principal, models=choices, selected=viewer.default_model(choices),
                     max_files=viewer.settings.max_files)

    @router.post("/predict", response_class=HTMLResponse)
    async def predict(request: Request):
        principal = signed_in(request)
        if isinstance(principal, RedirectResponse):
            return principal
        form = await request.form(max_files=viewer.settings.max_files + 1)
        choices = viewer.model_choices(principal)
        model = str(form.get("model") or viewer.default_model(choices) or "")
        uploads = [f for f in form.getlist("images") if hasattr(f, "read")]
        errors: list[str] = []
        try:
            viewer.check_csrf(request, principal, form.get("csrf"))
            check_model_spec(model)
            if model not in choices:
                raise GatewayError("PERMISSION_DENIED", "choose one of the models listed on the page")
            if len(uploads) > viewer.settings.max_files:
                raise GatewayError("RESOURCE_EXHAUSTED", f"at most {viewer.settings.max_files} files per upload")
        except GatewayError as exc:
            return _page(viewer, request, "upload.html", principal, status=_http_status(exc), models=choices,
                         selected=model if model in choices else viewer.default_model(choices),
                         max_files=viewer.settings.max_files, errors=[_refusal(exc)])
        results, meta = [], None
        for number, upload in enumerate(uploads, start=1):
            data = await upload.read()
            await upload.close()
            if not data:
                errors.append(f"Image {number}: the file is empty.")
                continue
            client = request.client.host if request.client else None
            request_id = f"viewer-{uuid.uuid4().hex[:24]}"
            try:
                try:
                    prediction = gateway.predict(principal, model, [data], explain=True, request_id=request_id,
                                                 door="viewer", client=client)
                except GatewayError as exc:
                    if exc.reason != "no_explain":
                        raise
                    # A version exported before heat maps existed still gets its finding, without the overlay.
                    prediction = gateway.predict(principal, model, [data], request_id=request_id, door="viewer",
                                                 client=client)
            except GatewayError as exc:
                errors.append(f"Image {number}: {_refusal(exc)}")
                continue
            meta = {"model": prediction.model, "version": prediction.version}
            view = _item_view(viewer, 0, prediction, prediction.items[0])
            view["index"] = number
            viewer.remember(principal, view["request_id"], Reading(
                prediction.model, prediction.version, view["outside"],
                hashlib.sha256(prediction.items[0].png).hexdigest(), time.time()))
            results.append(view)
        if not uploads:
            errors.append("Choose at least one DICOM, PNG, JPEG or TIFF file to upload.")
        status = 200 if results or not errors else 400
        return _page(viewer, request, "results.html" if results else "upload.html", principal, status=status,
                     results=results, meta=meta, errors=errors, models=choices, selected=model,
                     max_files=viewer.settings.max_files, feedback=viewer.settings.feedback_dir is not None)

    @router.post("/feedback", response_class=HTMLResponse)
    async def feedback(request: Request):
        from starlette.concurrency import run_in_threadpool

        principal = signed_in(request)
        if isinstance(principal, RedirectResponse):
            return principal
        form = await request.form()
        request_id, label = str(form.get("request_id", "")), str(form.get("label", ""))
        png_b64 = str(form.get("png", ""))
        reading = None
        try:
            viewer.check_csrf(request, principal, form.get("csrf"))
            if not REQUEST_ID_PATTERN.fullmatch(request_id):
                raise GatewayError("INVALID_ARGUMENT", "the feedback form is incomplete; reload the results")
            reading = viewer.reading(principal, request_id)
            png = _b64(png_b64)
            if reading is None or png is None or hashlib.sha256(png).hexdigest() != reading.png_sha256:
                raise GatewayError("PERMISSION_DENIED", "this feedback is not about an image you classified here "
                                   "recently; upload the image again")
            if label != UNUSABLE:
                if reading.outside:
                    raise GatewayError("INVALID_ARGUMENT", "this image is outside the model's intended use: it can "
                                       "only be marked unusable")
                if label not in await run_in_threadpool(viewer.model_labels, reading.model, reading.version):
                    raise GatewayError("INVALID_ARGUMENT", "choose one of the model's labels, or mark the image "
                                       "unusable")
            viewer.write_feedback(request_id, label, png)
        except GatewayError as exc:
            viewer.audit(principal, request, "feedback",
                         request_id=request_id if REQUEST_ID_PATTERN.fullmatch(request_id) else None,
                         outcome=exc.code)
            return _page(viewer, request, "message.html", principal, status=_http_status(exc),
                         title="Feedback not saved", message=_refusal(exc))
        viewer.audit(principal, request, "feedback", request_id=request_id, model=reading.model,
                     version=reading.version, label=label, outcome="OK")
        what = "marked unusable" if label == UNUSABLE else f"recorded as {label}"
        return _page(viewer, request, "message.html", principal, title="Thank you",
                     message=f"The image was {what}. It will be used when the model is next retrained.",
                     back=True)

    @router.get("/models/{model}", response_class=HTMLResponse)
    def model_page(request: Request, model: str):
        principal = signed_in(request)
        if isinstance(principal, RedirectResponse):
            return principal
        if not _valid_model(model) or not may_call(principal, model):
            return _page(viewer, request, "message.html", principal, status=404, title="No such model",
                         message="This model is not available to you.")
        folder = viewer.version_dir(model)
        card = _read_json(folder / "assets.extra" / "model_card.json") if folder else None
        metrics = _read_json(folder / "assets.extra" / "medpipe_metrics.json") if folder else None
        report = folder is not None and (folder / "assets.extra" / "report.html").is_file()
        drift = _latest_drift(viewer.settings.drift_reports, model)
        viewer.audit(principal, request, "model_page", model=model, version=int(folder.name) if folder else None,
                     outcome="OK")
        return _page(viewer, request, "model.html", principal, model=model,
                     version=folder.name if folder else None, card=card, metrics=metrics, report=report, drift=drift)

    @router.get("/models/{model}/report", response_class=HTMLResponse)
    def model_report(request: Request, model: str):
        principal = signed_in(request)
        if isinstance(principal, RedirectResponse):
            return principal
        folder = viewer.version_dir(model) if _valid_model(model) and may_call(principal, model) else None
        path = folder / "assets.extra" / "report.html" if folder else None
        if path is None or not path.is_file():
            return _page(viewer, request, "message.html", principal, status=404, title="No report",
                         message="No evaluation report was published with this model version.")
        # The report is self-contained HTML of our own making; sandboxed all the same.
        return HTMLResponse(path.read_text(encoding="utf-8"),
                            headers={"Content-Security-Policy": "sandbox; default-src 'none'; img-src data:; "
                                     "style-src 'unsafe-inline'", "Cache-Control": "no-store"})

    return router


def _valid_model(name: str) -> bool:
    """The gateway's own model-name rule (core.check_model_spec): never a path such as `..`."""
    try:
        check_model_spec(name)
    except GatewayError:
        return False
    return True


def _b64(text: str) -> bytes | None:
    try:
        return base64.b64decode(text, validate=True)
    except (ValueError, TypeError):
        return None


def _http_status(error: GatewayError) -> int:
    return error.http_status


def _refusal(error: GatewayError) -> str:
    plain = REFUSALS.get(error.code)
    return f"{plain} ({error.message})" if plain else error.message


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _latest_drift(folder: Path | None, model: str) -> dict | None:
    """The newest drift_report.json under the monitoring output folder for this model (the monitor's own file)."""
    if folder is None or not folder.is_dir():
        return None
    reports = sorted(folder.rglob("drift_report.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    for path in reports[:50]:
        report = _read_json(path)
        if isinstance(report, dict) and report.get("model") in (None, model):
            return {"date": report.get("date"), "alerts": report.get("alerts", []),
                    "status": report.get("status"), "requests": report.get("requests"),
                    "age_days": round((time.time() - path.stat().st_mtime) / 86400, 1)}
    return None
