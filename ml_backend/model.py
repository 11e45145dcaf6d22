"""The model class Label Studio users know (``setup / predict / fit / model_version``), one per
project, created lazily and cached per process, plus the process-wide ``Backend`` that owns what
is shared: the click model weights (loaded once), the per-image state cache, the image loader and
the background job thread.

Environment variables: see ``ml_backend/_wsgi.py``.
"""
from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .adapt import AdaptJob, default_adapter, default_click_loader
from .cache import StateCache, StateEntry, estimate_nbytes
from .convert import (
    LabelConfig,
    brush_label_for,
    context_clicks,
    check_image,
    decode_image,
    first_image_url,
    has_brush_mask,
    mask_to_result,
    parse_label_config,
    verdict_of,
)
from .convert import NG_CHOICE_NAMES, OK_CHOICE_NAMES
from .budget import check_deadline
from .env import env_float
from .errors import BackendError, BadRequest, ServiceUnavailable
from .images import Credentials, ImageLoader, utcnow
from .references import ProjectReferences
from .seg import SegJob, default_loader, default_trainer

logger = logging.getLogger(__name__)

INTERACTIVE_HINT = (
    "Smart tools do nothing? In the project's Settings > Model, turn on 'Interactive preannotations' "
    "for this backend; on the labeling page switch on 'Auto-Annotation', pick the smart KeyPoint "
    "label and click the defect (Alt+click = negative click)."
)


@dataclass
class Settings:
    model_dir: Path = field(default_factory=lambda: Path(os.path.expanduser("~/.adclick/models")))
    checkpoint: str | None = None
    device: str = "auto"
    state_cache_mb: float = 512.0
    image_cache_mb: float = 1024.0
    image_cache_dir: str | None = None
    threshold: float = 0.5
    reference_dir: str | None = None
    max_references: int = 200
    bank_wait_s: float = 80.0
    bank_refresh_s: float = 600.0
    seg_iterations: int = 600
    seg_threshold: float | None = None  # None: the threshold calibrated at training (in the checkpoint)
    # What Start Training continues from: None = adclick_core/weights/adclick_seg_pretrained.pt if a
    # deployment installed one (none is shipped), "none" = a new model, else a checkpoint path
    # (ADCLICK_SEG_INIT).
    seg_init: str | None = None
    train_every: int = 0
    # Adapt by itself from this many references (0: only on POST /adapt). Measured on products the
    # click model never saw: 60 references (metal plate) and 200 (a hidden bottle product) gain at
    # every click count, 18 weak ones (glass edge) lose (docs/results.md).
    adapt_min_references: int = 50
    adapt_iterations: int = 300
    learn_masks: int = 10  # adapt to the project's own brush masks after this many new ones (0: only POST /adapt)
    max_projects: int = 100  # live projects in memory; the least recently used idle one is evicted
    project_idle_s: float = 3600.0  # a project unused this long leaves memory (its files stay)
    max_disk_mb: float = 20000.0  # ADCLICK_MODEL_DIR budget: above it nothing new is written there

    @classmethod
    def from_env(cls) -> "Settings":
        return cls(
            model_dir=Path(os.path.expanduser(os.environ.get("ADCLICK_MODEL_DIR") or "~/.adclick/models")),
            checkpoint=os.environ.get("ADCLICK_CHECKPOINT") or None,
            device=os.environ.get("ADCLICK_DEVICE") or "auto",
            state_cache_mb=env_float("ADCLICK_STATE_CACHE_MB", 512.0),
            image_cache_mb=env_float("ADCLICK_IMAGE_CACHE_MB", 1024.0),
            image_cache_dir=os.environ.get("ADCLICK_IMAGE_CACHE_DIR") or None,
            threshold=env_float("ADCLICK_MASK_THRESHOLD", 0.5),
            reference_dir=os.environ.get("ADCLICK_REFERENCE_DIR") or None,
            max_references=int(env_float("ADCLICK_MAX_REFERENCES", 200)),
            bank_wait_s=env_float("ADCLICK_BANK_WAIT_S", 80.0),
            bank_refresh_s=env_float("ADCLICK_BANK_REFRESH_S", 600.0),
            seg_iterations=max(1, int(env_float("ADCLICK_SEG_ITERATIONS", 600))),
            seg_threshold=env_float("ADCLICK_SEG_THRESHOLD", None),
            seg_init=os.environ.get("ADCLICK_SEG_INIT") or None,
            train_every=max(0, int(env_float("ADCLICK_TRAIN_EVERY", 0))),
            adapt_min_references=max(0, int(env_float("ADCLICK_ADAPT_MIN_REFERENCES", 50))),
            adapt_iterations=max(1, int(env_float("ADCLICK_ADAPT_ITERATIONS", 300))),
            learn_masks=max(0, int(env_float("ADCLICK_LEARN_MASKS", 10))),
            max_projects=max(1, int(env_float("ADCLICK_MAX_PROJECTS", 100))),
            project_idle_s=env_float("ADCLICK_PROJECT_IDLE_S", 3600.0, positive=True),
            max_disk_mb=env_float("ADCLICK_MAX_DISK_MB", 20000.0, positive=True),
        )

    def seg_init_checkpoint(self) -> Path | None:
        """The checkpoint Start Training continues from (``seg_init``), or None for a new model."""
        from adclick_core.utils.checkpoint import SHIPPED_SEG_CHECKPOINT

        value = (self.seg_init or "").strip()
        if value.lower() in ("none", "off", "scratch"):
            return None
        if value:
            return Path(os.path.expanduser(value))
        return SHIPPED_SEG_CHECKPOINT if SHIPPED_SEG_CHECKPOINT.is_file() else None


