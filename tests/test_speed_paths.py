"""The speed paths: the device largest-component filter (equal to scipy's), mixed precision,
channels_last, torch.compile (and its fallback), sync-free training steps, the device-side
validation, and that every speed flag has its effect."""
import functools
import logging
import platform

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dataloaders.dataset import load_volumes
from evaluation.inference import Validator, predict_volume
from evaluation.metrics import dice_per_class
from networks.unet import build_model
from training import speed
from training.config import base_parser, parse_args
import training.run
import training.run_start
from training.run import Forward, Run
from training.run_start import resolve_speed_flags
from training.sscd_train import PRESETS, add_sscd_args, check_sscd_args, pretrain_step, stage_step
from utils.losses import ce_dice_loss
from utils.sscd import class_argmax, largest_component_per_class, largest_component_per_class_device, pseudo_labels


# ---------------------------------------------------------------- device LCC == scipy
def random_maps(seed, n, h, w, classes, blocky):
    g = torch.Generator().manual_seed(seed)
    if not blocky:
        return torch.randint(0, classes, (n, h, w), generator=g)
    coarse = torch.randint(0, classes, (n, 1, max(h // 8, 2), max(w // 8, 2)), generator=g).float()
    return F.interpolate(coarse, size=(h, w), mode="bilinear").round().clamp(0, classes - 1).long()[:, 0]


@pytest.mark.parametrize("seed", range(12))
def test_device_lcc_equals_scipy_on_random_maps(seed):
    h, w = [(8, 8), (16, 24), (33, 17), (64, 64)][seed % 4]
    classes = 2 + seed % 3
    for blocky in (False, True):
        labels = random_maps(seed, 3, h, w, classes, blocky)
        expected = largest_component_per_class(labels, classes)
        assert torch.equal(largest_component_per_class_device(labels, classes), expected)
        assert torch.equal(largest_component_per_class_device(labels, classes, check_every=1), expected)


def serpentine(size):
    s = torch.zeros(size, size, dtype=torch.long)
    s[::2] = 1
    for row in range(1, size, 2):
        s[row, size - 1 if row % 4 == 1 else 0] = 1
    return s


def spiral(size):
    s = torch.zeros(size, size, dtype=torch.long)
    top, left, bottom, right = 0, 0, size - 1, size - 1
    while top <= bottom and left <= right:
        s[top, left:right + 1] = 1
        s[top:bottom + 1, right] = 1
        s[bottom, left:right + 1] = 1
        s[top + 2:bottom + 1, left] = 1
        top, left, bottom, right = top + 2, left + 2, bottom - 2, right - 2
        if top <= bottom:
            s[top - 1, left - 2] = 0 if left - 2 > 0 else s[top - 1, left - 2]
    return s


def test_device_lcc_equals_scipy_on_hand_made_maps():
    lab = torch.zeros(6, 12, 12, dtype=torch.long)
    lab[0, 0, 0] = lab[0, 1, 1] = lab[0, 2, 2] = 1        # a diagonal chain: one 8-connected component
    lab[0, 0, 5:7] = 1                                    # a 2-pixel bar: removed
    lab[1, 0, 9:12] = 2                                   # tie 3 vs 3: the first in raster order wins
    lab[1, 5, 0:3] = 2
    lab[1, 9, 9] = 3                                      # a class with one pixel: kept
    lab[2] = 1                                            # the whole image one component
    lab[3, ::2, ::2] = 1                                  # isolated dots: all size 1, keep the first
    lab[4] = serpentine(12)
    lab[4, 11, 11] = 2
    lab[5, 3:9, 3:9] = 5                                  # a value >= num_classes: untouched
    lab[5, 0, 0] = 1
    expected = largest_component_per_class(lab, 4)
    assert torch.equal(largest_component_per_class_device(lab, 4), expected)
    assert expected[1, 0, 9:12].eq(2).all() and expected[1, 5, 0:3].eq(0).all()
    assert int(expected[3].sum()) == 1 and expected[3, 0, 0] == 1
    assert expected[5, 3:9, 3:9].eq(5).all()
    for shape in (serpentine(64), spiral(64), torch.zeros(64, 64, dtype=torch.long)):
        maps = torch.stack([shape, 1 - shape, shape * 2]).long()
        assert torch.equal(largest_component_per_class_device(maps, 3), largest_component_per_class(maps, 3))


def test_pseudo_labels_device_impl_equals_scipy():
    logits = 4 * torch.randn(4, 4, 32, 32, generator=torch.Generator().manual_seed(5))
    assert torch.equal(pseudo_labels(logits, 4, lcc_impl="device"), pseudo_labels(logits, 4))
    with pytest.raises(ValueError, match="lcc_impl"):
        pseudo_labels(logits, 4, lcc_impl="gpu")


# ---------------------------------------------------------------- precision, memory format, compile
def fixed_batch(size=32):
    g = torch.Generator().manual_seed(0)
    return torch.rand(4, 1, size, size, generator=g), torch.randint(0, 4, (4, size, size), generator=g)


def model_in_train_mode():
    """The U-Net training (BatchNorm on batch statistics) with dropout off: channels_last and
    compiled code draw dropout masks in another order, so the masks would differ."""
    torch.manual_seed(0)
    model = build_model(4).train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.eval()
    return model


def loss_and_grad(forward, model, x, y):
    logits, heads = forward(x, heads=True)
    loss = ce_dice_loss(logits, y, 4) + sum(ce_dice_loss(h, y, 4) for h in heads)
    model.zero_grad()
    loss.backward()
    return loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])


# measured (loss relative error, gradient cosine) on the CPU kinds this project meets, one thread:
#   bf16: AMD EPYC AVX2 5.6e-5 / 0.962, AMD EPYC Zen 4 AVX-512 2e-6 / 0.97, Intel Xeon AMX 5.4e-5 / 0.962
#   fp16: AVX2 5.8e-6 / 0.9953, AVX-512 1e-6 / 0.997
# spread of the cosine over those kernels: 0.008 (bf16), 0.002 (fp16). Each bound below clears the worst
# measurement by several times that spread and still fails a gradient that points elsewhere.
AMP_BOUNDS = {"bf16": (1e-3, 0.90), "fp16": (1e-4, 0.98)}


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_loss_close_to_fp32(amp):
    """Autocast on the CPU: float32 outputs, the loss and the gradient near fp32's (``AMP_BOUNDS``:
    bf16 keeps 8 mantissa bits, so its gradient's cosine to fp32's is ~0.96 on every CPU kind)."""
    x, y = fixed_batch()
    model = model_in_train_mode()
    ref_loss, ref_grad = loss_and_grad(Forward(model), model, x, y)
    forward = Forward(model, amp_dtype=training.run_start.AMP_DTYPES[amp])
    assert forward(x).dtype == torch.float32
    with torch.autocast("cpu", dtype=training.run_start.AMP_DTYPES[amp]):
        assert model(x).dtype == training.run_start.AMP_DTYPES[amp]  # the network itself ran in low precision
    loss, grad = loss_and_grad(forward, model, x, y)
    loss_bound, cosine_bound = AMP_BOUNDS[amp]
    assert float((loss - ref_loss).abs() / ref_loss) < loss_bound
    assert float(F.cosine_similarity(grad, ref_grad, dim=0)) > cosine_bound


def relative_error(a, b):
    return float((a - b).norm() / b.norm())


def test_channels_last_same_numbers():
    """Loss within 1e-5, gradient within 1e-2 relative (measured 7e-4: another summation order,
    amplified by BatchNorm over 16 values at the 2x2 bottom of a 32x32 batch of 4)."""
    x, y = fixed_batch()
    model = model_in_train_mode()
    ref_loss, ref_grad = loss_and_grad(Forward(model), model, x, y)
    model = model.to(memory_format=torch.channels_last)
    loss, grad = loss_and_grad(Forward(model, channels_last=True), model, x, y)
    assert model.down[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(loss, ref_loss, rtol=1e-5) and relative_error(grad, ref_grad) < 1e-2


def test_compile_matches_eager_on_the_tiny_unet():
    """torch.compile (inductor, C++ on the CPU) at 32x32: loss within 1e-5, gradient within 1e-2
    relative (measured 0 and 4.5e-3; fused kernels sum in another order, see above)."""
    x, y = fixed_batch()
    model = model_in_train_mode()
    ref_loss, ref_grad = loss_and_grad(Forward(model), model, x, y)
    forward = Forward(model, compile=True)
    loss, grad = loss_and_grad(forward, model, x, y)
    assert forward.compiled is not None, "compilation failed and fell back to eager"
    assert torch.allclose(loss, ref_loss, rtol=1e-5) and relative_error(grad, ref_grad) < 1e-2


def test_compile_failure_falls_back_to_eager_with_a_warning(monkeypatch, caplog):
    def broken_backend(graph, example_inputs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=broken_backend))
    x, _ = fixed_batch()
    model = build_model(4).eval()
    logger = logging.getLogger("test_compile_fallback")
    forward = Forward(model, compile=True, logger=logger)
    with caplog.at_level(logging.WARNING, logger="test_compile_fallback"):
        out = forward(x)
        again = forward(x)
    assert forward.compiled is None
    assert torch.equal(out, model(x)) and torch.equal(again, out)
    warnings = [r for r in caplog.records if "torch.compile failed, running eager" in r.getMessage()]
    assert len(warnings) == 1


# ---------------------------------------------------------------- runs: flags and sync-free steps
def make_run(root, tmp_path, *flags):
    parser = add_sscd_args(base_parser("t", "ACDC", num_classes=4, labelnum=3))
    args = parse_args(parser, ["--root_path", str(root), "--save_dir", str(tmp_path), "--image_size", "32",
                               "--batch_size", "4", "--labeled_bs", "2", "--patch_size", "8", "--device", "cpu",
                               "--labelnum", "3", *flags], PRESETS)
    check_sscd_args(parser, args)
    return Run(args, "ACDC")


def fake_cpu(monkeypatch, avx512_bf16, amx):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)


