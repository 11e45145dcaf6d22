"""Training loops. ADClick (click model) trains on synthetic anomalies pasted on defect-free images,
SimpleClick-style: initial clicks, 0-3 iterative clicks under no-grad, NFL, AdamW, EMA weights."""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from scipy import ndimage

from ..features.backbone import FeatureExtractor, load_image
from ..utils.checkpoint import save_checkpoint
from .distributed import Distributed
from ..inference.clicks import encode_clicks, next_training_click, sample_training_clicks
from ..utils.data import load_mask
from .losses import normalized_focal_loss, soft_dice_loss
from ..models import ADClick, ADClickConfig
from ..models.embeddings import residual_features
from ..features.reference import ReferenceBank
from ..features.residuals import ResidualConfig, compute_residuals, match_residuals, retrieve_neighbours, similar_bank_images
from .synthesis import AnomalySynthesizer
from ..inference.zoom import ZoomConfig, relative_crop, to_canvas

__all__ = ["ClickPool", "build_synthetic_pool", "build_defect_pool", "concat_pools", "ClickTrainConfig", "train_click", "ProgressFn"]

ProgressFn = Callable[[float, str], None]  # (fraction done in [0, 1], message)


@dataclass
class ClickPool:
    """Precomputed training samples (synthetic anomalies or real defects): residuals, stage-1
    features and masks at model input size."""

    residual: torch.Tensor  # N x C x g x g (float16)
    fine: torch.Tensor  # N x c1 x 2g x 2g (float16)
    masks: np.ndarray  # N x S x S bool

    def __len__(self) -> int:
        return int(self.residual.shape[0])


def concat_pools(pools: Sequence[ClickPool]) -> ClickPool:
    """One pool from several (one per product or texture family, each against its own bank)."""
    if not pools:
        raise ValueError("no synthetic pool to join")
    return ClickPool(torch.cat([p.residual for p in pools]), torch.cat([p.fine for p in pools]),
                         np.concatenate([p.masks for p in pools]))


