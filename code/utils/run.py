"""Run set-up shared by the trainers: dataset root (or the synthetic default), output folder,
logger, seeds, the saved config, and the supervised (labeled-only) training step."""
import json
from pathlib import Path

import torch

from dataloaders.dataset import ACDC_LABELED_SLICES, TrainData, check_root, load_volumes
from dataloaders.synthetic import make_synthetic_acdc
from networks.unet import build_model
from utils.config import resolve_save_dir, save_config
from utils.engine import close_logger, get_logger, seed_everything, train_loop
from utils.evaluation import validation_dice
from utils.losses import ce_dice_loss

SYNTHETIC_ROOT = Path("data") / "synthetic_ACDC"
SYNTHETIC_PATIENTS = 20
# labeled-slice tables per dataset; None = count the slices of the first --labelnum cases
LABEL_TABLES = {"ACDC": ACDC_LABELED_SLICES, "PROMISE12": None}
# datasets whose raw files must be converted first: the command, shown when --root_path is not converted
PREPROCESS_COMMANDS = {"PROMISE12": "python code/dataloaders/preprocess_promise12.py --raw {root} --out <folder> "
                                    "--image_size {size}"}


class Run:
    """Everything a trainer needs besides its own modules: args, root, save_dir, device, logger, config."""

    def __init__(self, args, dataset):
        if dataset not in LABEL_TABLES:
            raise ValueError(f"unknown dataset {dataset!r}")
        self.args, self.dataset = args, dataset
        self.save_dir = resolve_save_dir(args)
        self.save_dir.mkdir(parents=True, exist_ok=True)
        self.logger = get_logger(self.save_dir, args.exp)
        self.synthetic = args.root_path is None
        if self.synthetic:
            if dataset != "ACDC":
                raise SystemExit(f"--root_path is required for {dataset} (see README: preprocessing)")
            args.root_path = str(make_synthetic_acdc(SYNTHETIC_ROOT, n_patients=SYNTHETIC_PATIENTS))
            self.logger.info(f"no --root_path given: using the synthetic ACDC-layout data in {args.root_path} "
                             f"({SYNTHETIC_PATIENTS} patients; --labelnum counts patients, not the ACDC table)")
        self.root = check_root(args.root_path).resolve()
        args.root_path = str(self.root)
        self._check_preprocessed()
        self.device = torch.device(args.device)
        seed_everything(args.seed, args.deterministic)
        self.config = save_config(args, self.save_dir)
        self.logger.info(f"save_dir: {self.save_dir}")

    def _check_preprocessed(self):
        """Refuse a raw (unconverted) folder with the conversion command; warn when the slices were
        preprocessed at another size than --image_size (they would be resized again, nearest neighbour)."""
        command = PREPROCESS_COMMANDS.get(self.dataset)
        if command and not (self.root / "train_slices.list").is_file():
            self.close()
            raise SystemExit(f"--root_path {self.root}: no train_slices.list; convert the {self.dataset} files "
                             f"first: " + command.format(root=self.root, size=self.args.image_size))
        info = self.root / "dataset.json"
        if info.is_file():
            size = json.loads(info.read_text()).get("image_size")
            if size is not None and int(size) != self.args.image_size:
                self.logger.warning(f"{info}: slices were preprocessed at {size}x{size}, --image_size is "
                                    f"{self.args.image_size}: they are resized again (nearest neighbour)")

    def train_data(self):
        a = self.args
        table = None if self.synthetic else LABEL_TABLES[self.dataset]
        return TrainData(self.root, a.labelnum, a.image_size, a.num_classes, table)

    def val_volumes(self):
        return load_volumes(self.root, "val", self.args.num_classes)

    def model(self):
        return build_model(self.args.num_classes).to(self.device)

    def optimizer(self, model):
        return torch.optim.SGD(model.parameters(), lr=self.args.base_lr, momentum=0.9, weight_decay=1e-4)

    def validator(self, model, volumes):
        a = self.args
        return lambda: validation_dice(model, volumes, a.num_classes, a.image_size, self.device)

    def close(self):
        close_logger(self.logger)


def train_supervised(run, iterations=None):
    """Labeled-only baseline: CE + Dice on ``--labeled_bs`` labeled slices per iteration (weak aug),
    for ``iterations`` (default ``--max_iterations``)."""
    a = run.args
    iterations = iterations or a.max_iterations
    data, volumes = run.train_data(), run.val_volumes()
    model = run.model()
    opt = run.optimizer(model)
    stream = iter(data.stream(a.labeled_bs, 0, run.device, a.aug_device, a.num_workers, strong=False, seed=a.seed))

    def step(it):
        batch = next(stream)
        loss = ce_dice_loss(model(batch["image"]), batch["label"], a.num_classes)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"loss": loss}

    state = train_loop(save_dir=run.save_dir, iterations=iterations, step=step, models={"model": model},
                       optimizers={"model": opt}, validate=run.validator(model, volumes), config=run.config,
                       val_interval=a.val_interval, log_interval=a.log_interval, resume=a.resume,
                       logger=run.logger, name="supervised")
    run.logger.info(f"best val Dice {state['best_dice']:.4f} at iteration {state['best_iteration']}; "
                    f"checkpoints in {run.save_dir} (best.pth, last.pth)")
    return state
