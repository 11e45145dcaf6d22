"""Downloading task images (and calling the Label Studio API) with clear errors.

Images go through ``label_studio_sdk``'s own helper (``get_local_path``), which understands every
Label Studio URL kind (``/data/upload/...``, ``/data/local-files/?d=...``, cloud storage, plain
http(s)). We add what users of the official SAM backend kept tripping over:

* credentials: ``LABEL_STUDIO_URL`` / ``LABEL_STUDIO_API_KEY`` from the environment win; else the
  ``hostname`` / ``access_token`` Label Studio sent to ``/setup``. A personal access token (a JWT
  refresh token) is exchanged for a short-lived access token first, as the SDK client does;
  a legacy token is sent as ``Token``.
* errors: 401/403 -> 424 naming LABEL_STUDIO_API_KEY, 404 -> 404 naming the URL, an unreachable
  host -> 424 naming LABEL_STUDIO_URL, no answer in time -> 504 naming ADCLICK_DOWNLOAD_TIMEOUT;
  never a bare traceback.
* a timeout on every download (the helper has none by default).
* the download policy of ``url_policy.py`` (no SSRF: Label Studio host, its cloud-storage
  redirects and ``ADCLICK_ALLOWED_HOSTS`` only; the token only to Label Studio; bounded bytes).
* the helper's file cache is kept per (host, token) and bounded in size, so a wrong token
  never gets a file another token downloaded, and the disk does not fill up.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import os
import stat
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlparse

import requests

from .errors import BadRequest, ImageAccessDenied, ImageNotFound
from .url_policy import PolicySession, UrlPolicy

logger = logging.getLogger(__name__)

DOWNLOAD_TIMEOUT_S = float(os.environ.get("ADCLICK_DOWNLOAD_TIMEOUT", "30"))


@dataclass(frozen=True)
class Credentials:
    hostname: str  # Label Studio base URL, e.g. http://127.0.0.1:8080 ("" = unknown)
    token: str  # legacy token or personal access token ("" = none)
    source: str = "environment"  # where they came from, for error messages

    @staticmethod
    def resolve(setup_hostname: str | None = None, setup_token: str | None = None) -> "Credentials":
        env_host = os.environ.get("LABEL_STUDIO_URL") or os.environ.get("LABEL_STUDIO_HOST") or ""
        env_token = os.environ.get("LABEL_STUDIO_API_KEY") or os.environ.get("LABEL_STUDIO_ACCESS_TOKEN") or ""
        host = env_host or (setup_hostname or "")
        token = env_token or (setup_token or "")
        if env_host and env_token:
            src = "LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY"
        elif env_host or env_token:
            src = "environment + /setup"
        elif host or token:
            src = "Label Studio /setup (set LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY to override)"
        else:
            src = "nowhere (LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY are not set)"
        return Credentials(host.rstrip("/"), token, src)

    @property
    def key(self) -> str:
        return hashlib.sha1(f"{self.hostname}\0{self.token}".encode()).hexdigest()[:12]


class _AccessTokens:
    """Personal access tokens (JWT refresh tokens) -> cached access tokens."""

    def __init__(self):
        self._lock = threading.Lock()
        self._cache: dict[tuple[str, str], tuple[str, float]] = {}

    @staticmethod
    def _claims(token: str) -> dict | None:
        try:
            import jwt

            return jwt.decode(token, options={"verify_signature": False})
        except Exception:  # noqa: BLE001 - not a JWT = legacy token
            return None

    def header_token(self, creds: Credentials) -> str:
        """The token to send: legacy tokens as they are, refresh tokens exchanged."""
        claims = self._claims(creds.token)
        if not claims or claims.get("token_type") != "refresh":
            return creds.token
        key = (creds.hostname, creds.token)
        with self._lock:
            hit = self._cache.get(key)
            if hit and hit[1] - 30 > time.time():
                return hit[0]
            try:
                r = requests.post(
                    f"{creds.hostname}/api/token/refresh/", json={"refresh": creds.token},
                    timeout=DOWNLOAD_TIMEOUT_S,
                )
            except requests.RequestException as e:
                raise ImageAccessDenied(
                    f"could not reach Label Studio at {creds.hostname} to exchange the personal access "
                    f"token ({type(e).__name__}); check LABEL_STUDIO_URL"
                ) from None
            if r.status_code != 200:
                raise ImageAccessDenied(
                    f"Label Studio at {creds.hostname} refused the personal access token "
                    f"(HTTP {r.status_code} from /api/token/refresh/): set LABEL_STUDIO_API_KEY to a "
                    "valid token (Account & Settings > Personal Access Token, or a legacy token)"
                )
            access = r.json().get("access", "")
            exp = (self._claims(access) or {}).get("exp") or (time.time() + 240)
            self._cache[key] = (access, float(exp))
            return access


ACCESS_TOKENS = _AccessTokens()


def auth_headers(creds: Credentials) -> dict:
    """Authorization header for the Label Studio API (legacy ``Token`` or JWT ``Bearer``)."""
    if not creds.token:
        return {}
    tok = ACCESS_TOKENS.header_token(creds)
    scheme = "Bearer" if _AccessTokens._claims(tok) else "Token"
    return {"Authorization": f"{scheme} {tok}"}


def private_dir(path: Path) -> Path:
    """``path`` as a folder only this user can read (0700), created if missing; a folder that is a
    link or belongs to another user is refused (it could be read or planted by that user)."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise PermissionError(f"{path} is a link or belongs to another user: not used as a private cache")
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "adclick" / "images"