@pytest.mark.parametrize("avx512_bf16, amx, expected", [(False, False, "off"), (True, False, "bf16"),
                                                        (False, True, "bf16"), (True, True, "bf16")])
def test_auto_amp_is_bf16_only_where_the_cpu_has_native_bf16(monkeypatch, avx512_bf16, amx, expected):
    """--amp auto on the CPU: bf16 with AVX512-BF16 or AMX, fp32 (off) on e.g. an AVX2-only CPU,
    where emulated bf16 measured ~9x slower; CUDA always bf16; an explicit --amp is kept."""
    fake_cpu(monkeypatch, avx512_bf16, amx)
    assert speed.auto_amp("cpu") == expected and speed.cpu_has_native_bf16() == (expected == "bf16")
    assert speed.cpu_bf16_flags() == [f for f, on in (("amx_bf16", amx), ("avx512_bf16", avx512_bf16)) if on]
    assert speed.auto_amp("cuda") == speed.auto_amp("cuda:1") == "bf16"
    parser = base_parser("t", "ACDC", num_classes=4, labelnum=3)
    assert resolve_speed_flags(parse_args(parser, []), "cpu").amp == expected
    assert resolve_speed_flags(parse_args(parser, ["--amp", "bf16"]), "cpu").amp == "bf16"
    assert resolve_speed_flags(parse_args(parser, ["--amp", "off"]), "cpu").amp == "off"


