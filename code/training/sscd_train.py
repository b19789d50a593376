"""SSCD training: pre-training with BCP copy-paste and the SDA, then the curriculum stages.

One function, ``self_train_stage``, runs every curriculum stage; the stages differ only by
their HCA weight vector, whether the centre-disc loss is on, and the checkpoint they start
from (``--stage_init``: the previous phase's last weights, or its best on val.list). The method
pieces are the pure functions of ``utils.sscd`` and ``utils.losses``; this module wires them into
training steps.
"""
import math
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from common.checkpoint import load_checkpoint, load_model_state, save_checkpoint
from training.config import launcher_world_size, per_rank_batch, resolve_save_dir
from training.engine import GeneratorState, ScalerState, train_loop
from training.run import RUN_RECORDS, SUPERVISED_OUTPUTS, train_supervised
from utils.ema import ema_update
from utils.losses import MIX_DICE, dice_loss, mix_loss
from utils.sscd import (DEFAULT_HCA_SCHEDULE, HCA_COMBINES, RANK_BY, apply_sda, bcp_box_mask, center_disc_dice,
                        cgsr, class_argmax, cross_weight, hca_maps, mix, parse_hca_schedule, pseudo_labels,
                        region_hardness, region_means, sda_mask, split_iterations)


# What each --method sets (only flag defaults: anything given explicitly wins). BCP and ABD
# follow DeepMed-Lab-ECNU/BCP and chy-upc/ABD (BCP variant): one curriculum stage on the main
# output, no SDA, no deep supervision, no centre disc, 30k self-training iterations.
PRESETS = {
    "sscd": {},
    "labeled_only": {},
    "bcp": {"sda": "off", "students": 1, "displacement": "none", "hca_weights": "0,0,0,1", "ds_weight": 0.0,
            "center_disc_stages": 0, "stage_iterations": 30000, "teacher": "ema", "cross_rampup": 0.0,
            "stage_init": "best"},
    "abd": {"sda": "off", "students": 2, "displacement": "abd", "hca_weights": "0,0,0,1", "ds_weight": 0.0,
            "center_disc_stages": 0, "stage_iterations": 30000, "teacher": "ema", "rank_by": "confidence",
            "cross_rampup": 0.0, "stage_init": "best"},
}
# --patch_size when not given: --image_size / this (SSCD: 32 at 256², an 8x8 grid; ABD: 64-pixel squares)
PATCH_DIVISORS = {"abd": 4}
DEFAULT_PATCH_DIVISOR = 8
# (flag, lowest, highest) of the SSCD weights and probabilities
BOUNDED_FLAGS = (("u_weight", 0.0, float("inf")), ("ds_weight", 0.0, float("inf")), ("ema_decay", 0.0, 1.0),
                 ("cgsr_kl_prob", 0.0, 1.0), ("center_disc_stages", 0, float("inf")),
                 ("cross_rampup", 0.0, 1.0), ("cross_weight", 0.0, float("inf")))
# --cross_rampup when not given: this fraction of each stage with two students, none with one (docs/results.md,
# 2.4: the stage-1 ablation on real ACDC; a departure from the published method, which has no ramp-up)
DEFAULT_CROSS_RAMPUP = 0.5
# --displacement -> (cgsr direction, paste shape)
DISPLACEMENTS = {"cgsr": ("hard_into_easy", "disc"), "abd": ("easy_into_hard", "square")}


