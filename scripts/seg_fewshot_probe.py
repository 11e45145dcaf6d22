"""The end-to-end Start Training case in the core, with 30 OK tags (the 30 references).

Without ``--annotated``: session 7's case, 3 painted masks + 2 box-prompted images (the first e2e
image of each type), held out: the other 5 e2e images. With ``--annotated N``: the Start Training
test's case, N images per type besides the 10 e2e images (``tests/e2e/helpers.pick_annotated``: the
first of each type as rectangles -> box prompts, the rest painted masks), held out: the 10 e2e images.

Prints the held-out pixel AP of the regions pre-annotation returns (mask x region score), of the
Seg model's continuous map and of the training-free map, on the e2e held-out images and on a wider
held-out set (``--wide`` more per type); ``--goods K`` adds a threshold study on K test/good images.

    PYTHONPATH=. .venv/bin/python scripts/seg_fewshot_probe.py --iterations 300 [--annotated 4]
        [--pool] [--set FIELD=VALUE] [--wide 4] [--goods 20] [--checkpoint CKPT]
"""
import argparse, time
from pathlib import Path
import numpy as np, torch
from PIL import Image
from scipy import ndimage
from adclick_core.backbone import load_image
from adclick_core.baselines import gray_image
from adclick_core.clicks import Click
from adclick_core.refinement import refine_answer
from adclick_core.predictor import ClickPredictor, SegPredictor
from adclick_core.reference import ReferenceBank
from adclick_core.seg_training import SegItem, SegTrainConfig, train_seg
from adclick_core.seg_evaluation import mask_boxes
from adclick_core.box_prompts import box_prompted_item
from adclick_core.training import build_synthetic_pool
from adclick_core.regions import defect_regions
from adclick_core.metrics import pixel_ap
from adclick_core.cli import config_overrides
from tests.e2e.helpers import (DEFECTS, pick_annotated, pick_defects, pick_references, split_first_per_type,
                               training_free_maps)

ap = argparse.ArgumentParser()
ap.add_argument("--iterations", type=int, default=300)
ap.add_argument("--pool", action="store_true", help="+ a synthetic pool from the references")
ap.add_argument("--annotated", type=int, default=0, help="annotated images per type (the Start Training test's case)")
ap.add_argument("--wide", type=int, default=4, help="held-out images per type for the wide set (offset 10)")
ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="SegTrainConfig field override")
ap.add_argument("--checkpoint", help="evaluate this checkpoint instead of training one")
ap.add_argument("--goods", type=int, default=0, help="test/good images to score too (threshold study)")
args = ap.parse_args()
torch.set_num_threads(2)
mtd = Path("../shared/data/mtd").resolve()
clicker = ClickPredictor.from_checkpoint(None, device="cpu")
refs = pick_references(mtd)
bank = ReferenceBank.build(clicker.extractor, refs, progress=False)
clicker = clicker.with_bank(bank)
defects = pick_defects(mtd)
if args.annotated:
    annotated = pick_annotated(mtd, args.annotated, [img for _, img, _ in defects])
    train, held = [(d, img, g) for d, img, g, _ in annotated], defects
    as_boxes = [rect for *_, rect in annotated]
else:
    train, held = split_first_per_type(defects)
    as_boxes = [i in (3, 4) for i in range(len(train))]
used = {str(x[1]) for x in defects + train}
wide = held + [x for x in pick_defects(mtd, per_type=args.wide, offset=10) if str(x[1]) not in used] if args.wide else held
gt = lambda p: np.asarray(Image.open(p).convert("L")) > 127
items = []
for (d, img, g), rect in zip(train, as_boxes):
    m = gt(g)
    if not rect:
        items.append(SegItem(str(img), d, mask=m))
    else:
        items.append(box_prompted_item(clicker.with_refinement(None), SegItem(str(img), d, boxes=mask_boxes(m))))
items += [SegItem(str(p), None, tag="OK") for p in refs]
pool = None
if args.pool:
    pool = build_synthetic_pool(clicker.extractor, bank, refs, clicker.residual_config, per_image=2, seed=0,
                                bank_index=list(range(len(refs))), progress=False)
t = time.time()
overrides = config_overrides(SegTrainConfig, args.set)
tag = "_".join(f"{k}{v}" for k, v in overrides.items())
out = args.checkpoint or f"/tmp/seg_fewshot_{args.iterations}_{args.pool}_{args.annotated}_{tag}.pt"
if args.checkpoint:
    from adclick_core.checkpoint import load_checkpoint
    summary = load_checkpoint(out, "adclick_seg")["train_summary"]
else:
    _, summary = train_seg(items, clicker.extractor, bank, SegTrainConfig(iterations=args.iterations, **overrides),
                           residual_config=clicker.residual_config, synthetic=pool, defect_types=DEFECTS, out=out,
                           progress=False)
seg = SegPredictor.from_checkpoint(out, bank=bank, device="cpu", extractor=clicker.extractor)
thr = float(seg.threshold)
goods = [p for p in sorted((mtd / "test" / "good").glob("*.jpg"))][: args.goods]


def per_type_maps(path):
    return list(seg.predict_per_type(seg.set_image(str(path)), DEFECTS).values())


