"""The end-to-end Start Training case in the core: 3 painted masks + 2 box-prompted images + 30 OK
tags (30 references, the 5 held-out e2e images). Prints the held-out pixel AP of the regions
pre-annotation returns (mask x region score), of the Seg model's continuous map and of the
training-free map.

    PYTHONPATH=. .venv/bin/python scripts/seg_fewshot_probe.py ITERATIONS pool|nopool [EXTRA_PER_TYPE]
"""
import sys, time
from pathlib import Path
import numpy as np, torch
from PIL import Image
from adclick_core.predictor import ClickPredictor, SegPredictor
from adclick_core.reference import ReferenceBank
from adclick_core.seg_training import SegItem, SegTrainConfig, train_seg
from adclick_core.seg_evaluation import mask_boxes
from adclick_core.box_prompts import box_prompted_item
from adclick_core.training import build_synthetic_pool
from adclick_core.regions import defect_regions
from adclick_core.metrics import pixel_ap
from tests.e2e.helpers import DEFECTS, pick_defects, pick_references, split_first_per_type, training_free_maps
torch.set_num_threads(2)
iters = int(sys.argv[1]); use_pool = sys.argv[2] == "pool"; extra = int(sys.argv[3]) if len(sys.argv) > 3 else 0
mtd = Path("../shared/data/mtd").resolve()
clicker = ClickPredictor.from_checkpoint(None, device="cpu")
refs = pick_references(mtd)
bank = ReferenceBank.build(clicker.extractor, refs, progress=False)
clicker = clicker.with_bank(bank)
defects = pick_defects(mtd)
train, held = split_first_per_type(defects)
if extra:
    seen = {x[1] for x in defects}
    train += [x for x in pick_defects(mtd, per_type=extra, offset=5) if x[1] not in seen]
gt = lambda p: np.asarray(Image.open(p).convert("L")) > 127
items = []
for i, (d, img, g) in enumerate(train):
    m = gt(g)
    if i < 3 or i >= 5:
        items.append(SegItem(str(img), d, mask=m))
    else:
        items.append(box_prompted_item(clicker.with_refinement(None), SegItem(str(img), d, boxes=mask_boxes(m))))
items += [SegItem(str(p), None, tag="OK") for p in refs]
pool = None
if use_pool:
    pool = build_synthetic_pool(clicker.extractor, bank, refs, clicker.residual_config, per_image=2, seed=0,
                                bank_index=list(range(len(refs))), progress=False)
t = time.time()
out = f"/tmp/seg_fewshot_{iters}_{sys.argv[2]}_{extra}.pt"
_, summary = train_seg(items, clicker.extractor, bank, SegTrainConfig(iterations=iters), residual_config=clicker.residual_config,
                       synthetic=pool, defect_types=DEFECTS, out=out, progress=False)
seg = SegPredictor.from_checkpoint(out, bank=bank, device="cpu", extractor=clicker.extractor)
thr = float(seg.threshold)
scores, cont, gts = [], [], []
for d, img, g in held:
    st = seg.set_image(str(img))
    per = seg.predict_per_type(st, DEFECTS)
    sm = np.zeros(st.original_hw, np.float32); mx = np.zeros(st.original_hw, np.float32)
    for prob in per.values():
        mx = np.maximum(mx, prob)
        for r in defect_regions(prob, thr):
            sm = np.maximum(sm, r.mask * np.float32(r.score))
    scores.append(sm); cont.append(mx); gts.append(gt(g))
free = training_free_maps(refs, [img for _, img, _ in held])
print(f"iters {iters} pool {use_pool} extra {extra} items {summary.get('label_kinds')} train {time.time()-t:.0f}s thr {thr:.3f}: "
      f"held-out AP masks {pixel_ap(scores, gts):.3f}, continuous {pixel_ap(cont, gts):.3f}, map {pixel_ap(free, gts):.3f}", flush=True)
