"""Helpers shared by the end-to-end tests: what the browser sends, and the test project."""
from __future__ import annotations

import os
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MTD_SAMPLE = REPO / "tests" / "data" / "mtd_sample"
# The product the end-to-end tests label: the committed MTD sample, or any MVTec-style folder
# (train/good, test/<type>, ground_truth/<type>/<stem>_mask.png; JPEG, PNG, BMP or TIFF images).
DATA = Path(os.environ.get("ADCLICK_E2E_DATA") or MTD_SAMPLE).resolve()
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


def images_in(folder: Path) -> list[Path]:
    """The image files of ``folder``, sorted by name (none when it does not exist)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def mask_of(data: Path, defect: str, image: Path) -> Path:
    """The ground-truth mask of a test image: ``<stem>_mask.png`` (MVTec) or ``<stem>.png``."""
    folder = data / "ground_truth" / defect
    for name in (f"{image.stem}_mask.png", f"{image.stem}.png"):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"no ground-truth mask for {image} in {folder}")


def defect_types(data: Path) -> tuple[str, ...]:
    """The defect types of an MVTec-style folder: test/<type> folders (not ``good``) with images
    and a ground_truth/<type> folder."""
    test = data / "test"
    if not test.is_dir():
        return ()
    return tuple(sorted(d.name for d in test.iterdir() if d.is_dir() and d.name != "good" and images_in(d)
                        and (data / "ground_truth" / d.name).is_dir()))


_PALETTE = ("#e6194b", "#f58231", "#ffe119", "#3cb44b", "#4363d8", "#911eb4", "#46f0f0", "#f032e6")


def label_config(types: tuple[str, ...]) -> str:
    """``label_config/interactive_weak.xml`` with its brush, click and box labels set to ``types``."""
    import xml.etree.ElementTree as ET

    root = ET.fromstring((REPO / "label_config" / "interactive_weak.xml").read_text())
    for tag in ("BrushLabels", "KeyPointLabels", "RectangleLabels"):
        for labels in root.iter(tag):
            template = dict(labels.find("Label").attrib)
            for old in list(labels.findall("Label")):
                labels.remove(old)
            for i, t in enumerate(types):
                ET.SubElement(labels, "Label", {**template, "value": t, "background": _PALETTE[i % len(_PALETTE)]})
    return ET.tostring(root, encoding="unicode")


DEFECTS = defect_types(DATA)
CONFIG = label_config(DEFECTS) if DEFECTS else (REPO / "label_config" / "interactive_weak.xml").read_text()
N_REFERENCES = 30
PER_TYPE = 2
# Start Training in the end-to-end tests: iterations of the backend's ADClick-Seg training
# (ADCLICK_SEG_ITERATIONS of the backend fixture) and images annotated per defect type.
SEG_ITERATIONS = int(os.environ.get("ADCLICK_E2E_SEG_ITERATIONS", "600"))  # the backend default
ANNOTATED_PER_TYPE = 4


def local_url(path: Path, mtd: Path) -> str:
    """The Local Storage URL Label Studio uses for a file under the document root (mtd's parent)."""
    return f"/data/local-files/?d={path.relative_to(mtd.parent).as_posix()}"


def missing_url(mtd: Path) -> str:
    """A Local Storage URL under the document root whose file does not exist."""
    return local_url(mtd / "test" / DEFECTS[0] / "this_file_does_not_exist.jpg", mtd)


def verdict_result(value: str = "OK") -> list[dict]:
    return [{"from_name": "verdict", "to_name": "image", "type": "choices", "value": {"choices": [value]}}]


def pick_references(mtd: Path, n: int = N_REFERENCES) -> list[Path]:
    """``n`` train/good images spread over the sorted file list (deterministic): the references."""
    goods = images_in(mtd / "train" / "good")
    n = max(2, min(n, len(goods) - 2))  # two left for the tests that tag a new image OK
    return goods[:: max(1, len(goods) // n)][:n]


def split_first_per_type(defects: list[tuple]) -> tuple[list[tuple], list[tuple]]:
    """(the first image of each defect type, the rest): annotated vs held out in the training test.
    ``defects``: tuples whose first item is the defect type."""
    train, held_out = [], []
    for d in DEFECTS:
        mine = [x for x in defects if x[0] == d]
        train.append(mine[0])
        held_out += mine[1:]
    return train, held_out


def training_free_maps(references: list[Path], images: list[Path]) -> list:
    """The residual anomaly map ||r|| (sigma-4 smoothed, as eval-seg scores it) of each image
    against a bank of ``references``, computed with the core directly."""
    from scipy import ndimage

    pred = _click_predictor(references)
    return [ndimage.gaussian_filter(pred.anomaly_map(pred.set_image(p)), 4.0) for p in images]


def trained_seg_maps(checkpoint: Path, references: list[Path], images: list[Path]) -> list:
    """The continuous map (max over defect types) of an ADClick-Seg checkpoint the backend wrote,
    computed with the core directly on the same references."""
    from adclick_core.inference.predictor import SegPredictor

    click = _click_predictor(references)
    seg = SegPredictor.from_checkpoint(checkpoint, bank=click.bank, device="cpu", extractor=click.extractor)
    return [seg.predict(str(p))[0] for p in images]


def as_region_masks(maps: list, calibrate_on: list, gts: list) -> list:
    """``maps`` answered the way pre-annotation answers (a mask per connected region above a
    threshold, each pixel scored with its region's mean): the threshold is the best pixel F1 on
    ``calibrate_on`` against ``gts``, on maps divided by their largest value there."""
    import numpy as np

    from adclick_core.evaluation.metrics import best_f1_threshold
    from adclick_core.inference.regions import defect_regions

    top = max(float(m.max()) for m in calibrate_on) or 1.0
    thr, _ = best_f1_threshold([m / top for m in calibrate_on], gts)
    out = []
    for m in maps:
        scored = np.zeros(m.shape, np.float32)
        for r in defect_regions(np.clip(m / top, 0, 1), thr):
            scored = np.maximum(scored, r.mask * np.float32(r.score))
        out.append(scored)
    return out


_PREDICTORS: dict = {}


def _click_predictor(references: list[Path]):
    """The shipped click model with a bank of ``references`` (built once per reference list)."""
    from adclick_core.inference.predictor import ClickPredictor
    from adclick_core.features.reference import ReferenceBank

    key = tuple(str(p) for p in references)
    if key not in _PREDICTORS:
        pred = ClickPredictor.from_checkpoint(device="cpu")
        _PREDICTORS[key] = pred.with_bank(ReferenceBank.build(pred.extractor, list(references), progress=False))
    return _PREDICTORS[key]


def pick_defects(mtd: Path, per_type: int = PER_TYPE, offset: int = 0) -> list[tuple[str, Path, Path]]:
    """``per_type`` images of each defect type, spread over the sorted file list (deterministic)."""
    out = []
    for d in DEFECTS:
        files = images_in(mtd / "test" / d)
        for i in range(per_type):
            img = files[((i * len(files)) // per_type + len(files) // (2 * per_type) + offset) % len(files)]
            out.append((d, img, mask_of(mtd, d, img)))
    return out


def pick_annotated(mtd: Path, per_type: int, exclude: list[Path]) -> list[tuple[str, Path, Path, bool]]:
    """The images the Start Training test annotates: ``per_type`` per defect type (offset 5 in
    the sorted file list), none of ``exclude``. Each as (type, image, mask, as rectangles): the first
    image of each type is annotated with rectangles, the others with painted masks."""
    taken = {str(p) for p in exclude}
    out, types_seen = [], set()
    for d, img, gt in pick_defects(mtd, per_type=per_type, offset=5):
        if str(img) in taken:
            continue
        taken.add(str(img))
        out.append((d, img, gt, d not in types_seen))
        types_seen.add(d)
    return out


def keypoint(x: float, y: float, w: int, h: int, label: str, positive: bool = True) -> dict:
    """What the browser sends for a click on pixel (x, y): percent of the image, pixel centre.
    A positive click carries no ``is_positive`` (as when restored from a draft)."""
    item = {"original_width": w, "original_height": h, "image_rotation": 0,
            "value": {"x": (x + 0.5) / w * 100.0, "y": (y + 0.5) / h * 100.0, "width": 0.5,
                      "keypointlabels": [label]},
            "id": f"k{int(x)}_{int(y)}", "from_name": "click", "to_name": "image", "type": "keypointlabels"}
    if not positive:
        item["is_positive"] = False
    return item


def interactive(ls, ml_id: int, task_id: int, context: dict) -> tuple[dict, float]:
    """One click through Label Studio's interactive-annotating API: (answer, round trip in ms)."""
    t0 = time.perf_counter()
    r = ls.api("POST", f"/api/ml/{ml_id}/interactive-annotating", json={"task": task_id, "context": context})
    return r, (time.perf_counter() - t0) * 1e3


def import_tasks(ls, pid: int, tasks: list[dict]) -> dict[str, int]:
    """Import tasks; returns image URL -> task id for the whole project."""
    ls.api("POST", f"/api/projects/{pid}/import", json=tasks)
    listed = ls.api("GET", f"/api/projects/{pid}/tasks/?page_size=100000")
    return {t["data"]["image"]: t["id"] for t in listed}


def brush_result(gt, label: str) -> dict:
    """A BrushLabels result painting the boolean mask ``gt`` (RLE), as an annotator submits it."""
    import numpy as np
    from label_studio_sdk.converter.brush import mask2rle

    h, w = gt.shape
    return {"from_name": "defect", "to_name": "image", "type": "brushlabels", "original_width": w,
            "original_height": h, "image_rotation": 0,
            "value": {"format": "rle", "rle": [int(v) for v in mask2rle(np.where(gt, 255, 0).astype(np.uint8))],
                      "brushlabels": [label]}}
