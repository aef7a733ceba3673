"""Merge COCO instance files that share one category list into one, with file names under a common image root.

    python experiments/merge_coco.py --root ../shared/datasets --output data/coco_train208.json \
        coco-tiny/train2017=coco-tiny/annotations/instances_train2017.json \
        coco128/train2017=coco128/annotations/instances_train2017.json

Each argument is IMAGE_FOLDER=ANNOTATIONS, both relative to ``--root``; the merged file's ``file_name`` entries are
relative to ``--root`` too, so ``data.train_images`` is ``--root``. Image and annotation ids must not collide.
"""

import argparse
import json
import sys
from pathlib import Path


def merge(root: Path, sources: list[tuple[str, str]]) -> dict:
    merged = {"images": [], "annotations": [], "categories": None}
    for folder, annotations in sources:
        content = json.loads((root / annotations).read_text())
        if merged["categories"] is None:
            merged["categories"] = content["categories"]
        elif content["categories"] != merged["categories"]:
            raise SystemExit(f"error: {annotations}: another category list than the first file's")
        merged["images"] += [image | {"file_name": f"{folder}/{image['file_name']}"} for image in content["images"]]
        merged["annotations"] += content["annotations"]
    for key in ("images", "annotations"):
        ids = [entry["id"] for entry in merged[key]]
        if len(set(ids)) != len(ids):
            raise SystemExit(f"error: the {key} ids of the files collide; renumber them first")
    return merged


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("sources", nargs="+", metavar="IMAGE_FOLDER=ANNOTATIONS")
    args = parser.parse_args()
    merged = merge(args.root, [tuple(source.split("=", 1)) for source in args.sources])
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(merged))
    print(f"{args.output}: {len(merged['images'])} images, {len(merged['annotations'])} boxes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