def add_sscd_args(p):
    """The SSCD flags (defaults: the paper/reference values; docs/method.md; every flag: docs/flags.md)."""
    p.add_argument("--method", choices=sorted(PRESETS), default="sscd",
                   help="preset: sscd (the full method), bcp, abd, or labeled_only (the baseline row)")
    g = p.add_argument_group("SSCD")
    g.add_argument("--sda", choices=["on", "off"], default="on", help="Spatial Decoupling Amplifier in pre-training")
    g.add_argument("--students", type=int, choices=[1, 2], default=2,
                   help="2: weak- and strong-view students (SSCD, ABD); 1: one weak-view student (BCP)")
    g.add_argument("--displacement", choices=["cgsr", "abd", "none"], default="cgsr",
                   help="cgsr: hardest region of the other view pasted as a disc into an easy region (SSCD); "
                        "abd: doubtful region replaced by a confident square of the other view (ABD); none")
    g.add_argument("--pre_iterations", type=int, default=10000, help="pre-training iterations (0: skip)")
    g.add_argument("--stage_iterations", type=int, default=6000, help="iterations of each curriculum stage")
    g.add_argument("--sda_start", type=int, default=None,
                   help="iteration from which the SDA is on (default 60%% of --pre_iterations)")
    g.add_argument("--sda_alpha", type=float, default=0.2, help="SDA: fraction of highest-entropy pixels kept")
    g.add_argument("--u_weight", type=float, default=0.5, help="weight of the pseudo-labeled region in the mix loss")
    g.add_argument("--mix_dice", choices=MIX_DICE, default="joint",
                   help="mix-loss Dice: joint (one Dice per class over the mixed target, region-weighted pixels) "
                        "or region (a separate Dice inside and outside the box)")
    g.add_argument("--ds_weight", type=float, default=0.5,
                   help="deep-supervision weight of the three decoder heads (0: heads untrained, the reference)")
    g.add_argument("--hca_weights", default=DEFAULT_HCA_SCHEDULE,
                   help="HCA weights (1/2, 1/4, 1/8, full) of each stage, stages separated by ';'")
    g.add_argument("--hca_combine", choices=HCA_COMBINES, default="max_softmax",
                   help="max_softmax: the paper; logits: the reference code")
    g.add_argument("--rank_by", choices=RANK_BY, default="confidence",
                   help="region hardness: low confidence (paper) or neighbour contrast (reference)")
    g.add_argument("--patch_size", type=int, default=None,
                   help="side of the Decouple/CGSR regions (default: --image_size / 8, i.e. 32 at 256²; "
                        "--method abd: --image_size / 4)")
    g.add_argument("--top_num", type=int, default=4, help="easy candidate regions per image for the KL choice")
    g.add_argument("--cgsr_kl_prob", type=float, default=0.5, help="probability of the KL-guided CGSR branch")
    g.add_argument("--teacher", choices=["ema", "frozen"], default="ema",
                   help="pseudo-label teacher: EMA of student 1, or frozen at the stage's start (reference)")
    g.add_argument("--ema_decay", type=float, default=0.99)
    g.add_argument("--cross_cutout", choices=["include", "exclude"], default="include",
                   help="exclude: pixels of cutout noise in the strong view give no cross-supervision target "
                        "(student 2's CPS target for student 1, CGSR and centre-disc targets); include: the reference")
    g.add_argument("--cross_bn", choices=["update", "frozen"], default="update",
                   help="frozen: the CGSR forwards (half strong-view content) leave the students' BatchNorm running "
                        "statistics unchanged, as the SDA's; update: the reference")
    g.add_argument("--teacher_mode", choices=["eval", "train"], default="eval",
                   help="mode of the teacher's pseudo-label forward: eval (running statistics, no dropout) or train "
                        "(batch statistics and dropout, the reference; its running statistics stay untouched)")
    g.add_argument("--cross_rampup", type=float, default=None,
                   help="sigmoid ramp-up of the cross terms (CPS, CGSR, centre disc) over this fraction of each "
                        f"stage's iterations (0: full weight from the first iteration, the reference; default "
                        f"{DEFAULT_CROSS_RAMPUP} with two students, a departure; bcp/abd presets: 0)")
    g.add_argument("--cross_source", choices=["student", "teacher"], default="student",
                   help="where student 1's cross targets (CPS, CGSR, centre disc) come from: student 2's argmax (the "
                        "reference) or the EMA teacher's argmax on student 1's own inputs (a departure; student 2 "
                        "still learns from student 1)")
    g.add_argument("--cross_weight", type=float, default=1.0,
                   help="weight of the cross terms (CPS, CGSR, centre disc), times the ramp-up (1: the reference)")
    g.add_argument("--stage_lr", type=float, default=None,
                   help="SGD learning rate of the curriculum stages (default --base_lr, the reference); with "
                        "--method labeled_only from iteration --pre_iterations + 1 on, the same schedule per iteration")
    g.add_argument("--center_disc_stages", type=int, default=3,
                   help="use the centre-disc loss in the first N stages (0 disables)")
    g.add_argument("--validate_stage_start", choices=["on", "off"], default="on",
                   help="validate each stage's starting weights (iteration 0) too, so a stage's best.pth can be "
                        "its start when no step improves on it (off: the reference, only every --val_interval)")
    g.add_argument("--final", choices=["best_stage", "last_stage"], default="best_stage",
                   help="final model: the best-on-val checkpoint over all stages, or the last stage's best "
                        "(the reference); equal scores with --validate_stage_start on")
    g.add_argument("--stage_init", choices=["best", "last"], default="last",
                   help="what each curriculum stage starts from: the previous phase's last weights (training "
                        "continues; a departure, chosen by the ACDC table in docs/results.md) or its best-on-val "
                        "checkpoint (the reference); --final best_stage considers the pre-training's best too")
    g.add_argument("--start_stage", type=int, default=0, help="0: pre-training; k: begin at curriculum stage k")
    g.add_argument("--init_checkpoint", default=None,
                   help="weights the first run stage starts from (default: the previous stage's "
                        "--stage_init checkpoint in --save_dir); e.g. a pre-trained model with --start_stage 1")
    return p