@pytest.mark.parametrize("cap, bf16", [("AVX2", False), ("avx512_core", False), ("AVX2_VNNI", False),
                                        ("AVX512_CORE_BF16", True), ("AVX512_CORE_AMX", True), ("ALL", True)])
def test_auto_amp_follows_the_onednn_isa_cap(monkeypatch, cap, bf16):
    """A CPU with AVX512-BF16 whose oneDNN is capped below bf16 computes bf16 like an AVX2 CPU."""
    fake_cpu(monkeypatch, True, False)
    monkeypatch.setenv("DNNL_MAX_CPU_ISA" if cap == "ALL" else "ONEDNN_MAX_CPU_ISA", cap)
    assert speed.auto_amp("cpu") == ("bf16" if bf16 else "off")
    assert speed.cpu_description()["onednn_isa_cap"] == cap.upper()


def test_auto_amp_without_torch_probes_is_fp32(monkeypatch):
    """A torch without the cpuinfo probes never gets bf16 by default on the CPU."""
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    assert speed.cpu_bf16_flags() == [] and speed.auto_amp("cpu") == "off"


def test_cpu_description_names_the_cpu():
    info = speed.cpu_description()
    assert set(info) == {"cpu_model", "cpu_capability", "cpu_bf16", "onednn_isa_cap", "cpu_count"}
    assert info["cpu_model"] and info["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert info["cpu_bf16"] == speed.cpu_bf16_flags() and info["cpu_count"] >= 1


def test_host_allocator_tuning_is_idempotent_and_keeps_training_exact():
    """glibc: applied once (True), again a no-op; the numbers a step computes do not change."""
    x, y = fixed_batch()
    model = model_in_train_mode()
    before = loss_and_grad(Forward(model), model, x, y)
    applied = speed.tune_host_allocator()
    assert speed.tune_host_allocator() == applied
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert applied
    after = loss_and_grad(Forward(model), model, x, y)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])


