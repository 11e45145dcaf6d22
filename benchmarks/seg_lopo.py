"""Leave-one-product-out ADClick-Seg: pre-training on other products' real defects, and the
table *labels x product*.

For each product P of ``--folds``: ADClick-Seg is pre-trained on the real defects (painted masks)
of every *other* product of ``--products``, each against its own references (``pretrain-seg``);
then ``eval-seg`` scores P with the modes of ``--modes`` (two folds of P's defective images; the
model of a labelled mode trains on one fold, is scored on the other fold plus P's good test
images):

* ``residual_map``: the training-free map ||r|| (no model);
* ``pretrained`` / ``pretrained_fused``: the pre-trained model with no label of P (a new
  project), alone / fused with P's training-free map;
* ``unsupervised``, ``clicks5``, ``masks``, ``boxes``, ``tags``: trained on P's references and
  that kind of label, starting from the pre-trained model (from a random one: ``eval-seg``
  without ``--pretrained``).

No figure of P comes from a model that saw P's defect images. Timings are wall-clock.

    .venv/bin/python benchmarks/seg_lopo.py --root ../shared/data --banks runs --out runs/seg_lopo \\
        [--iterations 600] [--modes residual_map,pretrained,pretrained_fused,unsupervised,clicks5] \\
        [--folds mtd,glass_edge]

Writes ``<out>/<P>_pretrained.pt``, ``<out>/<P>/`` (eval-seg's checkpoints), ``<out>/<P>.json``
and prints the table (pixel AP, mean of P's two folds).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adclick_core.inference.predictor import ClickPredictor  # noqa: E402
from adclick_core.evaluation.seg import evaluate_seg  # noqa: E402
from adclick_core.training.seg import SegProduct, SegTrainConfig, train_seg  # noqa: E402

PRODUCTS = "mtd,bsd_pitting,mpdd_metal_plate,mtoc_lens,glass_edge"


def table(rows: dict[str, dict], modes: list[str]) -> str:
    lines = ["| product | " + " | ".join(modes) + " |", "|---" * (len(modes) + 1) + "|"]
    for p, r in rows.items():
        cells = []
        for m in modes:
            v = r["methods"].get(m)
            cells.append("-" if v is None else f"{v['ap']:.3f} ({v['aupro']:.3f})")
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\npixel AP (AU-PRO), mean of the product's two folds"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="../shared/data", help="folder holding the products")
    ap.add_argument("--products", default=PRODUCTS, help="comma-separated product folders under --root")
    ap.add_argument("--folds", default=None, help="comma-separated products to hold out (default: all)")
    ap.add_argument("--banks", default="runs", help="folder of <product>_bank.safetensors (made when missing)")
    ap.add_argument("--out", default="runs/seg_lopo")
    ap.add_argument("--pretrain-iterations", type=int, default=SegTrainConfig.iterations)
    ap.add_argument("--iterations", type=int, default=None, help="iterations of each labelled mode's training")
    ap.add_argument("--modes", default="residual_map,pretrained,pretrained_fused")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    root, out, banks = Path(args.root), Path(args.out), Path(args.banks)
    out.mkdir(parents=True, exist_ok=True)
    products = [p for p in args.products.split(",") if p]
    folds = [p for p in (args.folds or args.products).split(",") if p]
    modes = [m for m in args.modes.split(",") if m]
    clicker = ClickPredictor.from_checkpoint(None, device="auto")
    data: dict[str, SegProduct] = {}
    rows: dict[str, dict] = {}
    for p in folds:
        t0 = time.time()
        others = [q for q in products if q != p]
        ckpt = out / f"{p}_pretrained.pt"
        pre_summary = None
        if not ckpt.is_file():
            for q in others:
                if q not in data:
                    data[q] = SegProduct.from_folder(root / q, clicker.extractor, banks / f"{q}_bank.safetensors")
            first, rest = data[others[0]], [data[q] for q in others[1:]]
            cfg = SegTrainConfig(seed=args.seed, iterations=args.pretrain_iterations)
            _, pre_summary = train_seg(first.items, clicker.extractor, first.bank, cfg,
                                       residual_config=clicker.residual_config, out=ckpt, device=clicker.device,
                                       others=rest)
        pre_seconds = round(time.time() - t0, 1)
        result = evaluate_seg(root / p, out / p, modes=modes, seed=args.seed, iterations=args.iterations,
                              bank_path=str(banks / f"{p}_bank.safetensors"), device="auto",
                              pretrained=ckpt)
        result["pretraining"] = {"products": others, "iterations": args.pretrain_iterations,
                                 "seconds": pre_seconds if pre_summary is not None else "reused",
                                 "summary": pre_summary}
        (out / f"{p}.json").write_text(json.dumps(result, indent=2))
        rows[p] = result
        print(f"{p}: {json.dumps(result['methods'])} ({result['seconds']} s eval, pre-training {pre_seconds} s)",
              flush=True)
    print(table(rows, modes), flush=True)


if __name__ == "__main__":
    main()
