"""One curriculum-stage step, spied on: the exact targets, weights, views and source models of each
loss term (what "every flag changes the weights" cannot see), the effect of each stage flag on exact
values, and the pre-training step's frozen BatchNorm statistics."""
import copy

import pytest
import torch

from networks.unet import build_model
from test_speed_paths import make_run
from training import sscd_train
from utils.sscd import class_argmax, cross_weight, mix


class Recorder:
    """Wraps a function, keeping its positional/keyword arguments and result per call."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, *args, **kwargs):
        out = self.fn(*args, **kwargs)
        self.calls.append((args, kwargs, out))
        return out


def spied_step(root, tmp_path, monkeypatch, *flags, teacher_weights=None):
    """``(records, models, losses)`` of stage 1's first step from one random initialisation."""
    run = make_run(root, tmp_path, "--amp", "off", *flags)  # fp32: compared with plain forwards below
    data = run.train_data()
    torch.manual_seed(0)
    init = build_model(4).state_dict()
    names = ("_split_labeled", "pseudo_labels", "mix_loss", "dice_loss", "center_disc_dice", "ema_update",
             "bcp_box_mask", "_forward")
    records = {}
    for name in names:
        records[name] = Recorder(getattr(sscd_train, name))
        monkeypatch.setattr(sscd_train, name, records[name])
    step, models, _, _ = sscd_train.stage_step(run, 1, (1.0, 0.0, 0.0, 0.0), init, "init", data)
    if teacher_weights is not None:
        models["teacher"].load_state_dict(teacher_weights)
    records["modes"] = []  # (model name, training) of every forward
    for key, m in models.items():
        m.register_forward_pre_hook(lambda module, inputs, key=key: records["modes"].append((key, module.training)))
    records["stats"] = []  # student 1's BatchNorm running statistics right after each of its forwards
    m1 = models["model"]
    records["cgsr_inputs"] = []  # student 1's inputs after its first forward (the CGSR images)
    m1.register_forward_pre_hook(lambda module, inputs: records["cgsr_inputs"].append(inputs[0].clone())
                                 if records["stats"] else None)
    m1.register_forward_hook(lambda module, inputs, out: records["stats"].append(
        {n: t.clone() for n, t in module.state_dict().items() if "running_" in n}))
    before = {k: copy.deepcopy(m) for k, m in models.items()}
    losses = step(1)
    run.close()
    return records, models, before, losses, init


def other_weights():
    torch.manual_seed(1)
    return build_model(4).state_dict()


