"""Per-project reference banks (defect-free images) for the click model.

Sources, in this order:
* the folder named by ``ADCLICK_REFERENCE_DIR`` (every image under it, sorted), and
* tasks of the project whose latest annotation chooses an OK value in the config's Choices tag
  (read through Label Studio's export API, images fetched like task images).

The bank is built once per project, persisted as ``<model dir>/<project>/bank.safetensors`` with
``bank_sources.json`` (which tasks / files it holds), loaded from there after a restart, and
extended when annotation webhooks bring new OK tags (copy-on-write: requests in flight keep using
the bank they started with). A task that lost its OK tag triggers a rebuild without it.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable

from .convert import LabelConfig, decode_image, first_image_url, latest_annotation, verdict_of
from .errors import BackendError, NoReferences, ServiceUnavailable
from .images import Credentials, ImageLoader, export_annotated_tasks, fetch_task, utcnow

logger = logging.getLogger(__name__)

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
BANK_FILE = "bank.safetensors"
SOURCES_FILE = "bank_sources.json"


def folder_images(folder: str | os.PathLike | None, limit: int) -> list[Path]:
    if not folder:
        return []
    root = Path(folder)
    if not root.is_dir():
        logger.warning("ADCLICK_REFERENCE_DIR=%s is not a folder: ignored", folder)
        return []
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
    return files[:limit]


def ok_tasks(tasks: Iterable[dict], cfg: LabelConfig) -> dict[int, dict]:
    """task id -> task for tasks whose latest non-cancelled annotation says OK."""
    out: dict[int, dict] = {}
    for t in tasks:
        anns = [a for a in (t.get("annotations") or []) if isinstance(a, dict) and not a.get("was_cancelled")]
        if not anns:
            continue
        anns.sort(key=lambda a: (str(a.get("updated_at") or a.get("created_at") or ""), a.get("id") or 0))
        if verdict_of(anns[-1].get("result") or [], cfg) == "OK" and isinstance(t.get("id"), int):
            out[t["id"]] = t
    return out


class ProjectReferences:
    """The reference bank of one project; thread-safe; heavy work on the shared job executor."""

    def __init__(
        self,
        project_dir: Path,
        project_id: str,
        get_extractor: Callable[[], Any],
        get_bank_cls: Callable[[], Any],
        loader: ImageLoader,
        executor: ThreadPoolExecutor,
        reference_dir: str | None,
        max_references: int,
        on_update: Callable[[int], Any] | None = None,
        require_disk: Callable[[str], Any] | None = None,
        shared_lock: Callable[[str, float], Any] | None = None,
    ):
        self.dir = Path(project_dir)
        self.project_id = project_id
        self._get_extractor = get_extractor
        self._get_bank_cls = get_bank_cls  # ReferenceBank (or a stand-in), resolved on first use
        self._loader = loader
        self._executor = executor
        self.reference_dir = reference_dir
        self.max_references = max_references
        self._on_update = on_update  # called with the number of references after each sync / addition
        self._require_disk = require_disk  # raises (507) when the model folder is above its budget
        self._shared_lock = shared_lock  # (name, timeout) -> a lock all replicas see (queue.RedisJobs.lock)
        self.bank = None
        self.sources: list[str] = []  # "task:<id>" / "file:<path>" in bank order
        self.status = "not built"
        self.last_error: str | None = None
        self.last_sync: float = 0.0
        self._lock = threading.RLock()  # guards bank/sources swaps and builds
        self._job = None  # future of the queued/running sync
        self._job_lock = threading.Lock()

    @property
    def building(self) -> bool:
        job = self._job
        return job is not None and not job.done()

    # ---------------------------------------------------------------- info
    def info(self) -> dict:
        return {
            "references": len(self.bank) if self.bank is not None else 0,
            "status": self.status,
            "last_error": self.last_error,
            "sources": {
                "tasks": sum(1 for s in self.sources if s.startswith("task:")),
                "files": sum(1 for s in self.sources if s.startswith("file:")),
            },
        }

    # ---------------------------------------------------------------- persistence
    def _load_persisted(self) -> bool:
        path = self.dir / BANK_FILE
        if not path.is_file():
            return False
        try:
            bank = self._get_bank_cls().load(path)
            meta = json.loads((self.dir / SOURCES_FILE).read_text())
            extractor = self._get_extractor()
            want = getattr(getattr(extractor, "config", None), "fingerprint", None)
            have = getattr(getattr(bank, "backbone", None), "fingerprint", None)
            if callable(want) and callable(have) and want() != have():
                logger.info("project %s: persisted bank was built with another backbone: rebuilding", self.project_id)
                return False
            if meta.get("reference_dir") != (str(self.reference_dir) if self.reference_dir else None):
                logger.info("project %s: ADCLICK_REFERENCE_DIR changed: rebuilding the bank", self.project_id)
                return False
        except Exception as e:  # noqa: BLE001 - a broken file is rebuilt, never fatal
            logger.warning("project %s: cannot load %s (%s): rebuilding", self.project_id, path, e)
            return False
        self.bank = bank
        self.sources = list(meta.get("sources") or [])
        self.status = "ready"
        logger.info("project %s: loaded reference bank with %d images from %s", self.project_id, len(bank), path)
        return True

    def _persist(self) -> None:
        if self.bank is None or len(self.bank) == 0:
            return
        if self._require_disk is not None:
            try:
                self._require_disk(f"saving the reference bank of project {self.project_id}")
            except BackendError as e:  # the bank still answers clicks; it is rebuilt after a restart
                logger.warning("project %s: %s", self.project_id, e.message)
                self.last_error = e.message
                return
        self.dir.mkdir(parents=True, exist_ok=True)
        self.bank.save(self.dir / BANK_FILE)
        tmp = self.dir / (SOURCES_FILE + ".tmp")
        tmp.write_text(json.dumps({
            "sources": self.sources,
            "reference_dir": str(self.reference_dir) if self.reference_dir else None,
            "fingerprint": getattr(self.bank, "fingerprint", None),
            "updated": utcnow(),
        }, indent=1))
        os.replace(tmp, self.dir / SOURCES_FILE)

    # ---------------------------------------------------------------- building
    def _add(self, items: list[tuple[str, Any]]) -> int:
        """Add (source key, image array) pairs to a copy of the bank, then swap it in."""
        if not items:
            return 0
        extractor = self._get_extractor()
        keys = [k for k, _ in items]
        images = [a for _, a in items]
        with self._lock:
            if self.bank is None:
                new = self._get_bank_cls().build(extractor, images, names=keys, progress=False)
                added = len(new)
            else:
                new = copy.copy(self.bank)
                for attr in ("names", "hashes"):
                    if isinstance(getattr(new, attr, None), list):
                        setattr(new, attr, list(getattr(new, attr)))
                added = new.add(extractor, images, names=keys, progress=False)
            self.bank = new
            # Duplicate content is skipped by the bank; remember the source anyway (no re-fetch).
            self.sources = self.sources + [k for k in keys if k not in self.sources]
            self.status = "ready" if len(new) else "empty"
            self._persist()
        return int(added or 0)

    def _fetch_tasks(self, tasks: dict[int, dict], cfg: LabelConfig, creds: Credentials) -> list[tuple[str, Any]]:
        items = []
        for tid, task in sorted(tasks.items()):
            try:
                url = first_image_url(task, cfg)
                data = self._loader.fetch(url, creds, task_id=tid)
                items.append((f"task:{tid}", decode_image(data)))
            except BackendError as e:
                logger.warning("project %s: reference task %s skipped: %s", self.project_id, tid, e.message)
        return items

    def sync(self, cfg: LabelConfig, creds: Credentials, full: bool = False) -> dict:
        """Bring the bank in line with the folder and the project's OK-tagged tasks. With replicas
        (Redis), one builds a project's bank while the others wait and then load it from disk."""
        if self._shared_lock is None:
            return self._sync(cfg, creds, full)
        with self._shared_lock(f"bank-{self.dir.name}", 600.0):
            return self._sync(cfg, creds, full)

    def _sync(self, cfg: LabelConfig, creds: Credentials, full: bool = False) -> dict:
        t0 = time.time()
        with self._lock:
            self.status = "building" if self.bank is None else "updating"
            try:
                if self.bank is None and not full and self._load_persisted():
                    pass
                ok: dict[int, dict] = {}
                export_error = None
                if cfg.choices is not None and cfg.ok_choices:
                    try:
                        ok = ok_tasks(export_annotated_tasks(creds, self.project_id), cfg)
                    except BackendError as e:
                        export_error = e.message
                        logger.warning("project %s: cannot read OK-tagged tasks: %s", self.project_id, e.message)
                have_tasks = {int(s[5:]) for s in self.sources if s.startswith("task:")}
                if export_error is None and (have_tasks - set(ok)):
                    logger.info(
                        "project %s: task(s) %s lost their OK tag: rebuilding the bank without them",
                        self.project_id, sorted(have_tasks - set(ok)),
                    )
                    full = True
                if full:
                    self.bank, self.sources, have_tasks = None, [], set()
                files = folder_images(self.reference_dir, self.max_references)
                room = self.max_references - len(self.sources)
                new_files = [p for p in files if f"file:{p}" not in self.sources][: max(room, 0)]
                items = []
                for p in new_files:
                    try:
                        items.append((f"file:{p}", decode_image(p.read_bytes())))
                    except (BackendError, OSError) as e:
                        logger.warning("reference file %s skipped: %s", p, getattr(e, "message", e))
                room -= len(items)
                new_tasks = {tid: t for tid, t in ok.items() if tid not in have_tasks}
                if room < len(new_tasks):
                    logger.info(
                        "project %s: %d OK tasks, using %d (ADCLICK_MAX_REFERENCES=%d)",
                        self.project_id, len(ok), max(room, 0), self.max_references,
                    )
                    new_tasks = dict(sorted(new_tasks.items())[: max(room, 0)])
                items += self._fetch_tasks(new_tasks, cfg, creds)
                added = self._add(items)
                n = len(self.bank) if self.bank is not None else 0
                self.status = "ready" if n else "empty"
                self.last_error = export_error
                self.last_sync = time.time()
                logger.info(
                    "project %s: reference bank has %d images (+%d) in %.1f s",
                    self.project_id, n, added, time.time() - t0,
                )
            except Exception as e:
                self.status = "error" if self.bank is None else "ready"
                self.last_error = getattr(e, "message", None) or f"{type(e).__name__}: {e}"
                self.last_sync = time.time()
                raise
        self._updated(n)
        return {"references": n, "added": added}

    def _updated(self, references: int) -> None:
        if self._on_update is None or not references:
            return
        try:
            self._on_update(references)
        except Exception:  # noqa: BLE001 - what reacts to a new bank must not fail its sync
            logger.exception("project %s: reacting to the updated reference bank failed", self.project_id)

    def add_task(self, tid: int, cfg: LabelConfig, creds: Credentials) -> int:
        """Add task ``tid``, tagged OK in a webhook, as Label Studio has it: the task is re-read
        through the API (a webhook's body is not trusted: its image URL, verdict and project could be
        forged), and it must belong to this project and its latest annotation must say OK."""
        if isinstance(tid, bool) or not isinstance(tid, int) or f"task:{tid}" in self.sources:
            return 0
        if len(self.sources) >= self.max_references:
            return 0
        task = fetch_task(creds, tid)
        if str(task.get("project")) != str(self.project_id):
            logger.warning("project %s: webhook named task %s of project %s: not added", self.project_id, tid,
                           str(task.get("project"))[:20])
            return 0
        ann = latest_annotation(task)
        if ann is None or verdict_of(ann.get("result") or [], cfg) != "OK":
            logger.info("project %s: task %s is not tagged OK in Label Studio: not added", self.project_id, tid)
            return 0
        with self._lock:
            if self.bank is None:
                self._load_persisted()
            added = self._add(self._fetch_tasks({tid: task}, cfg, creds))
            n = len(self.bank) if self.bank is not None else 0
            logger.info("project %s: task %s tagged OK: reference bank has %d images (+%d)",
                        self.project_id, tid, n, added)
        self._updated(n)
        return added

    # ---------------------------------------------------------------- scheduling
    def schedule_sync(self, cfg: LabelConfig, creds: Credentials, full: bool = False):
        """Queue a sync on the shared executor; at most one queued or running sync per project."""
        with self._job_lock:
            if self._job is not None and not self._job.done():
                return self._job
            self._job = self._executor.submit(self._run_logged, self.sync, cfg, creds, full)
            return self._job

    def schedule(self, fn: Callable, *args, **kwargs):
        """Queue any other job (e.g. ``add_task``) on the shared executor."""
        return self._executor.submit(self._run_logged, fn, *args, **kwargs)

    def _run_logged(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except BackendError as e:
            logger.warning("project %s: reference bank: %s", self.project_id, e.message)
            self.last_error = e.message
        except Exception as e:  # noqa: BLE001 - background jobs log, never kill the executor
            logger.exception("project %s: reference job failed: %s", self.project_id, e)
        return None

    def require_bank(self, cfg: LabelConfig, creds: Credentials, wait_s: float, refresh_s: float):
        """The bank for a click; builds it on first use (waiting at most ``wait_s``)."""
        if self.bank is None:
            fut = self.schedule_sync(cfg, creds)
            try:
                fut.result(timeout=wait_s)
            except TimeoutError:
                raise ServiceUnavailable(
                    f"the reference bank of project {self.project_id} is still being built from its "
                    "OK-tagged images; click again in a moment"
                ) from None
        elif refresh_s > 0 and time.time() - self.last_sync > refresh_s:
            self.schedule_sync(cfg, creds)  # in the background; this click uses the current bank
        bank = self.bank
        if bank is None or len(bank) == 0:
            hint = []
            if cfg.choices is not None and cfg.ok_choices:
                hint.append(
                    f'tag a few defect-free tasks "{cfg.ok_choices[0]}" in <Choices name="{cfg.choices.name}"> '
                    "and submit them"
                )
            else:
                hint.append("add a <Choices> tag with an OK choice to the label config and tag defect-free tasks OK")
            hint.append("or set ADCLICK_REFERENCE_DIR to a folder of defect-free images")
            extra = f" (last error: {self.last_error})" if self.last_error else ""
            raise NoReferences(
                f"project {self.project_id} has no defect-free reference images yet: ADClick compares each "
                f"image with defect-free ones of the same product; {', '.join(hint)}{extra}"
            )
        return bank