def build_synthetic_pool(
    extractor: FeatureExtractor,
    bank: ReferenceBank,
    normals: Sequence,
    residual_config: ResidualConfig,
    per_image: int = 2,
    seed: int = 0,
    progress: bool = True,
    bank_index: Sequence[int] | None = None,
    batch_size: int = 8,
    synthesizer: AnomalySynthesizer | None = None,
    exclude_similar: int = 0,
    zoom_share: float = 0.0,
    zoom: ZoomConfig | None = None,
) -> ClickPool:
    """Paste ``per_image`` synthetic anomalies on every normal image and compute their residuals.

    ``bank_index[i]`` is the bank position of ``normals[i]`` (if it is in the bank): that image is
    excluded from its own retrieval, otherwise its residual would be trivially small, and so are
    the ``exclude_similar`` bank images most like it (``residuals.similar_bank_images``).

    A ``zoom_share`` of the samples are zoom-in crops instead of whole images (as
    ``ClickPredictor`` answers small defects): a random square of the image's canvas, between the
    model input and the canvas's shorter side, with the anomaly pasted on it and its residual
    against the same crop of the image's ``zoom.k`` nearest references (the bank must keep their
    pixels). The model then learns defects at their own size, not only squashed into one cell.
    """
    if not 0.0 <= zoom_share <= 1.0:
        raise ValueError(f"zoom_share must lie in [0, 1], got {zoom_share}")
    zoom = zoom or ZoomConfig()
    if zoom_share > 0 and not bank.has_sources:
        raise ValueError("zoom-in samples need a bank that keeps its references' pixels (rebuild the bank)")
    rng = np.random.default_rng(seed)
    synth = synthesizer or AnomalySynthesizer()
    s = extractor.config.input_size
    residuals, fines, masks = [], [], []
    jobs = [(i, r) for r in range(per_image) for i in range(len(normals))]
    bar = tqdm(total=len(jobs), desc="synthetic pool", unit="img", disable=not progress)
    resized_cache: dict[int, np.ndarray] = {}
    in_bank = [int(b) for b in bank_index if b >= 0] if bank_index is not None else []
    left_out = dict(zip(in_bank, similar_bank_images(bank, in_bank, exclude_similar, residual_config)))

    def resized(i: int) -> np.ndarray:
        if i not in resized_cache:
            resized_cache[i] = _resize_image(load_image(normals[i]), s)
        return resized_cache[i]

    canvas_cache: dict[int, np.ndarray] = {}

    def canvas(i: int) -> np.ndarray:
        if i not in canvas_cache:
            canvas_cache[i] = to_canvas(load_image(normals[i]), zoom.canvas_side)
        return canvas_cache[i]

    def exclusions(i: int) -> list[int]:
        return left_out[int(bank_index[i])] if bank_index is not None and bank_index[i] >= 0 else []

    # The crop or the whole image of each sample, drawn up front so the random stream of the
    # whole-image samples does not depend on the pixels.
    crops: dict[int, tuple[int, int, int, int]] = {}
    if zoom_share > 0:
        for j, (i, _) in enumerate(jobs):
            if rng.random() >= zoom_share:
                continue
            ch, cw = canvas(i).shape[:2]
            short = min(ch, cw)
            if short <= s:
                continue  # the whole image is already at its own resolution
            side = int(round(math.exp(rng.uniform(math.log(s), math.log(short)))))
            crops[j] = (int(rng.integers(0, ch - side + 1)), int(rng.integers(0, cw - side + 1)), side, side)
    k_zoom = replace(residual_config, k=zoom.k)

    for start in range(0, len(jobs), batch_size):
        chunk = list(enumerate(jobs[start : start + batch_size], start=start))
        images, excl = [], []
        for j, (i, _) in chunk:
            if j in crops:
                continue
            other = resized(int(rng.integers(len(normals))))
            img, mask = synth(resized(i), rng, others=[other])
            images.append(img)
            masks.append(mask)
            excl.append(exclusions(i))
        if images:
            feats = extractor(extractor.preprocess(images))
            res = compute_residuals(feats.grid, feats.descriptor, bank, residual_config, exclude=excl)
            residuals.append(res.residual.half().cpu())
            fines.append(feats.fine.half().cpu())
        for j, (i, _) in chunk:
            if j not in crops:
                continue
            box = crops[j]
            y0, x0, h, w = box
            cv = canvas(i)
            crop = np.ascontiguousarray(cv[y0:y0 + h, x0:x0 + w])
            crop = _resize_image(crop, s)
            other = resized(int(rng.integers(len(normals))))
            img, mask = synth(crop, rng, others=[other])
            whole = extractor(extractor.preprocess([resized(i)]))
            near = retrieve_neighbours(bank, whole.descriptor, k_zoom, exclude=[exclusions(i)])[0].tolist()
            residual, fine = _crop_residual(extractor, img, bank, near, box, cv.shape[:2], residual_config)
            residuals.append(residual)
            fines.append(fine)
            masks.append(mask)
        bar.update(len(chunk))
    bar.close()
    return ClickPool(torch.cat(residuals), torch.cat(fines), np.stack(masks))


