"""What the portable dropout masks (networks/dropout.py) cost in a training step, against torch's own
``nn.Dropout`` swapped into the same networks: the trainer's self-training step of curriculum stage 1
(or the pre-training step with the SDA), built as bench/profile_step.py builds it, timed in alternating
blocks so that both variants see the same machine load.

    python bench/bench_dropout.py --root_path ../shared/data/ACDC --image_size 128 --batch_size 8 --threads 1
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_train import make_run, synchronize, trainer_argv  # noqa: E402
from dataloaders.synthetic import make_synthetic_acdc  # noqa: E402
from networks.dropout import Dropout  # noqa: E402
from training.speed import cpu_description  # noqa: E402
from training.sscd_train import pretrain_step, stage_step  # noqa: E402
from utils.sscd import parse_hca_schedule  # noqa: E402


def build_parser():
    """The command-line flags (docs/flags.md is generated from this parser)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--root_path", default=None, help="an ACDC-layout root (default: synthetic, temporary)")
    p.add_argument("--image_size", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--step", choices=["pretrain_sda", "self_train"], default="self_train")
    p.add_argument("--amp", default="auto", help="the trainer's --amp")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--steps", type=int, default=2, help="timed steps per block")
    p.add_argument("--blocks", type=int, default=3, help="alternating blocks per variant")
    return p


def swap_dropout(models, portable):
    """Put our Dropout (``portable``) or torch's nn.Dropout in every dropout slot of ``models``."""
    for model in models:
        for module in model.modules():
            for name, child in module.named_children():
                if isinstance(child, nn.Dropout):  # ours is a subclass
                    setattr(module, name, Dropout(child.p) if portable else nn.Dropout(child.p))


def main(argv=None):
    a = build_parser().parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory(prefix="sscd_dropout_") as folder:
        root = a.root_path or make_synthetic_acdc(Path(folder) / "data", n_patients=40, n_val=2, n_test=1,
                                                  slices_per_volume=10, size=(216, 256))
        bench_args = argparse.Namespace(image_size=a.image_size, batch_size=a.batch_size, labelnum=7,
                                        device=a.device, amp=a.amp, channels_last="auto", lcc="auto",
                                        compile="off")
        run = make_run(trainer_argv(bench_args, "fast", root, Path(folder) / "run"))
        data = run.train_data()
        step, models, _ = pretrain_step(run, data)
        first = run.args.sda_start + 1
        if a.step == "self_train":
            weights = parse_hca_schedule(run.args.hca_weights)[0]
            step, models = stage_step(run, 1, weights, models["model"].state_dict(), "bench", data)[:2]
            first = 1
        nets = [m for m in models.values() if isinstance(m, nn.Module)]
        it, best = first, {"portable": float("inf"), "torch": float("inf")}
        step(it)  # warm-up
        it += 1
        for _ in range(a.blocks):
            for variant in ("torch", "portable"):
                swap_dropout(nets, variant == "portable")
                step(it)  # warm-up of the swapped modules
                it += 1
                synchronize(run.device)
                start = time.perf_counter()
                for _ in range(a.steps):
                    step(it)
                    it += 1
                synchronize(run.device)
                best[variant] = min(best[variant], (time.perf_counter() - start) / a.steps)
        amp = run.config["amp"]
        run.close()
    extra = best["portable"] - best["torch"]
    print(f"{a.step}, {a.image_size}^2, batch {a.batch_size}, --amp {amp}, threads {torch.get_num_threads()}: "
          f"torch dropout {best['torch']:.3f} s/step, portable {best['portable']:.3f} s/step "
          f"({extra:+.3f} s, {100 * extra / best['torch']:+.1f} %); CPU {cpu_description()}")
    return best


if __name__ == "__main__":
    main()