def check_sscd_args(parser, args):
    """Reject inconsistent SSCD settings with a message naming the flag."""
    try:
        stages = parse_hca_schedule(args.hca_weights)
        if args.max_iterations is not None:
            split_iterations(args.max_iterations, len(stages))
    except ValueError as err:
        parser.error(f"--hca_weights / --max_iterations: {err}")
    if args.cross_rampup is None:
        args.cross_rampup = DEFAULT_CROSS_RAMPUP if args.students == 2 else 0.0
    for flag, low, high in BOUNDED_FLAGS:
        value = getattr(args, flag)
        if not low <= value <= high:
            parser.error(f"--{flag} {value}: expected " + (f">= {low}" if high == float("inf") else f"{low}..{high}"))
    if args.patch_size is None:  # the preset's region size follows the image size
        args.patch_size = args.image_size // PATCH_DIVISORS.get(args.method, DEFAULT_PATCH_DIVISOR)
    if args.patch_size < 1:
        parser.error(f"--patch_size {args.patch_size}: expected a positive region side")
    if args.stage_lr is None:
        args.stage_lr = args.base_lr
    if not (math.isfinite(args.stage_lr) and args.stage_lr > 0):
        parser.error(f"--stage_lr {args.stage_lr}: expected a positive finite learning rate")
    if args.stage_iterations < 1:
        parser.error(f"--stage_iterations {args.stage_iterations}: every curriculum stage needs at least 1 iteration")
    if args.pre_iterations < 0:
        parser.error(f"--pre_iterations {args.pre_iterations}: expected 0 or more")
    if args.method != "labeled_only" and args.start_stage == 0 and args.pre_iterations == 0:
        parser.error("--pre_iterations 0 skips pre-training: give --start_stage 1 (and --init_checkpoint)")
    if args.sda_start is not None and not 0 <= args.sda_start <= args.pre_iterations:
        parser.error(f"--sda_start {args.sda_start}: expected 0..--pre_iterations ({args.pre_iterations})")
    if args.init_checkpoint is not None and not Path(args.init_checkpoint).is_file():
        parser.error(f"--init_checkpoint {args.init_checkpoint}: file not found")
    unlabeled = args.batch_size - args.labeled_bs
    crossed = {"--cross_cutout exclude": args.cross_cutout == "exclude", "--cross_rampup": args.cross_rampup > 0,
               "--cross_weight": args.cross_weight != 1.0, "--cross_source teacher": args.cross_source == "teacher"}
    for flag in [f for f, on in crossed.items() if on and args.students == 1]:
        parser.error(f"{flag} acts on the cross terms between two students: it needs --students 2")
    if args.cross_bn == "frozen" and args.displacement == "none":
        parser.error("--cross_bn frozen acts on the CGSR forwards: it needs --displacement cgsr or abd")
    if args.students == 1 and args.displacement != "none":
        parser.error(f"--displacement {args.displacement} needs --students 2 (it swaps regions between the views)")
    if args.method == "labeled_only":
        pass
    elif args.labeled_bs != unlabeled or args.labeled_bs % 2:
        parser.error(f"--labeled_bs {args.labeled_bs} / --batch_size {args.batch_size}: SSCD mixes labeled and "
                     f"unlabeled halves, so --batch_size must be 2 x --labeled_bs with --labeled_bs even")
    world = launcher_world_size()
    rank_labeled = per_rank_batch(args.batch_size, args.labeled_bs, world, args.batch_scope)[1]
    if args.method != "labeled_only" and rank_labeled % 2:
        parser.error(f"--labeled_bs {args.labeled_bs}: each of the {world} ranks draws {rank_labeled} labeled slices "
                     f"(--batch_scope global) and SSCD mixes them in pairs: give a --labeled_bs divisible by "
                     f"{2 * world}, or --batch_scope rank")
    if args.image_size % args.patch_size:
        parser.error(f"--patch_size {args.patch_size} must divide --image_size {args.image_size}")
    grid = (args.image_size // args.patch_size) ** 2
    if not 1 <= args.top_num <= grid:
        parser.error(f"--top_num {args.top_num}: expected 1..{grid} (regions per image)")
    if not 0 <= args.start_stage <= len(stages):
        parser.error(f"--start_stage {args.start_stage}: expected 0..{len(stages)}")
    if not 0 < args.sda_alpha <= 1:
        parser.error(f"--sda_alpha {args.sda_alpha}: expected a fraction in (0, 1]")
    if args.method != "labeled_only" and args.start_stage >= 1 and args.init_checkpoint is None:
        previous = resolve_save_dir(args) / stage_folder(args.start_stage - 1) / f"{args.stage_init}.pth"
        if not previous.is_file():
            parser.error(f"--start_stage {args.start_stage} starts from {previous}, which does not exist: "
                         f"give --init_checkpoint")
    if args.max_iterations is not None:
        args.stage_iterations = split_iterations(args.max_iterations, len(stages))
    else:
        args.stage_iterations = [args.stage_iterations] * len(stages)
    if args.sda_start is None:
        args.sda_start = int(0.6 * args.pre_iterations)
    # the labeled-only baseline gets the whole budget of the semi-supervised runs
    args.total_iterations = args.pre_iterations + sum(args.stage_iterations)
    return stages


def run_outputs(args, n_stages):
    """What the trainer writes in --save_dir with these flags (``Run``'s ``outputs``): the final
    ``best.pth`` and the folders of the stages it runs (from --start_stage on); from stage 0 on,
    also the run records config.yaml/log.txt."""
    if args.method == "labeled_only":
        return SUPERVISED_OUTPUTS
    folders = [stage_folder(k) for k in range(args.start_stage, n_stages + 1)]
    return ("best.pth", *folders, *(RUN_RECORDS if args.start_stage == 0 else ()))


def stage_folder(k):
    """The sub-folder of --save_dir that holds stage ``k`` (0 = pre-training)."""
    return "pretrain" if k == 0 else f"stage_{k}"


def _split_labeled(batch, half, views):
    """Views of a labeled+unlabeled batch: weak/strong images and labels in halves a, b."""
    n = 2 * half
    out = {}
    for view in views:
        img, lab = batch["image" + view], batch["label" + view]
        out["img" + view] = (img[:half], img[half:n])
        out["uimg" + view] = (img[n:n + half], img[n + half:])
        out["lab" + view] = (lab[:half], lab[half:n])
    if "cutout" in batch:  # where the strong view holds cutout noise (labeled halves, unlabeled halves)
        cut = batch["cutout"]
        out["cut"], out["ucut"] = (cut[:half], cut[half:n]), (cut[n:n + half], cut[n + half:])
    return out


def _mix_terms(logits_list, targets, box, num_classes, dice):
    """Mean over outputs of (Dice + CE)/2 of the BCP mix loss, summed over the mixes in ``targets``."""
    total = 0
    half = box.shape[0]
    for logits in logits_list:
        for j, (t_out, t_in, w_out, w_in) in enumerate(targets):
            d, c = mix_loss(logits[j * half:(j + 1) * half], t_out, t_in, box, w_out, w_in, num_classes, dice)
            total = total + (d + c) / 2
    return total / len(logits_list)


def _forward(model, x):
    """The list [1/2-head, 1/4-head, 1/8-head, main] of logits (the order of the HCA weights)."""
    logits, heads = model(x, heads=True)
    return heads + [logits]


def _weighted(outputs, loss_fn, ds_weight):
    """loss(main) + ds_weight * mean over heads of loss(head)."""
    main = loss_fn([outputs[-1]])
    if ds_weight <= 0:
        return main
    return main + ds_weight * loss_fn(outputs[:-1])


@contextmanager
def frozen_bn_statistics(*models):
    """BatchNorm layers of ``models`` normalise with batch statistics (in train mode) but leave
    their running statistics unchanged.

    The SDA forward sees images that are ~80 % zeros; in the reference it updated the running
    statistics too, which then no longer match real images at evaluation (val Dice collapsed as soon
    as the SDA switched on in our CPU runs).
    """
    layers = [m for model in models for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone()) for m in layers]
    for m in layers:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, tracked) in zip(layers, saved):
            m.momentum = momentum
            if tracked is not None:  # the batch counter too: every buffer as before
                m.num_batches_tracked.copy_(tracked)


