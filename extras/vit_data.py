"""The checks and one-line errors around transformer.py's data loading: a --data-dir folder's usual mistakes, a
missing `datasets` package, an unreachable Hub, a dataset without an image column and a class-label column; and
the decoding of a whole split into an ImageCache that skips (and counts) the unreadable files. The lesson's
load_splits and load_data call these."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch

import transformer
from trainkit import UserError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def check_image_folder(data_dir: Path) -> None:
    """--data-dir: clear errors for the usual mistakes before `datasets` sees the folder."""
    if not data_dir.exists():
        raise UserError(f"--data-dir {data_dir}: no such folder")
    if not data_dir.is_dir():
        raise UserError(f"--data-dir {data_dir}: not a folder")
    train = data_dir / "train"
    if not train.is_dir():
        raise UserError(f"--data-dir {data_dir}: expected a train/ folder with one subfolder per class "
                        f"(train/cats/*.jpg, train/dogs/*.jpg, ...)")
    classes = [d.name for d in sorted(train.iterdir())
               if d.is_dir() and any(f.suffix.lower() in IMAGE_EXTENSIONS for f in d.iterdir())]
    if not classes:
        raise UserError(f"--data-dir {data_dir}: train/ has no class subfolders with images "
                        f"(expected train/<class name>/<image files>)")
    if len(classes) < 2:
        raise UserError(f"--data-dir {data_dir}: train/ has only one class ({classes[0]}); "
                        f"a classifier needs at least two")


def source_name(data_dir: str | None, dataset: str) -> str:
    return f"--data-dir {data_dir}" if data_dir else f"dataset {dataset!r}"


@contextlib.contextmanager
def loading_errors(data_dir: str | None, dataset: str):
    """Around `datasets.load_dataset`: a folder is checked first, and what goes wrong becomes one line (UserError)
    instead of a traceback or a page of the Hub's retries."""
    if data_dir:
        check_image_folder(Path(data_dir))
    else:
        with contextlib.suppress(ImportError):
            import huggingface_hub

            huggingface_hub.utils.logging.set_verbosity_error()
    try:
        yield
    except ImportError as e:
        raise UserError(f"the `datasets` package is needed ({e}); pip install datasets") from None
    except Exception as e:  # datasets raises many types; the user only needs the first line
        first = (str(e).splitlines() or [type(e).__name__])[0]
        if data_dir:
            raise UserError(f"{source_name(data_dir, dataset)}: could not be loaded as an image folder: "
                            f"{first}") from None
        raise UserError(f"could not load {source_name(data_dir, dataset)} from the Hugging Face Hub "
                        f"({type(e).__name__}: {first}); offline? use --data-dir DIR with train/ and validation/ "
                        f"class subfolders") from None


def find_columns(splits, data_dir: str | None, dataset: str) -> tuple[str, str, list[str]]:
    """(image column, label column, class names) of a Hugging Face image-classification dataset: the image
    column is an Image feature, the label column a ClassLabel ('label' or 'labels' preferred)."""
    from datasets import ClassLabel, Image as ImageFeature

    if "train" not in splits:
        raise UserError(f"{source_name(data_dir, dataset)} has no 'train' split (splits: {list(splits)})")
    features = splits["train"].features
    image_cols = [k for k, f in features.items() if isinstance(f, ImageFeature)]
    label_cols = [k for k, f in features.items() if isinstance(f, ClassLabel)]
    if not image_cols or not label_cols:
        raise UserError(f"dataset has no image column with a class-label column (features: {list(features)}); "
                        f"expected an image-classification dataset")
    label_col = ([c for c in label_cols if c in ("label", "labels")] or label_cols)[0]
    return image_cols[0], label_col, list(features[label_col].names)


def cache_split(ds, image_col: str, label_col: str, size: int, desc: str, crop: float = 1.0) -> transformer.ImageCache:
    """Decodes every image of a Hugging Face split once (transformer.decode_image with this centre crop);
    unreadable files are skipped and counted."""
    from datasets import Image as ImageFeature
    from tqdm.auto import tqdm

    ds = ds.cast_column(image_col, ImageFeature(decode=False))  # we decode ourselves, so bad files can't crash
    images, labels, skipped = [], [], 0
    for row in tqdm(ds, desc=f"decoding {desc}", unit="img", leave=False, mininterval=1.0,
                    disable=not sys.stderr.isatty()):
        item = row[image_col]
        try:
            source = item["bytes"] if item.get("bytes") else item["path"]
            images.append(transformer.decode_image(source, size, crop))
            labels.append(int(row[label_col]))
        except (OSError, ValueError, SyntaxError, TypeError, KeyError, AttributeError):
            skipped += 1  # corrupt, truncated or not an image at all
    if not images:
        raise UserError(f"no readable images in the {desc} split ({skipped} files could not be decoded)")
    return transformer.ImageCache(torch.stack(images), torch.tensor(labels, dtype=torch.long), skipped)
