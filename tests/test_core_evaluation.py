"""``eval-click`` and ``bench``: the click protocol (``simulate_clicks``), argument checks, and one
tiny end-to-end run of each on a toy MVTec folder (64 px, a click checkpoint trained here)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from adclick_core.features.backbone import BackboneConfig
from adclick_core.inference.baselines import residual_cut_probability
from adclick_core.cli import main
from adclick_core.inference.clicks import Click
from adclick_core.utils.data import MVTecFolder
from adclick_core.utils.errors import DataError, InputError
from adclick_core.evaluation.clicks import DEFAULT_METHODS, METHODS, check_methods, evaluate_clicks, report_counts, simulate_clicks
from adclick_core.evaluation.metrics import iou, pixel_ap
from adclick_core.inference.predictor import ClickPredictor
from adclick_core.features.residuals import ResidualConfig
from tests.images import defective, texture, write_mvtec
from tests.tiny_click import train_tiny_click

HW = (48, 64)
BACKBONE = BackboneConfig(input_size=64)
RESIDUAL = ResidualConfig(k=3, radius=2.0)


def _square_gt(hw=(40, 40), box=(10, 30, 10, 30)) -> np.ndarray:
    gt = np.zeros(hw, bool)
    gt[box[0]:box[1], box[2]:box[3]] = True
    return gt


def _painter(radius: int):
    """A method that answers 1 in a disk around each positive click and 0 elsewhere."""
    def method(clicks: list[Click], prev):
        yy, xx = np.mgrid[:40, :40]
        out = np.zeros((40, 40), np.float32)
        for c in clicks:
            if c.positive:
                out[(yy - c.y) ** 2 + (xx - c.x) ** 2 <= radius ** 2] = 1.0
        return out
    return method


# ---------------------------------------------------------------- the protocol


def test_a_perfect_first_answer_ends_the_run_and_stands_for_later_counts():
    gt = _square_gt()
    calls = []

    def oracle(clicks, prev):
        calls.append(list(clicks))
        return gt.astype(np.float32)

    ious, kept = simulate_clicks(oracle, gt, max_clicks=20, report_at=[1, 3, 5])
    assert ious == [1.0] and len(calls) == 1
    assert calls[0][0].positive and gt[int(calls[0][0].y), int(calls[0][0].x)]  # first click inside the defect
    assert sorted(kept) == [1, 3, 5]
    for k in (1, 3, 5):
        np.testing.assert_array_equal(kept[k] > 0.5, gt)


def test_small_answers_run_to_the_cap_and_keep_the_answer_of_each_reported_count():
    gt = _square_gt()
    ious, kept = simulate_clicks(_painter(2), gt, max_clicks=6, report_at=[1, 3])
    assert len(ious) == 6  # never reaches IoU 0.8, so every allowed click is used
    disk = int((kept[1] > 0.5).sum())
    assert 9 <= disk <= 13  # one radius-2 disk after the first click
    assert (kept[3] > 0.5).sum() == pytest.approx(3 * disk, abs=4)  # three disks, nearly disjoint
    assert ious == sorted(ious)  # each click adds a disk of defect
    assert ious[0] == pytest.approx(iou(kept[1] > 0.49, gt))


def test_a_good_answer_stops_once_the_last_reported_count_is_reached():
    gt = _square_gt()
    grown = np.zeros_like(gt)
    grown[10:31, 10:31] = True  # IoU 400 / 441 = 0.91 from the first click on
    ious, kept = simulate_clicks(lambda c, p: grown.astype(np.float32), gt, max_clicks=20, report_at=[1, 3])
    assert len(ious) == 3 and ious[0] == pytest.approx(400 / 441)


def test_the_run_goes_on_until_the_highest_noc_target_is_reached():
    gt = _square_gt()
    grown = np.zeros_like(gt)
    grown[9:31, 9:31] = True  # IoU 400 / 484 = 0.83: NoC@80 is known, NoC@85 is not
    ious, _ = simulate_clicks(lambda c, p: grown.astype(np.float32), gt, max_clicks=7, report_at=[1, 3])
    assert len(ious) == 7


def test_report_counts_are_checked_against_the_cap():
    assert report_counts([5, 1, 3, 3], 20) == [1, 3, 5]
    with pytest.raises(InputError, match=r"1\.\.5"):
        report_counts([1, 30], 5)
    with pytest.raises(InputError, match=r"\[0\]"):
        report_counts([0, 3], 20)
    with pytest.raises(InputError):
        report_counts([], 20)
    with pytest.raises(InputError, match="max_clicks"):
        report_counts([1], 0)


def test_unknown_methods_are_named_with_the_known_ones():
    assert check_methods(["residual_map", "adclick"]) == ["residual_map", "adclick"]
    with pytest.raises(InputError) as info:
        check_methods(["adclick", "grabcut"])
    assert "grabcut" in str(info.value) and all(m in str(info.value) for m in METHODS)


# ---------------------------------------------------------------- end to end on a toy folder


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    """6 defect-free images, 3 + 2 defective ones (bright squares) and one with an empty mask."""
    squares = [defective(k, HW, size_range=(8, 14), margin=3, square_seed=700, texture_seed=300) for k in range(5)]
    empty = (texture(61, HW), np.zeros(HW, bool))
    return write_mvtec(tmp_path_factory.mktemp("mvtec") / "toy", [texture(i, HW) for i in range(6)],
                       {"scratch": squares[:3], "stain": squares[3:] + [empty]}, [texture(60, HW)])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, toy) -> Path:
    """A click model trained a few iterations on the packaged backbone at 64 px (as eval-click loads it)."""
    path = tmp_path_factory.mktemp("click") / "click.pt"
    train_tiny_click(toy, path, BACKBONE, RESIDUAL, random_init=False, iterations=3)
    return path


def test_evaluate_clicks_reports_every_method_per_count_and_per_image(toy, checkpoint):
    result = evaluate_clicks(toy, checkpoint, clicks=(3, 1), max_clicks=4, device="cpu", progress=False)
    assert result["n_images"] == 5
    assert result["left_out_empty_masks"] == ["stain/002"]
    assert set(result["methods"]) == set(DEFAULT_METHODS)
    for name, table in result["methods"].items():
        assert sorted(table) == ["1", "3"], name
        for row in table.values():
            for key in ("ap", "aupro", "pixel_auroc", "miou"):
                assert 0.0 <= row[key] <= 1.0, (name, key, row)
            assert 1.0 <= row["noc50"] <= row["noc80"] <= row["noc85"] <= 4.0, (name, row)
    assert set(result["per_defect_type_ap"]["adclick"]) == {"scratch", "stain"}
    for name, by_type in result["per_defect_type"].items():
        assert {t: r["n_images"] for t, r in by_type.items()} == {"scratch": 3, "stain": 2}
        for kind, row in by_type.items():
            assert result["per_defect_type_ap"][name][kind] == row["3"]["ap"]
            assert 1.0 <= row["noc80"] <= row["noc85"] <= 4.0
    json.dumps(result, allow_nan=False)  # no NaN anywhere: strict JSON

    # The residual-map row recomputed here from the same pieces: the figures belong to the right method.
    folder = MVTecFolder(toy)
    pred = ClickPredictor.from_checkpoint(checkpoint, device="cpu")
    pred = pred.with_bank(folder.reference_bank(pred.extractor, progress=False))
    samples = [s for s in folder.test_samples(defective_only=True) if s.mask().any()]
    maps, gts, per_image, per_image_ious = [], [], [], []
    for s in samples:
        image, gt = s.image(), s.mask()
        amap = pred.anomaly_map(pred.set_image(image))
        ious, kept = simulate_clicks(lambda c, p: residual_cut_probability(amap, c), gt, 4, [1, 3])
        per_image_ious.append(ious)
        maps.append(kept[3].astype(np.float32))
        gts.append(gt)
        per_image.append((s.name, pixel_ap([maps[-1]], [gt]), ious[min(3, len(ious)) - 1]))
    assert result["methods"]["residual_map"]["3"]["ap"] == pytest.approx(pixel_ap(maps, gts), abs=1e-4)
    scratch = [i for i, s in enumerate(samples) if s.defect_type == "scratch"]
    assert result["per_defect_type"]["residual_map"]["scratch"]["1"]["miou"] == pytest.approx(
        np.mean([per_image_ious[i][0] for i in scratch]), abs=1e-4)
    assert [r["image"] for r in result["per_image"]] == [n for n, _, _ in per_image]
    for row, (name, ap, last_iou), gt in zip(result["per_image"], per_image, gts):
        assert row["clicks"] == 3 and set(row["ap"]) == set(DEFAULT_METHODS)
        assert row["ap"]["residual_map"] == pytest.approx(ap, abs=1e-4), name
        assert row["iou"]["residual_map"] == pytest.approx(last_iou, abs=1e-4), name
        assert row["defect_pixels"] == int(gt.sum()) > 0
        assert row["defect_fraction"] == pytest.approx(gt.mean(), abs=1e-5)


def test_two_worker_processes_give_the_one_process_result(toy, checkpoint):
    kwargs = dict(clicks=(1, 3), max_clicks=4, device="cpu", progress=False,
                  methods=["adclick", "random_walker", "residual_map"])
    one = evaluate_clicks(toy, checkpoint, **kwargs)
    two = evaluate_clicks(toy, checkpoint, workers=2, **kwargs)
    assert (one["workers"], two["workers"]) == (1, 2)
    assert two["left_out_empty_masks"] == one["left_out_empty_masks"] == ["stain/002"]
    assert [r["image"] for r in two["per_image"]] == [r["image"] for r in one["per_image"]]
    for name in kwargs["methods"]:
        for k in ("1", "3"):
            for metric in ("ap", "miou", "noc80", "noc85"):
                # one thread per worker against two in one process: float sums may differ a little
                assert two["methods"][name][k][metric] == pytest.approx(one["methods"][name][k][metric], abs=2e-3)
    with pytest.raises(InputError, match="workers must be at least 1"):
        evaluate_clicks(toy, checkpoint, workers=0, **kwargs)


def test_eval_click_command_writes_the_json_it_prints(toy, checkpoint, tmp_path, capsys):
    out = tmp_path / "sub" / "eval.json"
    code = main(["eval-click", "--data", str(toy), "--checkpoint", str(checkpoint), "--clicks", "1,2",
                 "--max-clicks", "3", "--methods", "adclick,residual_map", "--device", "cpu", "--json", str(out)])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert json.loads(out.read_text()) == printed
    assert set(printed["methods"]) == {"adclick", "residual_map"}
    assert sorted(printed["methods"]["adclick"]) == ["1", "2"]


def test_eval_click_on_two_sets_gives_a_table_per_set_and_their_mean(toy, checkpoint, tmp_path, capsys):
    other = write_mvtec(tmp_path / "other", [texture(10 + i, HW) for i in range(4)],
                        {"dent": [defective(9, HW, size_range=(8, 14), margin=3, square_seed=701, texture_seed=301)]})
    code = main(["eval-click", "--data", str(toy), "--data", str(other), "--checkpoint", str(checkpoint),
                 "--clicks", "1,2", "--max-clicks", "3", "--methods", "adclick,residual_map", "--device", "cpu"])
    assert code == 0
    captured = capsys.readouterr()
    printed = json.loads(captured.out)
    assert list(printed["sets"]) == ["toy", "other"]
    assert printed["sets"]["other"]["n_images"] == 1
    for method in ("adclick", "residual_map"):
        for k in ("1", "2"):
            for metric in ("ap", "miou", "noc80", "noc85"):
                values = [printed["sets"][s]["methods"][method][k][metric] for s in ("toy", "other")]
                assert printed["mean"][method][k][metric] == pytest.approx(np.mean(values), abs=1e-4)
    assert "### toy (5 defective images)" in captured.err and "### other (1 defective images)" in captured.err
    assert "### mean over 2 data sets" in captured.err


def test_eval_click_adapt_evaluates_the_model_adapted_to_each_set(checkpoint, tmp_path, capsys):
    from adclick_core.training.adaptation import MIN_REFERENCES
    from adclick_core.utils.checkpoint import load_checkpoint

    product = write_mvtec(tmp_path / "product", [texture(20 + i, HW) for i in range(MIN_REFERENCES)],
                          {"dent": [defective(8, HW, size_range=(8, 14), margin=3, square_seed=702, texture_seed=302)]})
    kept = tmp_path / "adapted"
    code = main(["eval-click", "--data", str(product), "--checkpoint", str(checkpoint), "--clicks", "1",
                 "--max-clicks", "2", "--methods", "adclick", "--device", "cpu", "--workers", "1",
                 "--adapt", "--adapt-iterations", "2", "--adapt-dir", str(kept)])
    assert code == 0
    captured = capsys.readouterr()
    printed = json.loads(captured.out)
    adapted = kept / "product_adapted.pt"
    assert printed["checkpoint"] == str(adapted)  # the adapted model answered, not the one given
    assert printed["adapted"]["references"] == MIN_REFERENCES and printed["adapted"]["total_seconds"] > 0
    record = load_checkpoint(adapted, "adclick_click")["adapted"]
    assert record["config"]["iterations"] == 2 and record["references"] == MIN_REFERENCES
    assert f"adapted to its {MIN_REFERENCES} defect-free images" in captured.err


def test_eval_click_wants_one_bank_per_data_set(toy, tmp_path, capsys):
    assert main(["eval-click", "--data", str(toy), "--data", str(toy), "--bank", str(tmp_path / "b.safetensors"),
                 "--device", "cpu"]) == 2
    assert "give one --bank per --data" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--clicks", "1,a"], "--clicks takes whole numbers"),
    (["--clicks", "1,9", "--max-clicks", "5"], "must lie in 1..5"),
    (["--methods", "adclick,grabcut"], "grabcut"),
    (["--limit", "0"], "limit must be at least 1"),
])
def test_eval_click_bad_arguments_are_one_line_errors(toy, args, message, capsys):
    assert main(["eval-click", "--data", str(toy), "--device", "cpu", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_commands_name_a_folder_that_is_not_a_data_set(tmp_path, capsys):
    for argv in (["eval-click", "--data", str(tmp_path)], ["bench", "--data", str(tmp_path)],
                 ["build-bank", str(tmp_path / "missing"), "--out", str(tmp_path / "b.safetensors")]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert str(tmp_path) in err and "Traceback" not in err, argv


def test_a_mask_of_another_size_is_a_data_error(tmp_path, checkpoint):
    img, m = defective(0, HW)
    root = write_mvtec(tmp_path / "bad", [texture(0, HW)], {"dent": [(img, m[:40, :40])]})
    with pytest.raises(DataError, match="40x40"):
        evaluate_clicks(root, checkpoint, device="cpu", progress=False)


def test_bench_prints_the_latency_keys(toy, checkpoint, capsys):
    code = main(["bench", "--data", str(toy), "--checkpoint", str(checkpoint), "--images", "2",
                 "--clicks-per-image", "3", "--device", "cpu"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("cold_click_ms", "warm_click_ms"):
        assert out[key]["p50"] > 0 and out[key]["p95"] >= out[key]["p50"]
    assert out["cold_click_ms"]["n"] == 2 and 2 <= out["warm_click_ms"]["n"] <= 4
    assert out["bank_build_ms_per_image"] > 0 and out["bank_images"] == 6
    assert out["peak_rss_mb"] > 0 and out["device"] == "cpu" and out["without"] == []
    code = main(["bench", "--data", str(toy), "--checkpoint", str(checkpoint), "--images", "1",
                 "--clicks-per-image", "2", "--device", "cpu", "--without", "seeds", "--without", "zoom"])
    assert code == 0 and json.loads(capsys.readouterr().out)["without"] == ["seeds", "zoom"]


def test_ablations_leave_out_their_step_and_nothing_else(checkpoint):
    from adclick_core.inference.predictor import without_steps

    pred = ClickPredictor.from_checkpoint(checkpoint, device="cpu")
    unseeded = without_steps(pred, ["seeds"])
    assert unseeded.boundary is None and unseeded.zoom == pred.zoom and unseeded.refinement == pred.refinement
    assert pred.boundary is not None  # the shipped predictor keeps every step
    bare = without_steps(pred, ["seeds", "zoom", "refinement"])
    assert (bare.boundary, bare.zoom, bare.refinement) == (None, None, None)
    with pytest.raises(InputError, match="unknown steps"):
        without_steps(pred, ["crf"])


def test_bench_rejects_counts_that_measure_nothing(toy, capsys):
    assert main(["bench", "--data", str(toy), "--clicks-per-image", "1"]) == 2
    assert "2 clicks per image" in capsys.readouterr().err


def test_eval_click_learn_from_adapts_to_masks_and_evaluates_the_rest(checkpoint, tmp_path, capsys):
    from adclick_core.training.adaptation import MIN_REFERENCES
    from adclick_core.utils.checkpoint import load_checkpoint
    from adclick_core.evaluation.clicks import masks_for_learning

    dents = [defective(30 + i, HW, size_range=(8, 14), margin=3, square_seed=710 + i, texture_seed=310 + i)
             for i in range(4)]
    product = write_mvtec(tmp_path / "product", [texture(40 + i, HW) for i in range(MIN_REFERENCES)], {"dent": dents})
    learnt = masks_for_learning(product, 2)
    assert [s.name for s in masks_for_learning(product, 1)] == [learnt[0].name]  # nested over counts
    kept = tmp_path / "adapted"
    code = main(["eval-click", "--data", str(product), "--checkpoint", str(checkpoint), "--clicks", "1",
                 "--max-clicks", "2", "--methods", "adclick", "--device", "cpu", "--workers", "1",
                 "--learn-from", "0,2", "--adapt-iterations", "2", "--adapt-dir", str(kept)])
    assert code == 0
    captured = capsys.readouterr()
    printed = json.loads(captured.out)
    assert list(printed["sets"]) == ["product N=0", "product N=2"]
    for result in printed["sets"].values():  # both counts on the same two images, none learnt from
        assert sorted(r["image"] for r in result["per_image"]) == sorted(
            s.name for s in MVTecFolder(product).test_samples(defective_only=True) if s not in learnt)
    assert "adapted" not in printed["sets"]["product N=0"]
    assert printed["sets"]["product N=2"]["adapted"]["masks"] == 2
    assert load_checkpoint(kept / "product_N2_adapted.pt", "adclick_click")["adapted"]["masks"] == 2
    assert "and 2 of its defect masks" in captured.err
    assert main(["eval-click", "--data", str(product), "--checkpoint", str(checkpoint), "--device", "cpu",
                 "--learn-from", "4"]) == 2
    assert "cannot learn from 4 of its 4 defect images" in capsys.readouterr().err


def test_eval_click_limit_spreads_over_the_defect_types(toy, checkpoint):
    result = evaluate_clicks(toy, checkpoint, clicks=(1,), max_clicks=1, device="cpu", progress=False,
                             methods=["residual_map"], limit=3)
    everything = MVTecFolder(toy).test_samples(defective_only=True)
    picked = [everything[i] for i in np.linspace(0, len(everything) - 1, 3).round().astype(int)]
    assert [r["image"] for r in result["per_image"]] == [s.name for s in picked if s.mask().any()]
    assert len({s.defect_type for s in picked}) == 2 and picked[0] != picked[1]