def _init_name(path: Path | None) -> str:
    """What /health says Start Training starts from (a file name, never the server's folders)."""
    return "a new model" if path is None else path.name


def parse_project(project: Any) -> tuple[str, str | None]:
    """Label Studio's project field -> (id, uid). ``"12.1700000000"`` -> ("12", "12.1700000000");
    a webhook's project object -> its id and the same uid Label Studio uses for /setup."""
    if isinstance(project, dict):
        pid = project.get("id")
        if pid is None:
            raise BadRequest("the project object has no 'id'")
        if isinstance(pid, bool) or not (isinstance(pid, int) or (isinstance(pid, str) and pid.strip().isdigit())):
            raise BadRequest(f"the project's 'id' must be a whole number, got {str(pid)[:40]!r}")
        pid = int(pid)
        uid = None
        created = project.get("created_at")
        if isinstance(created, str):
            try:
                ts = datetime.fromisoformat(created.replace("Z", "+00:00")).timestamp()
                uid = f"{pid}.{int(ts)}"
            except (ValueError, OverflowError):
                pass
        return str(pid), uid
    if isinstance(project, bool) or project is None:
        raise BadRequest("the request has no 'project'")
    s = str(project).strip()
    pid = s.split(".", 1)[0]
    if not pid.isdigit():
        raise BadRequest(f"'project' must look like '<id>.<created timestamp>', got {project!r}")
    return pid, (s if "." in s else None)


