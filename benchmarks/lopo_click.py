"""Leave-one-product-out evaluation of real-defect click training.

For each product P of ``--products``: the shipped click model's member ``--member`` is fine-tuned on
the real defects (images + masks) of every *other* product, each against its own references, plus
synthetic anomalies on the ``--synthetic`` products' defect-free images; the other member is kept
(an ensemble stays an ensemble); then ``eval-click`` measures P with that model. No figure of P
comes from a model that saw P's defect images; P's defect-free images are allowed (the backend
sees a project's references too).

Every product's defect pool is built once and shared by the folds.

    .venv/bin/python benchmarks/lopo_click.py --root ../shared/data --banks runs \\
        --out runs/lopo [--iterations 300] [--limit N] [--skip-eval]

Writes ``<out>/<P>.pt`` (the fold's ensemble), ``<out>/<P>.json`` (its eval-click result) and
``<out>/summary.json``; prints the per-product table (ADClick fold model beside the random walker).

``--ship`` trains one more model on the real defects of *every* product (no product held out, so no
evaluation): ``<out>/all.pt``, the model shipped as ``adclick_core/weights/adclick_click.pt``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adclick_core.utils.checkpoint import ensemble_members, replace_member  # noqa: E402
from adclick_core.utils.data import MVTecFolder  # noqa: E402
from adclick_core.evaluation.clicks import default_workers, evaluate_clicks, format_click_tables  # noqa: E402
from adclick_core.inference.predictor import ClickPredictor  # noqa: E402
from adclick_core.training.synthesis import AnomalySynthesizer  # noqa: E402
from adclick_core.training.click import (ClickTrainConfig, build_defect_pool, build_synthetic_pool,  # noqa: E402
                                         concat_pools, train_click)

PRODUCTS = "mtd,bsd_pitting,mpdd_metal_plate,mtoc_lens,glass_edge"


def evaluate_fold(args, root: Path, out: Path, p: str) -> dict:
    """``eval-click`` of product ``p`` with its fold's model; writes ``<out>/<p>.json``."""
    result = evaluate_clicks(root / p, out / f"{p}.pt", bank_path=str(Path(args.banks) / f"{p}_bank.safetensors"),
                             limit=args.limit, methods=args.methods.split(","), workers=default_workers())
    (out / f"{p}.json").write_text(json.dumps(result, indent=2))
    print(format_click_tables(result), flush=True)
    return result["methods"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="../shared/data", help="folder holding the products")
    ap.add_argument("--products", default=PRODUCTS, help="comma-separated product folders under --root")
    ap.add_argument("--synthetic", default="mtd,bsd_pitting",
                    help="products whose defect-free images get synthetic anomalies in every fold")
    ap.add_argument("--banks", default="runs", help="folder of <product>_bank.safetensors (made when missing)")
    ap.add_argument("--out", default="runs/lopo")
    ap.add_argument("--checkpoint", default=None, help="click model to start from (default: the shipped one)")
    ap.add_argument("--start-dir", default=None,
                    help="start each fold from <dir>/<P>.pt (e.g. an earlier run's folds, to fine-tune another member)")
    ap.add_argument("--member", type=int, default=0, help="the ensemble member fine-tuned")
    ap.add_argument("--iterations", type=int, default=300)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--per-image", type=int, default=1, help="synthetic anomalies per defect-free image")
    ap.add_argument("--folds", default=None, help="comma-separated products to hold out (default: all)")
    ap.add_argument("--limit", type=int, default=None, help="eval-click --limit (images per held-out product)")
    ap.add_argument("--methods", default="adclick,random_walker")
    ap.add_argument("--skip-eval", action="store_true", help="train the folds only")
    ap.add_argument("--eval-only", action="store_true", help="evaluate the folds already in --out")
    ap.add_argument("--ship", action="store_true",
                    help="also train on every product's defects (<out>/all.pt, the shipped model; not evaluated)")
    args = ap.parse_args()

    root, out = Path(args.root), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    products = [p for p in args.products.split(",") if p]
    folds = [p for p in (args.folds if args.folds is not None else args.products).split(",") if p]
    t0 = time.time()
    base = ClickPredictor.from_checkpoint(args.checkpoint, device="auto")
    ext, rcfg = base.extractor, base.residual_config
    members = ensemble_members({"state_dict": base.model.state_dict(), **base.checkpoint_info})
    if not members:
        raise SystemExit("the start checkpoint is not an ensemble")
    start = members[args.member]
    mix = ((start.get("trained_on") or {}).get("synthesizer")) or {"p_edge": 0.3, "p_uneven": 0.35}

    def bank(p: str):
        return MVTecFolder(root / p).reference_bank(ext, Path(args.banks) / f"{p}_bank.safetensors")

    if args.eval_only:
        summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").is_file() else {"folds": {}}
        for p in folds:
            summary["folds"].setdefault(p, {})["methods"] = evaluate_fold(args, root, out, p)
            (out / "summary.json").write_text(json.dumps(summary, indent=2))
        return
    defect_pools, synthetic = {}, []
    for i, p in enumerate(products):
        samples = MVTecFolder(root / p).test_samples(defective_only=True)
        defect_pools[p] = build_defect_pool(ext, bank(p), [(s.image_path, s.mask_path) for s in samples], rcfg,
                                            seed=7000 + i)
    for i, p in enumerate(s for s in args.synthetic.split(",") if s):
        b = bank(p)
        normals = MVTecFolder(root / p).train_good()
        synthetic.append(build_synthetic_pool(ext, b, normals, rcfg, per_image=args.per_image, seed=1000 * i,
                                              bank_index=b.positions(normals), synthesizer=AnomalySynthesizer(**mix)))
    t_pools = time.time() - t0
    summary = {"pools_seconds": round(t_pools, 1), "iterations": args.iterations, "lr": args.lr,
               "defect_samples": {p: len(v) for p, v in defect_pools.items()},
               "synthetic_samples": sum(len(s) for s in synthetic), "folds": {}}
    for p in folds + (["all"] if args.ship else []):
        t1 = time.time()
        held_out = None if p == "all" else p
        if args.start_dir:  # this fold's own earlier model: its other members stay as they were trained
            fold_base = ClickPredictor.from_checkpoint(str(Path(args.start_dir) / f"{p}.pt"), device="cpu")
            members = ensemble_members({"state_dict": fold_base.model.state_dict(), **fold_base.checkpoint_info})
            start = members[args.member]
        pool = concat_pools(synthetic + [v for q, v in defect_pools.items() if q != held_out])
        tcfg = ClickTrainConfig(iterations=args.iterations, lr=args.lr, warmup=30, max_extra_clicks=3,
                                model=base.model.config)
        trained = out / f".{p}.member.pt"
        meta = {"backbone": ext.config.to_dict(), "residual_config": rcfg.to_dict(),
                "bank_fingerprint": start.get("bank_fingerprint"),
                "trained_on": {"defects": [q for q in products if q != held_out], "synthetic": args.synthetic,
                               "held_out": held_out, "synthesizer": mix}}
        _, train_summary = train_click(pool, tcfg, out=trained, meta=meta, device=base.device,
                                       checkpoint_every=0, init_state=start["state_dict"])
        ckpt = out / f"{p}.pt"
        what = f"real defects without {held_out}" if held_out else f"real defects of {','.join(products)}"
        replace_member(members, args.member, trained, f"member {args.member}, {what}", ckpt, held_out=held_out)
        fold = {"train": train_summary, "pool_size": len(pool), "checkpoint": str(ckpt)}
        if held_out and not args.skip_eval:
            fold["methods"] = evaluate_fold(args, root, out, p)
        fold["seconds"] = round(time.time() - t1, 1)
        summary["folds"][p] = fold
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    summary["total_seconds"] = round(time.time() - t0, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k != "folds"}, indent=2))


if __name__ == "__main__":
    main()
