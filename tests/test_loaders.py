"""Dataset loaders: ucm_captions, folder, wikipedia, class_coco (tiny fixtures in the real layouts) plus
the real UCM-captions folder when it is present next to the repository."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cmg_core.data import load_dataset, make_task
from cmg_core.data.coco import CMDA_ANOMALY_GROUPS, CMDA_NORMAL_GROUPS, load_class_coco
from cmg_core.data.folder import load_folder
from cmg_core.data.images import open_image
from cmg_core.data.ucm import load_ucm_captions
from cmg_core.data.wikipedia import load_wikipedia, split_captions
from cmg_core.errors import ConfigError, DataError

REAL_UCM = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ucm_captions"


def write_image(path: Path, color=(200, 30, 30), size: int = 8) -> Path:
    """A tiny solid-colour image; the format follows the suffix (.png, .jpg, .tif)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), color).save(path)
    return path


# ------------------------------------------------------------------------------------------------
# UCM-captions: synthetic fixture, 2 classes x 100 images (the imgid // 100 mapping needs 100 each)
# ------------------------------------------------------------------------------------------------
UCM_CLASSES = {"zebracrossing": "stripes", "airfield": "planes"}  # folder name -> caption keyword


def make_ucm(root: Path, ext: str = ".png") -> Path:
    """root/Images/<class>/<class>NN<ext> + dataset_ucm_captions.json for the classes above."""
    names = sorted(UCM_CLASSES)  # airfield (0), zebracrossing (1)
    entries = []
    for c, name in enumerate(names):
        for k in range(100):
            write_image(root / "Images" / name / f"{name}{k:02d}{ext}", color=(c * 200, k, 50))
            imgid = c * 100 + k
            sents = [{"raw": f" {UCM_CLASSES[name]} number {k} view {j} . ", "imgid": imgid} for j in range(5)]
            split = "test" if k >= 90 else ("val" if k >= 80 else "train")
            entries.append({"imgid": imgid, "filename": f"{imgid + 1}.tif", "split": split, "sentences": sents})
    (root / "dataset_ucm_captions.json").write_text(json.dumps({"images": entries, "dataset": "ucm"}))
    return root


@pytest.fixture(scope="module")
def ucm_root(tmp_path_factory) -> Path:
    return make_ucm(tmp_path_factory.mktemp("ucm"))


def test_ucm_synthetic_mapping(ucm_root):
    ds = load_ucm_captions(ucm_root)
    assert ds.name == "ucm_captions"
    assert ds.class_names == ["airfield", "zebracrossing"]
    assert len(ds) == 200 and ds.num_captions == 1000
    by_id = {it.image_id: it for it in ds.items}
    item = by_id["zebracrossing/zebracrossing37"]
    assert item.class_id == 1 and item.class_name == "zebracrossing"
    assert item.path == ucm_root / "Images" / "zebracrossing" / "zebracrossing37.png"
    assert item.captions[0] == "stripes number 37 view 0 ."  # stripped raw
    assert len(item.captions) == 5
    for it in ds.items:  # every caption names its own class keyword and image number
        assert all(UCM_CLASSES[it.class_name] in c for c in it.captions)
        assert all(f"number {int(it.image_id[-2:])} " in c for c in it.captions)
    assert ds.summary()["splits"] == {"train": 160, "val": 20, "test": 20}
    assert ds.meta["official_classes"] == 21


def test_ucm_accepts_tif(tmp_path):
    root = tmp_path / "tifs"
    make_ucm(root, ext=".tif")
    ds = load_ucm_captions(root)
    assert ds.items[0].path.suffix == ".tif"
    img = ds.load_image(0)
    assert img.size == (8, 8) and img.mode == "RGB"


def test_ucm_splits_option(ucm_root):
    ds = load_ucm_captions(ucm_root, splits="val,test")
    assert len(ds) == 40 and {it.split for it in ds.items} == {"val", "test"}
    with pytest.raises(DataError, match="splits"):
        load_ucm_captions(ucm_root, splits="holdout")


@pytest.fixture()
def ucm_copy(tmp_path) -> Path:
    return make_ucm(tmp_path / "ucm")


