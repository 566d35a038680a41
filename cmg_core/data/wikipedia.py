"""The Wikipedia image-text dataset (Rasiwasia et al., ACM MM 2010) in its released layout::

    root/categories.list                 one category name per line (art, biology, ..., warfare)
    root/trainset_txt_img_cat.list       tab-separated: text_id, image_id, category number (1-based)
    root/testset_txt_img_cat.list
    root/texts/<text_id>.xml             <document><title>..</title><text>..</text></document>
    root/images/<category>/<image_id>.jpg

Each image is paired with a long article section; its "captions" are the first `max_captions` sentences of
the text (each at most `max_chars` characters), so the text side looks like the other datasets.
"""
from __future__ import annotations

import html
import re
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path

from ..errors import ConfigError, DataError
from .images import IMAGE_EXTS
from .types import CaptionedDataset, CaptionedImage

CATEGORIES_FILE = "categories.list"
LIST_FILES = {"train": "trainset_txt_img_cat.list", "test": "testset_txt_img_cat.list"}
TEXTS_DIR = "texts"
IMAGES_DIR = "images"
MIN_WORDS = 3  # pieces shorter than this (section headings, stray tokens) are skipped when possible

_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))\s+(?=[\"'(\[]?[A-Z0-9])")
_TEXT_TAG = re.compile(r"<text[^>]*>(.*?)</text>", re.DOTALL | re.IGNORECASE)
_TITLE_TAG = re.compile(r"<title[^>]*>(.*?)</title>", re.DOTALL | re.IGNORECASE)
_ANY_TAG = re.compile(r"<[^>]+>")


def load_wikipedia(root: Path, max_captions: int = 5, max_chars: int = 300, **options) -> CaptionedDataset:
    """Load the Wikipedia dataset from `root` (layout in the module docstring).

    Every (text, image) pair of the train and test lists becomes one image with up to `max_captions`
    sentence "captions" of at most `max_chars` characters; the split comes from the list file.
    """
    if options:
        warnings.warn(f"wikipedia: ignoring unknown option(s) {sorted(options)}", stacklevel=2)
    if int(max_captions) < 1 or int(max_chars) < 20:
        raise ConfigError(f"wikipedia: max_captions={max_captions}, max_chars={max_chars}; expected >= 1 and >= 20")
    root = Path(root)
    categories = read_categories(root / CATEGORIES_FILE)
    items = []
    for split, name in LIST_FILES.items():
        for line_no, text_id, image_id, cat in read_pairs(root / name, len(categories)):
            where = f"{root / name}:{line_no}"
            text = read_article(root / TEXTS_DIR / f"{text_id}.xml", where)
            category = categories[cat - 1]
            items.append(
                CaptionedImage(
                    image_id=f"{category}/{image_id}",
                    path=_image_path(root / IMAGES_DIR, category, image_id, where),
                    captions=split_captions(text, int(max_captions), int(max_chars)),
                    class_id=cat - 1,
                    class_name=category,
                    split=split,
                )
            )
    meta = {"source": "Rasiwasia et al. 2010, Wikipedia image-text dataset", "official_pairs": 2866}
    return CaptionedDataset(name="wikipedia", items=items, class_names=categories, root=root, meta=meta)


def read_categories(path: Path) -> list[str]:
    """Category names, one per non-blank line (line k is category number k)."""
    if not path.is_file():
        raise DataError(f"Wikipedia category file {path} does not exist; expected one category name per line")
    names = [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines()]
    names = [n for n in names if n]
    if not names:
        raise DataError(f"{path} lists no categories; expected one category name per line")
    if len(set(names)) != len(names):
        raise DataError(f"{path} lists a category twice ({names}); expected distinct names")
    return names


def read_pairs(path: Path, n_categories: int) -> list[tuple[int, str, str, int]]:
    """(line number, text id, image id, 1-based category) for every line of a *_txt_img_cat.list file."""
    if not path.is_file():
        raise DataError(
            f"Wikipedia list file {path} does not exist; expected lines 'text_id<TAB>image_id<TAB>category'"
        )
    pairs = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t") if "\t" in line else line.split()
        fields = [f.strip() for f in fields]
        if len(fields) != 3 or not fields[0] or not fields[1]:
            raise DataError(f"{path}:{line_no}: {line!r}; expected 'text_id<TAB>image_id<TAB>category number'")
        if not fields[2].isdigit() or not 1 <= int(fields[2]) <= n_categories:
            raise DataError(f"{path}:{line_no}: category {fields[2]!r}; expected a number 1..{n_categories}")
        pairs.append((line_no, fields[0], fields[1], int(fields[2])))
    if not pairs:
        raise DataError(f"{path} has no pairs; expected lines 'text_id<TAB>image_id<TAB>category'")
    return pairs


def read_article(path: Path, where: str = "") -> str:
    """The article text of a texts/<id>.xml file (title used when the text is empty).

    The released files are not always well-formed XML (bare '&', odd encodings), so a regex over the
    raw text is the fallback when the XML parser refuses a file.
    """
    prefix = f"{where}: " if where else ""
    if not path.is_file():
        raise DataError(f"{prefix}text file {path} does not exist; expected <document>...<text>...</text></document>")
    raw = path.read_bytes().decode("utf-8", errors="replace")
    title, text = _parse_xml(raw)
    if text is None:
        title, text = _parse_regex(raw)
    if text is None:
        raise DataError(f"{prefix}{path} has no <text> element; expected <document><title/><text/></document>")
    text = text.strip() or (title or "").strip()
    if not text:
        raise DataError(f"{prefix}{path} has an empty <text> and no title; expected the article text")
    return text


def _parse_xml(raw: str) -> tuple[str | None, str | None]:
    """(title, text) with the XML parser; (None, None) when the file is not well-formed."""
    try:
        doc = ET.fromstring(raw.encode("utf-8"))
    except ET.ParseError:
        return None, None
    text = doc if doc.tag == "text" else doc.find(".//text")
    title = doc.find(".//title")
    return (
        "".join(title.itertext()) if title is not None else None,
        "".join(text.itertext()) if text is not None else None,
    )


def _parse_regex(raw: str) -> tuple[str | None, str | None]:
    """(title, text) by regex over a file the XML parser refused; entities unescaped, inner tags removed."""

    def grab(pattern: re.Pattern) -> str | None:
        m = pattern.search(raw)
        return html.unescape(_ANY_TAG.sub(" ", m.group(1))) if m else None

    return grab(_TITLE_TAG), grab(_TEXT_TAG)


def split_captions(text: str, max_captions: int = 5, max_chars: int = 300) -> tuple[str, ...]:
    """Up to `max_captions` sentences of `text`, each cut to at most `max_chars` characters.

    Paragraphs are split on line breaks, then into sentences; pieces of fewer than three words (section
    headings) are skipped unless nothing else is left.
    """
    pieces = []
    for para in re.split(r"\n+", text):
        para = " ".join(para.split())
        pieces.extend(p.strip() for p in _SENTENCE_END.split(para) if p.strip())
    long_enough = [p for p in pieces if len(p.split()) >= MIN_WORDS]
    chosen = (long_enough or pieces)[:max_captions]
    return tuple(_cap(p, max_chars) for p in chosen)


def _cap(piece: str, max_chars: int) -> str:
    """Cut a piece to at most max_chars characters, at a word boundary when there is one."""
    if len(piece) <= max_chars:
        return piece
    cut = piece[:max_chars]
    space = cut.rfind(" ")
    return (cut[:space] if space > max_chars // 2 else cut).rstrip(" ,;:")


def _image_path(images_dir: Path, category: str, image_id: str, where: str) -> Path:
    """images/<category>/<image_id>.jpg (other image extensions and a flat images/ folder also accepted)."""
    primary = images_dir / category / f"{image_id}.jpg"
    if primary.is_file():
        return primary
    for folder in (images_dir / category, images_dir):
        for ext in IMAGE_EXTS:
            cand = folder / f"{image_id}{ext}"
            if cand.is_file():
                return cand
    raise DataError(f"{where}: image {primary} does not exist; expected images/<category>/<image_id>.jpg")
