"""Per-project adaptation of the click model (``adclick_core.adaptation``) as a background job.

On ``POST /adapt``, or by itself once a project's reference bank holds
``ADCLICK_ADAPT_MIN_REFERENCES`` defect-free images (0, the default: never) and again each time it
has doubled since the last adaptation, ``AdaptJob`` fine-tunes the click
model on them with synthetic anomalies, writes ``<project dir>/click-<version>.pt`` and swaps it in
for that project's clicks (a ``jobs.BackgroundJob``: atomic, versioned, the previous model kept on
failure). Clicks are answered by the model in use until the new one is loaded. An adapted model
belongs to the click model it started from: with another ``ADCLICK_CHECKPOINT`` it is not used.
"""
from __future__ import annotations

import logging

from .jobs import BackgroundJob, predictor_loader

logger = logging.getLogger(__name__)

CURRENT_FILE = "click_current.json"


def default_adapter(pred, out, iterations: int, progress) -> dict:
    """``adapt_click`` on the predictor's own bank (its references' stored pixels)."""
    from adclick_core.adaptation import AdaptConfig, adapt_click

    return adapt_click(pred, out, AdaptConfig(iterations=iterations), progress=False, callback=progress)


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
        super().__init__(model)

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
        return self.start(f"{references} reference images, ADCLICK_ADAPT_MIN_REFERENCES={minimum}")

    def _train(self) -> dict:
        from adclick_core.adaptation import MIN_REFERENCES

        m, backend = self.m, self.m.backend
        bank = self._reference_bank()
        if len(bank) < MIN_REFERENCES:
            raise ValueError(f"adaptation needs at least {MIN_REFERENCES} defect-free reference images, the project "
                             f"has {len(bank)}: tag more tasks OK")
        base = backend.predictor()
        version = self._new_version()
        path = self.checkpoint_path(version)
        iterations = backend.settings.adapt_iterations
        self._progress(0.0, f"synthetic anomalies on {len(bank)} reference images")
        logger.info("project %s: adapting the click model on %d reference images, %d iterations -> %s",
                    m.project_id, len(bank), iterations, path)
        summary = backend.click_adapter(base.with_bank(bank), path, iterations, self._progress) or {}
        summary = {**summary, "references": len(bank), "base_click_model": backend.click_tag}
        return self._serve(version, path, bank, summary)  # clicks use it from now on
