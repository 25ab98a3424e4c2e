"""Multi-process training on PyTorch's own engine: torchrun starts one process per GPU (or CPU slot) and
sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR in the environment, torch.distributed holds the process group,
DistributedDataParallel averages the gradients and DistributedSampler shards the data
(torchvision's detection reference `utils.init_distributed_mode`).

    torchrun --nproc_per_node=4 pretrain_multi_class.py --coco-root /path/to/coco
    torchrun --nnodes=2 --node_rank=0 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 --nproc_per_node=4 ...

Nothing here holds state of its own: rank and world size are asked of torch.distributed each time, so a
single process (no torchrun) takes every code path with world size 1.
"""
import os
import shlex

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data.distributed import DistributedSampler


def is_distributed():
    return dist.is_available() and dist.is_initialized()


def get_rank():
    return dist.get_rank() if is_distributed() else 0


def get_world_size():
    return dist.get_world_size() if is_distributed() else 1


def is_main_process():
    """Rank 0 writes checkpoints, logs, TensorBoard and progress bars; the others only train."""
    return get_rank() == 0


def launched_by_torchrun():
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device=None):
    """Join the process group torchrun describes in the environment and return this process's device.

    Under torchrun: `nccl` on CUDA with one GPU per local rank (cuda:LOCAL_RANK, whatever `device` says
    about the index), `gloo` on the CPU (`device="cpu"` or no GPU). Without torchrun: a single process on
    `device` (default cuda when available) and no process group.
    """
    if not launched_by_torchrun():
        return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    use_cuda = torch.cuda.is_available() and not str(device or "").startswith("cpu")
    if use_cuda:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if is_distributed():  # a second main() in the same processes (a notebook, a driver) reuses the group
        return device
    if use_cuda:
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    return device


def cleanup():
    if is_distributed():
        dist.destroy_process_group()


def torchrun_hint(script, argv):
    """The exact torchrun command, when plain `python` sees several GPUs and no --device picks one; else None.

    We print the command rather than spawn the processes ourselves: torchrun (elastic restarts, multi-node
    rendezvous, clean teardown) is the launcher PyTorch maintains, and a hidden self-launch would hide it.
    """
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if launched_by_torchrun() or count < 2:
        return None
    return (f"{count} GPUs are visible; to train on all of them run\n"
            f"  torchrun --nproc_per_node={count} {script} {shlex.join(argv)}\n"
            f"or pass --device cuda:0 to train on one")


def rank_seed(seed):
    """A seed per (seed, rank): every rank draws different augmentations; world size 1 keeps `seed`."""
    return seed * get_world_size() + get_rank()


def train_sampler(dataset, seed, num_replicas=None, rank=None):
    """A DistributedSampler giving each rank a different 1/world_size of the shuffled data (None when
    single-process: the DataLoader shuffles). Every rank gets the same count, padded by repetition."""
    if num_replicas is None and not is_distributed():
        return None
    return DistributedSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)


def convert_sync_batchnorm(model):
    """BatchNorm statistics over the global batch (small per-GPU batches); a no-op when single-process."""
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model) if is_distributed() else model


def broadcast_model(model):
    """Copy rank 0's weights and buffers to every rank (each rank initialised its own random weights)."""
    if is_distributed():
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, src=0)


def wrap_model(model, device):
    """DistributedDataParallel over the parameters that require grad now; `model` itself when single-process.

    DDP registers its gradient hooks for the trainable parameters when it is built, so after (un)freezing
    build a new wrapper (drop the old one first) instead of using find_unused_parameters.
    """
    if not is_distributed():
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap_model(model):
    return model.module if isinstance(model, DistributedDataParallel) else model


def reduce_mean(values):
    """Average a dict of scalar tensors over the ranks (for logging and the non-finite check, which then
    stops every rank together)."""
    if not is_distributed():
        return values
    keys = sorted(values)
    stacked = torch.stack([values[k].detach().float() for k in keys])
    dist.all_reduce(stacked)
    return dict(zip(keys, stacked / get_world_size()))


def broadcast_object(value):
    """Rank 0's `value` on every rank (a picklable object); `value` itself when single-process."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def describe_shards(image_ids):
    """'4 + 4 images on 2 ranks, 8 distinct': what each rank trained on this epoch (an all_gather)."""
    gathered = [None] * get_world_size()
    if is_distributed():
        dist.all_gather_object(gathered, list(image_ids))
    else:
        gathered = [list(image_ids)]
    distinct = len(set().union(*map(set, gathered)))
    return f"{' + '.join(str(len(ids)) for ids in gathered)} images on {len(gathered)} ranks, {distinct} distinct"


def check_in_sync(model):
    """Raise if this rank's trainable weights differ from rank 0's (e.g. a DDP wrapper that missed
    parameters unfrozen after it was built, whose gradients were then never averaged)."""
    if not is_distributed():
        return
    named = [(name, param.detach().reshape(-1)) for name, param in unwrap_model(model).named_parameters()]
    local = torch.cat([flat for _, flat in named])
    reference = local.clone()
    dist.broadcast(reference, src=0)
    if not torch.equal(reference, local):
        start = 0
        for name, flat in named:
            if not torch.equal(reference[start:start + len(flat)], flat):
                raise RuntimeError(f"rank {get_rank()} has drifted from rank 0 at {name}")
            start += len(flat)
