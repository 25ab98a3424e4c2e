"""losses.py: focal loss equivalence, ATSS assignment, and the DetectionLoss contract."""
import os

import pytest
import torch
from torchvision.ops import sigmoid_focal_loss

from losses import ATSSAssigner, DetectionLoss, paired_box_iou, quality_focal_loss
from model_lightweight import create_lightweight_model, grid_points


@pytest.mark.parametrize("alpha", [None, 0.25])
def test_binary_quality_focal_loss_equals_torchvision_focal_loss(alpha):
    torch.manual_seed(0)
    logits = torch.randn(64, 5) * 3
    targets = (torch.rand(64, 5) > 0.8).float()
    ours = quality_focal_loss(logits, targets, gamma=2.0, alpha=alpha)
    reference = sigmoid_focal_loss(logits, targets, alpha=-1 if alpha is None else alpha, gamma=2.0, reduction="none")
    assert torch.allclose(ours, reference, atol=1e-6)


def test_gamma_zero_is_binary_cross_entropy():
    logits, targets = torch.randn(10, 3), torch.rand(10, 3)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    assert torch.allclose(quality_focal_loss(logits, targets, gamma=0.0), expected, atol=1e-6)


def test_paired_box_iou_matches_diagonal_of_box_iou():
    from torchvision.ops import box_iou
    a = torch.tensor([[0, 0, 10, 10], [5, 5, 15, 25], [0, 0, 1, 1.]])
    b = torch.tensor([[5, 0, 15, 10], [5, 5, 15, 25], [2, 2, 3, 3.]])
    assert torch.allclose(paired_box_iou(a, b), box_iou(a, b).diagonal(), atol=1e-6)