def _edit_json(root: Path, fn) -> None:
    path = root / "dataset_ucm_captions.json"
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def test_ucm_missing_json(ucm_copy):
    (ucm_copy / "dataset_ucm_captions.json").unlink()
    with pytest.raises(DataError, match="dataset_ucm_captions.json does not exist"):
        load_ucm_captions(ucm_copy)


def test_ucm_invalid_json(ucm_copy):
    (ucm_copy / "dataset_ucm_captions.json").write_text('{"images": [')
    with pytest.raises(DataError, match="not valid JSON"):
        load_ucm_captions(ucm_copy)


def test_ucm_json_without_images(ucm_copy):
    (ucm_copy / "dataset_ucm_captions.json").write_text('{"annotations": []}')
    with pytest.raises(DataError, match="'images' list"):
        load_ucm_captions(ucm_copy)


def test_ucm_entry_without_sentences(ucm_copy):
    _edit_json(ucm_copy, lambda d: d["images"][5].pop("sentences"))
    with pytest.raises(DataError, match=r"images\[5\].*sentences"):
        load_ucm_captions(ucm_copy)


def test_ucm_duplicate_imgid(ucm_copy):
    _edit_json(ucm_copy, lambda d: d["images"][3].update(imgid=2))
    with pytest.raises(DataError, match="repeats imgid 2"):
        load_ucm_captions(ucm_copy)


def test_ucm_missing_images_folder(ucm_copy):
    (ucm_copy / "Images").rename(ucm_copy / "pictures")
    with pytest.raises(DataError, match="Images does not exist"):
        load_ucm_captions(ucm_copy)


def test_ucm_missing_image_file(ucm_copy):
    (ucm_copy / "Images" / "airfield" / "airfield42.png").unlink()
    with pytest.raises(DataError, match=r"imgid 42 .*airfield42.*does not exist"):
        load_ucm_captions(ucm_copy)


def test_ucm_class_folder_count_mismatch(ucm_copy):
    (ucm_copy / "Images" / "aaa_extra").mkdir()
    with pytest.raises(DataError, match="3 class folders"):
        load_ucm_captions(ucm_copy)


def test_ucm_imgid_beyond_class_folders(ucm_copy):
    _edit_json(ucm_copy, lambda d: d["images"][0].update(imgid=250))
    with pytest.raises(DataError, match="imgids up to 250"):
        load_ucm_captions(ucm_copy)


# ------------------------------------------------------------------------------------------------
# UCM-captions: the real folder
# ------------------------------------------------------------------------------------------------
UCM_OFFICIAL = [
    "agricultural", "airplane", "baseballdiamond", "beach", "buildings", "chaparral", "denseresidential",
    "forest", "freeway", "golfcourse", "harbor", "intersection", "mediumresidential", "mobilehomepark",
    "overpass", "parkinglot", "river", "runway", "sparseresidential", "storagetanks", "tenniscourt",
]  # fmt: skip
# distinctive caption words per class (checked: >= 97% of the class, <= 1% of the other classes)
UCM_KEYWORDS = {
    "airplane": r"plane|aircraft",
    "beach": r"beach|sea|ocean",
    "tenniscourt": r"tennis",
    "runway": r"runway",
    "river": r"river",
    "golfcourse": r"golf",
    "harbor": r"harbor|boat|ship|yacht",
    "storagetanks": r"tank",
    "baseballdiamond": r"baseball",
    "agricultural": r"farm|crop|field",
}


@pytest.fixture(scope="module")
def real_ucm():
    if not (REAL_UCM / "dataset_ucm_captions.json").is_file():
        pytest.skip(f"real UCM-captions folder not found at {REAL_UCM}")
    return load_dataset("ucm_captions", REAL_UCM)


@pytest.mark.ucm
def test_real_ucm_counts(real_ucm):
    ds = real_ucm
    assert len(ds) == 2100 and ds.num_classes == 21 and ds.num_captions == 10500
    assert ds.class_names == UCM_OFFICIAL == sorted(ds.class_names)
    assert np.bincount(ds.labels).tolist() == [100] * 21
    assert ds.summary()["splits"] == {"train": 1680, "val": 210, "test": 210}
    assert all(len(it.captions) == 5 for it in ds.items)