def test_class_argmax_equals_argmax_with_ties():
    g = torch.Generator().manual_seed(3)
    for layout in (torch.contiguous_format, torch.channels_last):
        t = torch.randint(0, 3, (3, 4, 9, 7), generator=g).float().contiguous(memory_format=layout)  # many ties
        assert torch.equal(class_argmax(t), t.argmax(dim=1))
    t = torch.randn(2, 4, 16, 16, generator=g)
    assert torch.equal(class_argmax(t), t.argmax(dim=1)) and class_argmax(t).dtype == torch.long


def test_auto_speed_flags_per_device(monkeypatch):
    fake_cpu(monkeypatch, False, False)  # an AVX2-only CPU
    parser = base_parser("t", "ACDC", num_classes=4, labelnum=3)
    cpu = resolve_speed_flags(parse_args(parser, []), "cpu")
    assert (cpu.amp, cpu.channels_last, cpu.lcc, cpu.compile, cpu.sync_bn) == ("off", "on", "scipy", False, False)
    cuda = resolve_speed_flags(parse_args(parser, []), "cuda")
    assert (cuda.amp, cuda.channels_last, cuda.lcc) == ("bf16", "on", "device")
    explicit = resolve_speed_flags(parse_args(parser, ["--amp", "fp16", "--channels_last", "off",
                                                       "--lcc", "device"]), "cpu")
    assert (explicit.amp, explicit.channels_last, explicit.lcc) == ("fp16", "off", "device")


