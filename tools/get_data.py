"""Get a public data set into datasets/NAME, checked file by file against the SHA-256 manifest committed beside this
script (tools/data_manifests/NAME.sha256, `sha256sum -c` format).

    python tools/get_data.py kangaroo                           # download from its public source, extract, check
    python tools/get_data.py coco128 --from /path/to/coco128    # a copy already on disk (or its .zip): no network
    python tools/get_data.py kangaroo --from DIR --write-manifest    # maintainers: record DIR's files as the manifest

- kangaroo: 164 photos of one animal with Pascal VOC XML (images/, annots/), github.com/experiencor/kangaroo at a
  fixed commit. No licence is stated: use it for development, never commit it.
- coco128: the first 128 images of COCO 2017 train as Ultralytics publishes them (coco128.zip among the release
  assets of github.com/ultralytics/assets), in COCO's own layout: train2017/, val2017/ (the same images) and
  annotations/instances_{train,val}2017.json. Annotations (c) COCO Consortium, CC BY 4.0; images from Flickr under
  their own licences.

The manifest lists the files of the layout, not an archive, so a download and a copy are checked the same way. The
public coco128.zip holds YOLO txt labels, not COCO's JSON: its images are checked one by one against the manifest,
and its two annotation files are made here from the labels (annotations.read_yolo), which have no crowd boxes or
segmentations, so they are not checked; a --from copy in COCO's layout brings the original files, checked. A set is
written to NAME.partial and renamed once it checks, so datasets/NAME is either complete and verified or absent.
"""
import argparse
import hashlib
import logging
import os
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

logger = logging.getLogger(__name__)

MANIFEST_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data_manifests")
DATASETS = {
    "kangaroo": {
        "url": "https://github.com/experiencor/kangaroo/archive/882bbbd75ba49cb8cf9393e06d88ebaec293af32.zip",
        "source": "github.com/experiencor/kangaroo (Pascal VOC XML, no licence stated: development only)",
    },
    "coco128": {
        "url": "https://github.com/ultralytics/assets/releases/download/v0.0.0/coco128.zip",
        "source": "COCO 2017 train's first 128 images as Ultralytics publishes them (github.com/ultralytics/assets)",
    },
}
# COCO's 80 classes in the order of YOLO's class indices, and their COCO category ids (COCO skips 11 of 1..90).
COCO_NAMES = (
    "person bicycle car motorcycle airplane bus train truck boat traffic_light fire_hydrant stop_sign parking_meter "
    "bench bird cat dog horse sheep cow elephant bear zebra giraffe backpack umbrella handbag tie suitcase frisbee "
    "skis snowboard sports_ball kite baseball_bat baseball_glove skateboard surfboard tennis_racket bottle wine_glass "
    "cup fork knife spoon bowl banana apple sandwich orange broccoli carrot hot_dog pizza donut cake chair couch "
    "potted_plant bed dining_table toilet tv laptop mouse remote keyboard cell_phone microwave oven toaster sink "
    "refrigerator book clock vase scissors teddy_bear hair_drier toothbrush").split()
COCO_NAMES = [name.replace("_", " ") for name in COCO_NAMES]
COCO_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]
COCO_SPLITS = ("train2017", "val2017")  # coco128's val is its train: the same 128 images
YOLO_MARKER = os.path.join("annotations", "MADE_FROM_YOLO_LABELS")


class DataError(ValueError):
    """A data set that cannot be fetched or does not match its manifest (exit status 2)."""


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", choices=sorted(DATASETS), help="the data set")
    parser.add_argument("--out", default="datasets", help="the set goes to OUT/NAME (default: datasets)")
    parser.add_argument("--from", dest="from_path", default=None, metavar="DIR",
                        help="a copy already on disk: a folder in the layout above (or the public archive's "
                             "layout), or the public .zip; nothing is downloaded")
    parser.add_argument("--write-manifest", action="store_true",
                        help="record the SHA-256 of every file under --from as the manifest (maintainers)")
    return parser


# ---- the manifest ------------------------------------------------------------------------------------------------
def manifest_path(name):
    return os.path.join(MANIFEST_DIR, f"{name}.sha256")


