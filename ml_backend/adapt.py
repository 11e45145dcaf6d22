"""Per-project adaptation of the click model (``adclick_core.training.adaptation``) as a background job.

On ``POST /adapt``, by itself once a project's reference bank holds ``ADCLICK_ADAPT_MIN_REFERENCES``
defect-free images (0, the default: never) and again each time it has doubled since the last
adaptation, and by itself each time ``ADCLICK_LEARN_MASKS`` new brush masks (default 10) have been
submitted, ``AdaptJob`` fine-tunes the click model on the references with synthetic anomalies and
on every brush mask the project's finished annotations hold (exported through Label Studio's
API), writes ``<project dir>/click-<version>.pt`` and swaps it in
for that project's clicks (a ``jobs.BackgroundJob``: atomic, versioned, the previous model kept on
failure). Clicks are answered by the model in use until the new one is loaded. An adapted model
belongs to the click model it started from: with another ``ADCLICK_CHECKPOINT`` it is not used.
"""
from __future__ import annotations

import logging

from .errors import BackendError
from .jobs import BackgroundJob, predictor_loader

logger = logging.getLogger(__name__)

CURRENT_FILE = "click_current.json"


MAX_MASKS = 200  # the most recent brush masks an adaptation learns from at most


def default_adapter(pred, out, iterations: int, progress, masks=()) -> dict:
    """``adapt_click`` on the predictor's own bank (its references' stored pixels) and ``masks``,
    the project's (image, mask) pairs."""
    from adclick_core.training.adaptation import AdaptConfig, adapt_click

    return adapt_click(pred, out, AdaptConfig(iterations=iterations), progress=False, callback=progress,
                       defects=list(masks) or None)


default_click_loader = predictor_loader("ClickPredictor")


class AdaptJob(BackgroundJob):
    """The click model adapted to one project's product, and the job that makes it."""

    title = "click model adaptation"
    current_file = CURRENT_FILE
    version_prefix = "ADClick-adapted-"
    file_prefix = "click"
    started_status, running_status = "adaptation started", "already adapting"

    def __init__(self, model):  # model: ml_backend.model.ADClickModel
        self._auto_tried_at: int | None = None  # references count of the last automatic start
        self.masks_since = 0  # brush masks submitted since the last adaptation started
        super().__init__(model)

    def _on_start(self) -> None:
        self.masks_since = 0  # the run learns from every mask the project has

    def _restore(self) -> None:
        super()._restore()
        base = (self.current.summary.get("base_click_model") if self.current else None)
        if self.current is not None and base != self.m.backend.click_tag:
            logger.info("project %s: adapted click model %s was made from %s, the click model is now %s: not used",
                        self.m.project_id, self.current.version, base, self.m.backend.click_tag)
            self.current = None

    def _loader(self):
        return self.m.backend.click_loader

    def references_adapted(self) -> int:
        return int(self.current.summary.get("references", 0)) if self.current else 0

    def maybe_start(self, references: int) -> dict | None:
        """Start an automatic adaptation where the project has enough references and none was made
        from at least half as many; once per references count (a failure is not retried in a loop)."""
        minimum = self.m.backend.settings.adapt_min_references
        if minimum <= 0 or references < minimum or self.running or references == self._auto_tried_at:
            return None
        if self.current is not None and references < 2 * self.references_adapted():
            return None
        self._auto_tried_at = references
        return self._start_automatically(f"{references} reference images, ADCLICK_ADAPT_MIN_REFERENCES={minimum}")

    def note_mask(self) -> dict | None:
        """A brush mask was submitted (webhook): start an adaptation once ``ADCLICK_LEARN_MASKS`` new
        ones have come in since the last one started."""
        every = self.m.backend.settings.learn_masks
        self.masks_since += 1
        if every <= 0 or self.masks_since < every or self.running:
            return None
        return self._start_automatically(f"{self.masks_since} new brush masks, ADCLICK_LEARN_MASKS={every}")

    def _start_automatically(self, reason: str) -> dict | None:
        # nobody asked for this one: a refusal (the model folder's disk budget) is logged, not answered
        try:
            return self.start(reason)
        except BackendError as e:
            logger.warning("project %s: no automatic adaptation (%s): %s", self.m.project_id, reason, e.message)
            return None

    def _masks(self) -> tuple[list, dict]:
        """The project's brush masks as (image, mask) pairs, the most recent ``MAX_MASKS``; a
        project Label Studio cannot export now adapts without them (and says so)."""
        try:
            items, collected = self._collect(self.m.config, self.m.credentials)
        except BackendError as e:
            logger.warning("project %s: brush masks not read (%s): adapting on the references alone",
                           self.m.project_id, e.message)
            return [], {"masks_error": e.message}
        pairs = [(it.image, it.mask) for it in items if it.mask is not None and it.mask.any()]
        return pairs[-MAX_MASKS:], {"annotated_tasks": collected["exported_tasks"]}

    def _train(self) -> dict:
        from adclick_core.training.adaptation import MIN_REFERENCES

        m, backend = self.m, self.m.backend
        bank = self._reference_bank()
        masks, read = self._masks()
        if len(bank) < MIN_REFERENCES and not masks:
            raise ValueError(f"adaptation needs at least {MIN_REFERENCES} defect-free reference images or some brush "
                             f"masks, the project has {len(bank)} references and no mask: tag more tasks OK")
        base = backend.predictor()
        version = self._new_version()
        path = self.checkpoint_path(version)
        iterations = backend.settings.adapt_iterations
        self._progress(0.0, f"synthetic anomalies on {len(bank)} reference images, {len(masks)} brush masks")
        logger.info("project %s: adapting the click model on %d reference images and %d brush masks, %d iterations "
                    "-> %s", m.project_id, len(bank), len(masks), iterations, path)
        summary = backend.click_adapter(base.with_bank(bank), path, iterations, self._progress, masks) or {}
        summary = {**summary, **read, "references": len(bank), "masks": len(masks),
                   "base_click_model": backend.click_tag}
        return self._serve(version, path, bank, summary)  # clicks use it from now on