def test_speed_flags_reach_the_networks(synthetic_root, tmp_path):
    run = make_run(synthetic_root, tmp_path / "a", "--amp", "bf16", "--channels_last", "on", "--compile")
    model = run.model()
    forward = run.forward(model)
    assert model.down[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    assert forward.amp_dtype == torch.bfloat16 and forward.channels_last and forward.compiled is not None
    assert run.config["amp"] == "bf16" and not run.scaler.is_enabled()
    run.close()
    run = make_run(synthetic_root, tmp_path / "b", "--amp", "fp16", "--channels_last", "off")
    model = run.model()
    forward = run.forward(model)
    assert not model.down[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    assert forward.amp_dtype == torch.float16 and forward.compiled is None and run.scaler.is_enabled()
    run.close()


def stage_weights(run):
    """All weights after 2 pre-training and 2 stage iterations of ``run``."""
    data = run.train_data()
    step, models, _ = pretrain_step(run, data)
    for it in (1, 2):
        step(it)
    step, models, _, _ = stage_step(run, 1, (0.5, 0.5, 0, 0), models["model"].state_dict(), "pretrain", data)
    for it in (1, 2):
        step(it)
    return torch.cat([t.float().flatten() for m in models.values() for t in m.state_dict().values()])


def test_amp_and_lcc_flags_change_or_keep_the_training(synthetic_root, tmp_path, monkeypatch):
    calls = []
    real = training.sscd_train.pseudo_labels
    monkeypatch.setattr(training.sscd_train, "pseudo_labels",
                        lambda *a, **k: calls.append(k["lcc_impl"]) or real(*a, **k))
    base = stage_weights(make_run(synthetic_root, tmp_path / "base", "--amp", "off", "--lcc", "scipy"))
    device_lcc = stage_weights(make_run(synthetic_root, tmp_path / "lcc", "--amp", "off", "--lcc", "device"))
    assert calls == ["scipy", "scipy", "device", "device"]
    assert torch.equal(base, device_lcc)  # the same pseudo-labels, the same training
    for amp in ("bf16", "fp16"):
        low = stage_weights(make_run(synthetic_root, tmp_path / amp, "--amp", amp, "--lcc", "scipy"))
        assert not torch.equal(base, low) and torch.isfinite(low).all()
        assert float((low - base).abs().max()) < 0.05


class HostSync(RuntimeError):
    pass


@pytest.fixture
def forbid_host_sync(monkeypatch):
    """Within the fixture: every Python-level device->host read raises; ``torch.equal`` (the device
    LCC's convergence check) is counted instead."""
    equal_calls = []
    real_equal = torch.equal

    def forbid(name):
        def fail(*args, **kwargs):
            raise HostSync(f"Tensor.{name} inside a training step")
        return fail

    def start():
        for name in ("item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__"):
            monkeypatch.setattr(torch.Tensor, name, forbid(name))
        monkeypatch.setattr(torch, "equal", lambda *a: equal_calls.append(1) or real_equal(*a))
        return equal_calls

    return start


def test_training_steps_do_not_read_the_device(synthetic_root, tmp_path, forbid_host_sync):
    run = make_run(synthetic_root, tmp_path, "--lcc", "device", "--amp", "bf16", "--sda_start", "0")
    data = run.train_data()
    pre, models, _ = pretrain_step(run, data)
    stage, *_ = stage_step(run, 1, (0.5, 0.5, 0, 0), models["model"].state_dict(), "pretrain", data)
    pre(1), stage(1)  # warm-up outside the guard
    equal_calls = forbid_host_sync()
    for it in (2, 3):
        pre(it)  # with the SDA: both pre-training forwards
        stage(it)
    assert len(equal_calls) == 2  # one LCC convergence check per self-training step, nothing else


def test_scipy_lcc_reads_the_device(synthetic_root, tmp_path, forbid_host_sync):
    run = make_run(synthetic_root, tmp_path, "--lcc", "scipy")
    data = run.train_data()
    stage, *_ = stage_step(run, 1, (0.5, 0.5, 0, 0), run.model().state_dict(), "init", data)
    forbid_host_sync()
    with pytest.raises(HostSync):
        stage(1)


def test_validator_equals_per_volume_prediction(synthetic_root):
    volumes = load_volumes(synthetic_root, "val", 4)
    model = build_model(4).eval()
    per_case = np.stack([dice_per_class(predict_volume(model, v["image"], 32, "cpu"), v["label"], 4)
                         for v in volumes]).mean(axis=0)
    score, scalars = Validator(volumes, 4, 32, "cpu", batch_size=5)(model)
    assert score == pytest.approx(float(per_case.mean()), abs=1e-12)
    assert [scalars[f"dice_class{c}"] for c in (1, 2, 3)] == pytest.approx(per_case.tolist(), abs=1e-12)