def test_stage_step_targets_weights_views_and_models(synthetic_root, tmp_path, monkeypatch):
    teacher_weights = other_weights()  # the students start elsewhere: pseudo-labels can be told apart
    rec, models, before, losses, _ = spied_step(synthetic_root, tmp_path, monkeypatch, "--u_weight", "0.3",
                                                teacher_weights=teacher_weights)
    b = rec["_split_labeled"].calls[0][2]
    box = rec["bcp_box_mask"].calls[0][2]
    # pseudo-labels: the teacher (its own weights, eval mode) on the weak then the strong unlabeled halves
    (logits, _), _, plab = rec["pseudo_labels"].calls[0]
    teacher = build_model(4)
    teacher.load_state_dict(teacher_weights)
    u_all = torch.cat([*b["uimg"], *b["uimg_strong"]])
    with torch.no_grad():
        expected = teacher.eval().to(memory_format=torch.channels_last)(u_all.contiguous(
            memory_format=torch.channels_last))
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    pl = plab.split(1)
    # views: student 1 gets the weak mixes, student 2 the strong ones (unlabeled outside the box first)
    fwd = rec["_forward"].calls
    for k, view in enumerate(("", "_strong")):
        (img_a, img_b), (u_a, u_b) = b["img" + view], b["uimg" + view]
        torch.testing.assert_close(fwd[k][0][1], torch.cat([mix(u_a, img_a, box), mix(img_b, u_b, box)]))
    assert fwd[0][0][0].model is models["model"] and fwd[1][0][0].model is models["model_2"]
    # mix loss of the main output: the pseudo-labeled region weighted --u_weight, the labeled one 1
    mix_calls = rec["mix_loss"].calls
    per_student = len(mix_calls) // 2
    for k, view in enumerate(("", "_strong")):
        lab_a, lab_b = b["lab" + view]
        (logits_a, t_out, t_in, box_a, w_out, w_in, *_), _, _ = mix_calls[k * per_student]
        assert torch.equal(t_out, pl[2 * k]) and torch.equal(t_in, lab_a) and (w_out, w_in) == (0.3, 1.0)
        (logits_b, t_out, t_in, _, w_out, w_in, *_), _, _ = mix_calls[k * per_student + 1]
        assert torch.equal(t_out, lab_b) and torch.equal(t_in, pl[2 * k + 1]) and (w_out, w_in) == (1.0, 0.3)
        assert torch.equal(box_a, box)
    # CPS and CGSR: each student's target is the other student's argmax
    dice = rec["dice_loss"].calls
    (p1, t1, _), _, _ = dice[0]
    (p2, t2, _), _, _ = dice[1]
    assert torch.equal(t1, class_argmax(p2.detach())) and torch.equal(t2, class_argmax(p1.detach()))
    (q1, z2, _), _, _ = dice[2]
    (q2, z1, _), _, _ = dice[3]
    assert torch.equal(z2, class_argmax(q2.detach())) and torch.equal(z1, class_argmax(q1.detach()))
    # cross terms weighted by the default ramp-up: half of the 6000-iteration stage (30000 / 5), at iteration 1
    w = cross_weight(1, 3000)
    for k, key in enumerate(("cps1", "cps2", "cgsr1", "cgsr2")):
        torch.testing.assert_close(losses[key], w * dice[k][2], rtol=1e-6, atol=0)
    (d1, dz2, _), _, _ = rec["center_disc_dice"].calls[0]
    assert d1 is q1 and torch.equal(dz2, z2)
    # the EMA teacher follows student 1 with --ema_decay
    (teacher_arg, student_arg, decay), _, _ = rec["ema_update"].calls[0]
    assert teacher_arg is models["teacher"] and student_arg is models["model"] and decay == 0.99
    assert set(losses) == {"loss", "mix1", "mix2", "cps1", "cps2", "cgsr1", "cgsr2", "disc1", "disc2"}


def test_cross_rampup_scales_exactly_the_cross_terms(synthetic_root, tmp_path, monkeypatch):
    stage = ("--max_iterations", "100")  # 20 per stage
    _, _, _, plain, _ = spied_step(synthetic_root, tmp_path / "a", monkeypatch, *stage, "--cross_rampup", "0")
    _, _, _, ramped, _ = spied_step(synthetic_root, tmp_path / "b", monkeypatch, *stage, "--cross_rampup", "0.5")
    w = cross_weight(1, 10)  # half of the 20-iteration stage
    assert w == pytest.approx(0.0174224, rel=1e-5)  # exp(-5 * 0.9^2)
    for key in ("cps1", "cps2", "cgsr1", "cgsr2", "disc1", "disc2"):
        torch.testing.assert_close(ramped[key], w * plain[key], rtol=1e-6, atol=1e-9)
    for key in ("mix1", "mix2"):
        assert torch.equal(ramped[key], plain[key])


def test_cross_weight_flag_scales_exactly_the_cross_terms(synthetic_root, tmp_path, monkeypatch):
    stage = ("--max_iterations", "100", "--cross_rampup", "0")
    _, _, _, plain, _ = spied_step(synthetic_root, tmp_path / "a", monkeypatch, *stage)
    _, _, _, scaled, _ = spied_step(synthetic_root, tmp_path / "b", monkeypatch, *stage, "--cross_weight", "0.25")
    for key in ("cps1", "cps2", "cgsr1", "cgsr2", "disc1", "disc2"):
        torch.testing.assert_close(scaled[key], 0.25 * plain[key], rtol=1e-6, atol=1e-9)
    for key in ("mix1", "mix2"):
        assert torch.equal(scaled[key], plain[key])
    torch.testing.assert_close(scaled["loss"], plain["mix1"] + plain["mix2"] + 0.25 * (plain["loss"] - plain["mix1"]
                                                                                       - plain["mix2"]))