def sha256_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def list_files(folder):
    """The regular files under `folder` as sorted '/'-separated relative paths, hidden files and folders left out."""
    found = []
    for parent, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d != "__pycache__"]
        found += [os.path.relpath(os.path.join(parent, f), folder).replace(os.sep, "/")
                  for f in files if not f.startswith(".")]
    return sorted(found)


def write_manifest(folder, path):
    files = list_files(folder)
    if not files:
        raise DataError(f"no files in {folder} to record")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.writelines(f"{sha256_file(os.path.join(folder, name))}  {name}\n" for name in files)
    return len(files)


def read_manifest(path):
    """{relative path: sha256} of a manifest file."""
    if not os.path.isfile(path):
        raise DataError(f"no manifest {path}: write it with --from DIR --write-manifest")
    manifest = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            digest, _, name = line.rstrip("\n").partition("  ")
            if len(digest) != 64 or not name or name.startswith("/") or ".." in name.split("/"):
                raise DataError(f"{path}:{number}: not a line '<sha256>  <relative path>'")
            manifest[name] = digest
    return manifest


def verify(folder, manifest, skip=()):
    """Raise DataError naming the first file of `manifest` that is missing from `folder` or whose SHA-256 differs."""
    names = [name for name in manifest if name not in skip]
    missing = [name for name in names if not os.path.isfile(os.path.join(folder, name))]
    if missing:
        raise DataError(f"{os.path.join(folder, missing[0])} is missing ({len(missing)} of the manifest's "
                        f"{len(names)} files are)")
    for name in names:
        if sha256_file(os.path.join(folder, name)) != manifest[name]:
            raise DataError(f"{os.path.join(folder, name)}: SHA-256 differs from the manifest (a changed or "
                            f"corrupt copy)")
    return len(names)


# ---- download ----------------------------------------------------------------------------------------------------
def download(url, path):
    """`url` to `path`, one progress line on stderr; an unreachable URL is a one-line DataError."""
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(path, "wb") as f:
            total, done = int(response.headers.get("Content-Length") or 0), 0
            for block in iter(lambda: response.read(1 << 20), b""):
                f.write(block)
                done += len(block)
                share = f" of {total / 1e6:.1f} MB" if total else " MB"
                print(f"\rdownloading {url}: {done / 1e6:.1f}{share}", end="", file=sys.stderr, flush=True)
    except (urllib.error.URLError, OSError) as error:
        raise DataError(f"cannot reach {url} ({getattr(error, 'reason', error)}): use --from DIR") from None
    print(file=sys.stderr)


def extract(archive, folder):
    try:
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(folder)  # zipfile drops '..' and absolute parts of member names
    except zipfile.BadZipFile:
        raise DataError(f"{archive} is not a zip archive") from None


def find_root(folder, marker):
    """The folder at or below `folder` that holds the relative path `marker` (an archive's top folder varies)."""
    for parent, dirs, _ in os.walk(folder):
        dirs.sort()
        if os.path.exists(os.path.join(parent, marker)):
            return parent
    return None