def pretrain_step(run, data, resumables=None):
    """The pre-training step (BCP copy-paste of labeled pairs, plus the SDA after ``--sda_start``;
    one U-Net) and what train_loop saves: ``(step, models, optimizers)``. The batch stream and the
    box generator are added to the dict ``resumables`` when one is given."""
    a = run.args
    if a.labeled_bs % 2:
        raise ValueError(f"--labeled_bs {a.labeled_bs}: pre-training mixes labeled pairs, it must be even")
    model = run.model(student=True)
    opt = run.optimizer(model)
    forward = run.forward(model)
    parallel = run.parallel([model], find_unused=a.ds_weight <= 0)  # untrained heads get no gradient
    half, size = a.labeled_bs // 2, a.image_size
    stream = run.stream(data, a.labeled_bs, 0, strong=False, seed=a.seed)
    gen = run.generator(a.seed)
    if resumables is not None:
        resumables.update(stream=stream, box_generator=GeneratorState(gen), scaler=ScalerState(run.scaler))

    def losses_of(x, y, lab, box, sda):
        outputs = _forward(forward, x)
        lab_a, lab_b = lab[:half], lab[half:]
        targets = [(lab_a, lab_b, 1.0, 1.0), (lab_b, lab_a, 1.0, 1.0)]
        # the two complementary mixes form one batch: their mean has the reference's one-mix scale
        losses = {"mix": _weighted(outputs, lambda outs: _mix_terms(outs, targets, box, a.num_classes, a.mix_dice),
                                   a.ds_weight) / 2}
        if sda:
            keep = sda_mask(outputs[-1].detach(), a.sda_alpha)
            x_sda, y_sda = apply_sda(x, y, keep)
            with frozen_bn_statistics(model):  # mostly-zero images must not shift the eval statistics
                out_sda = forward(x_sda)
            losses["sda"] = (F.cross_entropy(out_sda, y_sda)
                             + dice_loss(torch.softmax(out_sda, 1), y_sda, a.num_classes, mask=keep)) / 2
        return losses

    def step(it):
        batch = next(stream)
        img, lab = batch["image"], batch["label"]
        box = bcp_box_mask(half, size, size, generator=gen, device=run.device)
        # both complementary mixes of each labeled pair: as many images through the network as labeled slices
        x = torch.cat([mix(img[:half], img[half:], box), mix(img[half:], img[:half], box)])
        y = torch.cat([mix(lab[:half], lab[half:], box), mix(lab[half:], lab[:half], box)])
        losses = parallel(lambda: losses_of(x, y, lab, box, a.sda == "on" and it > a.sda_start))
        loss = sum(losses.values())
        run.update(loss, [opt], [model])
        return {"loss": loss, **losses}

    return step, {"model": model}, {"model": opt}


