"""``python -m adclick_core ...``: build reference banks, train, evaluate, benchmark.

Long work shows progress bars on stderr; results meant for machines are JSON on stdout
(and in the ``--json`` file where a command offers it).
"""
from __future__ import annotations

import argparse
import json
import os
import logging
import sys
import time
from pathlib import Path

import torch

from .utils.errors import AdclickError, DataError, InputError

log = logging.getLogger("adclick_core")


def _add_backbone_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", default="efficientnet_lite0", choices=["efficientnet_lite0", "wide_resnet50_2"])
    p.add_argument("--backbone-weights", default=None, help="local weights file (default: packaged / timm)")
    p.add_argument("--input-size", type=int, default=256)
    p.add_argument("--feature-dim", type=int, default=None, help="d_f (default: backbone's own)")


def _add_residual_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--k", type=int, default=None, help="reference images kept by global retrieval (default 20)")
    p.add_argument("--matching", choices=["window", "soft"], default=None)
    p.add_argument("--radius", type=float, default=None, help="hard window radius sigma in grid cells")
    p.add_argument("--pos-weight", type=float, default=None, help="soft position-embedding scale w")


def _residual_config(args, base=None):
    from .features.residuals import ResidualConfig

    cfg = base or ResidualConfig()
    for name in ("k", "matching", "radius", "pos_weight"):
        v = getattr(args, name, None)
        if v is not None:
            setattr(cfg, name, v)
    return cfg


def _backbone_config(args):
    from .features.backbone import BackboneConfig

    stages, feature_dim = (2, 3, 4), 256
    if args.backbone == "wide_resnet50_2":
        stages, feature_dim = (1, 2, 3), 1024
    return BackboneConfig(name=args.backbone, stages=stages, input_size=args.input_size,
                          feature_dim=args.feature_dim or feature_dim)


