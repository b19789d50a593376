"""SSCD training: pre-training with BCP copy-paste and the SDA, then the curriculum stages.

One function, ``self_train_stage``, runs every curriculum stage; the stages differ only by
their HCA weight vector, whether the centre-disc loss is on, and the checkpoint they start
from (the previous stage's best on val.list). The method pieces are the pure functions of
``utils.sscd`` and ``utils.losses``; this module wires them into training steps.
"""
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F

from utils.checkpoint import load_checkpoint, load_model_state, save_checkpoint
from utils.ema import ema_update
from utils.engine import train_loop
from utils.losses import dice_loss, mix_loss
from utils.sscd import (DEFAULT_HCA_SCHEDULE, HCA_COMBINES, RANK_BY, apply_sda, bcp_box_mask, center_disc_dice,
                        cgsr, hca_maps, mix, parse_hca_schedule, pseudo_labels, region_hardness, region_means,
                        sda_mask, split_iterations)


def add_sscd_args(p):
    """The SSCD flags (defaults: the paper/reference values; see README)."""
    g = p.add_argument_group("SSCD")
    g.add_argument("--pre_iterations", type=int, default=10000, help="pre-training iterations (0: skip)")
    g.add_argument("--stage_iterations", type=int, default=6000, help="iterations of each curriculum stage")
    g.add_argument("--sda_start", type=int, default=None,
                   help="iteration from which the SDA is on (default 60%% of --pre_iterations)")
    g.add_argument("--sda_alpha", type=float, default=0.2, help="SDA: fraction of highest-entropy pixels kept")
    g.add_argument("--u_weight", type=float, default=0.5, help="weight of the pseudo-labeled region in the mix loss")
    g.add_argument("--ds_weight", type=float, default=0.5,
                   help="deep-supervision weight of the three decoder heads (0: heads untrained, the reference)")
    g.add_argument("--hca_weights", default=DEFAULT_HCA_SCHEDULE,
                   help="HCA weights (1/2, 1/4, 1/8, full) of each stage, stages separated by ';'")
    g.add_argument("--hca_combine", choices=HCA_COMBINES, default="max_softmax",
                   help="max_softmax: the paper; logits: the reference code")
    g.add_argument("--rank_by", choices=RANK_BY, default="confidence",
                   help="region hardness: low confidence (paper) or neighbour contrast (reference)")
    g.add_argument("--patch_size", type=int, default=32, help="side of the Decouple/CGSR regions")
    g.add_argument("--top_num", type=int, default=4, help="easy candidate regions per image for the KL choice")
    g.add_argument("--cgsr_kl_prob", type=float, default=0.5, help="probability of the KL-guided CGSR branch")
    g.add_argument("--teacher", choices=["ema", "frozen"], default="ema",
                   help="pseudo-label teacher: EMA of student 1, or frozen at the stage's start (reference)")
    g.add_argument("--ema_decay", type=float, default=0.99)
    g.add_argument("--center_disc_stages", type=int, default=3,
                   help="use the centre-disc loss in the first N stages (0 disables)")
    g.add_argument("--start_stage", type=int, default=0, help="0: pre-training; k: begin at curriculum stage k")
    g.add_argument("--init_checkpoint", default=None,
                   help="weights the first run stage starts from (default: the previous stage's best.pth "
                        "in --save_dir); e.g. a pre-trained model with --start_stage 1")
    return p