class ImageCache:
    """Downloaded images on disk, private and checked: the folder is 0700, each file is named by a
    keyed hash of (credentials, URL), which nobody without the key can predict, and starts with the
    SHA-256 of the image, which is checked on every read (a file changed on disk is dropped and the
    image downloaded again). One file per name, so a read opens one path. Oldest files go first
    above ``max_bytes``."""

    DIGEST = 64  # hex characters of the SHA-256 in front of the image bytes

    def __init__(self, root: Path, max_bytes: int):
        try:
            self.root = private_dir(root)
        except OSError as e:
            self.root = Path(tempfile.mkdtemp(prefix="adclick-images-"))
            logger.warning("image cache %s not usable (%s): using %s", root, e, self.root)
        self.max_bytes = max_bytes
        self._key = self._secret()
        self._lock = threading.Lock()
        self._last_prune = 0.0

    def _secret(self) -> bytes:
        path = self.root / ".key"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(os.urandom(32))
        except FileExistsError:
            pass
        except OSError:
            return os.urandom(32)
        key = path.read_bytes()
        return key if len(key) == 32 else os.urandom(32)

    def _name(self, creds_key: str, url: str) -> str:
        return hmac.new(self._key, f"{creds_key}\0{url}".encode(), hashlib.sha256).hexdigest()[:40]

    def get(self, creds_key: str, url: str) -> bytes | None:
        path = self.root / self._name(creds_key, url)
        try:
            raw = path.read_bytes()
        except OSError:
            return None
        digest, data = raw[: self.DIGEST], raw[self.DIGEST:]
        if hashlib.sha256(data).hexdigest().encode() != digest:
            logger.warning("image cache: %s does not match its content hash: dropped", path.name)
            path.unlink(missing_ok=True)
            return None
        try:
            os.utime(path)
        except OSError:
            pass
        return data

    def put(self, creds_key: str, url: str, data: bytes) -> None:
        try:
            fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".part-")
            with os.fdopen(fd, "wb") as fh:
                fh.write(hashlib.sha256(data).hexdigest().encode())
                fh.write(data)
            os.replace(tmp, self.root / self._name(creds_key, url))
        except OSError as e:
            logger.warning("image cache: cannot write (%s)", e)
            return
        with self._lock:
            self._prune()

    def _prune(self) -> None:
        now = time.time()
        if now - self._last_prune < 30:
            return
        self._last_prune = now
        files, total = [], 0
        for p in self.root.iterdir():
            try:
                if p.is_file() and p.name != ".key":
                    st = p.stat()
                    files.append((st.st_mtime, st.st_size, p))
                    total += st.st_size
            except OSError:
                continue
        files.sort()
        while total > self.max_bytes and files:
            _, size, p = files.pop(0)
            try:
                p.unlink()
                total -= size
            except OSError:
                pass