def pretrain(run, save_dir, iterations, data, volumes):
    """Pre-training (``pretrain_step``) for ``iterations``, checkpoints in ``save_dir``."""
    a = run.args
    resumables = {}
    step, models, opts = pretrain_step(run, data, resumables)
    return train_loop(save_dir=save_dir, iterations=iterations, step=step, models=models, optimizers=opts,
                      validate=run.validator(models["model"], volumes), config=run.config,
                      val_interval=a.val_interval, log_interval=a.log_interval, resume=a.resume,
                      logger=run.logger, name="pretrain", resumables=resumables, offset=0)


def stage_step(run, stage, weights, init_weights, source, data, resumables=None):
    """The step of curriculum stage ``stage`` (HCA ``weights``): students on the weak (and strong)
    view, a teacher, BCP mix, CPS, HCA, Decouple and CGSR; every network starts from
    ``init_weights`` (a state dict read from ``source``). Returns ``(step, models, optimizers,
    images)``, ``images(writer, iteration)`` adding the step's last inputs and maps to tensorboard.
    The batch stream and the box/CGSR generator are added to the dict ``resumables`` if given.

    The students' whole computation (both forwards of each) runs inside one ``run.parallel``
    call: one DDP forward per backward under torchrun (see ``training.distributed``).
    """
    a = run.args
    names = ["model", "model_2", "teacher"] if a.students == 2 else ["model", "teacher"]
    models = {name: run.model(student=name != "teacher") for name in names}
    for m in models.values():
        load_model_state(m, init_weights, source)
    teacher = models["teacher"]
    teacher.requires_grad_(False)
    students = [models["model"]] + ([models["model_2"]] if a.students == 2 else [])
    forwards, teacher_forward = [run.forward(s) for s in students], run.forward(teacher)
    parallel = run.parallel(students, find_unused=a.ds_weight <= 0)  # untrained heads get no gradient
    views = ["", "_strong"][:len(students)]
    rampup = round(a.cross_rampup * a.stage_iterations[stage - 1])  # iterations of the cross-term ramp-up
    opts = {name: run.optimizer(models[name], lr=a.stage_lr) for name in names if name != "teacher"}
    half, c, size = a.labeled_bs // 2, a.num_classes, a.image_size
    use_disc = stage <= a.center_disc_stages
    exclude_cutout = a.cross_cutout == "exclude" and len(students) == 2
    from_teacher = a.cross_source == "teacher"

    def teacher_argmax(x):
        """The teacher's class map of ``x``: the argmax of its logits, as for its pseudo-labels (no gradient;
        in train mode its buffers are kept)."""
        with torch.no_grad(), frozen_bn_statistics(teacher):
            return class_argmax(teacher_forward(x))
    stream = run.stream(data, a.labeled_bs, a.labeled_bs, strong=a.students == 2, seed=a.seed + 1000 * stage)
    gen = run.generator(a.seed + 1000 * stage)
    if resumables is not None:
        resumables.update(stream=stream, generator=GeneratorState(gen), scaler=ScalerState(run.scaler))
    vis = {}

    def losses_of(b, plab, box, w_cross):
        losses, x, outs, probs = {}, [], [], []
        for k, (view, forward) in enumerate(zip(views, forwards)):
            (img_a, img_b), (uimg_a, uimg_b) = b["img" + view], b["uimg" + view]
            lab_a, lab_b = b["lab" + view]
            pl_a, pl_b = plab[2 * k], plab[2 * k + 1]
            # unlabeled outside the box with the labeled slice inside, and the reverse
            x.append(torch.cat([mix(uimg_a, img_a, box), mix(img_b, uimg_b, box)]))
            targets = [(pl_a, lab_a, a.u_weight, 1.0), (lab_b, pl_b, 1.0, a.u_weight)]
            outs.append(_forward(forward, x[k]))
            losses[f"mix{k + 1}"] = _weighted(outs[k], lambda o, t=targets: _mix_terms(o, t, box, c, a.mix_dice),
                                                a.ds_weight)
            probs.append(torch.softmax(outs[k][-1], 1))
        argmax = [class_argmax(p.detach()) for p in probs]
        # cutout noise of the strong mixed images (pixel-aligned with the weak ones); None: not excluded
        noise = (torch.cat([mix(b["ucut"][0], b["cut"][0], box), mix(b["cut"][1], b["ucut"][1], box)])
                 if exclude_cutout else None)
        keep = None if noise is None else 1.0 - noise
        if len(students) == 2:  # student 1's target: student 2's argmax on the strong view, or the teacher's
            if from_teacher:  # on student 1's own (weak) mixed images: no cutout noise in the target
                losses["cps1"] = w_cross * dice_loss(probs[0], teacher_argmax(x[0]), c)
            else:
                losses["cps1"] = w_cross * dice_loss(probs[0], argmax[1], c, mask=keep)
            losses["cps2"] = w_cross * dice_loss(probs[1], argmax[0], c)
        if a.displacement != "none":
            cross, shown = _displacement_losses(a, weights, outs, x, noise, forwards, students,
                                                teacher_argmax if from_teacher else None, gen, w_cross, use_disc)
            losses.update(cross)
            vis.update(shown)
        vis.update(image=x[0][:1], pred=argmax[0][:1], pseudo=plab[0][:1])
        return losses

    def step(it):
        b = _split_labeled(next(stream), half, views)
        teacher.train(a.teacher_mode == "train")
        with torch.no_grad(), frozen_bn_statistics(teacher):  # train mode: batch statistics, buffers kept
            u_all = torch.cat([img for v in views for img in b["uimg" + v]])
            plab = pseudo_labels(teacher_forward(u_all), c, lcc_impl=a.lcc).split(half)
        box = bcp_box_mask(half, size, size, generator=gen, device=run.device)
        w_cross = a.cross_weight * cross_weight(it, rampup)
        losses = parallel(lambda: losses_of(b, plab, box, w_cross))
        loss = sum(losses.values())
        run.update(loss, opts.values(), students)
        if a.teacher == "ema":
            ema_update(teacher, students[0], a.ema_decay)
        return {"loss": loss, **losses}

    def images(writer, it):
        tag, scale = f"stage_{stage}", 1.0 / max(c - 1, 1)
        for key, value in vis.items():
            img = value[0] if value.dim() == 4 else value[:1].float() * (scale if key in ("pred", "pseudo") else 1)
            writer.add_image(f"{tag}/{key}", img.float().cpu(), it)

    return step, models, opts, images