def gray_of(path):
    return np.round(gray_image(load_image(str(path))) * 255).astype(np.uint8)


def score_map(shape, regions):
    """(mask, score) regions -> the map the e2e test scores: each pixel the best score covering it."""
    sm = np.zeros(shape, np.float32)
    for mask, score in regions:
        sm = np.maximum(sm, mask * np.float32(score))
    return sm


def region_scores(per, threshold):
    return score_map(per[0].shape, ((r.mask, r.score) for prob in per for r in defect_regions(prob, threshold)))


def relative_scores(per, gate, rel):
    """Regions where p >= rel x the map's own peak, for maps whose peak passes ``gate``."""
    return score_map(per[0].shape, ((r.mask, r.score) for prob in per if float(prob.max()) >= gate
                                    for r in defect_regions(prob, rel * float(prob.max()))))


def refined_region(prob, region, gray):
    """The region's edge moved onto the image's (refinement.py), its peak taken as the click."""
    near = ndimage.binary_dilation(region.mask, iterations=8)
    y, x = np.unravel_index(int(np.argmax(np.where(region.mask, prob, 0.0))), prob.shape)
    answer = np.clip(prob / max(float(prob[y, x]), 1e-6), 0, 1).astype(np.float32) * near
    return (refine_answer(answer, gray, [Click(float(x), float(y), True)]) >= 0.5) & near


def refined_scores(per, gray, threshold):
    return score_map(per[0].shape, ((refined_region(prob, r, gray), r.score) for prob in per
                                    for r in defect_regions(prob, threshold)))


wide_maps = [per_type_maps(img) for _, img, _ in wide]
good_maps = [per_type_maps(p) for p in goods]
cont = [np.max(per, 0) for per in wide_maps]
gts = [gt(g) for _, _, g in wide]
peaks = [float(c.max()) for c in cont]
scores = [region_scores(per, thr) for per in wide_maps]
free = training_free_maps(refs, [img for _, img, _ in wide])
n = len(held)
print(f"iters {args.iterations} pool {args.pool} annotated {args.annotated} set {overrides} items {summary.get('label_kinds')} "
      f"train {time.time()-t:.0f}s threshold {summary['threshold']}\n"
      f"  e2e held-out ({n}): masks {pixel_ap(scores[:n], gts[:n]):.3f}, continuous {pixel_ap(cont[:n], gts[:n]):.3f}, "
      f"map {pixel_ap(free[:n], gts[:n]):.3f}; peaks {np.round(peaks[:n], 3).tolist()}\n"
      f"  wide held-out ({len(wide)}): masks {pixel_ap(scores, gts):.3f}, continuous {pixel_ap(cont, gts):.3f}, "
      f"map {pixel_ap(free, gts):.3f}; median peak {np.median(peaks):.3f}", flush=True)
# The training-free map cut into regions the same way (at its own 90th / 99th percentile over these
# images, region score = its mean), to see what the region form alone costs.
for q in (0.9, 0.99):
    t_free = float(np.quantile(np.concatenate([m.ravel() for m in free]), q))
    cut = [region_scores([m], t_free) for m in free]
    print(f"  training-free map as regions (cut at its {q:.0%} quantile): e2e {pixel_ap(cut[:n], gts[:n]):.3f}, "
          f"wide {pixel_ap(cut, gts):.3f}")
if goods:
    # Threshold study: region AP for other cuts of the same maps, on the held-out defect images and
    # with K good test images added (false regions there count against it).
    good_peaks = [float(np.max(per)) for per in good_maps]
    print(f"  good test images ({len(goods)}): peaks median {np.median(good_peaks):.4f} max {np.max(good_peaks):.4f}; "
          f"defect peaks {np.round(sorted(peaks), 4).tolist()}")
    ggt = [np.zeros(per[0].shape, bool) for per in good_maps]
    grays = [gray_of(img) for _, img, _ in wide]
    good_grays = [gray_of(p) for p in goods]

    def study(label, score_fn):
        sc = [score_fn(per, gy) for per, gy in zip(wide_maps, grays)]
        gsc = [score_fn(per, gy) for per, gy in zip(good_maps, good_grays)]
        print(f"    {label}: regions AP e2e {pixel_ap(sc[:n], gts[:n]):.3f}, wide {pixel_ap(sc, gts):.3f}, "
              f"wide + goods {pixel_ap(sc + gsc, gts + ggt):.3f}; goods with a region {sum(bool(x.any()) for x in gsc)}")

    for q in sorted({thr, float(np.max(good_peaks)), float(np.median(good_peaks)), 0.001, 0.003, 0.01, 0.03, 0.1}):
        study(f"threshold {q:.4f}", lambda per, _g, q=q: region_scores(per, q))
    for gate in sorted({thr, float(np.median(good_peaks))}):
        for rel in (0.3, 0.5, 0.7):
            study(f"gate {gate:.4f}, cut {rel} x the map's peak", lambda per, _g, gate=gate, rel=rel:
                  relative_scores(per, gate, rel))
    for q in sorted({thr, 0.003, 0.01, 0.03}):
        study(f"threshold {q:.4f}, edges refined", lambda per, gy, q=q: refined_scores(per, gy, q))