def check_sscd_args(parser, args):
    """Reject inconsistent SSCD settings with a message naming the flag."""
    stages = parse_hca_schedule(args.hca_weights)
    unlabeled = args.batch_size - args.labeled_bs
    if args.labeled_bs != unlabeled or args.labeled_bs % 2:
        parser.error(f"--labeled_bs {args.labeled_bs} / --batch_size {args.batch_size}: SSCD mixes labeled and "
                     f"unlabeled halves, so --batch_size must be 2 x --labeled_bs with --labeled_bs even")
    if args.image_size % args.patch_size:
        parser.error(f"--patch_size {args.patch_size} must divide --image_size {args.image_size}")
    grid = (args.image_size // args.patch_size) ** 2
    if not 1 <= args.top_num <= grid:
        parser.error(f"--top_num {args.top_num}: expected 1..{grid} (regions per image)")
    if not 0 <= args.start_stage <= len(stages):
        parser.error(f"--start_stage {args.start_stage}: expected 0..{len(stages)}")
    if not 0 < args.sda_alpha <= 1:
        parser.error(f"--sda_alpha {args.sda_alpha}: expected a fraction in (0, 1]")
    if args.max_iterations is not None:
        args.stage_iterations = split_iterations(args.max_iterations, len(stages))
    else:
        args.stage_iterations = [args.stage_iterations] * len(stages)
    if args.sda_start is None:
        args.sda_start = int(0.6 * args.pre_iterations)
    return stages


def _split_labeled(batch, half):
    """Views of a labeled+unlabeled batch: weak/strong images and labels in halves a, b."""
    n = 2 * half
    out = {}
    for view in ("", "_strong"):
        img, lab = batch["image" + view], batch["label" + view]
        out["img" + view] = (img[:half], img[half:n])
        out["uimg" + view] = (img[n:n + half], img[n + half:])
        out["lab" + view] = (lab[:half], lab[half:n])
    return out


def _mix_terms(logits_list, targets, box, weights, num_classes):
    """Mean over outputs of (Dice + CE)/2 of the BCP mix loss, summed over the two mixes."""
    total = 0
    half = box.shape[0]
    for logits in logits_list:
        for j, (t_out, t_in, w_out, w_in) in enumerate(targets):
            d, c = mix_loss(logits[j * half:(j + 1) * half], t_out, t_in, box, w_out, w_in, num_classes)
            total = total + (d + c) / 2
    return total / len(logits_list)


def _forward(model, x, ds_weight):
    """Main logits and the list [1/2, 1/4, 1/8, main] the HCA reads (heads only when trained)."""
    logits, heads = model(x, heads=True)
    return logits, heads + [logits]


def _supervision_outputs(outputs, ds_weight):
    """The outputs a target supervises: the main logits, plus the heads when ds_weight > 0."""
    return outputs[-1:] if ds_weight <= 0 else outputs


def _weighted(outputs, loss_fn, ds_weight):
    """loss(main) + ds_weight * mean over heads of loss(head)."""
    main = loss_fn([outputs[-1]])
    if ds_weight <= 0:
        return main
    return main + ds_weight * loss_fn(outputs[:-1])


def pretrain(run, save_dir, iterations, data, volumes):
    """BCP copy-paste of labeled pairs, plus the SDA from ``--sda_start`` on; one U-Net."""
    a = run.args
    model = run.model()
    opt = run.optimizer(model)
    half = a.labeled_bs // 2
    stream = iter(data.stream(a.labeled_bs, 0, run.device, a.aug_device, a.num_workers, strong=False,
                              seed=a.seed))
    gen = torch.Generator(device=run.device).manual_seed(a.seed)
    size = a.image_size

    def step(it):
        batch = next(stream)
        img, lab = batch["image"], batch["label"]
        box = bcp_box_mask(half, size, size, generator=gen, device=run.device)
        x = mix(img[:half], img[half:], box)
        y = mix(lab[:half], lab[half:], box)
        logits, outputs = _forward(model, x, a.ds_weight)
        mix_l = _weighted(outputs, lambda outs: _mix_terms(
            outs, [(lab[:half], lab[half:], 1.0, 1.0)], box, None, a.num_classes), a.ds_weight)
        losses = {"mix": mix_l}
        loss = mix_l
        if it > a.sda_start:
            keep = sda_mask(logits.detach(), a.sda_alpha)
            x_sda, y_sda = apply_sda(x, y, keep)
            out_sda = model(x_sda)
            sda_l = (F.cross_entropy(out_sda, y_sda)
                     + dice_loss(torch.softmax(out_sda, 1), y_sda, a.num_classes, mask=keep)) / 2
            losses["sda"] = sda_l
            loss = loss + sda_l
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"loss": loss, **losses}

    return train_loop(save_dir=save_dir, iterations=iterations, step=step, models={"model": model},
                      optimizers={"model": opt}, validate=run.validator(model, volumes), config=run.config,
                      val_interval=a.val_interval, log_interval=a.log_interval, resume=a.resume,
                      logger=run.logger, name="pretrain")