def _crop_residual(extractor: FeatureExtractor, crop: np.ndarray, bank: ReferenceBank, near: Sequence[int],
                   box: tuple[int, int, int, int], canvas_hw: tuple[int, int],
                   residual_config: ResidualConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(residual 1 x C x g x g, stage-1 features) of a zoom-in ``crop`` (the image at ``box`` of its
    canvas) against the same crop of the bank references ``near``, as ``ClickPredictor`` answers on
    a crop; float16 on the CPU, as a pool keeps them."""
    refs = [relative_crop(bank.source(r), box, canvas_hw) for r in near if bank.sources[r] is not None]
    feats = extractor(extractor.preprocess([crop] + refs))
    residual = match_residuals(feats.grid[0].float(), feats.grid[1:].float(), residual_config)[None]
    return residual.half().cpu(), feats.fine[:1].half().cpu()


def _resize_image(image: np.ndarray, side: int) -> np.ndarray:
    """H x W x 3 uint8 -> side x side x 3 uint8 (antialiased), as the extractor sees a whole image."""
    # np.require copies only a read-only array (a decoded PIL image): torch warns on those.
    t = torch.from_numpy(np.require(image, requirements=["C", "W"])).permute(2, 0, 1)[None].float()
    t = F.interpolate(t, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
    return t[0].permute(1, 2, 0).round().clamp(0, 255).byte().numpy()


def _resize_defect_mask(mask: np.ndarray, hw: tuple[int, int], keep_small: bool = True) -> np.ndarray:
    """A defect mask at another size: a pixel is in when half of what it covers is. With
    ``keep_small``, a defect that would vanish keeps its strongest pixels instead (the canvas of a
    2448 px photo must not lose a 3 px scratch)."""
    t = torch.from_numpy(mask.astype(np.float32))[None, None]
    shrink = hw[0] <= mask.shape[0] and hw[1] <= mask.shape[1]
    cover = F.interpolate(t, size=hw, mode="area" if shrink else "bilinear")[0, 0].numpy()
    out = cover >= 0.5
    if keep_small and mask.any() and not out.any():
        out = cover >= cover.max() * 0.5
    return out


def build_defect_pool(
    extractor: FeatureExtractor,
    bank: ReferenceBank,
    samples: Sequence[tuple],
    residual_config: ResidualConfig,
    seed: int = 0,
    progress: bool = True,
    zoom: ZoomConfig | None = None,
    crops_per_image: int = 1,
) -> ClickPool:
    """Real defects with their pixel masks (``samples``: (image, mask) pairs, paths or arrays), each
    against its product's ``bank``: the whole image at model input size, and ``crops_per_image``
    zoom-in crops around one of its defects (as ``ClickPredictor`` zooms on a clicked defect): a
    square of 1.5-3x the defect's larger side, at least the model input, at a random offset that
    keeps the defect inside, matched against the same crop of the image's ``zoom.k`` nearest
    references. Defects too small to survive the whole-image resize come only as crops.

    The ADClick paper pre-trains its click model on other categories' real defects; synthetic
    anomalies alone never show it a real scratch's or rust patch's residual."""
    zoom = zoom or ZoomConfig()
    if crops_per_image and not bank.has_sources:
        raise ValueError("zoom-in crops need a bank that keeps its references' pixels (rebuild the bank)")
    rng = np.random.default_rng(seed)
    s = extractor.config.input_size
    k_zoom = replace(residual_config, k=zoom.k)
    residuals, fines, masks = [], [], []
    bar = tqdm(total=len(samples), desc="defect pool", unit="img", disable=not progress)
    for image, mask in samples:
        img = load_image(image)
        gt = np.asarray(mask if not isinstance(mask, (str, Path)) else load_mask(mask), bool)
        if gt.shape != img.shape[:2]:
            raise ValueError(f"mask {gt.shape} and image {img.shape[:2]} differ in size")
        bar.update(1)
        if not gt.any():
            continue
        whole = extractor(extractor.preprocess([_resize_image(img, s)]))
        whole_mask = _resize_defect_mask(gt, (s, s), keep_small=False)
        if whole_mask.any():
            res = compute_residuals(whole.grid, whole.descriptor, bank, residual_config)
            residuals.append(res.residual.half().cpu())
            fines.append(whole.fine.half().cpu())
            masks.append(whole_mask)
        cv = to_canvas(img, zoom.canvas_side)
        ch, cw = cv.shape[:2]
        if min(ch, cw) <= s:
            continue  # the whole image is already at its own resolution
        cmask = _resize_defect_mask(gt, (ch, cw))
        parts = ndimage.find_objects(ndimage.label(cmask, structure=np.ones((3, 3), bool))[0])
        near = retrieve_neighbours(bank, whole.descriptor, k_zoom)[0].tolist()
        for _ in range(crops_per_image):
            rows, cols = parts[int(rng.integers(len(parts)))]
            extent = max(rows.stop - rows.start, cols.stop - cols.start)
            side = int(min(min(ch, cw), max(s, round(extent * rng.uniform(1.5, 3.0)))))
            y0 = int(rng.integers(max(0, rows.stop - side), min(rows.start, ch - side) + 1)) \
                if rows.stop - rows.start <= side else int(np.clip(rows.start, 0, ch - side))
            x0 = int(rng.integers(max(0, cols.stop - side), min(cols.start, cw - side) + 1)) \
                if cols.stop - cols.start <= side else int(np.clip(cols.start, 0, cw - side))
            box = (y0, x0, side, side)
            crop = np.ascontiguousarray(cv[y0:y0 + side, x0:x0 + side])
            residual, fine = _crop_residual(extractor, crop, bank, near, box, (ch, cw), residual_config)
            residuals.append(residual)
            fines.append(fine)
            masks.append(_resize_defect_mask(cmask[y0:y0 + side, x0:x0 + side], (s, s)))
    bar.close()
    if not masks:
        raise ValueError("no defect pixels in any of the samples")
    return ClickPool(torch.cat(residuals), torch.cat(fines), np.stack(masks))


@dataclass
class ClickTrainConfig:
    iterations: int = 2000
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup: int = 100
    ema_decay: float = 0.995
    max_extra_clicks: int = 3
    nfl_gamma: float = 2.0
    nfl_alpha: float = 0.5
    dice_weight: float = 1.0  # + soft Dice: keeps short CPU trainings from collapsing to background
    seed: int = 0
    model: ADClickConfig = field(default_factory=ADClickConfig)

    def to_dict(self) -> dict:
        return asdict(self)


def warmup_cosine_lr(it: int, lr: float, warmup: int, iterations: int) -> float:
    """Linear warm-up to ``lr``, then cosine decay to 0 at ``iterations`` (both training loops)."""
    if it < warmup:
        return lr * (it + 1) / warmup
    t = (it - warmup) / max(1, iterations - warmup)
    return lr * 0.5 * (1 + math.cos(math.pi * t))


def optimizer_and_ema(model: torch.nn.Module, lr: float, weight_decay: float, ema_decay: float):
    """AdamW on the model and an EMA copy of it (weights and buffers) for the checkpoint."""
    ema = torch.optim.swa_utils.AveragedModel(
        model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(ema_decay), use_buffers=True
    )
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay), ema


def input_scale(residual: torch.Tensor, anomalous: torch.Tensor, kind: str, max_samples: int = 256) -> torch.Tensor:
    """Per-channel mean of the network input on normal pixels (residual N x C x g x g,
    ``anomalous`` N x S x S bool at any resolution, True where a defect is or may be)."""
    n = min(len(residual), max_samples)
    x = residual_features(residual[:n].float(), kind)
    g = x.shape[-1]
    normal = (F.adaptive_max_pool2d(anomalous[:n].float()[:, None], g) < 0.5).float()
    scale = (x * normal).sum((0, 2, 3)) / normal.sum((0, 2, 3)).clamp_min(1)
    return scale.clamp_min(1e-6)


def _augment(res: torch.Tensor, fine: torch.Tensor, masks: np.ndarray, rng: np.random.Generator):
    """Random flips, the same for residuals, features and masks (tiles look alike mirrored)."""
    if rng.random() < 0.5:
        res, fine, masks = res.flip(-1), fine.flip(-1), masks[..., ::-1]
    if rng.random() < 0.5:
        res, fine, masks = res.flip(-2), fine.flip(-2), masks[..., ::-1, :]
    return res, fine, np.ascontiguousarray(masks)


def train_click(
    pool: ClickPool,
    config: ClickTrainConfig,
    out: str | Path | None = None,
    meta: dict | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    callback: ProgressFn | None = None,
    checkpoint_every: int = 500,
    init_state: dict | None = None,
    sample_weights: np.ndarray | None = None,
    dist: Distributed | None = None,
) -> tuple[ADClick, dict]:
    """Train ADClick on a pool. Returns the EMA model and a summary; writes ``out``.

    ``dist``: the torchrun process group (default: the one this process joined, if any): each
    process draws its share of every batch, DDP averages the gradients, rank 0 writes ``out``.

    ``sample_weights``: how often each pool entry is drawn (normalised here; None: uniformly), so
    that a few real masks are not drowned by hundreds of synthetic anomalies.

    ``init_state``: weights to start from (fine-tuning, e.g. ``adaptation.adapt_click``) instead
    of a fresh model; the input scale is measured on this pool either way, so a product whose
    residuals run larger or smaller reaches the network at the scale it learnt on."""
    dist = dist or Distributed.current()
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed + dist.rank)  # each process its own draws
    device = dist.device(torch.device(device))
    mcfg = config.model
    model = ADClick(mcfg).to(device)
    if init_state is not None:
        model.load_state_dict(init_state, strict=True)
    model.residual_embed.input_scale.copy_(
        input_scale(pool.residual, torch.from_numpy(pool.masks), mcfg.residual_input).to(device))
    opt, ema = optimizer_and_ema(model, config.lr, config.weight_decay, config.ema_decay)
    trained = dist.wrap(model)  # the gradient step; corrective clicks are simulated on ``model``
    batch_size = dist.share(config.batch_size)
    progress = progress and dist.is_main
    out = out if dist.is_main else None
    callback = callback if dist.is_main else None

    def lr_at(it: int) -> float:
        return warmup_cosine_lr(it, config.lr, config.warmup, config.iterations)

    draw = None
    if sample_weights is not None:
        draw = np.asarray(sample_weights, np.float64)
        if draw.shape != (len(pool),) or (draw < 0).any() or draw.sum() <= 0:
            raise ValueError(f"sample_weights must be {len(pool)} non-negative numbers, not all 0")
        draw = draw / draw.sum()
    s = mcfg.input_size
    losses: list[float] = []
    t0 = time.time()
    bar = tqdm(range(config.iterations), desc="train-click", unit="it", disable=not progress)

    def save(it: int) -> None:
        if out is None:
            return
        save_checkpoint(
            out,
            "adclick_click",
            ema.module.state_dict(),
            model_config=mcfg.to_dict(),
            train_config={k: v for k, v in config.to_dict().items() if k != "model"},
            train_summary={"iterations_done": it, "seconds": round(time.time() - t0, 1),
                           "final_loss": float(np.mean(losses[-100:])) if losses else None},
            **(meta or {}),
        )

    for it in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(it)
        idx = rng.choice(len(pool), size=batch_size, replace=draw is not None or len(pool) < batch_size, p=draw)
        res, fine, gt = _augment(pool.residual[idx].float(), pool.fine[idx].float(), pool.masks[idx], rng)
        res, fine = res.to(device), fine.to(device)
        clicks = [sample_training_clicks(m, rng) for m in gt]
        prev = None
        n_extra = int(rng.integers(0, config.max_extra_clicks + 1))
        if n_extra:
            with torch.no_grad():
                for _ in range(n_extra):
                    logits = model(res, encode_clicks(clicks, prev, s, mcfg.click_radius).to(device), fine)
                    prev = torch.sigmoid(F.interpolate(logits, size=(s, s), mode="bilinear", align_corners=False))
                    pred = (prev[:, 0] > 0.49).cpu().numpy()
                    for b in range(len(clicks)):
                        c = next_training_click(gt[b], pred[b], rng)
                        if c is not None:
                            clicks[b].append(c)
        logits = trained(res, encode_clicks(clicks, prev, s, mcfg.click_radius).to(device), fine)
        logits = F.interpolate(logits, size=(s, s), mode="bilinear", align_corners=False)
        target = torch.from_numpy(gt).float()[:, None].to(device)
        loss = normalized_focal_loss(logits, target, gamma=config.nfl_gamma, alpha=config.nfl_alpha)
        if config.dice_weight:
            loss = loss + config.dice_weight * soft_dice_loss(logits, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema.update_parameters(model)
        losses.append(loss.item())
        if it % 10 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}", lr=f"{lr_at(it):.1e}")
        if callback is not None and it % 10 == 0:
            callback((it + 1) / config.iterations, f"iteration {it + 1}/{config.iterations} loss {np.mean(losses[-50:]):.4f}")
        if checkpoint_every and (it + 1) % checkpoint_every == 0:
            save(it + 1)
    bar.close()
    save(config.iterations)
    if callback is not None:
        callback(1.0, f"iteration {config.iterations}/{config.iterations} loss {np.mean(losses[-50:]):.4f}")
    summary = {
        "iterations": config.iterations,
        "seconds": round(time.time() - t0, 1),
        "loss_first_50": float(np.mean(losses[:50])) if losses else None,
        "loss_last_50": float(np.mean(losses[-50:])) if losses else None,
        "processes": dist.world_size,
    }
    return ema.module.eval(), summary
