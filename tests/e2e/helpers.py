"""Helpers shared by the end-to-end tests: what the browser sends, and the test project."""
from __future__ import annotations

import os
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONFIG = (REPO / "label_config" / "interactive_weak.xml").read_text()
DEFECTS = ("blowhole", "break", "crack", "fray", "uneven")
N_REFERENCES = 30
PER_TYPE = 2
# Start Training in the end-to-end tests: iterations of the backend's ADClick-Seg training
# (ADCLICK_SEG_ITERATIONS of the backend fixture) and images annotated per defect type.
SEG_ITERATIONS = int(os.environ.get("ADCLICK_E2E_SEG_ITERATIONS", "300"))
ANNOTATED_PER_TYPE = 4


def local_url(path: Path, mtd: Path) -> str:
    """The Local Storage URL Label Studio uses for a file under the document root (mtd's parent)."""
    return f"/data/local-files/?d={path.relative_to(mtd.parent).as_posix()}"


def missing_url(mtd: Path) -> str:
    """A Local Storage URL under the document root whose file does not exist."""
    return local_url(mtd / "test" / "crack" / "this_file_does_not_exist.jpg", mtd)


def verdict_result(value: str = "OK") -> list[dict]:
    return [{"from_name": "verdict", "to_name": "image", "type": "choices", "value": {"choices": [value]}}]


def pick_references(mtd: Path, n: int = N_REFERENCES) -> list[Path]:
    """``n`` train/good images spread over the sorted file list (deterministic): the references."""
    goods = sorted((mtd / "train" / "good").glob("*.jpg"))
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

    from adclick_core.predictor import ClickPredictor
    from adclick_core.reference import ReferenceBank

    pred = ClickPredictor.from_checkpoint(device="cpu")
    pred = pred.with_bank(ReferenceBank.build(pred.extractor, list(references), progress=False))
    return [ndimage.gaussian_filter(pred.anomaly_map(pred.set_image(p)), 4.0) for p in images]


def pick_defects(mtd: Path, per_type: int = PER_TYPE, offset: int = 0) -> list[tuple[str, Path, Path]]:
    """``per_type`` images of each defect type, spread over the sorted file list (deterministic)."""
    out = []
    for d in DEFECTS:
        files = sorted((mtd / "test" / d).glob("*.jpg"))
        for i in range(per_type):
            img = files[((i * len(files)) // per_type + len(files) // (2 * per_type) + offset) % len(files)]
            out.append((d, img, mtd / "ground_truth" / d / f"{img.stem}_mask.png"))
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