def _displacement_losses(a, weights, outs, x, noise, forwards, students, teacher_argmax, gen, w_cross, use_disc):
    """The displacement terms of a two-student stage: HCA confidence (``weights``) -> Decouple -> CGSR
    (or ABD's displacement, ``--displacement``) on the mixed images ``x`` of the two students, whose
    outputs (heads and main) are ``outs``; then each student on the displaced images, supervised by the
    other's argmax (student 1 by ``teacher_argmax`` of them when given), plus the centre-disc terms when
    ``use_disc``. ``noise``: the strong view's cutout-noise map of the mixed images (its pixels give no
    target), or None. Returns ``(losses, images)``, ``images`` the first sample's confidence map and
    displaced images for tensorboard.
    """
    c, patch = a.num_classes, a.patch_size
    direction, paste = DISPLACEMENTS[a.displacement]
    with torch.no_grad():  # HCA confidence -> Decouple -> CGSR on the mixed images
        (conf_w, cls_w), (conf_s, cls_s) = [hca_maps([h.detach() for h in o], weights, a.hca_combine) for o in outs]
        # the noise map travels with the images as a second channel through the same replacement
        x_w, x_s = (x[0], x[1]) if noise is None else (torch.cat([x[0], torch.zeros_like(x[0])], 1),
                                                      torch.cat([x[1], noise[:, None]], 1))
        x_s2w, x_w2s, info = cgsr(
            x_w, x_s, region_hardness(conf_w, patch, a.rank_by), region_hardness(conf_s, patch, a.rank_by),
            region_means(cls_w, patch), region_means(cls_s, patch), patch, a.top_num, a.cgsr_kl_prob, gen,
            direction=direction, paste=paste)
    x_swap = torch.cat([x_s2w, x_w2s])
    keep_swap = None if noise is None else (x_swap[:, 1] == 0).to(x_swap.dtype)
    x_swap = x_swap[:, :1]
    with frozen_bn_statistics(*students) if a.cross_bn == "frozen" else nullcontext():
        q1, q2 = torch.softmax(forwards[0](x_swap), 1), torch.softmax(forwards[1](x_swap), 1)
    z1, z2 = class_argmax(q1.detach()), class_argmax(q2.detach())
    t1 = z2 if teacher_argmax is None else teacher_argmax(x_swap)  # student 1's CGSR target
    losses = {"cgsr1": w_cross * dice_loss(q1, t1, c, mask=keep_swap),
              "cgsr2": w_cross * dice_loss(q2, z1, c, mask=keep_swap)}
    if use_disc:
        losses["disc1"] = w_cross * center_disc_dice(q1, t1, c, mask=keep_swap)
        losses["disc2"] = w_cross * center_disc_dice(q2, z1, c, mask=keep_swap)
    images = {"confidence": conf_w[:1], "cgsr_weak": x_s2w[:1, :1], "cgsr_strong": x_w2s[:1, :1]}
    return losses, images