# ---- coco128 as Ultralytics publishes it -------------------------------------------------------------------------
def coco_from_yolo(source, stage):
    """Ultralytics' coco128 (images/train2017, labels/train2017) into COCO's layout under `stage`; returns the
    annotation files it made, which the manifest's originals do not match."""
    from annotations import read_yolo
    from config import write_json_atomic
    labels = os.path.join(stage, "labels", "train2017")
    shutil.copytree(os.path.join(source, "labels", "train2017"), labels)
    with open(os.path.join(stage, "labels", "classes.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(COCO_NAMES) + "\n")
    data, _ = read_yolo(labels, image_root=os.path.join(source, "images", "train2017"))
    image_ids = {image["id"]: int(os.path.splitext(image["file_name"])[0]) for image in data["images"]}
    for image in data["images"]:
        image["id"] = image_ids[image["id"]]
    for annotation in data["annotations"]:
        annotation["image_id"] = image_ids[annotation["image_id"]]
        annotation["category_id"] = COCO_IDS[annotation["category_id"] - 1]
    data["categories"] = [{"id": i, "name": name} for i, name in zip(COCO_IDS, COCO_NAMES)]
    made = []
    for split in COCO_SPLITS:
        shutil.copytree(os.path.join(source, "images", "train2017"), os.path.join(stage, split))
        made.append(f"annotations/instances_{split}.json")
        write_json_atomic(data, os.path.join(stage, made[-1]), indent=None)
    shutil.rmtree(os.path.join(stage, "labels"))
    return made


# ---- getting a set -----------------------------------------------------------------------------------------------
def stage_source(name, source, work):
    """(folder in the manifest's layout, annotation files made locally) from a folder or a .zip at `source`."""
    if os.path.isfile(source):
        extract(source, os.path.join(work, "extracted"))
        source = os.path.join(work, "extracted")
    if not os.path.isdir(source):
        raise DataError(f"--from {source} is not a folder or a .zip")
    markers = {"kangaroo": ["annots"], "coco128": ["annotations", os.path.join("images", "train2017")]}[name]
    for marker in markers:
        root = find_root(source, marker)
        if root is None:
            continue
        if name == "coco128" and marker != "annotations":
            stage = os.path.join(work, "coco")
            return stage, coco_from_yolo(root, stage)
        return root, []
    raise DataError(f"{source} holds no {name} data set (none of {', '.join(markers)} found in it)")


def copy_checked(source, dest, manifest, skip=()):
    """Copy the manifest's files from `source` to `dest` through `dest`.partial, checked before the rename."""
    partial = dest + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        for relative in manifest:
            src = os.path.join(source, relative)
            if not os.path.isfile(src):
                missing = sum(not os.path.isfile(os.path.join(source, r)) for r in manifest)
                raise DataError(f"{src} is missing ({missing} of the manifest's {len(manifest)} files are)")
            os.makedirs(os.path.dirname(os.path.join(partial, relative)), exist_ok=True)
            shutil.copyfile(src, os.path.join(partial, relative))
        checked = verify(partial, manifest, skip)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    os.replace(partial, dest)
    return checked


def get(name, out="datasets", from_path=None):
    """Put data set `name` into `out`/name, from `from_path` (a folder or .zip) or its public URL, every file checked
    against the manifest. Returns the folder."""
    manifest = read_manifest(manifest_path(name))
    dest = os.path.join(out, name)
    if os.path.exists(dest):
        try:
            verify(dest, manifest, skip=_made_locally(dest, manifest))
        except DataError as error:
            raise DataError(f"{dest} exists but does not match the manifest ({error}): remove it and rerun") from None
        logger.info("%s is already there and matches its manifest", dest)
        return dest
    os.makedirs(out, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out) as work:
        if from_path is None:
            url = DATASETS[name]["url"]
            from_path = os.path.join(work, os.path.basename(url))
            download(url, from_path)
        source, made = stage_source(name, from_path, work)
        checked = copy_checked(source, dest, manifest, skip=made)
    if made:
        with open(os.path.join(dest, YOLO_MARKER), "w", encoding="utf-8") as f:
            f.write("annotations made from coco128.zip's YOLO labels (tools/get_data.py): no crowd boxes, no masks\n")
    logger.info("%s: %d files, SHA-256 checked against %s%s", dest, checked, os.path.relpath(manifest_path(name), ROOT),
                f"; made from the YOLO labels, not checked: {', '.join(made)}" if made else "")
    return dest


def _made_locally(dest, manifest):
    """An existing coco128 whose annotations were made from YOLO labels says so in a marker file."""
    made = os.path.isfile(os.path.join(dest, YOLO_MARKER))
    return [name for name in manifest if name.startswith("annotations/")] if made else []


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.write_manifest:
        if not args.from_path:
            raise DataError("--write-manifest records the files of --from DIR: pass --from")
        count = write_manifest(args.from_path, manifest_path(args.name))
        logger.info("%s: %d files", os.path.relpath(manifest_path(args.name), ROOT), count)
        return manifest_path(args.name)
    logger.info("%s: %s", args.name, DATASETS[args.name]["source"])
    return get(args.name, args.out, args.from_path)


if __name__ == "__main__":
    import config as cfg
    cfg.run_cli(main, None, bad_input=(DataError,))
