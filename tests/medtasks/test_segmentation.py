"""Specification of the segmentation task: metrics, losses, phantoms, shifts, U-Net, task."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from medtasks.base import DataError, DataSpec, PartitionSpec, TaskContext
from medtasks.segmentation import SegmentationParams, SegmentationTask, synthetic
from medtasks.segmentation.losses import LOSS_NAMES, build_loss
from medtasks.segmentation.metrics import SegmentationMetrics, dice_per_class, hd95, one_hot
from medtasks.segmentation.model import build_unet

NAN = float("nan")


def _labels(*maps: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.stack(maps)).long()


def _square(size: int, rows: slice, cols: slice, label: int = 1) -> np.ndarray:
    mask = np.zeros((size, size), dtype=np.int64)
    mask[rows, cols] = label
    return mask


def _context(**overrides) -> TaskContext:
    params = SegmentationParams(**overrides.pop("params", {"image_size": 32}))
    values = {
        "params": params,
        "model": None,
        "data": DataSpec(samples_per_client=20, server_samples=0),
        "partition": PartitionSpec(clients=3),
        "seed": 0,
    }
    values.update(overrides)
    return TaskContext(**values)


# ----------------------------------------------------------------------------- metrics


def test_dice_per_class_is_twice_overlap_over_total_area_and_nan_when_absent_from_both():
    truth = _square(8, slice(0, 4), slice(0, 4))  # 16 px of class 1
    pred = _square(8, slice(0, 4), slice(2, 6))  # 16 px, 8 of them overlap
    truth[6, 6] = 2  # class 2 missed by the prediction
    pred[7, 0] = 3  # class 3 predicted where the truth has none

    dice = dice_per_class(_labels(pred), _labels(truth), num_classes=5)

    torch.testing.assert_close(dice, torch.tensor([[2 * 8 / 32, 0.0, 0.0, NAN]]), equal_nan=True)


def test_hd95_of_a_shifted_square_is_the_shift():
    truth = _square(10, slice(2, 4), slice(2, 4))
    pred = _square(10, slice(2, 4), slice(5, 7))  # contour distances {2, 2, 3, 3} both ways

    result = hd95(_labels(pred, pred), _labels(truth, np.zeros_like(truth)), num_classes=2)

    torch.testing.assert_close(result, torch.tensor([[3.0], [NAN]]), equal_nan=True)


def test_dice_and_hd95_match_monai_on_phantom_masks():
    from monai.metrics import compute_dice, compute_hausdorff_distance

    samples = synthetic.generate(np.random.default_rng(0), 8, 32, 0.5)
    annotator = {"boundary_offset": 1.2, "boundary_noise": 1.0, "lesion_miss_rate": 0.3}
    _, shifted = synthetic.shift_samples(samples.images, samples.masks, {}, annotator, np.random.default_rng(1))
    pred, truth = torch.from_numpy(shifted), torch.from_numpy(samples.masks)
    pred[:2] = torch.roll(truth[:2], 5, dims=2)  # far-off predictions too
    pred_1h, truth_1h = one_hot(pred, 4), one_hot(truth, 4)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected_hd95 = compute_hausdorff_distance(pred_1h, truth_1h, percentile=95).float()
    # MONAI scores "absent from both" as 1 with ignore_empty=False; ours is NaN (undefined)
    expected_dice = compute_dice(pred_1h, truth_1h, include_background=False, ignore_empty=False)
    expected_dice[~(pred_1h.amax((2, 3)) + truth_1h.amax((2, 3)))[:, 1:].bool()] = NAN

    torch.testing.assert_close(hd95(pred, truth, 4), expected_hd95, equal_nan=True, rtol=0, atol=1e-4)
    torch.testing.assert_close(dice_per_class(pred, truth, 4), expected_dice, equal_nan=True)


def test_metric_accumulator_nan_means_over_images_then_classes():
    metrics = SegmentationMetrics(num_classes=3)
    full = _square(6, slice(0, 3), slice(0, 3))
    half = _square(6, slice(0, 3), slice(0, 3))
    half[:, 2] = 0  # 6 of 9 pixels: Dice 2·6/15 = 0.8

    metrics(_labels(full), _labels(full))  # class 1 Dice 1, class 2 absent (NaN)
    metrics(_labels(half), _labels(full))  # class 1 Dice 0.8
    result = metrics.aggregate()

    torch.testing.assert_close(result["dice_per_class"], torch.tensor([0.9, NAN]), equal_nan=True)
    assert result["dice"].item() == pytest.approx(0.9)
    metrics.reset()
    with pytest.raises(ValueError, match="before any batch"):
        metrics.aggregate()


def test_metrics_reject_mismatched_shapes():
    with pytest.raises(ValueError, match=r"\(1, 4, 4\).*\(1, 4, 5\)"):
        dice_per_class(torch.zeros(1, 4, 4, dtype=torch.long), torch.zeros(1, 4, 5, dtype=torch.long), 2)


# ----------------------------------------------------------------------------- losses


def _all_classes_target() -> torch.Tensor:
    target = torch.zeros(2, 8, 8, dtype=torch.long)
    target[:, :4, :4] = 1
    target[:, 4:, 4:] = 2
    target[:, 6, 1] = 3
    return target


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_loss_is_near_zero_for_a_perfect_prediction_and_large_for_a_wrong_one(name):
    loss = build_loss(name, num_classes=4)
    target = _all_classes_target()
    perfect = 30.0 * one_hot(target, 4)
    wrong = 30.0 * one_hot((target + 1) % 4, 4)

    assert loss(perfect, target).item() < 1e-3
    assert loss(wrong, target).item() > 0.3


def test_dice_loss_is_one_minus_soft_dice_per_image_and_class():
    generator = torch.Generator().manual_seed(0)
    probabilities = torch.rand(2, 3, 4, 4, generator=generator).softmax(dim=1)
    target = torch.randint(0, 3, (2, 4, 4), generator=generator)
    target[:, 0, :3] = torch.tensor([0, 1, 2])  # every class present in every image
    s = one_hot(target, 3)

    # D = 1 - 2<p, s> / (<p, 1> + <s, 1>), per image and class, then averaged
    dims = (2, 3)
    expected = (1 - 2 * (probabilities * s).sum(dims) / (probabilities.sum(dims) + s.sum(dims))).mean()
    loss = build_loss("dice", num_classes=3, smooth=0.0)

    torch.testing.assert_close(loss(probabilities.log(), target), expected)


def test_tversky_with_equal_half_weights_equals_dice_and_beta_punishes_misses():
    target = _all_classes_target()
    logits = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    dice = build_loss("dice", num_classes=4)(logits, target)
    tversky = build_loss("tversky", num_classes=4, tversky_alpha=0.5, tversky_beta=0.5)(logits, target)
    torch.testing.assert_close(tversky, dice)

    shrunk = target.clone()
    shrunk[:, 3, :4] = 0  # organ under-segmented: false negatives of class 1 (FP of background)
    under = 30.0 * one_hot(shrunk, 4)
    fn_heavy = build_loss("tversky", num_classes=4, tversky_alpha=0.1, tversky_beta=0.9)(under, target)
    fp_heavy = build_loss("tversky", num_classes=4, tversky_alpha=0.9, tversky_beta=0.1)(under, target)
    assert fn_heavy > fp_heavy


def test_focal_loss_with_gamma_zero_is_cross_entropy_over_classes():
    target = _all_classes_target()
    logits = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    focal = build_loss("focal", num_classes=4, focal_gamma=0.0)(logits, target)
    cross_entropy = build_loss("ce", num_classes=4)(logits, target)
    torch.testing.assert_close(focal, cross_entropy / 4)
    assert build_loss("focal", num_classes=4, focal_gamma=2.0)(logits, target) < focal


def test_unknown_loss_is_rejected():
    with pytest.raises(ValueError, match="unknown loss 'l2'"):
        build_loss("l2", num_classes=4)


# ----------------------------------------------------------------------------- generator


def test_generator_is_deterministic_and_draws_every_class():
    first = synthetic.generate(np.random.default_rng(7), 8, 64, 1.0)
    second = synthetic.generate(np.random.default_rng(7), 8, 64, 1.0)

    np.testing.assert_array_equal(first.images, second.images)
    np.testing.assert_array_equal(first.masks, second.masks)
    assert first.images.dtype == np.float32 and first.masks.dtype == np.int64
    for mask in first.masks:
        assert set(np.unique(mask)) == {0, 1, 2, 3}


def test_lesions_are_carved_out_of_organ_one_and_change_nothing_else():
    for seed in range(20):
        _, with_lesion = synthetic.phantom(np.random.default_rng(seed), 64, has_lesion=True)
        _, without = synthetic.phantom(np.random.default_rng(seed), 64, has_lesion=False)
        lesion = with_lesion == synthetic.LESION
        assert lesion.any()
        assert (without[lesion] == 1).all()
        np.testing.assert_array_equal(with_lesion[~lesion], without[~lesion])


def test_organs_are_brighter_than_surrounding_tissue():
    samples = synthetic.generate(np.random.default_rng(3), 16, 64, 0.0)
    mean = {c: samples.images[samples.masks == c].mean() for c in (0, 1, 2)}
    assert mean[2] > mean[1] > mean[0] + 0.2


def test_lesion_prevalence_follows_the_site_label_distribution():
    rare = synthetic.generate(np.random.default_rng(0), 60, 32, lesion_probability=0.1)
    common = synthetic.generate(np.random.default_rng(0), 60, 32, lesion_probability=0.9)

    def lesion_images(samples):
        return int((samples.masks == synthetic.LESION).any(axis=(1, 2)).sum())

    assert lesion_images(rare) < 15 < 45 < lesion_images(common)


SCANNER = {"blur_sigma": 1.0, "bias_field": 0.3, "gamma": 1.4, "gain": 0.8, "offset": 0.1, "noise_sigma": 0.08}


def test_feature_skew_changes_image_statistics_but_not_masks():
    neutral = synthetic.generate(np.random.default_rng(5), 6, 32, 0.5)
    shifted = synthetic.generate(np.random.default_rng(5), 6, 32, 0.5, acquisition=SCANNER)

    np.testing.assert_array_equal(shifted.masks, neutral.masks)
    organ, air = neutral.masks == 1, np.s_[:, :2, :]  # the top rows are outside the body
    assert abs(shifted.images[organ].mean() - neutral.images[organ].mean()) > 0.05  # gamma, gain, offset
    assert shifted.images[air].std() > 2 * neutral.images[air].std()  # noise
    image = neutral.images[0]
    np.testing.assert_array_equal(synthetic.acquire(image, {}, np.random.default_rng(0)), image)


@pytest.mark.parametrize(("offset", "grows"), [(1.5, True), (-1.5, False)])
def test_concept_shift_moves_contours_but_not_images(offset, grows):
    neutral = synthetic.generate(np.random.default_rng(5), 6, 32, 0.5)
    shifted = synthetic.generate(np.random.default_rng(5), 6, 32, 0.5, annotator={"boundary_offset": offset})

    np.testing.assert_array_equal(shifted.images, neutral.images)
    for before, after in zip(neutral.masks, shifted.masks):
        organ_before = np.isin(before, (1, 3)).sum()
        organ_after = np.isin(after, (1, 3)).sum()
        assert (organ_after > organ_before) if grows else (organ_after < organ_before)


def test_missed_lesions_are_labelled_as_the_organ_around_them():
    samples = synthetic.generate(np.random.default_rng(2), 4, 64, 1.0)
    missed = synthetic.shift_samples(samples.images, samples.masks, {}, {"lesion_miss_rate": 1.0}, np.random.default_rng(0))[1]

    lesion = samples.masks == synthetic.LESION
    assert not (missed == synthetic.LESION).any()
    assert (missed[lesion] == 1).all()
    np.testing.assert_array_equal(missed[~lesion], samples.masks[~lesion])


def test_unknown_shift_parameters_are_rejected():
    with pytest.raises(ValueError, match="unknown acquisition parameters"):
        synthetic.acquire(np.zeros((4, 4)), {"contrast": 2.0}, np.random.default_rng(0))


# ----------------------------------------------------------------------------- model


@pytest.mark.parametrize("norm", ["batch", "instance", "group"])
def test_unet_builds_and_runs_for_every_norm(norm):
    model = build_unet(4, (8, 16, 32, 64), norm=norm, num_groups=4)
    output = model(torch.randn(2, 1, 32, 32))

    assert output.shape == (2, 4, 32, 32)
    has_batch_norm = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert has_batch_norm == (norm == "batch")


def test_unet_init_is_seeded_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first = build_unet(4, seed=5)
    second = build_unet(4, seed=5)
    other = build_unet(4, seed=6)

    assert torch.rand(1) == expected_next
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        torch.testing.assert_close(a, b)
    assert not torch.equal(first.state_dict()["model.0.conv.unit0.conv.weight"], other.state_dict()["model.0.conv.unit0.conv.weight"])


def test_group_norm_needs_groups_dividing_the_class_count():
    with pytest.raises(ValueError, match="out_channels=num_classes=4"):
        build_unet(4, (8, 16, 32, 64), norm="group", num_groups=8)
    with pytest.raises(ValidationError, match="num_groups=8"):
        SegmentationParams(norm="group", num_groups=8)


def test_image_size_must_fit_the_unet_depth():
    with pytest.raises(ValidationError, match="multiple of 16"):
        SegmentationParams(image_size=40, channels=(8, 16, 32, 64, 128))


# ----------------------------------------------------------------------------- task


def test_client_data_sizes_follow_the_site_profiles_and_are_cached():
    ctx = _context(partition=PartitionSpec(clients=3, kind="quantity_skew", params={"min_samples": 4}))
    task = SegmentationTask(ctx)

    sizes = []
    for k, profile in enumerate(task.profiles):
        data = task.client_data(k)
        assert data.stats["n_train"] + data.stats["n_val"] == profile.n_samples
        assert len(data.train) == data.stats["n_train"] and len(data.val) == data.stats["n_val"] >= 1
        assert sum(data.stats["label_histogram"]) == profile.n_samples
        assert math.isclose(sum(data.stats["pixel_class_fractions"]), 1.0)
        sizes.append(profile.n_samples)
    assert len(set(sizes)) > 1
    assert SegmentationTask(ctx).client_data(0) is task.client_data(0)

    image, mask = task.client_data(0).train[0]
    assert image.shape == (1, 32, 32) and image.dtype == torch.float32
    assert mask.shape == (32, 32) and mask.dtype == torch.int64


def test_feature_skew_sites_record_their_scanner_and_differ_in_intensity():
    task = SegmentationTask(_context(partition=PartitionSpec(clients=2, kind="feature_skew", params={"severity": 1.0})))
    stats = [task.client_data(k).stats for k in range(2)]

    assert stats[0]["acquisition"] != stats[1]["acquisition"]
    assert stats[0]["annotator"] == {name: r.neutral for name, r in synthetic.ANNOTATOR_SPACE.items()}


def test_server_data_is_neutral_and_sized_by_server_samples():
    task = SegmentationTask(_context(data=DataSpec(samples_per_client=20, server_samples=12)))
    assert len(task.server_data()) == 12
    assert SegmentationTask(_context()).server_data() is None


def test_training_a_few_steps_raises_mean_dice_and_plots(tmp_path):
    torch.manual_seed(0)
    task = SegmentationTask(_context(data=DataSpec(samples_per_client=40)))
    data = task.client_data(0)
    model = task.build_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    before = task.evaluate(model, data.val)

    generator = torch.Generator().manual_seed(0)
    for _ in range(40):
        batch = data.train[torch.randint(len(data.train), (8,), generator=generator)]
        optimizer.zero_grad()
        task.loss(model, batch).backward()
        optimizer.step()
    after = task.evaluate(model, data.val)

    assert set(after) == {"loss", "dice", "dice_organ", "dice_organ2", "dice_lesion", "hd95"}
    assert after["dice"] > before["dice"] + 0.3
    assert after["loss"] < before["loss"]
    assert model.training  # evaluate restores the mode

    path = tmp_path / "examples.png"
    task.plot_examples(model, data.val, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_folder_source_splits_real_samples_and_applies_the_annotator(tmp_path):
    for name in ("images", "masks"):
        (tmp_path / name).mkdir()
    rng = np.random.default_rng(0)
    for case in range(8):
        mask = _square(24, slice(4, 16), slice(4, 16))
        if case % 2:
            mask[8:12, 8:12] = 2  # the last class (num_classes=3) marks "lesion" images
        np.save(tmp_path / "images" / f"c{case}.npy", mask * 100.0 + rng.normal(size=mask.shape))
        np.save(tmp_path / "masks" / f"c{case}.npy", mask)
    params = SegmentationParams(image_size=32, num_classes=3)
    data = DataSpec(source="folder", path=str(tmp_path), val_fraction=0.25)
    neutral = SegmentationTask(_context(params=params.model_dump(), data=data, partition=PartitionSpec(clients=2)))
    shifted = SegmentationTask(
        _context(params=params.model_dump(), data=data, partition=PartitionSpec(clients=2, kind="concept_shift"))
    )

    sites = [neutral.client_data(k) for k in range(2)]
    assert sum(s.stats["n_train"] + s.stats["n_val"] for s in sites) == 8
    assert sum(s.stats["label_histogram"][1] for s in sites) == 4
    image, mask = sites[0].train[0]
    assert image.shape == (1, 32, 32) and 0.0 <= image.min() and image.max() <= 1.0
    assert set(np.unique(mask.numpy())) <= {0, 1, 2}
    assert neutral.server_data() is None
    assert shifted.client_data(0).stats["annotator"] != sites[0].stats["annotator"]
    assert neutral.evaluate(neutral.build_model(), sites[0].val).keys() >= {"dice_class1", "dice_class2"}


def test_folder_masks_with_too_many_labels_are_a_data_error(tmp_path):
    for name in ("images", "masks"):
        (tmp_path / name).mkdir()
    for case in range(4):
        np.save(tmp_path / "images" / f"c{case}.npy", np.zeros((32, 32)))
        np.save(tmp_path / "masks" / f"c{case}.npy", np.full((32, 32), 5))
    task = SegmentationTask(_context(data=DataSpec(source="folder", path=str(tmp_path)), partition=PartitionSpec(clients=2)))
    with pytest.raises(DataError, match="label 5"):
        task.client_data(0)


def _label_folder(root, labels_per_case, side=32):
    """A folder of 2D cases whose mask ``k`` holds the labels ``labels_per_case[k]`` (one stripe each)."""
    for name in ("images", "masks"):
        (root / name).mkdir(parents=True)
    for case, labels in enumerate(labels_per_case):
        mask = np.zeros((side, side), dtype=np.int64)
        for j, label in enumerate(labels):
            mask[4 * j: 4 * j + 3, 4:28] = label
        np.save(root / "images" / f"c{case}.npy", mask * 50.0)
        np.save(root / "masks" / f"c{case}.npy", mask)
    return root


def _folder_task(root, **params) -> SegmentationTask:
    return SegmentationTask(_context(params={"image_size": 32, "channels": (4, 8), **params},
                                     data=DataSpec(source="folder", path=str(root)), partition=PartitionSpec(clients=2)))


def test_folder_num_classes_is_read_from_the_masks(tmp_path):
    task = _folder_task(_label_folder(tmp_path, [(1,), (1, 2), (2,), (1, 2)] * 2))  # two foreground classes
    assert task.num_classes == 3 and task.class_names == ("class1", "class2")
    site = task.client_data(0)
    metrics = task.evaluate(task.build_model(), site.val)
    assert {"dice_class1", "dice_class2"} <= metrics.keys() and "dice_class3" not in metrics
    assert len(site.stats["pixel_class_fractions"]) == 3


def test_folder_labels_must_be_0_to_L_minus_1_and_fit_a_given_num_classes(tmp_path):
    gap = _folder_task(_label_folder(tmp_path / "gap", [(2,), (3,)] * 4))
    with pytest.raises(DataError, match=r"hold labels \[0, 2, 3\] \(max label 3\) but never \[1\]") as error:
        gap.build_model()
    assert "task.params.num_classes" in str(error.value) and "\n" not in str(error.value)
    background = _folder_task(_label_folder(tmp_path / "empty", [(0,)] * 4))
    with pytest.raises(DataError, match="only background"):
        background.client_data(0)
    small = _folder_task(_label_folder(tmp_path / "small", [(1, 2)] * 4), num_classes=2)
    with pytest.raises(DataError, match=r"task.params.num_classes=2 but the masks .* hold label 2"):
        small.client_data(0)
    assert _folder_task(tmp_path / "gap", num_classes=5).num_classes == 5  # a larger given value is kept


def test_a_label_lost_to_resampling_still_counts(tmp_path):
    for name in ("images", "masks"):
        (tmp_path / name).mkdir()
    for case in range(4):
        mask = np.zeros((64, 64), dtype=np.int64)
        mask[10:40, 10:40] = 1
        mask[50, 50] = 2  # one pixel: nearest-neighbour resampling to 32 may drop it
        np.save(tmp_path / "images" / f"c{case}.npy", mask * 50.0)
        np.save(tmp_path / "masks" / f"c{case}.npy", mask)
    assert _folder_task(tmp_path).num_classes == 3


def test_synthetic_num_classes_stays_4_and_unset_survives_a_round_trip():
    unset = SegmentationParams()
    assert unset.num_classes == 4 and not unset.num_classes_set
    assert unset.model_dump()["num_classes"] is None  # what a resolved scenario writes
    assert not SegmentationParams.model_validate(unset.model_dump()).num_classes_set
    given = SegmentationParams.model_validate(SegmentationParams(num_classes=4).model_dump())
    assert given.num_classes_set and given.num_classes == 4
    task = SegmentationTask(_context())
    assert task.num_classes == 4 and task.class_names == synthetic.CLASS_NAMES[1:]


def test_bad_contexts_are_rejected_early():
    with pytest.raises(ValueError, match="synthetic segmentation data has 4 classes"):
        SegmentationTask(_context(params={"image_size": 32, "num_classes": 3}))
    with pytest.raises(ValueError, match="unknown segmentation model"):
        SegmentationTask(_context(model="vnet"))
    with pytest.raises(ValueError, match="no data.params"):
        SegmentationTask(_context(data=DataSpec(params={"noise": 1})))
