"""tools/get_data.py: a copy or a download is checked file by file against its SHA-256 manifest, and nothing the
project commits names a folder of the machine that wrote it."""
import os
import subprocess
import sys
import urllib.error
import zipfile

import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import get_data  # noqa: E402
from config import run_cli  # noqa: E402


def _write(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


@pytest.fixture
def kangaroo_copy(tmp_path, monkeypatch):
    """A tiny copy in kangaroo's layout, with its manifest in a temporary manifest folder."""
    copy = tmp_path / "copy"
    for stem in ("00001", "00002"):
        _write(str(copy / "images" / f"{stem}.jpg"), f"jpeg bytes {stem}".encode())
        _write(str(copy / "annots" / f"{stem}.xml"), f"<annotation>{stem}</annotation>".encode())
    monkeypatch.setattr(get_data, "MANIFEST_DIR", str(tmp_path / "manifests"))
    get_data.write_manifest(str(copy), get_data.manifest_path("kangaroo"))
    _write(str(copy / "README.md"), b"not in the manifest, not copied")
    return copy


def _cli(argv, capsys):
    """The command line as `python tools/get_data.py` runs it: (exit status, stderr lines)."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(get_data.main, argv, bad_input=(get_data.DataError,))
    return exit_info.value.code, capsys.readouterr().err.strip().splitlines()


def test_from_copy_with_matching_manifest(kangaroo_copy, tmp_path):
    dest = get_data.get("kangaroo", str(tmp_path / "datasets"), str(kangaroo_copy))
    assert dest == str(tmp_path / "datasets" / "kangaroo")
    assert get_data.list_files(dest) == ["annots/00001.xml", "annots/00002.xml", "images/00001.jpg",
                                         "images/00002.jpg"]
    assert (tmp_path / "datasets" / "kangaroo" / "images" / "00002.jpg").read_bytes() == b"jpeg bytes 00002"
    assert get_data.get("kangaroo", str(tmp_path / "datasets"), str(kangaroo_copy)) == dest  # there and checked


def test_changed_byte_fails_naming_the_file(kangaroo_copy, tmp_path, capsys):
    image = kangaroo_copy / "images" / "00002.jpg"
    image.write_bytes(image.read_bytes()[:-1] + b"X")
    code, lines = _cli(["kangaroo", "--out", str(tmp_path / "datasets"), "--from", str(kangaroo_copy)], capsys)
    assert code == 2 and len(lines) == 1
    assert "images/00002.jpg" in lines[0] and "SHA-256 differs" in lines[0]
    assert not os.listdir(tmp_path / "datasets")  # no half-checked set left behind


def test_missing_file_fails(kangaroo_copy, tmp_path, capsys):
    os.remove(kangaroo_copy / "annots" / "00001.xml")
    code, lines = _cli(["kangaroo", "--out", str(tmp_path / "datasets"), "--from", str(kangaroo_copy)], capsys)
    assert code == 2 and len(lines) == 1
    assert "annots/00001.xml is missing" in lines[0]
    assert not os.listdir(tmp_path / "datasets")


def test_existing_set_that_differs_is_refused(kangaroo_copy, tmp_path):
    dest = get_data.get("kangaroo", str(tmp_path / "datasets"), str(kangaroo_copy))
    with open(os.path.join(dest, "annots", "00002.xml"), "ab") as f:
        f.write(b" ")
    with pytest.raises(get_data.DataError, match="remove it and rerun"):
        get_data.get("kangaroo", str(tmp_path / "datasets"), str(kangaroo_copy))


def test_download_extracts_and_checks(kangaroo_copy, tmp_path, monkeypatch):
    archive = tmp_path / "kangaroo-0123abc.zip"
    with zipfile.ZipFile(archive, "w") as zf:  # GitHub's archives put everything under one top folder
        for name in get_data.list_files(str(kangaroo_copy)):
            zf.write(kangaroo_copy / name, f"kangaroo-0123abc/{name}")
    monkeypatch.setitem(get_data.DATASETS["kangaroo"], "url", archive.as_uri())
    dest = get_data.get("kangaroo", str(tmp_path / "datasets"))
    assert len(get_data.list_files(dest)) == 4
    assert sorted(os.listdir(tmp_path / "datasets")) == ["kangaroo"]  # the archive and its extraction are gone


def test_offline_is_one_line_that_points_at_from(kangaroo_copy, tmp_path, monkeypatch, capsys):
    def unreachable(url, timeout=None):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(get_data.urllib.request, "urlopen", unreachable)
    code, lines = _cli(["kangaroo", "--out", str(tmp_path / "datasets")], capsys)
    assert code == 2 and len(lines) == 1
    assert lines[0].startswith("error: cannot reach https://") and lines[0].endswith("use --from DIR")


def _jpeg(path, color):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (64, 48), color).save(path)


def test_coco128_from_ultralytics_zip(tmp_path, monkeypatch):
    """The public coco128.zip (YOLO labels): images checked against the manifest, COCO JSON made with COCO's ids."""
    coco = tmp_path / "coco_layout"  # what the manifest was written from: COCO's layout
    for stem, color in (("000000000009", "red"), ("000000000025", "blue")):
        for split in ("train2017", "val2017"):
            _jpeg(str(coco / split / f"{stem}.jpg"), color)
        _jpeg(str(tmp_path / "yolo" / "coco128" / "images" / "train2017" / f"{stem}.jpg"), color)
    for split in ("train2017", "val2017"):
        _write(str(coco / "annotations" / f"instances_{split}.json"), b"{}")
    # class 2 is car (COCO id 3), class 79 toothbrush (id 90); 000000000025 has no label file (a negative)
    _write(str(tmp_path / "yolo" / "coco128" / "labels" / "train2017" / "000000000009.txt"),
           b"2 0.5 0.5 0.5 0.5\n79 0.25 0.25 0.25 0.25\n")
    monkeypatch.setattr(get_data, "MANIFEST_DIR", str(tmp_path / "manifests"))
    get_data.write_manifest(str(coco), get_data.manifest_path("coco128"))
    archive = tmp_path / "coco128.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for name in get_data.list_files(str(tmp_path / "yolo")):
            zf.write(tmp_path / "yolo" / name, name)

    dest = get_data.get("coco128", str(tmp_path / "datasets"), str(archive))
    from annotations import read_coco_json
    data = read_coco_json(os.path.join(dest, "annotations", "instances_val2017.json"))
    assert sorted(image["id"] for image in data["images"]) == [9, 25]
    assert sorted(a["category_id"] for a in data["annotations"]) == [3, 90]
    assert {c["id"]: c["name"] for c in data["categories"]}[90] == "toothbrush"
    assert get_data.get("coco128", str(tmp_path / "datasets")) == dest  # made-here annotations are not re-checked

    _jpeg(str(tmp_path / "yolo" / "coco128" / "images" / "train2017" / "000000000025.jpg"), "green")
    with pytest.raises(get_data.DataError, match="train2017/000000000025.jpg: SHA-256 differs"):
        get_data.get("coco128", str(tmp_path / "other"), str(tmp_path / "yolo"))


def test_committed_manifests_are_relative_and_complete():
    for name in get_data.DATASETS:
        manifest = get_data.read_manifest(get_data.manifest_path(name))
        assert manifest and all(not path.startswith("/") for path in manifest)
    assert len(get_data.read_manifest(get_data.manifest_path("kangaroo"))) == 2 * 164


def test_no_committed_file_names_this_machines_folders():
    """A clone has no /work, /root or /home of the machine that wrote a file: commands, records and defaults use
    paths relative to the checkout. tests/ is left out: tests pass foreign absolute paths on purpose."""
    try:
        listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                                capture_output=True, text=True, check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    offenders = []
    for name in listed:
        path = os.path.join(ROOT, name)
        if name.startswith("tests/") or not os.path.isfile(path):
            continue
        with open(path, "rb") as f:
            data = f.read()
        if b"\0" in data:
            continue  # binary: images, weights
        text = data.decode("utf-8", errors="replace")
        offenders += [f"{name}:{number}" for number, line in enumerate(text.splitlines(), 1)
                      if any(folder in line for folder in ("/work/", "/root/", "/home/"))]
    assert not offenders, f"absolute paths of a machine in {offenders}"
