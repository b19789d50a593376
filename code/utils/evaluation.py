"""Volume inference and evaluation shared by validation during training and the test scripts.

Protocol (as the published ACDC tables): every slice is resized to the network size with
nearest-neighbour interpolation, the argmax is resized back the same way and the slices are
stacked into a volume; metrics are computed in 3-D per foreground class. All slices of a
volume go through the network in batched forwards.
"""
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch

from dataloaders.dataset import resize_nearest, volume_spacing
from utils.metrics import case_metrics, dice_per_class


@torch.no_grad()
def predict_volume(model, image, image_size, device, batch_size=64):
    """Label volume (D,H,W) uint8 predicted slice-wise for ``image`` (D,H,W) float."""
    model.eval()
    device = torch.device(device)
    vol = torch.as_tensor(image, dtype=torch.float32, device=device)
    size = vol.shape[-2:]
    slices = resize_nearest(vol, (image_size, image_size))[:, None]
    preds = []
    for start in range(0, slices.shape[0], batch_size):
        logits = model(slices[start:start + batch_size])
        preds.append(logits.argmax(dim=1).to(torch.uint8))
    pred = resize_nearest(torch.cat(preds), size)
    return pred.cpu().numpy()


def validation_dice(model, volumes, num_classes, image_size, device):
    """Mean over volumes of the per-class Dice (classes 1..C-1) and its class mean, for model selection."""
    per_case = np.stack([
        dice_per_class(predict_volume(model, v["image"], image_size, device), v["label"], num_classes)
        for v in volumes])
    per_class = per_case.mean(axis=0)
    return float(per_class.mean()), {f"dice_class{c + 1}": float(d) for c, d in enumerate(per_class)}


def _case_metrics(args):
    pred, label, num_classes, spacing = args
    voxels = case_metrics(pred, label, num_classes)
    mm = case_metrics(pred, label, num_classes, spacing) if spacing is not None else None
    return voxels, mm


def evaluate_predictions(preds, volumes, num_classes, workers=0):
    """Per-case metrics in voxels and, where the volume has a spacing, in mm.

    Returns a list of ``(voxel_metrics, mm_metrics_or_None)`` per case, each a per-class list
    of dicts from ``utils.metrics.case_metrics``. ``workers`` > 0 computes cases in parallel
    processes (medpy's distance transforms dominate the cost).
    """
    jobs = [(p, v["label"], num_classes, volume_spacing(v["attrs"])) for p, v in zip(preds, volumes)]
    if workers > 0 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(_case_metrics, jobs))
    return [_case_metrics(job) for job in jobs]
