"""Volume inference and evaluation shared by validation during training and the test scripts.

Protocol (as the published ACDC tables): every slice is resized to the network size with
nearest-neighbour interpolation, the argmax is resized back the same way and the slices are
stacked into a volume; metrics are computed in 3-D per foreground class. All slices of a
volume go through the network in batched forwards. Validation during training (``Validator``)
keeps its volumes on the device and counts the Dice there: one host read per validation.
"""
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch

from dataloaders.dataset import resize_nearest, volume_spacing
from evaluation.metrics import case_metrics


@torch.no_grad()
def predict_volume(model, image, image_size, device, batch_size=64):
    """Label volume (D,H,W) uint8 predicted slice-wise for ``image`` (D,H,W) float. Slices go to
    ``device`` ``batch_size`` at a time (device memory: one batch, not the volume)."""
    model.eval()
    device = torch.device(device)
    vol = torch.as_tensor(image, dtype=torch.float32)
    size = vol.shape[-2:]
    preds = []
    for start in range(0, vol.shape[0], batch_size):
        slices = resize_nearest(vol[start:start + batch_size].to(device), (image_size, image_size))[:, None]
        logits = model(slices)
        preds.append(resize_nearest(logits.argmax(dim=1).to(torch.uint8), size).cpu())
    return torch.cat(preds).numpy()


def present_classes(volumes, num_classes):
    """The foreground classes (1..C-1) that occur in the ground truth of at least one of ``volumes``."""
    present = np.zeros(num_classes, dtype=bool)
    for v in volumes:
        present[np.unique(v["label"])] = True
    return [k for k in range(1, num_classes) if present[k]]


def scored_classes(volumes, num_classes):
    """The classes the selection Dice averages: ``present_classes``. A class absent from every
    volume would score 1 for a model that never predicts it and so raise the mean; ValueError if
    no class is present."""
    scored = present_classes(volumes, num_classes)
    if not scored:
        cases = ", ".join(v["case"] for v in volumes[:3])
        raise ValueError(f"validation volumes ({cases}, ...): no foreground class 1..{num_classes - 1} occurs in "
                         f"any of them; nothing to select a model on")
    return scored


class Validator:
    """Validation Dice for model selection: the mean over volumes of the per-class Dice (classes
    1..C-1, the rule of ``evaluation.metrics.dice_per_class``) and its mean over the classes that occur
    in some validation volume (``scored_classes``; a warning through ``logger`` names the others).

    The volumes are uploaded once, on the first call: every slice resized to the network size in
    one (S, 1, size, size) tensor, the labels at their own size. A call runs all slices of all
    volumes through ``forward`` in batches of ``batch_size``, resizes each volume's argmax back,
    and counts each volume's confusion matrix with a scatter on the device.
    """

    def __init__(self, volumes, num_classes, image_size, device, batch_size=128, logger=None):
        self.volumes, self.num_classes, self.image_size = volumes, num_classes, image_size
        self.device, self.batch_size = torch.device(device), batch_size
        self.slices = None
        self.scored = scored_classes(volumes, num_classes)
        missing = [k for k in range(1, num_classes) if k not in self.scored]
        if missing and logger is not None:
            logger.warning(f"validation: class(es) {missing} occur in no validation volume; they would score "
                           f"Dice 1 whenever the model never predicts them, so the selection Dice is the mean "
                           f"over classes {self.scored} only")

    def _upload(self):
        size = (self.image_size, self.image_size)
        self.slices = torch.cat([resize_nearest(torch.as_tensor(v["image"], dtype=torch.float32), size)
                                 for v in self.volumes])[:, None].to(self.device)
        self.labels = [torch.as_tensor(v["label"]).to(self.device, torch.long) for v in self.volumes]

    @torch.no_grad()
    def __call__(self, forward):
        """``(score, {"dice_class<c>": dice})`` of ``forward`` (a model in eval mode, or any callable
        from a (B, 1, S, S) batch to logits)."""
        if self.slices is None:
            self._upload()
        c = self.num_classes
        preds = torch.cat([forward(self.slices[i:i + self.batch_size]).argmax(dim=1)
                           for i in range(0, self.slices.shape[0], self.batch_size)])
        dice, start = [], 0
        for label in self.labels:
            pred = resize_nearest(preds[start:start + label.shape[0]], label.shape[-2:])
            start += label.shape[0]
            index = (pred * c + label).flatten()
            confusion = torch.zeros(c * c, dtype=torch.long, device=self.device).scatter_add_(
                0, index, torch.ones_like(index)).view(c, c).double()
            inter, total = confusion.diagonal()[1:], (confusion.sum(0) + confusion.sum(1))[1:]
            dice.append(torch.where(total > 0, 2 * inter / total.clamp(min=1), torch.ones_like(total)))
        per_class = torch.stack(dice).mean(dim=0).tolist()
        score = float(np.mean([per_class[k - 1] for k in self.scored]))
        return score, {f"dice_class{k + 1}": d for k, d in enumerate(per_class)}


def _case_metrics(args):
    pred, label, num_classes, spacing = args
    voxels = case_metrics(pred, label, num_classes)
    mm = case_metrics(pred, label, num_classes, spacing) if spacing is not None else None
    return voxels, mm


def evaluate_predictions(preds, volumes, num_classes, workers=0):
    """Per-case metrics in voxels and, where the volume has a spacing, in mm.

    Returns a list of ``(voxel_metrics, mm_metrics_or_None)`` per case, each a per-class list
    of dicts from ``evaluation.metrics.case_metrics``. ``workers`` > 0 computes cases in parallel
    processes (medpy's distance transforms dominate the cost).
    """
    jobs = [(p, v["label"], num_classes, volume_spacing(v["attrs"])) for p, v in zip(preds, volumes)]
    if workers > 0 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(_case_metrics, jobs))
    return [_case_metrics(job) for job in jobs]
