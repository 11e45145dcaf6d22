"""The end-to-end click test's protocol without Label Studio: IoU after 3 simulated clicks on the
test's MTD images (``pick_defects``) with its references (``pick_references``), per checkpoint.

    .venv/bin/python benchmarks/e2e_click_protocol.py [--data MTD_DIR] [--per-type N] [CKPT ...]

``--data`` defaults to the committed sample ``tests/data/mtd_sample``, as the test uses it;
``--per-type 2`` is the test's own choice of images. No checkpoint: the shipped model.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from adclick_core.evaluation.clicks import simulate_clicks  # noqa: E402
from adclick_core.inference.predictor import ClickPredictor  # noqa: E402
from adclick_core.features.reference import ReferenceBank  # noqa: E402
from tests.e2e.helpers import pick_defects, pick_references  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", nargs="*", help="click checkpoints (none: the shipped one)")
    ap.add_argument("--data", default=str(REPO / "tests" / "data" / "mtd_sample"))
    ap.add_argument("--per-type", type=int, default=2)
    ap.add_argument("--clicks", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = Path(args.data).resolve()
    for ckpt in args.checkpoints or [None]:
        core = ClickPredictor.from_checkpoint(ckpt, device="cpu")
        core = core.with_bank(ReferenceBank.build(core.extractor, pick_references(data), progress=False))
        ious = []
        for _, img, gt_path in pick_defects(data, per_type=args.per_type):
            gt = np.asarray(Image.open(gt_path).convert("L")) > 127
            state = core.set_image(str(img))
            per_click, _ = simulate_clicks(lambda c, p: core.predict(state, c, prev_mask=p), gt,
                                           args.clicks, [args.clicks])
            ious.append(per_click[-1])
        print(json.dumps({"checkpoint": ckpt or "shipped", "data": str(data), "clicks": args.clicks,
                          "iou": [round(i, 3) for i in ious], "n_iou_ge_0.5": sum(i >= 0.5 for i in ious),
                          "n_images": len(ious), "mean_iou": round(float(np.mean(ious)), 3)}))


if __name__ == "__main__":
    main()