def _points(img_size=64):
    sizes = [(img_size // s, img_size // s) for s in (8, 16, 32)]
    points, strides = grid_points(sizes, (8, 16, 32), "cpu")
    return points, strides, [h * w for h, w in sizes]


def test_atss_assigns_points_inside_the_box_and_only_real_boxes():
    points, strides, level_sizes = _points()
    gt = torch.tensor([[[8.0, 8.0, 40.0, 40.0], [0.0, 0.0, 0.0, 0.0]]])
    mask = torch.tensor([[True, False]])
    assigned, foreground = ATSSAssigner()(points, strides, level_sizes, gt, mask)
    assert foreground.any()
    assert (assigned[foreground] == 0).all()  # the padded box never wins
    inside = points[foreground[0]]
    assert ((inside >= 8) & (inside <= 40)).all()


def test_atss_gives_a_tiny_box_a_positive_and_splits_two_boxes():
    points, strides, level_sizes = _points()
    gt = torch.tensor([[[1.0, 1.0, 3.0, 3.0], [40.0, 40.0, 60.0, 60.0]]])  # first lies between grid points
    assigned, foreground = ATSSAssigner()(points, strides, level_sizes, gt, torch.tensor([[True, True]]))
    assert set(assigned[foreground].tolist()) == {0, 1}


def _targets():
    return [{"boxes_xyxy": torch.tensor([[8.0, 8.0, 40.0, 40.0], [30.0, 20.0, 60.0, 50.0]]),
             "labels": torch.tensor([0, 1])},
            {"boxes_xyxy": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]


def test_detection_loss_returns_named_terms_and_handles_empty_images():
    torch.manual_seed(0)
    model = create_lightweight_model(2, "nano", img_size=64)
    criterion = DetectionLoss(cls_weight=1.0, box_weight=2.0)
    losses = criterion(model(torch.rand(2, 3, 64, 64)), _targets())
    assert set(losses) == {"loss", "loss_cls", "loss_box"}
    assert torch.isclose(losses["loss"], losses["loss_cls"] + 2.0 * losses["loss_box"])
    losses["loss"].backward()
    assert model.head.box_pred.weight.grad.abs().sum() > 0

    empty = [_targets()[1], _targets()[1]]
    model.zero_grad()
    losses = criterion(model(torch.rand(2, 3, 64, 64)), empty)
    assert losses["loss_box"] == 0 and losses["loss_cls"] > 0  # all negatives still teach "no object"
    losses["loss"].backward()
    assert model.head.cls_pred.weight.grad.abs().sum() > 0


def test_box_weight_zero_removes_box_term():
    torch.manual_seed(0)
    model = create_lightweight_model(2, "nano", img_size=64)
    outputs = model(torch.rand(2, 3, 64, 64))
    losses = DetectionLoss(box_weight=0.0)(outputs, _targets())
    assert torch.isclose(losses["loss"], losses["loss_cls"])


def test_perfect_boxes_have_near_zero_box_loss():
    """Outputs that place every positive point's box exactly on its object give ~0 GIoU loss."""
    points, strides, level_sizes = _points()
    gt = torch.tensor([8.0, 8.0, 40.0, 40.0])
    ltrb = torch.cat([points - gt[:2], gt[2:] - points], dim=1).clamp(min=0)[None]  # (1, A, 4)
    outputs = {"cls_logits": torch.zeros(1, len(points), 1), "box_ltrb": ltrb, "points": points,
               "strides": strides, "level_sizes": level_sizes}
    targets = [{"boxes_xyxy": gt[None], "labels": torch.tensor([0])}]
    assert DetectionLoss()(outputs, targets)["loss_box"] < 1e-4


def test_a_small_box_nested_in_a_larger_one_keeps_a_positive():
    """Its centre points overlap the large box more, which would win them all on IoU; the small box keeps its
    best candidate, since the large box has others."""
    sizes = [(40, 40), (20, 20), (10, 10)]
    points, strides = grid_points(sizes, (8, 16, 32), "cpu")
    boxes = torch.tensor([[[100.0, 100, 164, 164], [130, 130, 134, 134]]])
    assigned, foreground = ATSSAssigner()(points, strides, [h * w for h, w in sizes], boxes,
                                          torch.ones(1, 2, dtype=torch.bool))
    per_box = [int((foreground & (assigned == m)).sum()) for m in range(2)]
    assert per_box[1] >= 1 and per_box[0] >= 1, per_box


def test_a_point_that_is_another_box_only_positive_is_not_taken():
    """Two identical tiny boxes compete for one best point: one keeps it, the other cannot take it away."""
    sizes = [(40, 40), (20, 20), (10, 10)]
    points, strides = grid_points(sizes, (8, 16, 32), "cpu")
    boxes = torch.tensor([[[130.0, 130, 134, 134], [130, 130, 134, 134]]])
    assigned, foreground = ATSSAssigner()(points, strides, [h * w for h, w in sizes], boxes,
                                          torch.ones(1, 2, dtype=torch.bool))
    per_box = sorted(int((foreground & (assigned == m)).sum()) for m in range(2))
    assert per_box == [0, 1]


def _ddp_probe():
    """A nano (BatchNorm in eval mode, so that a process's batch does not change another's statistics), 4 images
    whose boxes are spread unevenly (5 on the first two, 1 on the last two)."""
    torch.manual_seed(0)
    model = create_lightweight_model(1, "nano", img_size=64, imagenet_pretrained=False).eval()
    images = torch.rand(4, 3, 64, 64)
    boxes = [[[4, 4, 30, 30], [30, 30, 60, 60], [10, 40, 30, 62]], [[0, 0, 40, 20], [20, 20, 50, 50]],
             [[8, 8, 56, 56]], []]
    targets = [{"boxes_xyxy": torch.tensor(b, dtype=torch.float32).reshape(-1, 4),
                "labels": torch.zeros(len(b), dtype=torch.int64)} for b in boxes]
    return model, images, targets


def _ddp_worker(out_path):
    """Run under torchrun --nproc_per_node=2: each process takes half of the probe batch; rank 0 saves the
    gradients DDP averaged."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model, images, targets = _ddp_probe()
    wrapped = DistributedDataParallel(model)
    DetectionLoss()(wrapped(images[2 * rank:2 * rank + 2]), targets[2 * rank:2 * rank + 2])["loss"].backward()
    if rank == 0:
        torch.save({name: p.grad for name, p in model.named_parameters()}, out_path)
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_compute_the_gradient_of_one_process_on_the_global_batch(tmp_path):
    import subprocess
    import sys
    from test_distributed import free_port
    out = tmp_path / "ddp_grads.pt"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), __file__, str(out)]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": repo})
    assert result.returncode == 0, result.stderr[-2000:]
    ddp = torch.load(out, weights_only=True)
    model, images, targets = _ddp_probe()
    DetectionLoss()(model(images), targets)["loss"].backward()
    for name, param in model.named_parameters():
        assert torch.allclose(ddp[name], param.grad, rtol=1e-4, atol=1e-6), name


if __name__ == "__main__":
    import sys
    _ddp_worker(sys.argv[1])