class ImageLoader:
    """Fetches task images as bytes through the SDK helper (every hop checked by ``UrlPolicy``),
    with a private, hash-checked cache (``ImageCache``)."""

    def __init__(self, cache_dir: str | os.PathLike | None = None, max_cache_mb: float = 1024.0):
        self.cache = ImageCache(Path(cache_dir) if cache_dir else default_cache_dir(), int(max_cache_mb * 1024 * 1024))

    def fetch(self, url: str, creds: Credentials, task_id: int | None = None) -> bytes:
        """The image's bytes, or a BackendError with a message the annotator can act on."""
        from label_studio_sdk._extensions.label_studio_tools.core.utils import io as ls_io

        if not isinstance(url, str) or not url.strip():
            raise BadRequest("the task has no image URL")
        if task_id is not None and (isinstance(task_id, bool) or not isinstance(task_id, int) or task_id < 0):
            # it goes into a Label Studio API path (cloud storage resolution) with the backend's token
            raise BadRequest(f"a task id must be a whole number, got {str(task_id)[:40]!r}")
        url = url.strip()
        policy = UrlPolicy.from_env(creds.hostname)
        if url.startswith("data:"):
            data = _data_uri_bytes(url)
            policy.require_size(len(data), "the data: image")
            return data
        is_ls_path = url.startswith("/data/") or url.startswith("data/") or url.startswith("/storage-data/") \
            or url.startswith("upload") or url.startswith("/upload") or url.startswith(("s3:", "gs:", "azure-blob:"))
        parsed = urlparse(url)
        if not is_ls_path and parsed.scheme not in ("http", "https"):
            raise ImageNotFound(
                f"unknown image URL {url!r}: expected a Label Studio path (/data/upload/..., "
                "/data/local-files/?d=...), a cloud storage URI or an http(s) URL"
            )
        if creds.hostname and not creds.hostname.startswith(("http://", "https://")):
            raise ImageAccessDenied(
                f"LABEL_STUDIO_URL={creds.hostname!r} must start with http:// or https://"
            )
        host_for_msg = creds.hostname or "(no Label Studio URL)"
        cached = self.cache.get(creds.key, url)
        if cached is not None:
            return cached
        token = ""
        if creds.token and creds.hostname:
            token = ACCESS_TOKENS.header_token(creds)
        try:
            with ls_io.http_session(PolicySession(policy, DOWNLOAD_TIMEOUT_S)), \
                    tempfile.TemporaryDirectory(dir=self.cache.root, prefix=".download-") as scratch:
                path = ls_io.get_local_path(
                    url,
                    cache_dir=scratch,
                    hostname=creds.hostname or None,
                    access_token=token or None,
                    download_resources=True,
                    task_id=task_id,
                    # never Label Studio's upload folder on this machine: an upload is downloaded
                    # through Label Studio, which checks that the token may see it
                    image_dir=os.path.join(scratch, "no-local-uploads"),
                )
                policy.require_size(os.path.getsize(path), f"the image {url}")
                with open(path, "rb") as fh:
                    data = fh.read()
        except requests.HTTPError as e:
            code = e.response.status_code if e.response is not None else 0
            if code in (401, 403):
                raise ImageAccessDenied(
                    f"Label Studio at {host_for_msg} refused the image download (HTTP {code}) for {url}: "
                    "set LABEL_STUDIO_API_KEY to a valid API token of a user who can see this project "
                    f"(credentials from {creds.source})"
                ) from None
            if code == 404:
                raise ImageNotFound(
                    f"image not found: {url} (HTTP 404 from {host_for_msg}); for local files, Label "
                    "Studio needs a Local Storage on a folder holding it"
                ) from None
            raise ImageAccessDenied(f"downloading {url} from {host_for_msg} failed with HTTP {code}") from None
        except requests.Timeout:
            raise ImageAccessDenied(
                f"{host_for_msg} did not answer the download of {url} within {DOWNLOAD_TIMEOUT_S:.0f} s "
                "(ADCLICK_DOWNLOAD_TIMEOUT): Label Studio or its storage is slow or overloaded", status=504
            ) from None
        except requests.ConnectionError as e:
            raise ImageAccessDenied(
                f"could not reach {host_for_msg} to download {url} ({type(e).__name__}): set "
                "LABEL_STUDIO_URL to an address the backend can reach"
            ) from None
        except (requests.exceptions.MissingSchema, requests.exceptions.InvalidURL,
                requests.exceptions.InvalidSchema) as e:
            raise ImageNotFound(f"unknown image URL {url!r}: {e}") from None
        except FileNotFoundError as e:
            msg = str(e)
            if "LABEL_STUDIO_API_KEY" in msg:
                raise ImageAccessDenied(
                    f"cannot download {url}: no Label Studio API token; set LABEL_STUDIO_API_KEY"
                ) from None
            if "hostname" in msg or "LABEL_STUDIO_URL" in msg:
                raise ImageAccessDenied(
                    f"cannot download {url}: the Label Studio URL is unknown; set LABEL_STUDIO_URL "
                    "(e.g. http://127.0.0.1:8080)"
                ) from None
            raise ImageNotFound(f"image not found: {url} ({msg})") from None
        except ValueError as e:  # e.g. invalid LABEL_STUDIO_URL, path escaping the root
            raise BadRequest(f"cannot download {url}: {e}") from None
        except OSError as e:
            raise ImageNotFound(f"cannot read the image {url}: {e}") from None
        self.cache.put(creds.key, url, data)
        return data