def test_cross_weight_schedule():
    assert cross_weight(5, 0) == 1.0
    assert cross_weight(0, 10) == pytest.approx(0.006737947, rel=1e-6)
    assert cross_weight(5, 10) == pytest.approx(0.2865048, rel=1e-6)
    assert cross_weight(10, 10) == cross_weight(50, 10) == 1.0
    with pytest.raises(ValueError):
        cross_weight(1, -1)


def test_cutout_pixels_excluded_from_the_cross_targets(synthetic_root, tmp_path, monkeypatch):
    rec, _, _, _, _ = spied_step(synthetic_root, tmp_path, monkeypatch, "--cross_cutout", "exclude")
    b = rec["_split_labeled"].calls[0][2]
    box = rec["bcp_box_mask"].calls[0][2]
    noise = torch.cat([mix(b["ucut"][0], b["cut"][0], box), mix(b["cut"][1], b["ucut"][1], box)])
    assert 0 < noise.sum() < noise.numel()
    dice = rec["dice_loss"].calls
    torch.testing.assert_close(dice[0][1]["mask"], 1 - noise)  # student 1's CPS: no target from the noise
    assert dice[1][1].get("mask") is None  # student 2's target comes from the weak view
    keep_swap = dice[2][1]["mask"]
    assert torch.equal(keep_swap, dice[3][1]["mask"]) and set(keep_swap.unique().tolist()) <= {0.0, 1.0}
    half = keep_swap.shape[0] // 2
    # x_w2s is the strong image with one weak region pasted in: its noise is the strong noise there
    # except inside that region; x_s2w is weak with one strong region: noise only from that region
    dropped_w2s, dropped_s2w = (keep_swap[half:] == 0), (keep_swap[:half] == 0)
    assert torch.all(noise[dropped_w2s] == 1) and torch.all(noise[dropped_s2w] == 1)
    patch = 8
    assert dropped_w2s.sum() >= noise.sum() - half * patch * patch
    assert dropped_s2w.sum() <= half * patch * patch
    assert torch.equal(rec["center_disc_dice"].calls[0][1]["mask"], keep_swap)


def test_teacher_mode_train_uses_batch_statistics_and_keeps_buffers(synthetic_root, tmp_path, monkeypatch):
    weights = other_weights()
    rec, models, before, _, _ = spied_step(synthetic_root, tmp_path, monkeypatch, "--teacher_mode", "train",
                                           "--teacher", "frozen", teacher_weights=weights)
    b = rec["_split_labeled"].calls[0][2]
    (logits, _), _, _ = rec["pseudo_labels"].calls[0]
    assert [training for key, training in rec["modes"] if key == "teacher"] == [True]
    reference = build_model(4)
    reference.load_state_dict(weights)
    with torch.no_grad():
        eval_out = reference.eval()(torch.cat([*b["uimg"], *b["uimg_strong"]]))
    assert not torch.allclose(logits, eval_out, atol=1e-3)  # batch statistics (and dropout) were used
    for key, value in models["teacher"].state_dict().items():  # frozen teacher: buffers untouched
        assert torch.equal(value, before["teacher"].state_dict()[key]), key


