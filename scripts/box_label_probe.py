"""How good are the pseudo labels that box prompts make, next to those of 5 simulated clicks?

On every other image of eval-seg's fold 0 (MTD: 49 images): pooled pixel AP, mean IoU (p > 0.5)
and pooled pixel precision / recall (p > 0.5: what the training labels call defective) of the
box-prompted answer (boxes = the ground truth's blobs) and of the 5-click answer, per-type
IoU, and how often the box prompts' positive clicks land within 2 px of the defect.

    PYTHONPATH=. .venv/bin/python scripts/box_label_probe.py [DATA] [BANK] [--raw]

``--raw``: the click model's answers without boundary refinement (refinement.py).
"""
import sys

import numpy as np
import torch

from adclick_core.box_prompts import box_clicks_and_probability
from adclick_core.data import MVTecFolder
from adclick_core.metrics import iou, pixel_ap
from adclick_core.predictor import ClickPredictor
from adclick_core.seg_evaluation import mask_boxes, split_folds, weak_items

torch.set_num_threads(2)
args = [a for a in sys.argv[1:] if a != "--raw"]
data = args[0] if len(args) > 0 else "../shared/data/mtd"
bank = args[1] if len(args) > 1 else "runs/mtd_bank.safetensors"
folder = MVTecFolder(data)
cp = ClickPredictor.from_checkpoint(None, device="cpu")
cp = cp.with_bank(folder.reference_bank(cp.extractor, bank, progress=False))
if "--raw" in sys.argv:
    cp = cp.with_refinement(None)
fold = split_folds(folder.test_samples(defective_only=True), seed=0)[0][::2]
ious = {"box": [], "clicks5": []}
probs = {"box": [], "clicks5": []}
gts, on = [], {"first": [0, 0], "extra": [0, 0]}
for s, ci in zip(fold, weak_items("clicks5", fold, cp)):
    img = s.image()
    gt = s.mask(img.shape[:2])
    gts.append(gt)
    p, clicks = box_clicks_and_probability(cp, cp.set_image(img), mask_boxes(gt), s.defect_type)
    for i, c in enumerate(c for c in clicks if c.positive):
        near = gt[max(0, int(c.y) - 2):int(c.y) + 3, max(0, int(c.x) - 2):int(c.x) + 3].any()
        on["first" if i == 0 else "extra"][0] += int(near)
        on["first" if i == 0 else "extra"][1] += 1
    for k, prob in (("box", p), ("clicks5", ci.click_prob)):
        probs[k].append(prob)
        ious[k].append(iou(prob > 0.5, gt))
for k in ious:
    a = np.array(ious[k])
    called = np.concatenate([(p > 0.5).ravel() for p in probs[k]])
    truth = np.concatenate([g.ravel() for g in gts])
    hits = int((called & truth).sum())
    print(k, "AP", round(pixel_ap(probs[k], gts), 3), "mean IoU", a.mean().round(3),
          "IoU>=0.5", int((a >= .5).sum()), "/", len(a), "precision", round(hits / max(int(called.sum()), 1), 3), "recall", round(hits / max(int(truth.sum()), 1), 3))
types = [s.defect_type for s in fold]
for t in sorted(set(types)):
    print(" ", t, {k: round(float(np.mean([v for v, tt in zip(ious[k], types) if tt == t])), 3) for k in ious})
print("box-prompt positive clicks within 2 px of the defect (hits, clicks):", on)