@pytest.mark.ucm
@pytest.mark.parametrize("cls", sorted(UCM_KEYWORDS))
def test_real_ucm_captions_match_class(real_ucm, cls):
    pattern = re.compile(UCM_KEYWORDS[cls], re.IGNORECASE)

    def frac(items):
        return np.mean([any(pattern.search(c) for c in it.captions) for it in items])

    inside = [it for it in real_ucm.items if it.class_name == cls]
    outside = [it for it in real_ucm.items if it.class_name != cls]
    assert len(inside) == 100
    assert frac(inside) >= 0.9, f"{cls}: captions do not mention {pattern.pattern}"
    assert frac(outside) <= 0.05


@pytest.mark.ucm
def test_real_ucm_mapping_on_files(real_ucm):
    raw = json.loads((REAL_UCM / "dataset_ucm_captions.json").read_text())["images"]
    by_id = {it.image_id: it for it in real_ucm.items}
    entry = next(e for e in raw if e["imgid"] == 150)
    item = by_id["airplane/airplane50"]
    assert item.captions == tuple(s["raw"].strip() for s in entry["sentences"])
    assert item.split == entry["split"] and item.class_id == 1
    assert item.path.stem == "airplane50" and item.path.parent.name == "airplane"
    # the README's known quirk: airplane01 and airplane02 are pixel-identical, airplane00 is not
    a0, a1, a2 = (np.asarray(open_image(by_id[f"airplane/airplane0{k}"].path)) for k in range(3))
    assert a1.shape[2] == 3 and a1.shape[0] == a1.shape[1] >= 64
    assert np.array_equal(a1, a2) and not np.array_equal(a0, a1)


@pytest.mark.ucm
def test_real_ucm_task(real_ucm):
    task = make_task(real_ucm, n_normal=6, seed=3)
    assert len(task.normal_classes) == 6
    assert len(task.train_idx) == 6 * 80 and int(task.test_is_anomaly.sum()) == 15 * 100


# ------------------------------------------------------------------------------------------------
# images and tasks
# ------------------------------------------------------------------------------------------------
def test_open_image_garbage_and_empty(tmp_path):
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is not an image at all" * 10)
    with pytest.raises(DataError, match="garbage.png could not be decoded"):
        open_image(garbage)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="empty.jpg is empty"):
        open_image(empty)
    with pytest.raises(DataError, match="does not exist"):
        open_image(tmp_path / "nope.png")


def test_make_task_errors(ucm_root):
    ds = load_ucm_captions(ucm_root)
    with pytest.raises(DataError, match="2 classes"):
        make_task(ds, n_normal=2)
    with pytest.raises(DataError, match="2 classes"):
        make_task(ds, n_normal=5)
    one_class = make_task(ds, normal_classes=["airfield", "zebracrossing"])  # every class normal: one-class
    assert one_class.test_is_anomaly.sum() == 0 and len(one_class.test_idx) > 0
    assert np.array_equal(make_task(ds, normal_classes="all").train_idx, one_class.train_idx)
    with pytest.raises(DataError, match="unknown class 'forest'"):
        make_task(ds, normal_classes=["forest"])
    task = make_task(ds, normal_classes=["airfield"], holdout="split")
    assert len(task.train_idx) == 90 and int((task.test_is_anomaly == 0).sum()) == 10
    assert int(task.test_is_anomaly.sum()) == 100


# ------------------------------------------------------------------------------------------------
# folder
# ------------------------------------------------------------------------------------------------
@pytest.fixture()
def folder_root(tmp_path) -> Path:
    """Images/cat/{a,b}.png, Images/dog/{c,d}.jpg; captions.csv with several rows per image."""
    root = tmp_path / "mine"
    write_image(root / "Images" / "cat" / "a.png")
    write_image(root / "Images" / "cat" / "b.png")
    write_image(root / "Images" / "dog" / "c.jpg")
    write_image(root / "Images" / "dog" / "d.jpg")
    (root / "captions.csv").write_text(
        "image,caption\n"
        "Images/cat/a.png,a cat on a sofa\n"
        "cat/a.png,  a sleeping cat  \n"
        "cat/b.png,\"a cat, outside\"\n"
        "dog/c.jpg,a dog\n"
        "Images/dog/d.jpg,a dog running\n"
    )
    return root


