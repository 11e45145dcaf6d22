"""ADClick-Seg per project: the background training job (Start Training) and the trained model
that answers pre-annotation.

``SegJob`` (a ``jobs.BackgroundJob``: answers at once, one run per project at a time, atomic
swap, the previous model kept on failure) exports the project's finished annotations through
Label Studio's API, turns them into ``SegItem``s (``convert.task_labels`` /
``convert.seg_items_of``), downloads the images with the shared loader, trains with
``adclick_core.training.seg.train_seg`` on the project's reference bank with the click model's
backbone and residual config, writes ``<project dir>/seg-<version>.pt`` and swaps it in: the
project's ``model_version`` changes after the file is complete.
"""
from __future__ import annotations

import logging

from .jobs import BackgroundJob, predictor_loader

logger = logging.getLogger(__name__)

CURRENT_FILE = "seg_current.json"


def default_trainer(items, extractor, bank, iterations, residual_config, defect_types, out, progress, device,
                    init=None):
    """Calls ``train_seg``, continuing from ``init`` (a pre-trained checkpoint) when given; without
    a text encoder installed, trains without the language branch (and from scratch: the
    pre-trained model has one)."""
    from adclick_core.utils.errors import MissingWeightsError
    from adclick_core.training.seg import SegTrainConfig, train_seg

    kw = dict(residual_config=residual_config, defect_types=list(defect_types), out=out, progress=progress,
              device=device)
    try:
        return train_seg(items, extractor, bank, SegTrainConfig(iterations=iterations), init=init, **kw)
    except MissingWeightsError as e:
        if init is not None and str(init) in str(e):
            raise
        logger.warning("ADClick-Seg: no text encoder (%s): training without the language branch, from scratch", e)
        return train_seg(items, extractor, bank, SegTrainConfig(iterations=iterations, language=False), **kw)


default_loader = predictor_loader("SegPredictor")


class SegJob(BackgroundJob):
    """ADClick-Seg training (Start Training) and the current ADClick-Seg model of one project."""

    title = "ADClick-Seg training"
    current_file = CURRENT_FILE
    version_prefix = "ADClick-Seg-"
    file_prefix = "seg"
    started_status, running_status = "training started", "already training"

    def __init__(self, model):  # model: ml_backend.model.ADClickModel
        self.annotations_since = 0
        super().__init__(model)

    def _on_start(self) -> None:
        self.annotations_since = 0

    def _loader(self):
        return self.m.backend.seg_loader

    def _prompt_boxes(self, items: list, pred) -> list:
        """Box-only items -> the click model's answer to the box (``adclick_core.inference.box_prompts``), so a
        rectangle trains like the clicks an annotator would have made inside it."""
        from adclick_core.inference.box_prompts import box_prompted_item
        from adclick_core.training.seg import item_label_kind

        n = sum(item_label_kind(it) == "boxes" for it in items)
        out, done = [], 0
        for it in items:
            if item_label_kind(it) != "boxes":
                out.append(it)
                continue
            done += 1
            self._progress(0.0, f"prompting the click model with the boxes of image {done}/{n}")
            try:
                out.append(box_prompted_item(pred, it))
            except ValueError as e:  # one odd image must not sink the job: it keeps its plain box labels
                logger.warning("project %s: boxes of a %s image not prompted (%s): trained as plain boxes",
                               self.m.project_id, it.defect_type, e)
                out.append(it)
        if n:
            logger.info("project %s: %d box-labelled item(s) turned into click pseudo labels", self.m.project_id, n)
        return out

    @staticmethod
    def _click_replay(pred):
        """(image, clicks, defect type) -> the click model's answer after the last click, replayed
        click by click with the previous answer as the annotator did."""
        last: list = [None, None]  # (image, state): one image's state serves all its labels

        def replay(image, clicks, defect_type):
            if last[0] is not image:
                last[0], last[1] = image, pred.set_image(image)
            prob = None
            for k in range(1, len(clicks) + 1):
                prob = pred.predict(last[1], list(clicks[:k]), prev_mask=prob, defect_type=defect_type)
            if prob is None:
                raise ValueError("no clicks")
            return prob

        return replay

    def _train(self) -> dict:
        m, backend = self.m, self.m.backend
        cfg, creds = m.config, m.credentials
        bank = self._reference_bank()
        click = backend.predictor()
        click_for_bank = m.click_predictor(bank)
        items, collected = self._collect(cfg, creds, self._click_replay(click_for_bank))
        items = self._prompt_boxes(items, click_for_bank)
        if not items:
            raise ValueError(
                f"nothing to train on: {collected['exported_tasks']} annotated task(s) exported, none with a "
                f"brush mask, rectangle or OK/NG verdict ({collected['skipped']})")
        version = self._new_version()
        m.dir.mkdir(parents=True, exist_ok=True)
        path = self.checkpoint_path(version)
        iterations = backend.settings.seg_iterations
        init = backend.settings.seg_init_checkpoint()
        logger.info("project %s: training ADClick-Seg on %d item(s) from %d task(s), %d iterations from %s -> %s",
                    m.project_id, len(items), collected["used_tasks"], iterations,
                    init if init is not None else "a new model", path)
        _, summary = backend.seg_trainer(
            items, click.extractor, bank, iterations, getattr(click, "residual_config", None),
            cfg.defect_types, path, self._progress, getattr(click, "device", "cpu"), init=init)
        return self._serve(version, path, bank, {**(summary or {}), **collected})  # model_version changes now
