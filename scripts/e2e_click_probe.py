"""The end-to-end click test's protocol without Label Studio: IoU after 3 simulated clicks on its
10 MTD images (``pick_defects``) with its 30 references (``pick_references``), per checkpoint.

    PYTHONPATH=. .venv/bin/python scripts/e2e_click_probe.py [CKPT ...]   (none: the shipped model)
"""
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from adclick_core.evaluation import simulate_clicks
from adclick_core.predictor import ClickPredictor
from adclick_core.reference import ReferenceBank
from tests.e2e.helpers import pick_defects, pick_references

torch.set_num_threads(1)
mtd = Path("../shared/data/mtd").resolve()
for ckpt in sys.argv[1:] or [None]:
    core = ClickPredictor.from_checkpoint(ckpt, device="cpu")
    core = core.with_bank(ReferenceBank.build(core.extractor, pick_references(mtd), progress=False))
    ious = []
    for _, img, gt_path in pick_defects(mtd):
        gt = np.asarray(Image.open(gt_path).convert("L")) > 127
        state = core.set_image(str(img))
        per_click, _ = simulate_clicks(lambda c, p: core.predict(state, c, prev_mask=p), gt, 3, [3])
        ious.append(per_click[-1])
    print(f"{ckpt or 'shipped'}: IoU after 3 clicks {[round(i, 3) for i in ious]}, "
          f">= 0.5 on {sum(i >= 0.5 for i in ious)} of {len(ious)}, mean {np.mean(ious):.3f}")