def test_folder_csv(folder_root):
    ds = load_folder(folder_root)
    assert ds.class_names == ["cat", "dog"]
    by_id = {it.image_id: it for it in ds.items}
    assert sorted(by_id) == ["cat/a", "cat/b", "dog/c", "dog/d"]
    assert by_id["cat/a"].captions == ("a cat on a sofa", "a sleeping cat")
    assert by_id["cat/b"].captions == ("a cat, outside",)
    assert by_id["dog/d"].class_id == 1 and by_id["cat/b"].class_id == 0
    assert by_id["dog/c"].path.name == "c.jpg" and by_id["dog/c"].path.is_file()
    assert ds.num_captions == 5


def test_folder_jsonl_with_class_and_split(tmp_path):
    root = tmp_path / "j"
    write_image(root / "Images" / "x" / "1.png")
    write_image(root / "Images" / "x" / "2.png")
    rows = [
        {"image": "x/1.png", "caption": "first", "class": "zulu"},
        {"image": "x/2.png", "caption": "second", "split": "test"},
        {"image": "x/2.png", "caption": "second again"},
    ]
    (root / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    ds = load_folder(root)
    assert ds.class_names == ["x", "zulu"]  # class column wins over the folder name
    by_id = {it.image_id: it for it in ds.items}
    assert by_id["x/1"].class_name == "zulu" and by_id["x/1"].class_id == 1
    assert by_id["x/2"].captions == ("second", "second again") and by_id["x/2"].split == "test"


def test_folder_explicit_captions_option(folder_root):
    (folder_root / "other.jsonl").write_text(
        "\n".join(json.dumps({"image": f"{c}/{n}", "caption": f"pic {n}"})
                  for c, n in [("cat", "a.png"), ("cat", "b.png"), ("dog", "c.jpg"), ("dog", "d.jpg")])
    )  # fmt: skip
    ds = load_folder(folder_root, captions="other.jsonl")
    assert {it.captions for it in ds.items} == {("pic a.png",), ("pic b.png",), ("pic c.jpg",), ("pic d.jpg",)}
    with pytest.raises(DataError, match="nothere.csv does not exist"):
        load_folder(folder_root, captions="nothere.csv")


def test_folder_lazy_decode(folder_root):
    (folder_root / "Images" / "cat" / "b.png").write_bytes(b"\x89PNG garbage")
    ds = load_folder(folder_root)  # no decoding at load time
    idx = next(i for i, it in enumerate(ds.items) if it.image_id == "cat/b")
    with pytest.raises(DataError, match="b.png could not be decoded"):
        ds.load_image(idx)


def test_folder_uncaptioned_images(folder_root):
    write_image(folder_root / "Images" / "dog" / "e.png")
    write_image(folder_root / "Images" / "bird" / "f.png")
    with pytest.raises(DataError, match=r"2 image\(s\) .*no caption.*bird/f.png"):
        load_folder(folder_root)
    with pytest.warns(UserWarning, match="2 image"):
        ds = load_folder(folder_root, require_captions=False)
    assert len(ds) == 4 and ds.class_names == ["cat", "dog"]


@pytest.mark.parametrize(
    "content, pattern",
    [
        ("img,caption\ncat/a.png,x\n", r"captions.csv:1: .*lacks column"),
        ("image,caption\ncat/a.png,ok\ncat/zz.png,missing\n", r"captions.csv:3: image 'cat/zz.png' does not exist"),
        ("image,caption\ncat/a.png,ok\ndog/c.jpg,   \n", r"captions.csv:3: empty caption"),
        ("image,caption\ncat/a.png,ok\n,orphan caption\n", r"captions.csv:3: empty 'image'"),
        ("image,caption,class\ncat/a.png,ok,cat\ncat/a.png,again,dog\n", r"captions.csv:3: .*class 'dog'"),
        ("image,caption\ncat/a.png,ok,extra\n", r"captions.csv:2: more fields"),
        ("image,caption,split\ncat/a.png,ok,holdout\n", r"captions.csv:2: split 'holdout'"),
    ],
)
def test_folder_bad_csv(folder_root, content, pattern):
    (folder_root / "captions.csv").write_text(content)
    with pytest.raises(DataError, match=pattern):
        load_folder(folder_root, require_captions=False)


@pytest.mark.parametrize(
    "lines, pattern",
    [
        (['{"image": "cat/a.png", "caption": "ok"}', '{"image": "cat/b.png", caption}'], r"jsonl:2: not valid JSON"),
        (['{"image": "cat/a.png"}'], r"jsonl:1: missing key\(s\) \['caption'\]"),
        (['["cat/a.png", "x"]'], r"jsonl:1: got list"),
        (['{"image": "cat/a.png", "caption": 5}'], r"jsonl:1: 'caption' is 5"),
    ],
)
def test_folder_bad_jsonl(folder_root, lines, pattern):
    (folder_root / "captions.csv").unlink()
    (folder_root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=pattern):
        load_folder(folder_root, require_captions=False)


def test_folder_layout_errors(tmp_path, folder_root):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no image files in"):
        load_folder(tmp_path / "empty")
    with pytest.raises(DataError, match="captions file .*nope.csv does not exist"):
        load_folder(folder_root, captions="nope.csv")
    (folder_root / "captions.csv").unlink()
    assert not load_folder(folder_root).has_captions  # no captions file: plain images (cmg_core.data.plain)
    (folder_root / "notes.txt").write_text("hi")
    (folder_root / "captions.csv").write_text("image,caption\nnotes.txt,hello\n")
    with pytest.raises(DataError, match="not an image file"):
        load_folder(folder_root, require_captions=False)


# ------------------------------------------------------------------------------------------------
# wikipedia
# ------------------------------------------------------------------------------------------------
WIKI_CATS = ["art", "biology", "geography"]
ARTICLE = (
    "Early life\n\nThe painter was born in Paris in 1840. He studied at the academy for ten years. "
    "His style changed after 1870! Critics praised the later works.\n"
    "Legacy\n"
    "Museums around the world hold his paintings today. " + "A very long sentence " * 40 + "ends here."
)


def write_wiki_text(path: Path, title: str, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'<?xml version="1.0" encoding="UTF-8"?>\n<document>\n<title>{title}</title>\n'
                    f"<date>May 1, 2009</date>\n<text>{text}</text>\n</document>\n")  # fmt: skip


@pytest.fixture()
def wiki_root(tmp_path) -> Path:
    """3 categories; 4 train pairs, 2 test pairs; one text with a bare '&' (not well-formed XML)."""
    root = tmp_path / "wikipedia_dataset"
    root.mkdir()
    (root / "categories.list").write_text("\n".join(WIKI_CATS) + "\n")
    train = [("t1", "i1", 1), ("t2", "i2", 1), ("t3", "i3", 2), ("t4", "i4", 3)]
    test = [("t5", "i5", 2), ("t6", "i6", 3)]
    for name, rows in [("trainset_txt_img_cat.list", train), ("testset_txt_img_cat.list", test)]:
        (root / name).write_text("".join(f"{t}\t{i}\t{c}\n" for t, i, c in rows))
        for t, i, c in rows:
            write_wiki_text(root / "texts" / f"{t}.xml", f"Title {t}", f"{WIKI_CATS[c - 1]} article {t}. " + ARTICLE)
            write_image(root / "images" / WIKI_CATS[c - 1] / f"{i}.jpg", color=(10 * c, 20, 30))
    bad_xml = (
        "<document><title>War & peace</title><text>Swords & shields were used in battle. "
        "Armies met on the field &amp; fought.</text></document>"
    )
    (root / "texts" / "t6.xml").write_text(bad_xml)
    return root


def test_wikipedia_loads(wiki_root):
    ds = load_wikipedia(wiki_root)
    assert ds.class_names == WIKI_CATS
    assert len(ds) == 6 and np.bincount(ds.labels).tolist() == [2, 2, 2]
    assert ds.summary()["splits"] == {"train": 4, "test": 2}
    by_id = {it.image_id: it for it in ds.items}
    t1 = by_id["art/i1"]
    assert t1.class_id == 0 and t1.split == "train" and t1.path == wiki_root / "images" / "art" / "i1.jpg"
    assert t1.captions[0] == "art article t1."
    assert t1.captions[1] == "The painter was born in Paris in 1840."  # "Early life" heading skipped
    assert len(t1.captions) == 5 and all(len(c) <= 300 for c in t1.captions)
    t6 = by_id["geography/i6"]  # malformed XML read by the regex fallback, entities unescaped
    assert t6.split == "test" and t6.captions == ("Swords & shields were used in battle.",
                                                  "Armies met on the field & fought.")  # fmt: skip
    img = ds.load_image(0)
    assert img.size == (8, 8)


def test_wikipedia_caption_options(wiki_root):
    ds = load_wikipedia(wiki_root, max_captions=2, max_chars=40)
    assert all(1 <= len(it.captions) <= 2 and all(len(c) <= 40 for c in it.captions) for it in ds.items)
    long = split_captions("Short one here. " + "Word " * 200, max_captions=5, max_chars=50)
    assert long[0] == "Short one here." and long[1] == ("Word " * 10).strip() and len(long) == 2
    with pytest.raises(ConfigError):
        load_wikipedia(wiki_root, max_captions=0)


@pytest.mark.parametrize(
    "edit, pattern",
    [
        (lambda r: (r / "categories.list").unlink(), "categories.list does not exist"),
        (lambda r: (r / "testset_txt_img_cat.list").unlink(), "testset_txt_img_cat.list does not exist"),
        (lambda r: (r / "trainset_txt_img_cat.list").write_text("t1\ti1\t1\nt2\ti2\n"),
         r"trainset_txt_img_cat.list:2: .*expected 'text_id<TAB>image_id<TAB>category"),
        (lambda r: (r / "trainset_txt_img_cat.list").write_text("t1\ti1\t4\n"),
         r"trainset_txt_img_cat.list:1: category '4'; expected a number 1..3"),
        (lambda r: (r / "texts" / "t3.xml").unlink(),
         r"trainset_txt_img_cat.list:3: text file .*t3.xml does not exist"),
        (lambda r: (r / "texts" / "t3.xml").write_text("<document><title>x</title></document>"),
         r"t3.xml has no <text> element"),
        (lambda r: (r / "images" / "biology" / "i5.jpg").unlink(),
         r"testset_txt_img_cat.list:1: image .*biology/i5.jpg does not exist"),
    ],
)  # fmt: skip
def test_wikipedia_errors(wiki_root, edit, pattern):
    edit(wiki_root)
    with pytest.raises(DataError, match=pattern):
        load_wikipedia(wiki_root)


# ------------------------------------------------------------------------------------------------
# class_coco
# ------------------------------------------------------------------------------------------------
COCO_CAT_IDS = [i + 1 + i // 10 for i in range(80)]  # 1..10, 12..21, ... (gaps like COCO's 1..90)


def make_coco(root: Path, split: str = "val2017") -> Path:
    """80 categories; images: 1 single (class 6), 2 two classes, 3 single + crowd of another class,
    4 no annotations, 5 single (class 0, not CMDA), 6 single without captions, 7 single (class 6),
    8 single (class 67)."""
    cats = [{"id": cid, "name": f"thing{k}", "supercategory": "x"} for k, cid in enumerate(COCO_CAT_IDS)]
    cid = COCO_CAT_IDS.__getitem__
    anns = [
        (1, cid(6), 0), (1, cid(6), 0),
        (2, cid(6), 0), (2, cid(14), 0),
        (3, cid(14), 0), (3, cid(22), 1),
        (5, cid(0), 0), (6, cid(4), 0), (7, cid(6), 0), (8, cid(67), 0),
    ]  # fmt: skip
    images = [{"id": i, "file_name": f"{i:012d}.jpg", "width": 8, "height": 8} for i in range(1, 9)]
    instances = {
        "images": images,
        "categories": cats,
        "annotations": [
            {"id": n, "image_id": i, "category_id": c, "iscrowd": crowd, "bbox": [0, 0, 1, 1]}
            for n, (i, c, crowd) in enumerate(anns)
        ],
    }
    caps = [(i, f"caption {k} of image {i}") for i in (1, 2, 3, 4, 5, 7, 8) for k in range(2)]
    cap_anns = [{"id": n, "image_id": i, "caption": c} for n, (i, c) in enumerate(caps)]
    captions = {"images": images, "annotations": cap_anns}
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(instances))
    (root / "annotations" / f"captions_{split}.json").write_text(json.dumps(captions))
    for im in images:
        write_image(root / split / im["file_name"])
    return root


@pytest.fixture()
def coco_root(tmp_path) -> Path:
    return make_coco(tmp_path / "coco")


def test_cmda_groups_constants():
    assert len(CMDA_NORMAL_GROUPS) == 6 and len(set(CMDA_NORMAL_GROUPS)) == 6
    assert len(CMDA_ANOMALY_GROUPS) == 50 and len(set(CMDA_ANOMALY_GROUPS)) == 50
    assert not set(CMDA_NORMAL_GROUPS) & set(CMDA_ANOMALY_GROUPS)
    assert all(0 <= c < 80 for c in CMDA_NORMAL_GROUPS + CMDA_ANOMALY_GROUPS)


def test_coco_single_object(coco_root):
    ds = load_class_coco(coco_root, split="val2017")
    assert ds.num_classes == 80 and ds.class_names[6] == "thing6"
    by_id = {it.image_id: it for it in ds.items}
    assert sorted(by_id) == [f"val2017/{i:012d}" for i in (1, 3, 5, 7, 8)]
    assert by_id["val2017/000000000001"].class_id == 6
    assert by_id["val2017/000000000003"].class_id == 14  # the crowd annotation is ignored
    assert by_id["val2017/000000000005"].class_name == "thing0"
    assert by_id["val2017/000000000008"].class_id == 67
    assert by_id["val2017/000000000007"].captions == ("caption 0 of image 7", "caption 1 of image 7")
    assert {it.split for it in ds.items} == {"val"}
    assert by_id["val2017/000000000001"].path == coco_root / "val2017" / "000000000001.jpg"


def test_coco_groups_and_cap(coco_root):
    ds = load_class_coco(coco_root, split="val2017", groups="cmda")
    assert sorted(it.class_id for it in ds.items) == [6, 6, 14, 67]  # class 0 is not a CMDA group
    assert ds.num_classes == 80
    capped = load_class_coco(coco_root, split="val2017", groups="cmda", max_per_class=1)
    assert sorted(it.image_id for it in capped.items) == [f"val2017/{i:012d}" for i in (1, 3, 8)]
    named = load_class_coco(coco_root, split="val2017", groups="thing0,67")
    assert sorted(it.class_id for it in named.items) == [0, 67]
    with pytest.raises(ConfigError, match="'giraffe'"):
        load_class_coco(coco_root, split="val2017", groups="giraffe")


@pytest.mark.parametrize(
    "edit, pattern",
    [
        (lambda r: (r / "annotations" / "captions_val2017.json").unlink(), "captions_val2017.json does not exist"),
        (lambda r: (r / "annotations" / "instances_val2017.json").write_text("{nope"), "is not valid JSON"),
        (lambda r: (r / "annotations" / "instances_val2017.json").write_text('{"images": []}'),
         r"missing or non-list key\(s\) \['annotations', 'categories'\]"),
        (lambda r: (r / "val2017" / "000000000003.jpg").unlink(),
         r"1 of 5 COCO image files are missing .*000000000003"),
    ],
)  # fmt: skip
def test_coco_errors(coco_root, edit, pattern):
    edit(coco_root)
    with pytest.raises(DataError, match=pattern):
        load_class_coco(coco_root, split="val2017")


def test_coco_cmda_needs_80_categories(coco_root):
    path = coco_root / "annotations" / "instances_val2017.json"
    data = json.loads(path.read_text())
    data["categories"] = data["categories"][:40]
    data["annotations"] = [a for a in data["annotations"] if a["category_id"] <= COCO_CAT_IDS[39]]
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match="80 categories"):
        load_class_coco(coco_root, split="val2017", groups="cmda")


# ------------------------------------------------------------------------------------------------
# registry dispatch
# ------------------------------------------------------------------------------------------------
def test_load_dataset_dispatch(ucm_root, folder_root, wiki_root, coco_root, tmp_path):
    assert load_dataset("ucm_captions", ucm_root).name == "ucm_captions"
    assert load_dataset("folder", folder_root).name == "folder"
    assert load_dataset("wikipedia", str(wiki_root), max_captions=1).items[0].captions == ("art article t1.",)
    coco = load_dataset("class_coco", coco_root, split="val2017", groups="cmda")
    assert coco.name == "class_coco" and len(coco) == 4
    with pytest.raises(DataError, match="does not exist or is not a folder"):
        load_dataset("wikipedia", tmp_path / "missing")
    with pytest.raises(DataError, match="needs a root"):
        load_dataset("folder")