def test_cross_source_teacher_gives_student_1_the_teachers_targets(synthetic_root, tmp_path, monkeypatch):
    teacher_weights = other_weights()  # the teacher differs from both students: its targets can be told apart
    rec, models, _, losses, _ = spied_step(synthetic_root, tmp_path, monkeypatch, "--cross_source", "teacher",
                                           "--cross_cutout", "exclude", teacher_weights=teacher_weights)
    teacher = build_model(4)
    teacher.load_state_dict(teacher_weights)
    teacher.eval().to(memory_format=torch.channels_last)

    def teacher_map(x):
        with torch.no_grad():
            return class_argmax(teacher(x.contiguous(memory_format=torch.channels_last)))

    x_weak = rec["_forward"].calls[0][0][1]  # student 1's mixed (weak) images
    dice = rec["dice_loss"].calls
    (p1, t1, _), kw1, _ = dice[0]
    (p2, t2, _), _, _ = dice[1]
    assert torch.equal(t1, teacher_map(x_weak)) and kw1.get("mask") is None  # no cutout in the weak view
    assert not torch.equal(t1, class_argmax(p2.detach()))  # not student 2's any more
    assert torch.equal(t2, class_argmax(p1.detach()))  # student 2 still learns from student 1
    (q1, z_t, _), kw_q1, _ = dice[2]
    (q2, z1, _), kw_q2, _ = dice[3]
    # the CGSR images are the ones both students saw (the second forward of student 1: the hook's input)
    x_swap = rec["cgsr_inputs"][0]
    assert torch.equal(z_t, teacher_map(x_swap)) and torch.equal(z1, class_argmax(q1.detach()))
    assert torch.equal(kw_q1["mask"], kw_q2["mask"])  # the cutout mask of the CGSR images still applies
    (d1, dz, _), _, _ = rec["center_disc_dice"].calls[0]
    assert d1 is q1 and torch.equal(dz, z_t)
    # three teacher forwards, all in eval mode: pseudo-labels, the CPS target, the CGSR target
    assert [training for key, training in rec["modes"] if key == "teacher"] == [False, False, False]
    assert set(losses) == {"loss", "mix1", "mix2", "cps1", "cps2", "cgsr1", "cgsr2", "disc1", "disc2"}


@pytest.mark.parametrize("mode", ["frozen", "update"])
def test_cross_bn_frozen_keeps_student_statistics_of_the_mixed_forward_only(synthetic_root, tmp_path,
                                                                            monkeypatch, mode):
    rec, models, _, _, init = spied_step(synthetic_root, tmp_path, monkeypatch, "--cross_bn", mode)
    assert [key for key, _ in rec["modes"]].count("model") == 2  # the mixed images, then the CGSR images
    after_mixed, after_cgsr = rec["stats"]
    changed = [n for n in after_mixed if not torch.equal(after_mixed[n], after_cgsr[n])]
    assert (changed == []) == (mode == "frozen")
    final = models["model"].state_dict()
    assert all(torch.equal(final[n], after_cgsr[n]) for n in after_cgsr)
    assert not all(torch.equal(after_mixed[n], init[n]) for n in after_mixed)  # the mixed forward did update


def test_cross_flags_refused_where_they_would_do_nothing(synthetic_root, tmp_path, capsys):
    for flags, word in ((["--students", "1", "--displacement", "none", "--cross_cutout", "exclude"], "--cross_cutout"),
                        (["--students", "1", "--displacement", "none", "--cross_rampup", "0.5"], "--cross_rampup"),
                        (["--students", "1", "--displacement", "none", "--cross_weight", "0.5"], "--cross_weight"),
                        (["--students", "1", "--displacement", "none", "--cross_source", "teacher"], "--cross_source"),
                        (["--cross_weight", "-0.1"], "--cross_weight -0.1: expected >= 0"),
                        (["--displacement", "none", "--cross_bn", "frozen"], "--cross_bn")):
        with pytest.raises(SystemExit):
            make_run(synthetic_root, tmp_path, *flags)
        assert word in capsys.readouterr().err


def test_pretraining_sda_forward_leaves_batchnorm_statistics(synthetic_root, tmp_path, monkeypatch):
    """With the SDA images blown up 1000x, the running statistics after a step must equal those
    with the SDA images as they are: only the mixed-image forward may update them (this fails if
    ``frozen_bn_statistics`` is removed from the pre-training step)."""
    stats, real = [], sscd_train.apply_sda
    for k, scale in enumerate((1.0, 1000.0)):
        monkeypatch.setattr(sscd_train, "apply_sda", lambda x, y, keep, s=scale: (real(x, y, keep)[0] * s,
                                                                                   real(x, y, keep)[1]))
        run = make_run(synthetic_root, tmp_path / str(k), "--sda_start", "0", "--pre_iterations", "4", "--amp", "off")
        torch.manual_seed(0)
        step, models, _ = sscd_train.pretrain_step(run, run.train_data())
        losses = step(1)
        assert "sda" in losses
        stats.append({n: t.clone() for n, t in models["model"].state_dict().items() if "running_" in n})
        run.close()
    for name in stats[0]:
        torch.testing.assert_close(stats[0][name], stats[1][name], rtol=1e-6, atol=1e-7)
