"""labelme -> COCO: against labelme's own converter, every shape type, and bad input."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from minis.data.coco import CocoInstances
from minis.data.labelme import labelme_to_coco

LABELME = Path(__file__).resolve().parents[2] / "shared" / "data" / "labelme"
needs_labelme = pytest.mark.skipif(not LABELME.is_dir(), reason="../shared/data/labelme is absent")


def load_coco(path: Path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def convert(in_dir: Path, out_dir: Path, labels_file: Path | None = None):
    """Convert, collect warnings, and load the result both with pycocotools and CocoInstances."""
    out_json = out_dir / "annotations.json"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        returned = labelme_to_coco(in_dir, out_json, labels_file)
    assert json.loads(out_json.read_text()) == returned
    dataset = CocoInstances(out_dir / "images", out_json)
    return dataset, [str(w.message) for w in caught]


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


# --------------------------------------------------------------------------------------------
# labelme's examples
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def instance_segmentation(tmp_path_factory):
    if not LABELME.is_dir():
        pytest.skip("../shared/data/labelme is absent")
    root = LABELME / "instance_segmentation"
    return convert(root / "data_annotated", tmp_path_factory.mktemp("voc"), root / "labels.txt")


@pytest.mark.realdata
def test_agrees_with_labelmes_own_converter(instance_segmentation):
    """Compare with labelme2coco's output for the same files.

    Both write the labelme polygon points as COCO polygons, so decoded with pycocotools the
    masks must be identical. labelme computes ``bbox``/``area`` from its own PIL rasterisation,
    which includes the polygon's boundary pixels, while ours are those of the pycocotools mask
    that is actually used: boxes agree within a pixel, and labelme's areas are a few percent
    larger. labelme drops ``__ignore__`` shapes, which we keep as crowd regions, so only the
    non-crowd annotations are compared.
    """
    dataset, messages = instance_segmentation
    assert messages == []
    ours = dataset.coco
    reference = load_coco(LABELME / "instance_segmentation" / "data_dataset_coco" / "annotations.json")

    reference_names = {c["name"] for c in reference.cats.values()} - {"_background_"}
    assert {c["name"] for c in ours.cats.values()} == reference_names
    assert dataset.class_names[1:] == [line for line in (LABELME / "instance_segmentation" / "labels.txt")
                                       .read_text().split("\n")[2:] if line]

    by_name = {Path(info["file_name"]).name: image_id for image_id, info in reference.imgs.items()}
    assert sorted(by_name) == sorted(info["file_name"] for info in ours.imgs.values())
    for image_id, info in ours.imgs.items():
        ref_id = by_name[info["file_name"]]
        ref_info = reference.imgs[ref_id]
        assert (info["height"], info["width"]) == (ref_info["height"], ref_info["width"])
        ours_anns = [a for a in ours.loadAnns(ours.getAnnIds(imgIds=image_id)) if not a["iscrowd"]]
        ref_anns = reference.loadAnns(reference.getAnnIds(imgIds=ref_id))
        assert len(ours_anns) == len(ref_anns)  # instances per image, group_id merging included
        for a, r in zip(ours_anns, ref_anns):
            assert ours.cats[a["category_id"]]["name"] == reference.cats[r["category_id"]]["name"]
            np.testing.assert_array_equal(ours.annToMask(a), reference.annToMask(r))
            ours_xyxy = np.array(a["bbox"]) + [0, 0, a["bbox"][0], a["bbox"][1]]
            ref_xyxy = np.array(r["bbox"]) + [0, 0, r["bbox"][0], r["bbox"][1]]
            np.testing.assert_allclose(ours_xyxy, ref_xyxy, atol=1.0)
            assert a["area"] == ours.annToMask(a).sum() <= r["area"] <= 1.1 * a["area"]


@pytest.mark.realdata
def test_group_id_merges_shapes_into_one_multipart_instance(instance_segmentation):
    dataset, _ = instance_segmentation
    coco = dataset.coco
    for stem, label, group_size in (("2011_000003", "person", 2), ("2011_000006", "sofa", 4)):
        document = json.loads((LABELME / "instance_segmentation" / "data_annotated" / f"{stem}.json").read_text())
        group = [s for s in document["shapes"] if s["label"] == label and s["group_id"] == 0]
        assert len(group) == group_size
        (image_id,) = [i for i, info in coco.imgs.items() if info["file_name"] == f"{stem}.jpg"]
        height, width = coco.imgs[image_id]["height"], coco.imgs[image_id]["width"]
        polygons = [np.ravel(s["points"]).tolist() for s in group]
        merged = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=image_id)) if a["segmentation"] == polygons]
        assert len(merged) == 1  # one annotation holds every part
        union = np.zeros((height, width), dtype=np.uint8)
        for polygon in polygons:
            union |= mask_utils.decode(mask_utils.frPyObjects([polygon], height, width))[:, :, 0]
        np.testing.assert_array_equal(coco.annToMask(merged[0]), union)


@pytest.mark.realdata
def test_ignore_shapes_become_crowd_regions_of_every_category(instance_segmentation):
    dataset, _ = instance_segmentation
    coco = dataset.coco
    n_regions = 0
    for image_id, info in coco.imgs.items():
        document = json.loads((LABELME / "instance_segmentation" / "data_annotated"
                               / info["file_name"].replace(".jpg", ".json")).read_text())
        ignore = [s for s in document["shapes"] if s["label"] == "__ignore__"]
        crowd = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=image_id)) if a["iscrowd"]]
        assert len(crowd) == len(ignore) * len(coco.cats)
        for region in ignore:
            expected = mask_utils.decode(mask_utils.frPyObjects(
                [np.ravel(region["points"]).tolist()], info["height"], info["width"]))[:, :, 0]
            same = [a for a in crowd if np.array_equal(coco.annToMask(a), expected)]
            assert sorted(a["category_id"] for a in same) == sorted(coco.cats)
            assert all(isinstance(a["segmentation"], dict) for a in same)  # crowd regions are RLE
            n_regions += 1
    assert n_regions == 2

    # In CocoInstances they are crowd targets, and in the dataset's items too.
    (image_id,) = [i for i, info in coco.imgs.items() if info["file_name"] == "2011_000003.jpg"]
    _, target = dataset[dataset.ids.index(image_id)]
    assert target["iscrowd"].tolist() == [0, 0, 0] + [1] * len(coco.cats)


@needs_labelme
@pytest.mark.realdata
def test_every_primitive_shape_type(tmp_path):
    document = json.loads((LABELME / "primitives" / "primitives.json").read_text())
    shapes = {s["label"]: s for s in document["shapes"]}
    dataset, messages = convert(LABELME / "primitives", tmp_path)
    coco = dataset.coco

    # line, point and linestrip enclose no area: warned about by file and shape index, skipped.
    assert len(messages) == 3
    for index, kind in ((4, "line"), (5, "point"), (6, "linestrip")):
        assert any(f"primitives.json: shapes[{index}]" in m and f"is a {kind}" in m for m in messages)
    assert sorted(c["name"] for c in coco.cats.values()) == ["circle", "octagon", "polygon", "rectangle"]

    height, width = document["imageHeight"], document["imageWidth"]
    masks = {}
    for ann in coco.loadAnns(coco.getAnnIds()):
        masks.setdefault(coco.cats[ann["category_id"]]["name"], []).append(coco.annToMask(ann).astype(bool))
    assert {k: len(v) for k, v in masks.items()} == {"rectangle": 2, "circle": 1, "polygon": 1, "octagon": 1}

    # Rectangle (32, 35)-(132, 135): exactly the pixels between its corners.
    expected = np.zeros((height, width), dtype=bool)
    expected[35:135, 32:132] = True
    assert any(np.array_equal(m, expected) for m in masks["rectangle"])

    # Circle: the analytic disc, sampled at pixel centres.
    (cx, cy), (px, py) = shapes["circle"]["points"]
    ys, xs = np.mgrid[0:height, 0:width] + 0.5
    disc = (xs - cx) ** 2 + (ys - cy) ** 2 <= (px - cx) ** 2 + (py - cy) ** 2
    assert iou(masks["circle"][0], disc) > 0.97

    # Polygon: labelme's own PIL rasterisation (which includes boundary pixels) agrees closely.
    drawn = Image.new("L", (width, height))
    ImageDraw.Draw(drawn).polygon([tuple(p) for p in shapes["polygon"]["points"]], fill=1)
    assert iou(masks["polygon"][0], np.asarray(drawn).astype(bool)) > 0.95

    # Mask: the embedded PNG, pasted with its top-left pixel at the first point.
    patch = np.asarray(Image.open(io.BytesIO(base64.b64decode(shapes["octagon"]["mask"])))) > 0
    x0, y0 = (int(v) for v in shapes["octagon"]["points"][0])
    expected = np.zeros((height, width), dtype=bool)
    expected[y0 : y0 + patch.shape[0], x0 : x0 + patch.shape[1]] = patch
    np.testing.assert_array_equal(masks["octagon"][0], expected)
    (octagon,) = [a for a in coco.anns.values() if coco.cats[a["category_id"]]["name"] == "octagon"]
    assert isinstance(octagon["segmentation"], dict)  # bitmaps are written as RLE


@needs_labelme
@pytest.mark.realdata
def test_image_embedded_in_imagedata(tmp_path):
    source = LABELME / "tutorial" / "apc2016_obj3.json"
    document = json.loads(source.read_text())
    assert document["imagePath"] == "apc2016_obj3.json"  # not an image: only imageData can help
    dataset, messages = convert(LABELME / "tutorial", tmp_path)
    assert messages == []
    (info,) = dataset.coco.imgs.values()
    assert info["file_name"] == "apc2016_obj3.jpg"
    assert (tmp_path / "images" / "apc2016_obj3.jpg").read_bytes() == base64.b64decode(document["imageData"])
    image, target = dataset[0]
    assert image.shape == (3, document["imageHeight"], document["imageWidth"])
    assert len(target["masks"]) == len(document["shapes"]) == 4


@needs_labelme
@pytest.mark.realdata
def test_video_frames_with_labels_file(tmp_path):
    root = LABELME / "video_annotation"
    dataset, _ = convert(root / "data_annotated", tmp_path, root / "labels.txt")
    assert dataset.class_names == ["background", "car", "track"]
    assert [info["file_name"] for info in dataset.coco.imgs.values()] == ["00000100.jpg", "00000101.jpg"]
    for index in range(len(dataset)):
        _, target = dataset[index]
        assert sorted(target["labels"].tolist()) == [1, 2, 2]


# --------------------------------------------------------------------------------------------
# Synthetic labelme files
# --------------------------------------------------------------------------------------------


def write_labelme(folder: Path, stem: str, shapes: list[dict], size=(40, 30), embed=False, image=True) -> Path:
    """Write ``<stem>.json`` (and ``<stem>.png`` unless embedded or ``image=False``) in labelme 5 format."""
    folder.mkdir(parents=True, exist_ok=True)
    picture = Image.new("RGB", size, (90, 120, 150))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    if image and not embed:
        picture.save(folder / f"{stem}.png")
    document = {
        "version": "5.7.0", "flags": {}, "shapes": shapes, "imagePath": f"{stem}.png",
        "imageData": base64.b64encode(buffer.getvalue()).decode() if embed else None,
        "imageWidth": size[0], "imageHeight": size[1],
    }
    path = folder / f"{stem}.json"
    path.write_text(json.dumps(document, indent=1))
    return path


def polygon(label, points, group_id=None, shape_type="polygon"):
    return {"label": label, "points": points, "group_id": group_id, "shape_type": shape_type, "flags": {}}


SQUARE = [[2, 2], [10, 2], [10, 10], [2, 10]]


def test_synthetic_folder_sorted_ids_categories_and_file_names(tmp_path):
    write_labelme(tmp_path / "in", "b", [polygon("zebra", SQUARE), polygon("ant", [[20, 5], [30, 5], [25, 15]])])
    write_labelme(tmp_path / "in", "a", [polygon("ant", SQUARE, shape_type="polygon")], embed=True)
    write_labelme(tmp_path / "in", "c", [])  # an image without objects
    coco = labelme_to_coco(tmp_path / "in", tmp_path / "out" / "coco.json")
    assert [(i["id"], i["file_name"]) for i in coco["images"]] == [(1, "a.png"), (2, "b.png"), (3, "c.png")]
    assert coco["categories"] == [{"id": 1, "name": "ant", "supercategory": "none"},
                                  {"id": 2, "name": "zebra", "supercategory": "none"}]
    ids = [(a["id"], a["image_id"], a["category_id"]) for a in coco["annotations"]]
    assert ids == [(1, 1, 1), (2, 2, 2), (3, 2, 1)]
    assert coco["annotations"][0]["bbox"] == [2.0, 2.0, 8.0, 8.0] and coco["annotations"][0]["area"] == 64.0
    dataset = CocoInstances(tmp_path / "out" / "images", tmp_path / "out" / "coco.json")
    assert dataset[2][1]["masks"].shape == (0, 30, 40)
    # Writing the result into the input folder, twice: the COCO file is not mistaken for a labelme one.
    for _ in range(2):
        inside = labelme_to_coco(tmp_path / "in", tmp_path / "in" / "coco.json")
        assert inside["images"] == coco["images"] and inside["annotations"] == coco["annotations"]


def test_mask_shapes_are_cropped_to_the_image_and_rectangles_take_any_corner_order(tmp_path):
    patch = np.zeros((6, 8), dtype=np.uint8)
    patch[1:5, 2:8] = 255
    buffer = io.BytesIO()
    Image.fromarray(patch).save(buffer, format="PNG")
    blob = {**polygon("blob", [[35.6, 26.2], [42.6, 31.2]], shape_type="mask"),
            "mask": base64.b64encode(buffer.getvalue()).decode()}
    box = polygon("box", [[12, 9], [3, 4]], shape_type="rectangle")  # dragged up and left
    write_labelme(tmp_path / "in", "img", [blob, box], size=(40, 30))
    dataset, messages = convert(tmp_path / "in", tmp_path / "out")
    assert messages == []
    _, target = dataset[0]
    expected = np.zeros((30, 40), dtype=np.uint8)
    expected[27:30, 37:40] = 1  # patch rows 1..4, cols 2..7 pasted at (35, 26), cut at the image edge
    np.testing.assert_array_equal(target["masks"][0].numpy(), expected)
    expected = np.zeros((30, 40), dtype=np.uint8)
    expected[4:9, 3:12] = 1
    np.testing.assert_array_equal(target["masks"][1].numpy(), expected)
    assert target["boxes"].tolist() == [[37, 27, 40, 30], [3, 4, 12, 9]]


def test_broken_json_names_the_file(tmp_path):
    write_labelme(tmp_path, "good", [polygon("a", SQUARE)])
    (tmp_path / "bad.json").write_text('{"shapes": [\n  {"label": }')
    with pytest.raises(ValueError, match=r"bad\.json: not valid JSON \(line 2, column"):
        labelme_to_coco(tmp_path, tmp_path / "out" / "coco.json")


def test_polygon_with_two_points_names_file_and_shape_index(tmp_path):
    write_labelme(tmp_path, "img", [polygon("a", SQUARE), polygon("a", [[1, 1], [5, 5]])])
    with pytest.raises(ValueError, match=r"img\.json: shapes\[1\] \('a'\): polygon has 2 point\(s\)"):
        labelme_to_coco(tmp_path, tmp_path / "out" / "coco.json")


def test_missing_image_names_the_labelme_file(tmp_path):
    write_labelme(tmp_path, "img", [polygon("a", SQUARE)], image=False)
    expected = r"img\.json: image file .*img\.png \(field 'imagePath'\) does not exist"
    with pytest.raises(FileNotFoundError, match=expected):
        labelme_to_coco(tmp_path, tmp_path / "out" / "coco.json")


def test_label_missing_from_labels_file_is_an_error(tmp_path):
    write_labelme(tmp_path / "in", "img", [polygon("cat", SQUARE), polygon("dgo", SQUARE)])
    labels = tmp_path / "labels.txt"
    labels.write_text("__ignore__\n_background_\ncat\ndog\n")
    with pytest.raises(ValueError, match=r"img\.json: shapes\[1\]: label 'dgo' is not in the labels file"):
        labelme_to_coco(tmp_path / "in", tmp_path / "out" / "coco.json", labels)