def _data_uri_bytes(url: str) -> bytes:
    import base64

    head, _, payload = url.partition(",")
    if ";base64" not in head:
        raise BadRequest("data: image URLs must be base64-encoded")
    try:
        return base64.b64decode(payload, validate=False)
    except Exception as e:  # noqa: BLE001
        raise BadRequest(f"the data: image URL is not valid base64: {e}") from None


def fetch_task(creds: Credentials, task_id: int, timeout: float = 30.0) -> dict:
    """One task as Label Studio has it (``/api/tasks/<id>``: its project, data and annotations),
    with its annotations from ``/api/tasks/<id>/annotations/`` where the task answer has none. What
    a webhook says of a task is re-read here before it changes anything."""
    if isinstance(task_id, bool) or not isinstance(task_id, int) or task_id < 0:
        raise BadRequest(f"a task id must be a whole number, got {str(task_id)[:40]!r}")
    task = _get_json(creds, f"/api/tasks/{task_id}", f"task {task_id}", timeout)
    if not isinstance(task, dict):
        raise ImageAccessDenied(f"Label Studio answered task {task_id} with no task object")
    if not isinstance(task.get("annotations"), list):
        anns = _get_json(creds, f"/api/tasks/{task_id}/annotations/", f"the annotations of task {task_id}", timeout)
        task = {**task, "annotations": anns if isinstance(anns, list) else []}
    return task


def _get_json(creds: Credentials, path: str, what: str, timeout: float):
    if not creds.hostname:
        raise ImageAccessDenied("the Label Studio URL is unknown: set LABEL_STUDIO_URL")
    try:
        r = requests.get(f"{creds.hostname}{path}", headers=auth_headers(creds), timeout=timeout)
    except requests.RequestException as e:
        raise ImageAccessDenied(
            f"could not reach Label Studio at {creds.hostname} ({type(e).__name__}); check LABEL_STUDIO_URL") from None
    if r.status_code in (401, 403):
        raise ImageAccessDenied(f"Label Studio refused to show {what} (HTTP {r.status_code}): check LABEL_STUDIO_API_KEY")
    if r.status_code == 404:
        raise ImageNotFound(f"{what} not found at {creds.hostname}")
    if r.status_code != 200:
        raise ImageAccessDenied(f"reading {what} failed with HTTP {r.status_code}")
    try:
        return r.json()
    except ValueError:
        raise ImageAccessDenied(f"Label Studio answered {what} with no JSON") from None


def export_annotated_tasks(creds: Credentials, project_id: int | str, timeout: float = 120.0) -> list[dict]:
    """Finished annotations of a project (annotated tasks only) through the export API."""
    if not creds.hostname:
        raise ImageAccessDenied(
            "the Label Studio URL is unknown: set LABEL_STUDIO_URL so the backend can read the "
            "project's OK-tagged reference images"
        )
    url = f"{creds.hostname}/api/projects/{project_id}/export"
    try:
        r = requests.get(url, params={"exportType": "JSON"}, headers=auth_headers(creds), timeout=timeout)
    except requests.RequestException as e:
        raise ImageAccessDenied(
            f"could not reach Label Studio at {creds.hostname} ({type(e).__name__}); check LABEL_STUDIO_URL"
        ) from None
    if r.status_code in (401, 403):
        raise ImageAccessDenied(
            f"Label Studio refused the project export (HTTP {r.status_code}): set LABEL_STUDIO_API_KEY "
            f"to a valid token of a user who can see project {project_id}"
        )
    if r.status_code == 404:
        raise ImageNotFound(f"project {project_id} not found at {creds.hostname}")
    if r.status_code != 200:
        raise ImageAccessDenied(f"the project export failed with HTTP {r.status_code}: {r.text[:200]}")
    try:
        data = r.json()
    except ValueError:
        raise ImageAccessDenied("the project export is not JSON") from None
    return data if isinstance(data, list) else []


def utcnow() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