def click_model_tag(checkpoint: str | None) -> str:
    """A short version tag of the click model that needs no weights loaded (setup has 3 s):
    the checkpoint's name plus a hash of its path, size and mtime (a retrained file = a new tag)."""
    if checkpoint:
        p = Path(checkpoint)
    else:
        try:
            from adclick_core.utils.checkpoint import SHIPPED_CLICK_CHECKPOINT as p
        except ImportError:
            return "click-embedded"
    try:
        st = p.stat()
        h = hashlib.sha1(f"{p.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:8]
    except OSError:
        h = "missing"
    return f"click-{'' if checkpoint else 'embedded-'}{p.stem}-{h}"


class Backend:
    """Process-wide shared resources and the per-project model instances."""

    def __init__(
        self,
        settings: Settings | None = None,
        predictor_factory: Callable[[], Any] | None = None,
        bank_cls: Any = None,
        loader: ImageLoader | None = None,
        seg_trainer: Callable | None = None,
        seg_loader: Callable | None = None,
        click_adapter: Callable | None = None,
        click_loader: Callable | None = None,
        queue: Any = None,
    ):
        self.settings = settings or Settings.from_env()
        # Redis (REDIS_URL / REDIS_HOST): trainings go to queue workers; False: always in this process
        if queue is None:
            from .queue import RedisJobs

            queue = RedisJobs.from_env()
        self.queue = queue or None
        self._predictor_factory = predictor_factory or self._default_predictor
        self._bank_cls = bank_cls
        self.seg_trainer = seg_trainer or default_trainer  # (items, extractor, bank, iterations, rcfg, types, out, progress, device)
        self.seg_loader = seg_loader or default_loader  # (path, bank, device, extractor) -> SegPredictor
        # (predictor, out, iterations, progress, masks) -> summary; masks: the project's (image, mask) pairs
        self.click_adapter = click_adapter or default_adapter
        self.click_loader = click_loader or default_click_loader  # (path, bank, device, extractor) -> ClickPredictor
        self.loader = loader or ImageLoader(self.settings.image_cache_dir, self.settings.image_cache_mb)
        self.cache = StateCache(int(self.settings.state_cache_mb * 1024 * 1024))
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adclick-jobs")
        self.training_lock = threading.Lock()  # one training (ADClick-Seg or adaptation) at a time
        self._predictor = None
        self._predictor_error: str | None = None
        self._predictor_lock = threading.Lock()
        self._models: dict[str, "ADClickModel"] = {}
        self._models_lock = threading.Lock()
        self._disk_checked: tuple[float, float] = (-1e9, 0.0)
        self.started = utcnow()
        self.click_tag = click_model_tag(self.settings.checkpoint)
        self.stats = {"clicks": 0, "cold_clicks": 0, "errors_4xx": 0, "errors_5xx": 0}

    # ------------------------------------------------------------ shared model
    def _default_predictor(self):
        from adclick_core.inference.predictor import ClickPredictor

        return ClickPredictor.from_checkpoint(self.settings.checkpoint, device=self.settings.device)

    @property
    def bank_cls(self):
        if self._bank_cls is None:
            from adclick_core.features.reference import ReferenceBank

            self._bank_cls = ReferenceBank
        return self._bank_cls

    def predictor(self):
        """The click model, loaded once per process (thread-safe)."""
        if self._predictor is not None:
            return self._predictor
        with self._predictor_lock:
            if self._predictor is None:
                t0 = time.time()
                try:
                    self._predictor = self._predictor_factory()
                except ImportError as e:
                    self._predictor_error = f"the click model is not available: {e}"
                    raise ServiceUnavailable(self._predictor_error) from None
                except Exception as e:
                    from adclick_core.utils.errors import AdclickError

                    if isinstance(e, AdclickError):
                        self._predictor_error = f"{type(e).__name__}: {e}"
                        raise ServiceUnavailable(
                            f"the click model could not be loaded: {e} (ADCLICK_CHECKPOINT="
                            f"{self.settings.checkpoint or 'embedded default'})"
                        ) from None
                    self._predictor_error = f"{type(e).__name__}: {e}"
                    raise
                self._predictor_error = None
                logger.info("click model loaded in %.1f s (%s)", time.time() - t0, self.click_tag)
        return self._predictor

    def preload(self) -> None:
        try:
            self.predictor()
        except Exception as e:  # noqa: BLE001 - reported by /health and on the first click
            logger.error("preloading the click model failed: %s", e)

    # ------------------------------------------------------------ projects
    def model_for(
        self, project: Any, label_config: str | None = None, hostname: str | None = None,
        access_token: str | None = None,
    ) -> "ADClickModel":
        pid, uid = parse_project(project)
        with self._models_lock:
            m = self._models.get(pid)
            if m is not None and uid and m.uid and uid != m.uid:
                logger.info("project %s was re-created in Label Studio (%s -> %s): new model", pid, m.uid, uid)
                m = None
            self._evict_locked(keep=pid, room_for_one=m is None)
            if m is None:
                m = ADClickModel(pid, self, uid=uid)
                self._models[pid] = m
            m.last_used = time.monotonic()
        m.update(label_config=label_config, hostname=hostname, access_token=access_token, uid=uid)
        return m

    def _evict_locked(self, keep: str, room_for_one: bool) -> None:
        """Projects leave memory when idle for ``project_idle_s`` or, least recently used first, when
        a new one needs room above ``max_projects``; their files stay and load again on next use. A
        project with a job or bank build running stays; if none can leave, the new one is a 503."""
        now = time.monotonic()
        # least recently used first; busy() (a queue read with Redis) only for those that would leave
        for m in sorted((m for pid, m in self._models.items() if pid != keep), key=lambda m: m.last_used):
            crowded = room_for_one and len(self._models) >= self.settings.max_projects
            if not crowded and now - m.last_used < self.settings.project_idle_s:
                break
            if m.busy():
                continue
            del self._models[m.project_id]
            logger.info("project %s left memory (%s); its files stay in %s", m.project_id,
                        "ADCLICK_MAX_PROJECTS" if crowded else "idle", m.dir)
        if room_for_one and len(self._models) >= self.settings.max_projects:
            raise ServiceUnavailable(f"{len(self._models)} projects are busy (ADCLICK_MAX_PROJECTS="
                                     f"{self.settings.max_projects}): try again when a job has finished")

    def disk_used_mb(self) -> float:
        """Size of ADCLICK_MODEL_DIR (cached for 30 s: a walk of the folder is not free)."""
        now = time.monotonic()
        if now - self._disk_checked[0] > 30.0:
            total = 0
            for f in self.settings.model_dir.rglob("*"):
                try:
                    total += f.stat().st_size if f.is_file() else 0
                except OSError:
                    pass
            self._disk_checked = (now, total / 2**20)
        return self._disk_checked[1]

    def require_disk(self, what: str) -> None:
        """507 before ``what`` writes to ADCLICK_MODEL_DIR when the folder is above ADCLICK_MAX_DISK_MB."""
        used = self.disk_used_mb()
        if used > self.settings.max_disk_mb:
            raise BackendError(f"{what}: ADCLICK_MODEL_DIR holds {used:,.1f} MB, above ADCLICK_MAX_DISK_MB "
                               f"({self.settings.max_disk_mb:,g}); remove old projects' folders or raise the bound",
                               status=507)

    def models(self) -> list["ADClickModel"]:
        with self._models_lock:
            return list(self._models.values())

    def health(self) -> dict:
        loaded = self._predictor is not None
        return {
            "status": "UP",
            "model_class": "ADClickModel",
            "model_version": f"ADClick-{self.click_tag}",
            "click_model": {
                "loaded": loaded,
                "checkpoint": self.settings.checkpoint or "embedded default",
                "device": str(getattr(self._predictor, "device", self.settings.device)) if loaded else self.settings.device,
                "error": self._predictor_error,
            },
            "seg_model": {
                "iterations": self.settings.seg_iterations,
                "threshold": (self.settings.seg_threshold if self.settings.seg_threshold is not None
                              else "calibrated per model"),
                "train_every": self.settings.train_every,
                "starts_from": _init_name(self.settings.seg_init_checkpoint()),
                "projects": {m.project_id: m.seg.current.version for m in self.models() if m.seg.current},
            },
            "training": {m.project_id: m.seg.status() for m in self.models()},
            "adaptation": {
                "min_references": self.settings.adapt_min_references,
                "learn_masks": self.settings.learn_masks,
                "iterations": self.settings.adapt_iterations,
                "projects": {m.project_id: m.adapt.status() for m in self.models()},
            },
            "state_cache": self.cache.stats(),
            "projects": {m.project_id: m.info() for m in self.models()},
            "stats": dict(self.stats),
            "started": self.started,
            "hint": INTERACTIVE_HINT,
        }

    def versions(self) -> list[str]:
        return sorted({m.model_version for m in self.models()} | {f"ADClick-{self.click_tag}"})


class ADClickModel:
    """One Label Studio project: ``setup()``, ``predict(tasks, context)``, ``fit(event, data)``."""

    def __init__(self, project_id: str, backend: Backend, uid: str | None = None):
        self.project_id = project_id
        self.uid = uid
        self.backend = backend
        self.label_config_xml: str | None = None
        self._cfg: LabelConfig | None = None
        self._cfg_error: str | None = None
        self.hostname: str | None = None
        self.access_token: str | None = None
        dir_name = f"project-{uid.replace('.', '-')}" if uid else f"project-{project_id}"
        self.dir = backend.settings.model_dir / dir_name
        self.references = ProjectReferences(
            self.dir, project_id,
            get_extractor=lambda: backend.predictor().extractor,
            get_bank_cls=lambda: backend.bank_cls,
            loader=backend.loader,
            executor=backend.executor,
            reference_dir=backend.settings.reference_dir,
            max_references=backend.settings.max_references,
            on_update=lambda n: self.adapt.maybe_start(n),
            require_disk=backend.require_disk,
            shared_lock=backend.queue.lock if backend.queue is not None else None,
        )
        self._pred_for_bank: tuple[tuple[str, int], Any] | None = None
        self._lock = threading.Lock()
        self.seg = SegJob(self)
        self.adapt = AdaptJob(self)
        self.last_used = time.monotonic()

    def busy(self) -> bool:
        """A job or a reference-bank build is running: the project must stay in memory."""
        return self.seg.running or self.adapt.running or self.references.building

    # ------------------------------------------------------------ state
    def update(self, label_config=None, hostname=None, access_token=None, uid=None) -> None:
        with self._lock:
            if uid and not self.uid:
                self.uid = uid
            if hostname:
                self.hostname = hostname
            if access_token:
                self.access_token = access_token
            if label_config and label_config != self.label_config_xml:
                self.label_config_xml = label_config
                try:
                    self._cfg = parse_label_config(label_config)
                    self._cfg_error = None
                    for w in self._cfg.warnings:
                        logger.warning("project %s: %s", self.project_id, w)
                except BadRequest as e:
                    self._cfg = None
                    self._cfg_error = e.message

    @property
    def config(self) -> LabelConfig:
        if self._cfg is None:
            raise BadRequest(
                self._cfg_error
                or f"project {self.project_id}: no label config yet (send label_config with /predict or /setup)"
            )
        return self._cfg

    @property
    def credentials(self) -> Credentials:
        return Credentials.resolve(self.hostname, self.access_token)

    @property
    def click_version(self) -> str:
        """The project's click model: its adapted version once there is one, else the shared one's tag."""
        self.adapt.refresh()
        adapted = self.adapt.current
        return adapted.version if adapted is not None else f"ADClick-{self.backend.click_tag}"

    @property
    def model_version(self) -> str:
        """The ADClick-Seg version once one is trained (Label Studio re-predicts tasks whose
        prediction has another version), else the click model's."""
        self.seg.refresh()
        seg = self.seg.current
        return seg.version if seg is not None else self.click_version

    def info(self) -> dict:
        return {
            "uid": self.uid,
            "model_version": self.model_version,
            "label_config": "ok" if self._cfg else (self._cfg_error or "not received"),
            "reference_bank": self.references.info(),
            "click_model": self.click_version,
            "seg_model": self.seg.current.version if self.seg.current else None,
            "training": self.seg.status(),
            "adaptation": self.adapt.status(),
        }

    # ------------------------------------------------------------ the familiar API
    def setup(self) -> dict:
        """Validate the config and start building the reference bank in the background."""
        cfg = self.config  # raises BadRequest for a config without our tags
        # Label Studio calls /setup often (every state check): sync at most once per refresh period.
        refs = self.references
        if refs.bank is None and refs.status != "error" or (
            time.time() - refs.last_sync > max(self.backend.settings.bank_refresh_s, 60.0)
        ):
            refs.schedule_sync(cfg, self.credentials)
        return {"model_version": self.model_version}

    def predict(self, tasks: list[dict], context: dict | None = None, **kwargs) -> list[dict]:
        if not isinstance(tasks, list) or not tasks:
            raise BadRequest("'tasks' must be a non-empty list of tasks")
        cfg = self.config
        out = []
        for t in tasks:
            check_deadline()  # a long batch stops with a 503 between tasks, not minutes later
            out.append(self._preannotate(t, cfg) if context is None else self._interactive(t, context, cfg))
        return out

    def fit(self, event: str, data: dict, **kwargs) -> dict:
        if event == "START_TRAINING":
            self.config  # a project without a usable config cannot train: 4xx with the reason
            return self.seg.start("Start Training")
        if event in ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_CREATED"):
            return self._on_annotation(data)
        if event in ("ANNOTATIONS_DELETED", "TASKS_DELETED"):
            if self._cfg is not None and self.references.bank is not None:
                self.references.schedule_sync(self._cfg, self.credentials)
            return {"status": "ok", "action": event, "message": "reference bank re-sync queued"}
        return {"status": "ignored", "action": event}

    # ------------------------------------------------------------ webhooks
    def _on_annotation(self, data: dict) -> dict:
        if self._cfg is None:
            return {"status": "ignored", "message": "no label config known for this project yet"}
        cfg = self._cfg
        ann = data.get("annotation") if isinstance(data.get("annotation"), dict) else {}
        task = data.get("task") if isinstance(data.get("task"), dict) else {}
        verdict = verdict_of(ann.get("result") or [], cfg)
        tid = task.get("id")
        every = self.backend.settings.train_every
        submitted = data.get("action") in ("ANNOTATION_CREATED", "ANNOTATION_UPDATED") and not ann.get("was_cancelled")
        if every > 0 and submitted:
            self.seg.annotations_since += 1
            if self.seg.annotations_since >= every and not self.seg.running:
                self.seg.start(f"{self.seg.annotations_since} new annotations, ADCLICK_TRAIN_EVERY={every}")
        if submitted and has_brush_mask(ann.get("result") or [], cfg):
            self.adapt.note_mask()
        if verdict == "OK" and isinstance(tid, int) and not ann.get("was_cancelled"):
            if self.references.bank is None:
                self.references.schedule_sync(cfg, self.credentials)
            else:
                creds = self.credentials
                self.references.schedule(self.references.add_task, tid, cfg, creds)
            return {"status": "ok", "message": f"task {tid} tagged OK: added to the reference bank in the background"}
        if isinstance(tid, int) and f"task:{tid}" in self.references.sources:
            self.references.schedule_sync(cfg, self.credentials)
            return {"status": "ok", "message": f"task {tid} is no longer OK: reference bank re-sync queued"}
        return {"status": "ok"}

    # ------------------------------------------------------------ predictions
    def _preannotate(self, task: dict, cfg: LabelConfig) -> dict:
        tid = task.get("id") if isinstance(task, dict) else None
        self.seg.refresh()  # a model a queue worker or another replica recorded since
        if self.seg.current is None:
            logger.info(
                "project %s: task %s: no pre-annotation: no ADClick-Seg model for this project yet "
                "(press Start Training after annotating a few images)", self.project_id, tid,
            )
            return {"result": [], "score": 0.0, "model_version": self.model_version}
        version = self.seg.current.version
        try:
            return self._seg_predict(task, cfg)
        except BackendError as e:  # one bad task must not drop the whole batch
            logger.warning("project %s: task %s: no pre-annotation: %s", self.project_id, tid, e.message)
        except Exception as e:  # noqa: BLE001
            logger.exception("project %s: task %s: pre-annotation failed: %s", self.project_id, tid, e)
        return {"result": [], "score": 0.0, "model_version": version}

    def _seg_predict(self, task: dict, cfg: LabelConfig) -> dict:
        from adclick_core.inference.regions import defect_regions

        t0 = time.perf_counter()
        seg_version = self.seg.current.version
        entry, bank, pred, data = self._image_state(task, cfg)
        seg = self.seg.predictor(bank)
        same_residuals = (
            getattr(getattr(seg, "residual_config", None), "to_dict", lambda: None)()
            == getattr(getattr(pred, "residual_config", None), "to_dict", lambda: None)()
        )
        known = list(getattr(seg, "defect_types", None) or cfg.defect_types)
        types = [t for t in cfg.defect_types if t in known] or known
        if same_residuals:
            state = entry.state
        else:  # a checkpoint trained with other residual settings: its own state (not cached)
            state = seg.with_bank(bank).set_image(decode_image(data))
        per_type = seg.predict_per_type(state, types)
        thr = self.backend.settings.seg_threshold
        if thr is None:
            thr = float(getattr(seg, "threshold", 0.5))
        result, seen = [], []
        image_score = 0.0
        for t, prob in per_type.items():
            prob = np.asarray(prob, dtype=np.float32)
            image_score = max(image_score, float(prob.max(initial=0.0)))
            if any(prob is p for p in seen):  # a model without language gives one map for all types
                continue
            seen.append(prob)
            label = brush_label_for(t, cfg)
            for region in defect_regions(prob, thr):
                result.append(mask_to_result(region.mask, cfg, label, region.score, entry.width, entry.height,
                                             region_id=uuid.uuid4().hex[:10]))
        if cfg.choices is not None:
            verdict = _choice_value(cfg, "NG" if image_score >= thr else "OK")
            if verdict is not None:
                result.append({"from_name": cfg.choices.name, "to_name": cfg.choices.to_name, "type": "choices",
                               "score": image_score, "value": {"choices": [verdict]}})
        logger.info("project %s task %s: ADClick-Seg %s: %d region(s), image score %.3f, %.0f ms",
                    self.project_id, task.get("id"), seg_version, sum(r["type"] == "brushlabels" for r in result),
                    image_score, (time.perf_counter() - t0) * 1e3)
        return {"result": result, "score": image_score, "model_version": seg_version}

    def click_predictor(self, bank):
        """The project's click model (adapted, or the shared one) on ``bank``. Its image states are
        the shared model's too: an adapted model keeps the backbone and residual config."""
        base = self.backend.predictor()
        adapted = self.adapt.predictor(bank)
        key = (str(bank.fingerprint), id(adapted))
        cached = self._pred_for_bank
        if cached is not None and cached[0] == key:
            return cached[1]
        pred = (adapted or base).with_bank(bank)
        self._pred_for_bank = (key, pred)
        return pred

    def _image_state(self, task: dict, cfg: LabelConfig, with_timings: bool = False):
        """Fetch the task image and get its cached residual state (computed once per image, bank and
        click model). Returns (entry, bank, click predictor, image bytes)."""
        from adclick_core.utils.errors import EmptyBankError, InputError

        t0 = time.perf_counter()
        if not isinstance(task, dict):
            raise BadRequest("each task must be an object")
        url = first_image_url(task, cfg)
        creds = self.credentials
        data = self.backend.loader.fetch(url, creds, task_id=task.get("id"))
        check_image(data)  # a refused image starts no bank build
        digest = hashlib.sha1(data).hexdigest()
        t_fetch = time.perf_counter()
        self.backend.predictor()  # a model that cannot load is a 503, not "no references"
        bank = self.references.require_bank(
            cfg, creds, self.backend.settings.bank_wait_s, self.backend.settings.bank_refresh_s
        )
        pred = self.click_predictor(bank)
        t_bank = time.perf_counter()
        key = (digest, str(bank.fingerprint), self.backend.click_tag)

        def create() -> StateEntry:
            image = decode_image(data)
            check_deadline()
            try:
                state = pred.set_image(image)
            except EmptyBankError as e:
                raise BadRequest(str(e), status=409) from None
            except InputError as e:
                raise BadRequest(f"the image cannot be used: {e}") from None
            return StateEntry(state, image.shape[1], image.shape[0], estimate_nbytes(state))

        entry, cached = self.backend.cache.get_or_create(key, create)
        t_state = time.perf_counter()
        if with_timings:
            return entry, bank, pred, cached, key, (t_fetch - t0, t_bank - t_fetch, t_state - t_bank)
        return entry, bank, pred, data

    def _interactive(self, task: dict, context: dict, cfg: LabelConfig) -> dict:
        from adclick_core.utils.errors import InputError

        t0 = time.perf_counter()
        if not isinstance(task, dict):
            raise BadRequest("each task must be an object")
        # Validate the clicks' shape before any expensive work (sizes checked below).
        context_clicks(context, cfg, None, None)
        entry, bank, pred, cached, key, (d_fetch, d_bank, d_state) = self._image_state(task, cfg, with_timings=True)
        t_state = time.perf_counter()
        cc = context_clicks(context, cfg, entry.width, entry.height)
        clicks = tuple(cc.clicks)
        answer_key = (self.click_version, cc.label)  # an adapted model does not reuse the shared one's answers
        with entry.lock:
            prev = entry.last.get(answer_key)
            prev_mask = None
            prob = None
            if prev is not None:
                prev_clicks, prev_prob = prev
                if prev_clicks == clicks:
                    prob = prev_prob.astype(np.float32)  # the same request again (retry)
                elif len(prev_clicks) < len(clicks) and clicks[: len(prev_clicks)] == prev_clicks:
                    prev_mask = prev_prob.astype(np.float32)
            if prob is None:
                try:
                    prob = pred.predict(entry.state, list(clicks), prev_mask=prev_mask, defect_type=cc.label)
                except InputError as e:
                    raise BadRequest(f"bad clicks: {e}") from None
                prob = np.asarray(prob, dtype=np.float32)
                if prob.shape != (entry.height, entry.width):
                    raise RuntimeError(
                        f"the click model returned a {prob.shape} map for a {entry.height}x{entry.width} image"
                    )
                entry.last[answer_key] = (clicks, prob.astype(np.float16))
        self.backend.cache.touch_size(key)
        mask = prob >= self.backend.settings.threshold
        score = float(prob[mask].mean()) if mask.any() else 0.0
        brush_label = brush_label_for(cc.label, cfg)
        result = []
        if mask.any():
            result.append(mask_to_result(mask, cfg, brush_label, score, entry.width, entry.height,
                                         region_id=uuid.uuid4().hex[:10]))
        t_end = time.perf_counter()
        self.backend.stats["clicks"] += 1
        if not cached:
            self.backend.stats["cold_clicks"] += 1
        logger.info(
            "project %s task %s: %d click(s) [%s] label=%s %s: fetch %.0f ms, bank %.0f ms, state %.0f ms, "
            "predict %.0f ms, total %.0f ms, mask %d px",
            self.project_id, task.get("id"), len(clicks),
            "".join("+" if c.positive else "-" for c in clicks), cc.label,
            "warm" if cached else "cold", d_fetch * 1e3, d_bank * 1e3, d_state * 1e3,
            (t_end - t_state) * 1e3, (t_end - t0) * 1e3, int(mask.sum()),
        )
        return {"result": result, "score": score, "model_version": self.model_version}



def _choice_value(cfg: LabelConfig, verdict: str) -> str | None:
    """The config's Choice value for "OK" / "NG" (e.g. "OK", "Good", "NG", "Defective")."""
    names = OK_CHOICE_NAMES if verdict == "OK" else NG_CHOICE_NAMES
    for c in cfg.choices.labels if cfg.choices else ():
        if c.strip().lower() in names:
            return c
    return None