# ---------------------------------------------------------------------------- commands
def cmd_build_bank(args) -> dict:
    from .features.backbone import build_extractor
    from .utils.data import IMAGE_SUFFIXES
    from .features.reference import ReferenceBank

    extractor = build_extractor(_backbone_config(args), weights=args.backbone_weights, device=args.device)
    src = Path(args.images)
    if not src.is_dir():
        raise DataError(f"{src} is not a folder (give a folder of defect-free images or an MVTec-style folder)")
    if (src / "train" / "good").is_dir():
        src = src / "train" / "good"
    paths = sorted(p for p in src.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise AdclickError(f"no images found in {src}")
    t0 = time.time()
    bank = ReferenceBank.build(extractor, paths, names=[p.name for p in paths], progress=True)
    bank.save(args.out)
    return {"bank": str(args.out), "images": len(bank), "seconds": round(time.time() - t0, 1),
            "fingerprint": bank.fingerprint, "backbone": bank.backbone.to_dict()}


def cmd_combine_click(args) -> dict:
    from .utils.checkpoint import combine_checkpoints
    from .inference.predictor import ClickPredictor

    summary = combine_checkpoints(args.checkpoints, args.out)
    # Load it back as the backend will: a file that does not build is an error now, not at the first click.
    pred = ClickPredictor.from_checkpoint(args.out, device=args.device)
    summary["members_loaded"] = len(pred.model.members)
    return summary


def _init_predictor(args):
    """The click model ``train-click --init`` continues from; its backbone, model and residual
    config are the new model's, so options that would change them are refused."""
    from .inference.predictor import ClickPredictor

    pred = ClickPredictor.from_checkpoint(args.init, device=args.device, backbone_weights=args.backbone_weights)
    bcfg, mcfg = pred.extractor.config, pred.model.config
    clashes = [f"--{name} {given} (the checkpoint has {have})" for name, given, have in (
        ("backbone", args.backbone, bcfg.name), ("input-size", args.input_size, bcfg.input_size),
        ("feature-dim", args.feature_dim, bcfg.feature_dim), ("embed-dim", args.embed_dim, mcfg.embed_dim),
        ("depth", args.depth, mcfg.depth)) if given is not None and given != have]
    if clashes:
        raise InputError(f"--init {args.init} fixes the architecture; drop or match: {', '.join(clashes)}")
    return pred


def _paired(files: list | None, folders: list, option: str, folder_option: str) -> list:
    """One file per folder from a repeated ``option`` (None each where it is not given)."""
    files = list(files or [])
    if files and len(files) != len(folders):
        raise InputError(f"{len(files)} {option} files for {len(folders)} {folder_option} folders: give one "
                         f"{option} per {folder_option}")
    return files or [None] * len(folders)


def cmd_train_click(args) -> dict:
    from .features.backbone import build_extractor
    from .utils.checkpoint import ensemble_members, joint_fingerprint, load_checkpoint, replace_member
    from .utils.data import MVTecFolder
    from .models import ADClickConfig
    from .features.reference import ReferenceBank
    from .training.synthesis import AnomalySynthesizer
    from .training.adaptation import member_weights
    from .training.textures import texture_families
    from .training.distributed import Distributed
    from .training.click import ClickTrainConfig, build_defect_pool, build_synthetic_pool, concat_pools, train_click

    torch.set_num_threads(max(1, torch.get_num_threads()))
    t0 = time.time()
    dist = Distributed.from_env(args.device)  # under torchrun: one of N processes
    if args.max_extra_clicks < 0:
        raise AdclickError(f"--max-extra-clicks must be >= 0, got {args.max_extra_clicks}")
    if args.textures < 0 or args.texture_images < 2:
        raise InputError(f"--textures must be >= 0 and --texture-images >= 2, got {args.textures} and "
                         f"{args.texture_images}")
    datas = [Path(d) for d in args.data]
    banks = _paired(args.bank, datas, "--bank", "--data")
    defect_sets = [Path(d) for d in args.defects]
    defect_banks = _paired(args.defects_bank, defect_sets, "--defects-bank", "--defects")
    if not datas and not defect_sets and not args.textures:
        raise InputError("nothing to train on: give --data, --defects or --textures")
    if args.crops_per_defect < 0:
        raise InputError(f"--crops-per-defect must be >= 0, got {args.crops_per_defect}")
    mix = {"p_edge": args.edge_share, "p_uneven": args.uneven_share, "p_finish": args.finish_share,
           "p_photometric": args.photometric_share, "p_strip": args.strip_share,
           "p_faint": args.faint_share}
    try:
        synth = AnomalySynthesizer(**mix)
    except ValueError as exc:
        raise AdclickError(f"synthetic anomaly mix: {exc}") from exc
    for d in datas + defect_sets:  # every folder is checked before anything is computed
        if not MVTecFolder(d).train_good():
            raise DataError(f"{d}: no defect-free images in train/good (the references its residuals need)")
    for d in defect_sets:
        if not MVTecFolder(d).test_samples(defective_only=True):
            raise DataError(f"{d}: no defect images with masks (test/<type>, ground_truth/<type>/<name>_mask.png)")
    init_state, init_record, ensemble = None, None, []
    if args.replace_member:
        ensemble = ensemble_members(load_checkpoint(args.init, "adclick_click")) if args.init else []
        if len(ensemble) < 2:
            raise InputError("--replace-member needs --init to name an ensemble checkpoint")
    if args.init:
        pred = _init_predictor(args)
        init_state, _ = member_weights(pred, args.init_member)
        init_record = {"checkpoint": str(args.init), "member": args.init_member}
        extractor, rcfg, mcfg = pred.extractor, _residual_config(args, base=pred.residual_config), pred.model.config
    else:
        args.backbone, args.input_size = args.backbone or "efficientnet_lite0", args.input_size or 256
        extractor = build_extractor(_backbone_config(args), weights=args.backbone_weights, device=args.device)
        rcfg = _residual_config(args)
        mcfg = ADClickConfig(in_channels=extractor.feature_dim, input_size=extractor.config.input_size,
                             grid_size=extractor.grid_size, fine_channels=extractor.fine_channels,
                             embed_dim=args.embed_dim or 96, depth=args.depth or 4)

    if dist.active:  # rank 0 builds and saves the banks first; below, every process loads them
        with dist.main_first():
            for data, bank_path in list(zip(datas, banks)) + list(zip(defect_sets, defect_banks)):
                if bank_path:
                    MVTecFolder(data).reference_bank(extractor, bank_path)

    # Each source (a product folder or a texture family) pastes anomalies on its own images and
    # takes residuals against its own bank; the first keeps the single-folder random stream.
    pools, fingerprints, sources = [], [], []
    for i, (data, bank_path) in enumerate(zip(datas, banks)):
        bank = MVTecFolder(data).reference_bank(extractor, bank_path)
        normals = MVTecFolder(data).train_good()
        pools.append(build_synthetic_pool(extractor, bank, normals, rcfg, per_image=args.per_image,
                                          seed=args.seed + 1000 * i, bank_index=bank.positions(normals),
                                          exclude_similar=args.exclude_similar, synthesizer=synth))
        fingerprints.append(bank.fingerprint)
        sources.append({"data": str(data), "normal_images": len(normals)})
    families = texture_families(args.textures, seed=args.seed)
    for j, family in enumerate(families):
        images = family.images(args.texture_images, seed=args.seed * 1000 + j + 1)
        bank = ReferenceBank.build(extractor, images, names=[f"texture-{j}-{n}" for n in range(len(images))],
                                   progress=False)
        if len(bank) != len(images):  # the pool leaves each image out of its own retrieval by position
            raise AdclickError(f"texture family {j}: {len(images) - len(bank)} duplicate images")
        pools.append(build_synthetic_pool(extractor, bank, images, rcfg, per_image=args.per_image,
                                          seed=args.seed + 1000 * (len(datas) + j),
                                          bank_index=list(range(len(images))), progress=False,
                                          exclude_similar=args.exclude_similar, synthesizer=synth))
        fingerprints.append(bank.fingerprint)
    defects = []
    for i, (data, bank_path) in enumerate(zip(defect_sets, defect_banks)):
        bank = MVTecFolder(data).reference_bank(extractor, bank_path)
        samples = MVTecFolder(data).test_samples(defective_only=True)
        pools.append(build_defect_pool(extractor, bank, [(x.image_path, x.mask_path) for x in samples], rcfg,
                                       seed=args.seed + 7000 + i, crops_per_image=args.crops_per_defect))
        fingerprints.append(bank.fingerprint)
        defects.append({"data": str(data), "defect_images": len(samples), "samples": len(pools[-1])})
    pool = concat_pools(pools)
    t_pool = time.time() - t0
    tcfg = ClickTrainConfig(iterations=args.iterations, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                            max_extra_clicks=args.max_extra_clicks, model=mcfg)
    trained_on = {"synthetic_per_image": args.per_image, "exclude_similar": args.exclude_similar,
                  "synthesizer": mix, "pool_seconds": round(t_pool, 1), "device": str(args.device),
                  "threads": torch.get_num_threads()}
    if defects:
        trained_on["defects"] = {"sets": defects, "crops_per_defect": args.crops_per_defect}
    if len(datas) == 1 and not families:
        trained_on = {**sources[0], **trained_on}
    else:
        trained_on = {"sources": sources, "normal_images": sum(s["normal_images"] for s in sources)
                      + len(families) * args.texture_images, **trained_on,
                      "textures": {"families": len(families), "images_per_family": args.texture_images,
                                   "kinds": sorted({f.kind for f in families})}}
    meta = {
        "backbone": extractor.config.to_dict(),
        "residual_config": rcfg.to_dict(),
        "bank_fingerprint": joint_fingerprint(fingerprints),
        "trained_on": trained_on,
    }
    if init_record:
        meta["init"] = init_record
    out = Path(args.out).with_name(f".{Path(args.out).name}.member.tmp") if args.replace_member else args.out
    try:
        _, summary = train_click(pool, tcfg, out=out, meta=meta, device=extractor.device, init_state=init_state,
                                 dist=dist)
        if args.replace_member and dist.is_main:
            replace_member(ensemble, args.init_member, out, f"member {args.init_member} continued", args.out)
    finally:
        if args.replace_member and dist.is_main:  # a failed training leaves no temporary member behind
            Path(out).unlink(missing_ok=True)
        dist.barrier()  # the checkpoint is complete before any process returns
        dist.shutdown()
    summary.update({"checkpoint": str(args.out), "pool_seconds": round(t_pool, 1),
                    "total_seconds": round(time.time() - t0, 1), "pool_size": len(pool),
                    "sources": len(datas) + len(families)})
    return summary


def _int_list(text: str, option: str) -> list[int]:
    try:
        return [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise InputError(f"{option} takes whole numbers separated by commas, e.g. 1,3,5; got {text!r}") from None


def cmd_eval_click(args) -> dict:
    from .training.adaptation import AdaptConfig
    from .evaluation.clicks import default_workers, evaluate_click_sets, format_click_tables

    result = evaluate_click_sets(
        args.data, checkpoint=args.checkpoint, bank_paths=args.bank, device=args.device,
        residual_overrides={k: getattr(args, k) for k in ("k", "matching", "radius", "pos_weight")
                            if getattr(args, k) is not None},
        clicks=_int_list(args.clicks, "--clicks"), max_clicks=args.max_clicks, limit=args.limit,
        methods=args.methods.split(","),
        workers=args.workers if args.workers is not None else default_workers(args.device),
        adapt=AdaptConfig(iterations=args.adapt_iterations) if args.adapt else None, adapt_dir=args.adapt_dir,
        learn_from=_int_list(args.learn_from, "--learn-from") if args.learn_from else (),
    )
    if len(result["sets"]) == 1:  # one set: the same JSON as always, its tables too
        result = next(iter(result["sets"].values()))
    print(format_click_tables(result), file=sys.stderr)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


def cmd_adapt_click(args) -> dict:
    from .training.adaptation import AdaptConfig, adapt_click
    from .utils.data import IMAGE_SUFFIXES, cached_bank
    from .inference.predictor import ClickPredictor

    src = Path(args.data)
    if not src.is_dir():
        raise DataError(f"{src} is not a folder (give a folder of defect-free images or an MVTec-style folder)")
    if (src / "train" / "good").is_dir():
        src = src / "train" / "good"
    images = sorted(p for p in src.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise DataError(f"no images found in {src}")
    cfg = AdaptConfig(iterations=args.iterations, lr=args.lr, per_image=args.per_image, zoom_share=args.zoom_share,
                      max_images=args.max_images, member=args.member, seed=args.seed)
    pred = ClickPredictor.from_checkpoint(args.checkpoint, device=args.device)
    bank = cached_bank(pred.extractor, images, args.bank)
    summary = adapt_click(pred.with_bank(bank), args.out, cfg, normals=images)
    ClickPredictor.from_checkpoint(args.out, device=args.device)  # a file that does not load is an error now
    return summary


def cmd_bench(args) -> dict:
    from .evaluation.latency import bench_clicks

    return bench_clicks(data=args.data, checkpoint=args.checkpoint, bank_path=args.bank, device=args.device,
                        n_images=args.images, clicks_per_image=args.clicks_per_image, bank_images=args.bank_images,
                        without=args.without)


def config_overrides(cls, pairs: list[str]) -> dict:
    """``["lr=1e-4", ...]`` -> {field: value} typed like the dataclass default (numbers and bools)."""
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        default = getattr(cls, key, None) if sep else None
        if not isinstance(default, (bool, int, float, str)):
            raise SystemExit(f"--set {pair!r}: expected FIELD=VALUE with FIELD a number/bool field of {cls.__name__}")
        if isinstance(default, bool):
            out[key] = value.strip().lower() in ("1", "true", "yes", "on")
        else:
            try:
                out[key] = type(default)(value)
            except ValueError:
                raise SystemExit(f"--set {pair!r}: {key} takes a {type(default).__name__}") from None
    return out


def cmd_train_seg(args) -> dict:
    from .utils.data import MVTecFolder
    from .inference.predictor import ClickPredictor
    from .evaluation.seg import _ok_items, split_folds, weak_items
    from .training.distributed import Distributed
    from .training.seg import SegTrainConfig, seg_synthetic_pool, train_seg

    t0 = time.time()
    dist = Distributed.from_env(args.device)  # under torchrun: one of N processes
    data = Path(args.data)
    folder = MVTecFolder(data)
    clicker = ClickPredictor.from_checkpoint(args.click_checkpoint, device=args.device)
    with dist.main_first():  # rank 0 builds and saves the bank, the other processes load it
        bank = folder.reference_bank(clicker.extractor, args.bank)
    clicker = clicker.with_bank(bank)
    samples = folder.test_samples(defective_only=True)
    if args.fold is not None:
        samples = split_folds(samples, seed=args.seed)[args.fold]
    mode = args.mode
    items = []
    if mode != "unsupervised":
        items = weak_items("clicks" if mode == "clicks" else mode, samples, clicker, n_clicks=args.clicks)
    if mode == "tags":
        items += _ok_items(folder.train_good(), len(items), args.seed)
    pool = seg_synthetic_pool(clicker.extractor, bank, folder.train_good(), clicker.residual_config, seed=args.seed,
                              unsupervised=not items)
    cfg = SegTrainConfig(seed=args.seed, language=not args.no_language, **config_overrides(SegTrainConfig, args.set))
    if args.iterations:
        cfg.iterations = args.iterations
    try:
        _, summary = train_seg(items, clicker.extractor, bank, cfg, residual_config=clicker.residual_config,
                               synthetic=pool, defect_types=folder.defect_types, out=args.out, device=clicker.device,
                               dist=dist, init=args.init)
    finally:
        dist.barrier()  # the checkpoint is complete before any process returns
        dist.shutdown()
    summary.update({"checkpoint": str(args.out), "mode": mode, "fold": args.fold,
                    "total_seconds": round(time.time() - t0, 1)})
    return summary


def cmd_pretrain_seg(args) -> dict:
    """ADClick-Seg pre-trained on the real defects (painted masks) of several products, each
    against its own references: the starting point of ``train-seg --init`` and of Start Training."""
    from .training.distributed import Distributed
    from .inference.predictor import ClickPredictor
    from .training.seg import SegProduct, SegTrainConfig, train_seg

    t0 = time.time()
    roots = [Path(d) for part in args.data for d in part.split(",") if d]
    if len(set(roots)) != len(roots) or not roots:
        raise SystemExit("--data: give each product folder once")
    dist = Distributed.from_env(args.device)
    clicker = ClickPredictor.from_checkpoint(args.click_checkpoint, device=args.device)
    products = []
    for root in roots:
        cache = Path(args.bank_dir) / f"{root.name}_bank.safetensors" if args.bank_dir else None
        with dist.main_first():  # rank 0 builds and saves the bank, the other processes load it
            product = SegProduct.from_folder(root, clicker.extractor, cache)
        if not product.items:
            raise SystemExit(f"{root}: no defective test image with a mask to pre-train on")
        products.append(product)
        log.info("%s: %d defect images, %d references", root.name, len(product.items), len(product.bank))
    cfg = SegTrainConfig(seed=args.seed, **config_overrides(SegTrainConfig, args.set))
    if args.iterations:
        cfg.iterations = args.iterations
    first, rest = products[0], products[1:]
    try:
        _, summary = train_seg(first.items, clicker.extractor, first.bank, cfg,
                               residual_config=clicker.residual_config, out=args.out, device=clicker.device,
                               dist=dist, others=rest)
    finally:
        dist.barrier()
        dist.shutdown()
    summary.update({"checkpoint": str(args.out), "products": [p.name for p in products],
                    "total_seconds": round(time.time() - t0, 1)})
    return summary


def cmd_eval_seg(args) -> dict:
    from .evaluation.seg import evaluate_seg

    result = evaluate_seg(data=args.data, runs=args.runs, modes=args.modes.split(","), seed=args.seed,
                          iterations=args.iterations, train_missing=not args.no_train,
                          click_checkpoint=args.click_checkpoint, bank_path=args.bank, device=args.device,
                          only_folds=[int(f) for f in args.folds.split(",")] if args.folds else None,
                          gate={"checkpoint": None, "on": True, "off": False}[args.gate],
                          pretrained=args.pretrained)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


# ---------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m adclick_core", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("build-bank", help="features of defect-free images -> a reference bank file")
    p.add_argument("images", help="folder of defect-free images, or an MVTec root (uses train/good)")
    p.add_argument("--out", required=True, help="bank file to write (.safetensors)")
    p.add_argument("--device", default="auto")
    _add_backbone_args(p)
    p.set_defaults(func=cmd_build_bank)

    p = sub.add_parser("train-click", help="train the ADClick click model on synthetic anomalies and real defects")
    p.add_argument("--data", default=[], action="append",
                   help="MVTec-style folder; its train/good images get synthetic anomalies. Repeat it to train on "
                        "several products (each against its own references)")
    p.add_argument("--defects", default=[], action="append",
                   help="MVTec-style folder whose real defect images (test/<type> with ground_truth masks) are "
                        "learnt from, against its own train/good references; repeatable. Leave a product out to "
                        "measure it later (leave-one-product-out)")
    p.add_argument("--defects-bank", default=None, action="append",
                   help="reference bank file to reuse / create (one per --defects, in the same order)")
    p.add_argument("--crops-per-defect", type=int, default=1,
                   help="zoom-in crops around each real defect, besides its whole image")
    p.add_argument("--out", required=True, help="checkpoint to write")
    p.add_argument("--bank", default=None, action="append",
                   help="reference bank file to reuse / create (one per --data, in the same order)")
    p.add_argument("--textures", type=int, default=0,
                   help="also train on N procedural texture families (grain, brushed, weave, grooves, speckle)")
    p.add_argument("--texture-images", type=int, default=24, help="defect-free images per texture family")
    p.add_argument("--iterations", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--per-image", type=int, default=2, help="synthetic anomalies per normal image")
    p.add_argument("--exclude-similar", type=int, default=0,
                   help="also leave the N bank images most similar to a composite's source out of its residuals")
    p.add_argument("--edge-share", type=float, default=0.0,
                   help="share of synthetic anomalies that are bands / chips along an image side")
    p.add_argument("--uneven-share", type=float, default=0.2,
                   help="share of the other anomalies that are large uneven regions")
    p.add_argument("--finish-share", type=float, default=0.0,
                   help="share of the uneven ones that are straight-bordered finish patches")
    p.add_argument("--strip-share", type=float, default=0.0,
                   help="share of the other uneven ones that are strips across the image, side to side")
    p.add_argument("--faint-share", type=float, default=0.0,
                   help="share of the strips rendered faint (1-6 %% brightness change): the clicks' line must carry them")
    p.add_argument("--photometric-share", type=float, default=0.0,
                   help="share of composites relit as a whole (brighter / higher contrast)")
    p.add_argument("--max-extra-clicks", type=int, default=3,
                   help="iterative corrective clicks simulated per training sample: 0 up to this many")
    p.add_argument("--embed-dim", type=int, default=None, help="Swin width (default 96)")
    p.add_argument("--depth", type=int, default=None, help="Swin blocks (default 4)")
    p.add_argument("--init", default=None,
                   help="continue from this click checkpoint's weights (its backbone, model and residual config)")
    p.add_argument("--init-member", type=int, default=0, help="the ensemble member of --init to start from")
    p.add_argument("--replace-member", action="store_true",
                   help="with an ensemble --init: write the whole ensemble, the trained model in place of "
                        "--init-member and the other members as they were")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    _add_backbone_args(p)
    _add_residual_args(p)
    p.set_defaults(func=cmd_train_click, backbone=None, input_size=None)  # None: the default, or --init's

    p = sub.add_parser("adapt-click", help="fine-tune the click model on one product's defect-free images (minutes)")
    p.add_argument("--data", required=True, help="folder of defect-free images, or an MVTec-style folder (train/good)")
    p.add_argument("--out", required=True, help="adapted checkpoint to write")
    p.add_argument("--checkpoint", default=None, help="click model to start from (default: the shipped one)")
    p.add_argument("--bank", default=None, help="reference bank file to reuse / create")
    p.add_argument("--iterations", type=int, default=300)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--per-image", type=int, default=2, help="synthetic anomalies per reference image")
    p.add_argument("--zoom-share", type=float, default=0.5, help="share of them on zoom-in crops")
    p.add_argument("--max-images", type=int, default=200, help="reference images used at most")
    p.add_argument("--member", type=int, default=0, help="the ensemble member to start from")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_adapt_click)

    p = sub.add_parser("combine-click", help="several click checkpoints -> one ensemble checkpoint (mean probability)")
    p.add_argument("checkpoints", nargs="+", help="click checkpoints of one architecture, backbone and bank")
    p.add_argument("--out", required=True, help="ensemble checkpoint to write")
    p.add_argument("--device", default="cpu", help="where the written file is loaded back as a check")
    p.set_defaults(func=cmd_combine_click)

    p = sub.add_parser("eval-click", help="simulated-click evaluation against two baselines")
    p.add_argument("--data", required=True, action="append",
                   help="MVTec-style folder (train/good = references, test = evaluation); repeat it for several "
                        "data sets: one table per set and their mean")
    p.add_argument("--checkpoint", default=None, help="click checkpoint (default: the shipped one)")
    p.add_argument("--clicks", default="1,3,5,10,20", help="click counts to report")
    p.add_argument("--max-clicks", type=int, default=20, help="clicks simulated at most (NoC cap)")
    p.add_argument("--workers", type=int, default=None,
                   help="processes sharing the images (default: one per CPU core, at most 4; one on a GPU)")
    p.add_argument("--methods", default="adclick,random_walker,residual_map",
                   help="adclick (shipped behaviour), adclick_raw (no boundary refinement), adclick_global (no "
                        "zoom-in), random_walker, residual_map")
    p.add_argument("--bank", default=None, action="append",
                   help="reference bank file to reuse / create (one per --data, in the same order)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only N defective images of each set, spread evenly over its sorted list "
                        "(every defect type in proportion): a quick run to iterate on")
    p.add_argument("--adapt", action="store_true",
                   help="adapt the click model to each set's defect-free images first, as the backend adapts a "
                        "project's (adapt-click), and evaluate the adapted model")
    p.add_argument("--adapt-iterations", type=int, default=300, help="fine-tuning iterations of --adapt")
    p.add_argument("--learn-from", default=None,
                   help="counts N, e.g. 0,10,20: per N, adapt the model to the set's references and N of its defect "
                        "images with their masks (a project's accepted labels, drawn at random, seed 0), then "
                        "evaluate the images no count learnt from (N = 0: the model as it is)")
    p.add_argument("--adapt-dir", default=None, help="keep the adapted checkpoints here (default: thrown away)")
    p.add_argument("--json", default=None, help="also write the result to this file")
    p.add_argument("--device", default="auto")
    _add_residual_args(p)
    p.set_defaults(func=cmd_eval_click)

    p = sub.add_parser("train-seg", help="train ADClick-Seg from one kind of label")
    p.add_argument("--data", required=True, help="MVTec-style folder: train/good = references, test/<type> = labelled")
    p.add_argument("--mode", required=True, choices=["unsupervised", "clicks", "masks", "boxes", "tags"])
    p.add_argument("--out", required=True, help="checkpoint to write")
    p.add_argument("--fold", type=int, default=None, choices=[0, 1], help="train on one fold of the defective images")
    p.add_argument("--clicks", type=int, default=5, help="simulated clicks per image for --mode clicks")
    p.add_argument("--iterations", type=int, default=None)
    p.add_argument("--no-language", action="store_true", help="ablation: no prompt features")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a SegTrainConfig field (repeatable), e.g. --set lr=2e-4")
    p.add_argument("--click-checkpoint", default=None, help="ADClick checkpoint for pseudo labels (default: shipped)")
    p.add_argument("--init", default=None,
                   help="continue from this ADClick-Seg checkpoint (e.g. one from pretrain-seg) instead of a random model")
    p.add_argument("--bank", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_train_seg)

    p = sub.add_parser("pretrain-seg", help="pre-train ADClick-Seg on the real defects of other products")
    p.add_argument("--data", required=True, action="append",
                   help="MVTec-style product folders (comma-separated or repeated): every defective test image "
                        "with its mask, against the product's own train/good")
    p.add_argument("--out", required=True, help="checkpoint to write")
    p.add_argument("--iterations", type=int, default=None)
    p.add_argument("--bank-dir", default=None, help="cache each product's bank here as <folder name>_bank.safetensors")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a SegTrainConfig field (repeatable)")
    p.add_argument("--click-checkpoint", default=None, help="its backbone is the one used (default: shipped)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_pretrain_seg)

    p = sub.add_parser("eval-seg", help="ADClick-Seg from every kind of label, side by side, two folds")
    p.add_argument("--data", required=True)
    p.add_argument("--runs", required=True, help="folder of checkpoints <mode>_fold<f>.pt (missing ones are trained)")
    p.add_argument("--modes", default=",".join(["residual_map", "unsupervised", "clicks5", "boxes", "tags", "masks",
                                                 "clicks5_no_language"]))
    p.add_argument("--iterations", type=int, default=None, help="training iterations for missing checkpoints")
    p.add_argument("--no-train", action="store_true", help="fail instead of training missing checkpoints")
    p.add_argument("--pretrained", default=None,
                   help="ADClick-Seg checkpoint pre-trained on other products (pretrain-seg): the modes "
                        "'pretrained' (as it is, no label of this product) and 'pretrained_fused' (fused with "
                        "the training-free map) score it, and every mode that trains starts from it")
    p.add_argument("--folds", default=None, help="only these folds, e.g. 0 (default: both; the mean is over those run)")
    p.add_argument("--gate", choices=["checkpoint", "on", "off"], default="checkpoint",
                   help="scale Seg maps by the image score: as each checkpoint was calibrated (default), "
                        "or always / never")
    p.add_argument("--click-checkpoint", default=None)
    p.add_argument("--bank", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_eval_seg)

    p = sub.add_parser("bench", help="click latency and memory (JSON)")
    p.add_argument("--data", required=True, help="MVTec-style folder")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--bank", default=None)
    p.add_argument("--images", type=int, default=10)
    p.add_argument("--clicks-per-image", type=int, default=5)
    p.add_argument("--bank-images", type=int, default=None, help="build the bank from the first N train/good images")
    p.add_argument("--without", default=[], action="append", choices=["refinement", "seeds", "zoom"],
                   help="time the clicks without this step (repeatable): zoom (zoom-in), refinement (the walker on "
                        "small answers, the anchored cut), seeds (the clicks as hard seeds)")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        result = args.func(args)
    except AdclickError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0") or 0) == 0:  # under torchrun the first process reports
        print(json.dumps(result, indent=2))
    return 0