def self_train_stage(run, stage, weights, init_path, save_dir, iterations, data, volumes):
    """Curriculum stage ``stage`` (``stage_step``) for ``iterations`` from the weights in ``init_path``."""
    a = run.args
    resumables = {}
    step, models, opts, images = stage_step(run, stage, weights, load_checkpoint(init_path)["model"], init_path,
                                            data, resumables)
    use_disc = stage <= a.center_disc_stages
    run.logger.info(f"[stage {stage}] HCA weights {weights}, centre disc {'on' if use_disc else 'off'}, "
                    f"init {init_path}, {iterations} iterations")
    config = {**run.config, "stage": stage, "hca_stage_weights": list(weights)}
    offset = a.pre_iterations + sum(a.stage_iterations[:stage - 1])  # iterations before this stage
    return train_loop(save_dir=save_dir, iterations=iterations, step=step, models=models, optimizers=opts,
                      validate=run.validator(models["model"], volumes), config=config, val_interval=a.val_interval,
                      log_interval=a.log_interval, resume=a.resume, logger=run.logger, name=f"stage_{stage}",
                      on_validate=images, resumables=resumables, validate_start=a.validate_stage_start == "on",
                      offset=offset)


def train_sscd(run, stages):
    """Pre-training (unless skipped) then every curriculum stage from ``--start_stage``; copies the
    final model (``--final``: the last stage's best checkpoint, or the best of every stage's) to
    ``save_dir/best.pth`` and returns its path."""
    a = run.args
    if a.method == "labeled_only":
        train_supervised(run, a.total_iterations, lr_after=(a.pre_iterations, a.stage_lr))
        return Path(run.save_dir) / "best.pth"
    data, volumes = run.train_data(), run.val_volumes()
    save_dir = Path(run.save_dir)
    init = Path(a.init_checkpoint) if a.init_checkpoint else None
    handover = f"{a.stage_init}.pth"  # what the next stage starts from
    if a.start_stage == 0:
        pretrain(run, save_dir / stage_folder(0), a.pre_iterations, data, volumes)
        init = save_dir / stage_folder(0) / handover
    for k in range(max(a.start_stage, 1), len(stages) + 1):
        if init is None:
            init = save_dir / stage_folder(k - 1) / handover
        stage_dir = save_dir / stage_folder(k)
        self_train_stage(run, k, stages[k - 1], init, stage_dir, a.stage_iterations[k - 1], data, volumes)
        init = stage_dir / handover
    final = save_dir / "best.pth"
    if run.rank == 0:
        init = stage_dir / "best.pth"  # the last stage's best
        if a.final == "best_stage":  # pre-training first: with --stage_init best, stage 1's start is its best
            init = best_stage_checkpoint([save_dir / stage_folder(k) / "best.pth" for k in range(0, len(stages) + 1)],
                                         init)
        run.logger.info(f"final model (--final {a.final}): {init}")
        save_checkpoint({k: v for k, v in load_checkpoint(init).items() if k != "format"}, final)
    return final


def best_stage_checkpoint(paths, default):
    """The checkpoint with the highest val Dice among the existing ``paths`` (the earliest on ties),
    or ``default`` when none exists."""
    scored = [(load_checkpoint(p)["best_dice"], -k, p) for k, p in enumerate(paths) if Path(p).is_file()]
    return max(scored)[2] if scored else default



def final_val_metrics(path, num_classes):
    """``(mean val Dice, [Dice of class 1..C-1])`` of checkpoint ``path``: the validation it was
    selected with, stored in it by train_loop (no second pass over val.list)."""
    state = load_checkpoint(path)
    val = state.get("val") or {"dice": state["best_dice"]}
    return val["dice"], [val[f"dice_class{k}"] for k in range(1, num_classes) if f"dice_class{k}" in val]
