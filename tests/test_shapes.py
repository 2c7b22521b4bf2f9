"""The shapes benchmark (minis.data.shapes) and the folder dataset (minis.data.semantic).

Ground truth is checked against pycocotools: every RLE is decoded and compared with the label
PNG, the box and the area written next to it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from minis.data.semantic import SemanticSegmentation
from minis.data.shapes import SHAPE_CLASSES, _visible_instance_map, main, make_shapes, render_sample

SMALL = {"num_train": 20, "num_val": 8, "image_size": 96, "progress": False}


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> dict:
    return make_shapes(tmp_path_factory.mktemp("shapes") / "root", seed=3, **SMALL)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _coco(paths: dict, split: str) -> COCO:
    return COCO(str(paths[split]["annotations"]))


# ---------------------------------------------------------------- determinism and caching


def test_same_seed_gives_identical_bytes_and_other_seed_differs(small, tmp_path):
    again = make_shapes(tmp_path / "again", seed=3, **SMALL)
    reference, repeated = _files(small["root"]), _files(again["root"])
    assert sorted(reference) == sorted(repeated)
    assert len(reference) == 2 * (20 + 8) + 2 + 1  # images + labels, two JSON files, meta.json
    for name in reference:
        assert reference[name] == repeated[name], name

    other = _files(make_shapes(tmp_path / "other", seed=4, **SMALL)["root"])
    assert sorted(other) == sorted(reference)
    differing = [name for name in reference if name != "meta.json" and other[name] != reference[name]]
    assert "annotations/instances_train.json" in differing
    assert sum(name.startswith("train/images/") for name in differing) == 20  # every image changes


def test_returned_layout(small):
    assert small["class_names"] == ["background", *SHAPE_CLASSES]
    assert small["num_classes"] == len(SHAPE_CLASSES) + 1
    for split, count in (("train", 20), ("val", 8)):
        assert len(list(small[split]["images"].glob("*.png"))) == count
        assert len(list(small[split]["labels"].glob("*.png"))) == count
        assert small[split]["annotations"].is_file()
    meta = json.loads((small["root"] / "meta.json").read_text())
    assert meta["seed"] == 3 and meta["num_train"] == 20 and meta["classes"] == list(SHAPE_CLASSES)
    assert not (small["root"] / ".generating").exists()


def test_second_call_is_cached_and_writes_nothing(tmp_path):
    first = make_shapes(tmp_path / "s", seed=1, **SMALL)
    stamps = {p: p.stat().st_mtime_ns for p in first["root"].rglob("*")}
    time.sleep(0.02)
    started = time.perf_counter()
    second = make_shapes(tmp_path / "s", seed=1, **SMALL)
    assert time.perf_counter() - started < 0.5
    assert second == first
    assert {p: p.stat().st_mtime_ns for p in first["root"].rglob("*")} == stamps


def test_other_parameters_raise_unless_overwrite(tmp_path):
    make_shapes(tmp_path / "s", seed=1, **SMALL)
    with pytest.raises(ValueError, match="seed: 1 -> 2"):
        make_shapes(tmp_path / "s", seed=2, **SMALL)
    smaller = {**SMALL, "num_train": 5}
    paths = make_shapes(tmp_path / "s", seed=2, overwrite=True, **smaller)
    assert len(list(paths["train"]["images"].iterdir())) == 5  # old files are gone, not mixed in
    assert len(_coco(paths, "train").imgs) == 5
    assert _files(paths["root"]) == _files(make_shapes(tmp_path / "fresh", seed=2, **smaller)["root"])


def test_interrupted_generation_is_redone_and_foreign_folder_refused(tmp_path):
    paths = make_shapes(tmp_path / "s", seed=1, **SMALL)
    complete = _files(paths["root"])
    # Simulate a crash half-way: the marker is there, meta.json is not, one image is missing.
    (paths["root"] / "meta.json").unlink()
    (paths["train"]["images"] / "000007.png").unlink()
    (paths["root"] / ".generating").write_text("{}")
    make_shapes(tmp_path / "s", seed=1, **SMALL)
    assert _files(paths["root"]) == complete

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not a shapes benchmark")
    with pytest.raises(FileExistsError, match="not empty"):
        make_shapes(foreign, **SMALL)


# ---------------------------------------------------------------- ground truth consistency


@pytest.mark.parametrize("split", ["train", "val"])
def test_label_png_equals_decoded_rle_masks(small, split):
    coco = _coco(small, split)
    for image_id, info in coco.imgs.items():
        label = np.asarray(Image.open(small[split]["labels"] / info["file_name"]))
        painted = np.zeros((info["height"], info["width"]), dtype=np.uint8)
        coverage = np.zeros_like(painted, dtype=np.int64)
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=[image_id])):
            mask = coco.annToMask(ann).astype(bool)
            coverage += mask
            painted[mask] = ann["category_id"]
        assert coverage.max() <= 1, f"visible masks overlap in image {image_id}"
        np.testing.assert_array_equal(painted, label, err_msg=f"image {image_id}")


def test_box_area_and_fields_match_the_masks(small):
    coco = _coco(small, "train")
    annotations = list(coco.anns.values())
    assert [a["id"] for a in annotations] == list(range(1, len(annotations) + 1))
    for ann in annotations:
        rle = ann["segmentation"]
        assert isinstance(rle["counts"], str)  # compressed RLE, JSON-friendly
        mask = mask_utils.decode(rle)
        assert ann["area"] == int(mask.sum()) == int(mask_utils.area(rle))
        assert ann["area"] >= 20  # tiny remnants of occluded objects are dropped
        np.testing.assert_array_equal(ann["bbox"], mask_utils.toBbox(rle))
        assert ann["iscrowd"] == 0
        assert 1 <= ann["category_id"] <= len(SHAPE_CLASSES)


def test_coco_header_images_and_categories(small):
    data = json.loads(small["train"]["annotations"].read_text())
    assert {"info", "licenses", "images", "annotations", "categories"} <= set(data)
    assert "generated" in data["info"]["description"]
    assert [c["name"] for c in data["categories"]] == list(SHAPE_CLASSES)
    assert [c["id"] for c in data["categories"]] == list(range(1, len(SHAPE_CLASSES) + 1))
    assert [im["id"] for im in data["images"]] == list(range(1, 21))
    for im in data["images"]:
        with Image.open(small["train"]["images"] / im["file_name"]) as picture:
            assert picture.mode == "RGB" and picture.size == (im["width"], im["height"]) == (96, 96)
        with Image.open(small["train"]["labels"] / im["file_name"]) as label:
            assert label.mode == "L"


def test_empty_images_exist_and_all_classes_appear(small):
    coco = _coco(small, "train")
    empty = [i for i in coco.imgs if not coco.getAnnIds(imgIds=[i])]
    assert len(empty) >= 1
    for image_id in empty:
        label = np.asarray(Image.open(small["train"]["labels"] / coco.imgs[image_id]["file_name"]))
        assert not label.any()
    used = {a["category_id"] for a in coco.anns.values()}
    assert used == set(range(1, len(SHAPE_CLASSES) + 1))


def test_rendered_samples_keep_big_enough_objects_and_some_touch_the_border():
    rng = np.random.default_rng(0)
    touching_border = 0
    for _ in range(30):
        sample = render_sample(rng, image_size=96)
        visible = sample.visible_masks()  # [N,H,W]
        assert sample.image.shape == (96, 96, 3) and sample.image.dtype == np.uint8
        assert visible.sum(axis=(1, 2)).min(initial=20) >= 20
        # An object cut by the image edge has visible pixels in the first/last row or column.
        edges = visible[:, [0, -1], :].any(axis=(1, 2)) | visible[:, :, [0, -1]].any(axis=(1, 2))
        touching_border += int(edges.sum())
    assert touching_border > 0


def test_visible_instance_map_matches_painting_one_by_one():
    """The vectorised occlusion equals painting masks in order and dropping tiny remnants."""
    rng = np.random.default_rng(1)
    full = rng.uniform(size=(6, 40, 40)) < 0.3  # six random "shapes", heavily overlapping
    full[2] = False
    full[2, 5:8, 5:8] = True  # 9 pixels at most: below min_area, so it must be dropped
    instance_map, kept = _visible_instance_map(full, min_area=50)

    def paint(indices):
        canvas = np.zeros((40, 40), dtype=np.int32)
        for position, index in enumerate(indices, start=1):
            canvas[full[index]] = position
        return canvas

    indices = list(range(6))
    while True:  # reference: drop the smallest remnants until every object is big enough
        canvas = paint(indices)
        areas = [(canvas == p).sum() for p in range(1, len(indices) + 1)]
        small_ones = [indices[p] for p, area in enumerate(areas) if area < 50]
        if not small_ones:
            break
        indices = [i for i in indices if i not in small_ones]
    assert kept.tolist() == indices and 2 not in indices
    np.testing.assert_array_equal(instance_map, canvas)


def test_occlusion_happens_in_the_benchmark():
    """Some visible masks are smaller than the shape drawn alone (they are partly covered)."""
    from minis.data.shapes import _sample_objects, _shape_mask

    rng = np.random.default_rng(5)
    partially_hidden = 0
    for _ in range(20):
        objects = _sample_objects(rng, 96, max_objects=6)
        full = np.stack([_shape_mask(obj, 96) for obj in objects])
        instance_map, kept = _visible_instance_map(full, min_area=20)
        visible_area = np.bincount(instance_map.ravel(), minlength=len(kept) + 1)[1:]
        partially_hidden += int((visible_area < full[kept].sum(axis=(1, 2))).sum())
    assert partially_hidden > 0


# ---------------------------------------------------------------- readers


def test_semantic_dataset_reads_the_benchmark(small):
    dataset = SemanticSegmentation(small["val"]["images"], small["val"]["labels"], small["class_names"])
    coco = _coco(small, "val")
    assert len(dataset) == 8 and dataset.num_classes == 6
    assert dataset.ids == sorted(coco.imgs)
    image, target = dataset[3]
    assert image.dtype == torch.float32 and image.shape == (3, 96, 96)
    assert 0 <= image.min() and image.max() <= 1
    assert target["image_id"] == dataset.ids[3]
    info = coco.imgs[target["image_id"]]
    expected_rgb = np.array(Image.open(small["val"]["images"] / info["file_name"]))
    torch.testing.assert_close(image, torch.from_numpy(expected_rgb).permute(2, 0, 1).float() / 255)
    semantic = target["semantic"]
    assert semantic.dtype == torch.int64 and semantic.shape == (96, 96)
    expected = np.asarray(Image.open(small["val"]["labels"] / info["file_name"]))
    np.testing.assert_array_equal(semantic.numpy(), expected)


def test_semantic_dataset_applies_joint_transforms(small):
    from torchvision.transforms import v2

    flip = v2.RandomHorizontalFlip(p=1.0)
    plain = SemanticSegmentation(small["val"]["images"], small["val"]["labels"], small["class_names"])
    flipped = SemanticSegmentation(small["val"]["images"], small["val"]["labels"], small["class_names"], flip)
    (image, target), (image_f, target_f) = plain[0], flipped[0]
    torch.testing.assert_close(image_f, image.flip(-1))
    torch.testing.assert_close(target_f["semantic"], target["semantic"].flip(-1))


def test_semantic_dataset_cache_gives_the_same_items_without_reading_again(small, tmp_path):
    import shutil

    from torchvision.transforms import v2

    images, labels = tmp_path / "images", tmp_path / "labels"
    shutil.copytree(small["val"]["images"], images)
    shutil.copytree(small["val"]["labels"], labels)
    plain = SemanticSegmentation(images, labels, small["class_names"])
    expected = [(plain[i][0].flip(-1), plain[i][1]["semantic"].flip(-1)) for i in range(len(plain))]
    cached = SemanticSegmentation(images, labels, small["class_names"], v2.RandomHorizontalFlip(p=1.0), cache=True)
    assert all(torch.equal(cached[i][0], expected[i][0]) for i in range(len(cached)))  # first read: from the files
    shutil.rmtree(images)
    shutil.rmtree(labels)  # from now on: from memory
    for index, (image, semantic) in enumerate(expected):
        cached_image, cached_target = cached[index]
        assert torch.equal(cached_image, image) and torch.equal(cached_target["semantic"], semantic)


def test_semantic_dataset_errors_name_the_files(tmp_path):
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(images / "a.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(images / "b.jpg")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(labels / "a.png")
    with pytest.raises(FileNotFoundError, match="b.jpg"):
        SemanticSegmentation(images, labels, ["background", "thing"])

    Image.fromarray(np.zeros((9, 8), np.uint8)).save(labels / "b.png")  # wrong height
    dataset = SemanticSegmentation(images, labels, ["background", "thing"])
    assert dataset.ids == [0, 1]  # names are not numbers: ids are positions
    with pytest.raises(ValueError, match=r"b\.png.*8x9.*b\.jpg"):
        dataset[1]

    Image.fromarray(np.full((8, 8), 7, np.uint8)).save(labels / "a.png")  # class 7 of 2
    with pytest.raises(ValueError, match=r"a\.png.*\[7\]"):
        dataset[0]
    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(labels / "a.png")  # ignore is fine
    assert (dataset[0][1]["semantic"] == 255).all()


def test_coco_instances_reads_the_benchmark(small):
    coco_module = pytest.importorskip("minis.data.coco")
    dataset = coco_module.CocoInstances(small["train"]["images"], small["train"]["annotations"])
    reference = _coco(small, "train")
    assert len(dataset) == 20
    for index in range(len(dataset)):
        image, target = dataset[index]
        image_id = dataset.ids[index]
        assert target["image_id"] == image_id
        anns = reference.loadAnns(reference.getAnnIds(imgIds=[image_id]))
        expected = np.stack([reference.annToMask(a) for a in anns]) if anns else np.zeros((0, 96, 96))
        np.testing.assert_array_equal(target["masks"].numpy(), expected)
        assert target["labels"].tolist() == [a["category_id"] for a in anns]


def test_coco_instances_cache_gives_the_same_items_without_reading_again(small, tmp_path):
    import shutil

    from minis.data.coco import CocoInstances

    images = tmp_path / "images"
    shutil.copytree(small["train"]["images"], images)
    plain = CocoInstances(images, small["train"]["annotations"])
    expected = [plain[i] for i in range(len(plain))]
    cached = CocoInstances(images, small["train"]["annotations"], cache=True)
    [cached[i] for i in range(len(cached))]
    shutil.rmtree(images)  # from now on: from memory
    for index, (image, target) in enumerate(expected):
        cached_image, cached_target = cached[index]
        assert torch.equal(cached_image, image) and type(cached_image) is type(image)
        assert cached_target.keys() == target.keys()
        for key, value in target.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(cached_target[key], value) and type(cached_target[key]) is type(value), key
            else:
                assert cached_target[key] == value
        cached_target["boxes"].add_(1)  # a caller that changes a target in place does not change the cache
        assert torch.equal(cached[index][1]["boxes"], target["boxes"])


# ---------------------------------------------------------------- command line and default size


def test_command_line(tmp_path, capsys):
    paths = main([str(tmp_path / "cli"), "--num-train", "3", "--num-val", "2", "--image-size", "64"])
    assert "ready" in capsys.readouterr().out
    assert len(list(paths["train"]["images"].iterdir())) == 3
    assert json.loads((paths["root"] / "meta.json").read_text())["image_size"] == 64


def test_default_size_generates_quickly(tmp_path):
    started = time.perf_counter()
    paths = make_shapes(tmp_path / "default", progress=False)
    seconds = time.perf_counter() - started
    print(f"default shapes benchmark (1000 + 200 images at 128x128) generated in {seconds:.1f} s")
    assert seconds < 60
    coco = _coco(paths, "train")
    assert len(coco.imgs) == 1000 and len(_coco(paths, "val").imgs) == 200
    empty = sum(1 for i in coco.imgs if not coco.getAnnIds(imgIds=[i]))
    assert 40 <= empty <= 70  # about 5%
    sides = np.array([max(a["bbox"][2], a["bbox"][3]) for a in coco.anns.values()])
    assert 8 <= np.percentile(sides, 5) and np.percentile(sides, 95) <= 64  # objects ~12-60 px


def test_visible_instance_map_when_every_object_is_too_small():
    full = np.zeros((2, 30, 30), dtype=bool)
    full[0, :3, :3] = full[1, 10:12, 10:12] = True  # 9 and 4 pixels
    instance_map, kept = _visible_instance_map(full, min_area=20)
    assert kept.tolist() == [] and not instance_map.any()


def test_size_range_sets_object_sizes_and_is_recorded(tmp_path):
    """Large objects only: every kept object's box spans at least ~the smallest diameter."""
    paths = make_shapes(tmp_path / "big", num_train=10, num_val=2, image_size=64, size_range=(0.5, 0.7),
                        max_objects=1, empty_fraction=0, progress=False)
    meta = json.loads((paths["root"] / "meta.json").read_text())
    assert meta["size_range"] == [0.5, 0.7]
    coco = _coco(paths, "train")
    # A lone object is never occluded; cut by the border it still keeps over half its extent.
    sides = [max(a["bbox"][2], a["bbox"][3]) for a in coco.anns.values()]
    assert len(sides) == 10 and min(sides) >= 0.5 * 64 * 0.5
    with pytest.raises(ValueError, match="size_range"):
        make_shapes(tmp_path / "bad", size_range=(0.6, 0.2), progress=False)
    # A copy generated before size_range was recorded is still recognised as the default one.
    default = make_shapes(tmp_path / "old", num_train=2, num_val=1, progress=False)
    meta_path = default["root"] / "meta.json"
    old_meta = json.loads(meta_path.read_text())
    del old_meta["size_range"]
    meta_path.write_text(json.dumps(old_meta))
    assert make_shapes(tmp_path / "old", num_train=2, num_val=1, progress=False)["root"] == default["root"]


def test_plain_variant_has_flat_backgrounds_and_unstriped_objects():
    """textures=False: background pixels vary only by the sensor noise; default backgrounds vary more."""

    def background_spread(textures: bool) -> float:
        rng, spreads = np.random.default_rng(5), []
        for _ in range(20):
            sample = render_sample(rng, image_size=64, textures=textures)
            background = sample.image[sample.instance_map == 0].astype(np.float32) / 255  # [P,3]
            spreads.append(background.std(axis=0).max())
        return float(np.median(spreads))

    plain, textured = background_spread(False), background_spread(True)
    assert plain < 0.06 < textured  # noise std is 0.04
    rng = np.random.default_rng(6)
    from minis.data.shapes import _sample_objects
    assert all(o.stripe_colour is None for _ in range(20) for o in _sample_objects(rng, 64, 6, textures=False))