def self_train_stage(run, stage, weights, init_path, save_dir, iterations, data, volumes):
    """One curriculum stage: two students (weak/strong view), a teacher, BCP mix, CPS, HCA,
    Decouple and CGSR; all three networks start from ``init_path``."""
    a = run.args
    init = load_checkpoint(init_path)
    models = {"model": run.model(), "model_2": run.model(), "teacher": run.model()}
    for m in models.values():
        load_model_state(m, init["model"], init_path)
    s1, s2, teacher = models["model"], models["model_2"], models["teacher"]
    teacher.requires_grad_(False)
    opts = {"model": run.optimizer(s1), "model_2": run.optimizer(s2)}
    half, c, size, patch = a.labeled_bs // 2, a.num_classes, a.image_size, a.patch_size
    use_disc = stage <= a.center_disc_stages
    stream = iter(data.stream(a.labeled_bs, a.labeled_bs, run.device, a.aug_device, a.num_workers, strong=True,
                              seed=a.seed + 1000 * stage))
    gen = torch.Generator(device=run.device).manual_seed(a.seed + 1000 * stage)
    vis = {}

    def step(it):
        b = _split_labeled(next(stream), half)
        teacher.eval()
        with torch.no_grad():
            u_all = torch.cat([*b["uimg"], *b["uimg_strong"]])
            plab = pseudo_labels(teacher(u_all), c).split(half)
        box = bcp_box_mask(half, size, size, generator=gen, device=run.device)
        x, targets, outs = {}, {}, {}
        for view, k, student in (("", 0, s1), ("_strong", 2, s2)):
            (img_a, img_b), (uimg_a, uimg_b) = b["img" + view], b["uimg" + view]
            lab_a, lab_b = b["lab" + view]
            pl_a, pl_b = plab[k], plab[k + 1]
            # unlabeled outside the box with the labeled slice inside, and the reverse
            x[view] = torch.cat([mix(uimg_a, img_a, box), mix(img_b, uimg_b, box)])
            targets[view] = [(pl_a, lab_a, a.u_weight, 1.0), (lab_b, pl_b, 1.0, a.u_weight)]
            outs[view] = _forward(student, x[view], a.ds_weight)
        losses = {}
        for view, name in (("", "1"), ("_strong", "2")):
            losses["mix" + name] = _weighted(
                outs[view][1], lambda o, v=view: _mix_terms(o, targets[v], box, None, c), a.ds_weight)
        p1, p2 = torch.softmax(outs[""][0], 1), torch.softmax(outs["_strong"][0], 1)
        y1, y2 = p1.detach().argmax(1), p2.detach().argmax(1)
        losses["cps1"], losses["cps2"] = dice_loss(p1, y2, c), dice_loss(p2, y1, c)
        # HCA confidence -> Decouple -> CGSR on the mixed images
        with torch.no_grad():
            conf_w, cls_w = hca_maps([o.detach() for o in outs[""][1]], weights, a.hca_combine)
            conf_s, cls_s = hca_maps([o.detach() for o in outs["_strong"][1]], weights, a.hca_combine)
            x_s2w, x_w2s, info = cgsr(
                x[""], x["_strong"], region_hardness(conf_w, patch, a.rank_by),
                region_hardness(conf_s, patch, a.rank_by), region_means(cls_w, patch),
                region_means(cls_s, patch), patch, a.top_num, a.cgsr_kl_prob, gen)
        x_swap = torch.cat([x_s2w, x_w2s])
        q1, q2 = torch.softmax(s1(x_swap), 1), torch.softmax(s2(x_swap), 1)
        z1, z2 = q1.detach().argmax(1), q2.detach().argmax(1)
        losses["cgsr1"], losses["cgsr2"] = dice_loss(q1, z2, c), dice_loss(q2, z1, c)
        if use_disc:
            losses["disc1"], losses["disc2"] = center_disc_dice(q1, z2, c), center_disc_dice(q2, z1, c)
        loss = sum(losses.values())
        for opt in opts.values():
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt in opts.values():
            opt.step()
        if a.teacher == "ema":
            ema_update(teacher, s1, a.ema_decay)
        vis.update(image=x[""][:1], pred=y1[:1], confidence=conf_w[:1], cgsr_weak=x_s2w[:1],
                   cgsr_strong=x_w2s[:1], pseudo=plab[0][:1])
        return {"loss": loss, **losses}

    def images(writer, it):
        if not vis:
            return
        tag = f"stage_{stage}"
        writer.add_image(f"{tag}/input", vis["image"][0], it)
        writer.add_image(f"{tag}/prediction", vis["pred"][:1].float() / max(c - 1, 1), it)
        writer.add_image(f"{tag}/hca_confidence", vis["confidence"][:1], it)
        writer.add_image(f"{tag}/cgsr_strong_to_weak", vis["cgsr_weak"][0], it)
        writer.add_image(f"{tag}/cgsr_weak_to_strong", vis["cgsr_strong"][0], it)
        writer.add_image(f"{tag}/pseudo_label", vis["pseudo"][:1].float() / max(c - 1, 1), it)

    run.logger.info(f"[stage {stage}] HCA weights {weights}, centre disc {'on' if use_disc else 'off'}, "
                    f"init {init_path}, {iterations} iterations")
    return train_loop(save_dir=save_dir, iterations=iterations, step=step, models=models, optimizers=opts,
                      validate=run.validator(s1, volumes), config={**run.config, "stage": stage,
                                                                   "hca_stage_weights": list(weights)},
                      val_interval=a.val_interval, log_interval=a.log_interval, resume=a.resume,
                      logger=run.logger, name=f"stage_{stage}", on_validate=images)


def train_sscd(run, stages):
    """Pre-training (unless skipped) then every curriculum stage from ``--start_stage``; copies the
    last stage's best checkpoint to ``save_dir/best.pth`` and returns its path."""
    a = run.args
    data, volumes = run.train_data(), run.val_volumes()
    save_dir = Path(run.save_dir)
    init = Path(a.init_checkpoint) if a.init_checkpoint else None
    if a.start_stage == 0:
        if a.pre_iterations < 1:
            raise SystemExit("--pre_iterations 0 needs --start_stage 1 and --init_checkpoint")
        pretrain(run, save_dir / "pretrain", a.pre_iterations, data, volumes)
        init = save_dir / "pretrain" / "best.pth"
    for k in range(max(a.start_stage, 1), len(stages) + 1):
        if init is None:
            init = save_dir / ("pretrain" if k == 1 else f"stage_{k - 1}") / "best.pth"
        stage_dir = save_dir / f"stage_{k}"
        self_train_stage(run, k, stages[k - 1], init, stage_dir, a.stage_iterations[k - 1], data, volumes)
        init = stage_dir / "best.pth"
    final = save_dir / "best.pth"
    save_checkpoint({k: v for k, v in load_checkpoint(init).items() if k != "format"}, final)
    return final
