"""Is IoU after 3 clicks limited by the threshold or by the mask's shape?

For N images per defect type (spread over each type's sorted list), runs the eval-click protocol
for 3 clicks with a click checkpoint and with the residual-cut baseline, and prints the IoU at the
protocol threshold, at several global thresholds and at a per-image oracle threshold.

    PYTHONPATH=. .venv/bin/python scripts/iou_probe.py [CHECKPOINT|shipped] [N_PER_TYPE]
"""
import json, sys
import numpy as np, torch
from adclick_core.data import MVTecFolder
from adclick_core.predictor import ClickPredictor
from adclick_core.evaluation import simulate_clicks
from adclick_core.baselines import residual_cut_probability
from adclick_core.metrics import iou
torch.set_num_threads(2)
ckpt = sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] != "shipped" else None
per_type = int(sys.argv[2]) if len(sys.argv) > 2 else 6
folder = MVTecFolder("../shared/data/mtd")
pred = ClickPredictor.from_checkpoint(ckpt, device="cpu")
pred = pred.with_bank(folder.reference_bank(pred.extractor, "runs/mtd_bank.safetensors", progress=False))
samples = folder.test_samples(defective_only=True)
by = {}
for s in samples: by.setdefault(s.defect_type, []).append(s)
pick = []
for t, ss in sorted(by.items()):
    idx = np.linspace(0, len(ss) - 1, per_type).round().astype(int)
    pick += [ss[i] for i in idx]
rows = []
for s in pick:
    img = s.image(); gt = s.mask(img.shape[:2]); st = pred.set_image(img)
    amap = pred.anomaly_map(st)
    out = {"type": s.defect_type, "hw": list(gt.shape), "area": float(gt.mean())}
    for name, m in [("adclick", lambda c, p: pred.predict(st, c, prev_mask=p)),
                    ("cut", lambda c, p: residual_cut_probability(amap, c))]:
        ious, kept = simulate_clicks(m, gt, 3, [3])
        p = kept[3].astype(np.float32)
        best = max(iou(p > t, gt) for t in np.linspace(0.02, 0.98, 49))
        out[name] = (round(ious[-1], 3), round(float(best), 3))
        out[name + "_t"] = [round(iou(p > t, gt), 3) for t in (0.3, 0.4, 0.49, 0.6, 0.7, 0.8)]
    rows.append(out); print(out, flush=True)
for name in ("adclick", "cut"):
    a = np.array([r[name][0] for r in rows]); b = np.array([r[name][1] for r in rows])
    print(name, "mean iou", a.mean().round(3), "n>=.5", (a >= .5).sum(), "/", len(a), "oracle mean", b.mean().round(3), "n>=.5", (b >= .5).sum())
    for t in sorted(by):
        sel = [r[name][0] for r in rows if r["type"] == t]; sel2 = [r[name][1] for r in rows if r["type"] == t]
        print("  ", t, np.mean(sel).round(3), np.mean(sel2).round(3))

for name in ("adclick", "cut"):
    a = np.array([r[name + "_t"] for r in rows]); print(name, "iou at t=.3,.4,.49,.6,.7,.8:", a.mean(0).round(3), (a >= .5).sum(0))
