"""Multi-process training on the CPU: torchrun --nproc_per_node=2 (gloo) runs pretraining, then fine-tuning
from the backbone it wrote, and each writes what a single process writes, from rank 0 only.

Both scripts log "N + N images on 2 ranks, M distinct" per epoch from an all_gather of the image ids each
rank trained on, so disjoint shards are checked in the real run; both also raise if the ranks' weights
drift apart, which catches a DDP wrapper left over from a frozen stage. Tiny: nano, 64 px, 8 images.
"""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

import distributed
import finetune_single_class as finetune
import pretrain_multi_class as pretrain
from dataset_coco import CocoDetectionDataset
from synthetic_data import write_coco_layout, write_shapes_split

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMON = ["--batch-size", "2", "--model-size", "nano", "--img-size", "64", "--workers", "0", "--device", "cpu",
          "--no-plots"]
FINETUNE = {"stage1_epochs": 1, "stage2_epochs": 0, "stage3_epochs": 1, "stage3_head_lr": 5e-4, "progress": False}


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(script, *args):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), script, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def files_under(folder):
    """Relative paths of a run folder; TensorBoard event names (host, pid) reduced to their folder."""
    found = set()
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.relpath(os.path.join(root, name), folder)
            found.add("tensorboard/<events>" if path.startswith("tensorboard") else path)
    return found


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    write_coco_layout(str(root / "coco"), ["person", "car", "dog"], num_train=8, num_val=4, img_size=64, seed=0)
    write_shapes_split(root / "train", root / "train.json", 8, ["whiteline"], img_size=64, seed=0,
                       empty_fraction=0.0)
    write_shapes_split(root / "val", root / "val.json", 4, ["whiteline"], img_size=64, seed=1)
    (root / "finetune.json").write_text(json.dumps(FINETUNE))
    return root


@pytest.mark.slow
def test_torchrun_two_processes_shard_data_and_write_like_one(data, tmp_path):
    pretrain_args = ["--coco-root", str(data / "coco"), "--epochs", "1", "--no-progress", *COMMON]
    result = torchrun("pretrain_multi_class.py", *pretrain_args, "--output-dir", str(tmp_path / "pre2"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "epoch 1 data shards: 4 + 4 images on 2 ranks, 8 distinct" in result.stderr
    assert "global batch 4; learning rates x 2 (linear scaling)" in result.stderr
    (ddp_run,) = [entry.path for entry in os.scandir(tmp_path / "pre2")]  # rank 1 wrote nothing of its own
    single = pretrain.main(pretrain_args + ["--output-dir", str(tmp_path / "pre1")])
    assert files_under(ddp_run) == files_under(single["run_dir"])

    backbone = os.path.join(ddp_run, "backbone_weights", "last_backbone.pth")
    finetune_args = ["--config", str(data / "finetune.json"), "--pretrained-backbone", backbone,
                     "--train-root", str(data / "train"), "--train-ann", str(data / "train.json"),
                     "--val-root", str(data / "val"), "--val-ann", str(data / "val.json"), *COMMON]
    result = torchrun("finetune_single_class.py", *finetune_args, "--output-dir", str(tmp_path / "fine2"))
    assert result.returncode == 0, result.stderr[-3000:]
    for epoch in (1, 2):  # stage 1 (heads) and stage 3 (all): a new DDP wrapper each, ranks still in sync
        assert f"epoch {epoch} data shards: 4 + 4 images on 2 ranks, 8 distinct" in result.stderr
    (ddp_run,) = [entry.path for entry in os.scandir(tmp_path / "fine2")]
    single = finetune.main(finetune_args + ["--output-dir", str(tmp_path / "fine1")])
    assert files_under(ddp_run) == files_under(single["run_dir"])
    last = torch.load(os.path.join(ddp_run, "last_model.pth"), weights_only=True)
    assert last["epoch"] == 2 and last["stage"] == 3
    head_lrs = {g["name"]: g["initial_lr"] for g in last["optimizer_state_dict"]["param_groups"]}
    assert head_lrs["head"] == pytest.approx(2 * FINETUNE["stage3_head_lr"])  # global batch 4 = 2 x 2


def test_distributed_sampler_gives_each_rank_a_different_half(data):
    dataset = CocoDetectionDataset(str(data / "train.json"), str(data / "train"))
    shards = [distributed.train_sampler(dataset, seed=0, num_replicas=2, rank=rank) for rank in (0, 1)]
    first = [list(sampler) for sampler in shards]
    assert len(first[0]) == len(first[1]) == 4
    assert set(first[0]).isdisjoint(first[1]) and set(first[0]) | set(first[1]) == set(range(8))
    for sampler in shards:
        sampler.set_epoch(1)
    assert [list(sampler) for sampler in shards] != first  # reshuffled every epoch
    assert distributed.train_sampler(dataset, seed=0) is None  # single process: the DataLoader shuffles


def test_single_process_helpers_are_no_ops():
    model = torch.nn.Linear(2, 2)
    assert distributed.get_world_size() == 1 and distributed.is_main_process()
    assert distributed.wrap_model(model, torch.device("cpu")) is model
    assert distributed.unwrap_model(model) is model
    assert distributed.rank_seed(7) == 7
    assert distributed.describe_shards([3, 1]) == "2 images on 1 ranks, 2 distinct"


def test_plain_python_with_several_gpus_prints_the_torchrun_command(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    hint = distributed.torchrun_hint("pretrain_multi_class.py", ["--coco-root", "/data/my coco", "--amp"])
    assert "torchrun --nproc_per_node=4 pretrain_multi_class.py --coco-root '/data/my coco' --amp" in hint
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert distributed.torchrun_hint("pretrain_multi_class.py", []) is None
