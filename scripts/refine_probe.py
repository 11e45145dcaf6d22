"""Boundary refinement settings compared on the click protocol: IoU after 3 clicks per image.

The images: the 10 of the end-to-end test (``pick_defects``), 10 more (offset 7) and 44 others
(10 per type at offset 3, minus those already used); references as in the end-to-end test (30
train/good images). Prints, per setting, how many reach IoU >= 0.5 and the mean IoU.

    PYTHONPATH=. .venv/bin/python scripts/refine_probe.py [DATA]
"""
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from adclick_core.evaluation import simulate_clicks
from adclick_core.predictor import ClickPredictor
from adclick_core.reference import ReferenceBank
from adclick_core.refinement import RefineConfig
from tests.e2e.helpers import pick_defects, pick_references

torch.set_num_threads(2)
mtd = Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data/mtd").resolve()
core = ClickPredictor.from_checkpoint(None, device="cpu")
core = core.with_bank(ReferenceBank.build(core.extractor, pick_references(mtd), progress=False))
only_walker = dict(relative_threshold=None, trace_between_clicks=False)
settings = {"raw": None,
            "walker only, gate 2 %, beta 300": RefineConfig(max_area_frac=0.02, beta=300.0, **only_walker),
            "walker only (session 6)": RefineConfig(**only_walker),
            "walker + anchored cut 0.3": RefineConfig(relative_threshold=0.3, trace_between_clicks=False),
            "walker + anchored cut 0.5": RefineConfig(relative_threshold=0.5, trace_between_clicks=False),
            "walker + anchored cut (0.4)": RefineConfig(trace_between_clicks=False),
            "shipped (+ traced clicks)": RefineConfig()}
first = pick_defects(mtd) + pick_defects(mtd, offset=7)
seen = {img for _, img, _ in first}
images = first + [t for t in pick_defects(mtd, per_type=10, offset=3) if t[1] not in seen]
ious = {k: [] for k in settings}
for d, img, gt_path in images:
    gt = np.asarray(Image.open(gt_path).convert("L")) > 127
    state = core.set_image(str(img))
    for name, cfg in settings.items():
        pred = core.with_refinement(cfg)
        per_click, _ = simulate_clicks(lambda c, p: pred.predict(state, c, prev_mask=p), gt, 3, [3])
        ious[name].append(per_click[-1])
for name, v in ious.items():
    a = np.array(v)
    print(f"{name}: {len(a)} images, IoU >= 0.5 after 3 clicks on {(a >= 0.5).sum()}, mean IoU {a.mean():.3f}"
          f" (e2e 10: {(a[:10] >= 0.5).sum()}, next 10: {(a[10:20] >= 0.5).sum()}, other {len(a) - 20}: {(a[20:] >= 0.5).sum()})")
