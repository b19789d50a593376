"""What a run changes in torch's process-wide backend settings, and state that belongs to a device.

* ``backend_flags`` / ``apply_backend_flags``: cuDNN autotuning and determinism (``--deterministic``)
  and TF32 for fp32 convolutions (``--amp``), as one dict that the trainers set once and the benchmark
  sets again before each of its paths (the flags are process-wide).
* ``fit_generator_state``: a saved ``torch.Generator`` state on a generator of another device type
  (a CUDA generator's state is 16 bytes, a CPU one's 5056), for a run resumed with another --device.
* ``match_state_layout``: optimizer state (SGD momentum) in the memory format of its parameter, for a
  run resumed with another --channels_last.

docs/gpu.md explains the choices (determinism trade-off, precision table).
"""
import hashlib
import os

import torch

# cuBLAS needs this set before its first use to be deterministic (CUDA documentation, "Reproducibility")
CUBLAS_DETERMINISTIC = ":4096:8"


def resolve_deterministic(value, device):
    """``--deterministic`` when not given (None): 0 on CUDA, 1 elsewhere.

    On CUDA, ``1`` cannot make training bit-identical (the backward of the U-Net's bilinear
    upsampling accumulates with atomics; docs/gpu.md) while it turns cuDNN autotuning off for every
    convolution, so the default there is speed; on the CPU the flag changes nothing (runs are
    bit-identical either way) and ``1`` is kept as the recorded value."""
    if value is not None:
        return int(value)
    return 0 if torch.device(device).type == "cuda" else 1


def backend_flags(deterministic, amp, device):
    """The process-wide settings of a run on ``device``:

    * ``cudnn_benchmark`` / ``cudnn_deterministic``: autotuned convolution algorithms, or
      deterministic ones (``deterministic`` 1);
    * ``deterministic_algorithms`` (CUDA and ``deterministic`` 1): torch's deterministic
      implementations wherever one exists, with a warning (not an error) for ops that have none;
    * ``conv_tf32``: fp32 convolutions may use TF32 on CUDA; False with ``amp`` 'off', so that
      '--amp off' means IEEE fp32 (TF32 keeps a 10-bit mantissa). Under bf16/fp16 autocast the
      convolutions run in the autocast type and the flag only concerns the few fp32 ones."""
    cuda = torch.device(device).type == "cuda"
    deterministic = bool(deterministic)
    return {"cudnn_benchmark": not deterministic, "cudnn_deterministic": deterministic,
            "deterministic_algorithms": cuda and deterministic, "conv_tf32": amp != "off"}


def set_conv_tf32(allowed, cudnn=None):
    """Allow or forbid TF32 in cuDNN fp32 convolutions: ``cudnn.conv.fp32_precision`` where torch has
    it (mixing it with the legacy flag is an error there), else the legacy ``cudnn.allow_tf32``.
    ``cudnn``: default ``torch.backends.cudnn``."""
    cudnn = torch.backends.cudnn if cudnn is None else cudnn
    conv = getattr(cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        conv.fp32_precision = "tf32" if allowed else "ieee"
    else:
        cudnn.allow_tf32 = allowed


def conv_tf32_allowed(cudnn=None):
    """Whether cuDNN fp32 convolutions may use TF32 now (either API, as ``set_conv_tf32``)."""
    cudnn = torch.backends.cudnn if cudnn is None else cudnn
    conv = getattr(cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        return conv.fp32_precision != "ieee"
    return bool(cudnn.allow_tf32)


def apply_backend_flags(flags):
    """Set what ``backend_flags`` returned (process-wide)."""
    torch.backends.cudnn.benchmark = flags["cudnn_benchmark"]
    torch.backends.cudnn.deterministic = flags["cudnn_deterministic"]
    if flags["deterministic_algorithms"]:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_DETERMINISTIC)
    torch.use_deterministic_algorithms(flags["deterministic_algorithms"], warn_only=True)
    set_conv_tf32(flags["conv_tf32"])


def current_backend_flags():
    """The settings ``apply_backend_flags`` controls, as they are now (for checks and the benchmark)."""
    return {"cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
            "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
            "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "conv_tf32": conv_tf32_allowed()}


def fit_generator_state(generator, state):
    """``(state for generator, note)``: ``state`` itself when it has the size of ``generator``'s own
    state (same device type; note None). Otherwise the state was saved on another device type,
    whose generator is another algorithm (Philox on CUDA, Mersenne Twister on the CPU), so it
    cannot be converted exactly: ``generator`` is re-seeded from a hash of the saved bytes
    (deterministic: the same checkpoint resumes the same way) and ``note`` is one line saying so."""
    own = generator.get_state()
    state = torch.as_tensor(state, dtype=torch.uint8).cpu()
    if state.numel() == own.numel():
        return state, None
    seed = int.from_bytes(hashlib.sha256(state.numpy().tobytes()).digest()[:8], "little") >> 1
    generator.manual_seed(seed)
    note = (f"a {state.numel()}-byte generator state was saved on another device type (this "
            f"{generator.device.type} generator's state is {own.numel()} bytes): re-seeded from it, so the "
            f"random draws after this resume differ from an uninterrupted run's")
    return generator.get_state(), note


def match_state_layout(optimizer):
    """Give every tensor of ``optimizer``'s state that has its parameter's shape (SGD's momentum
    buffer) the parameter's memory format, in place of the layout it was saved in (a run resumed
    with another --channels_last); values unchanged. Returns how many tensors were converted."""
    converted = 0
    for param, state in optimizer.state.items():
        for key, value in state.items():
            if (isinstance(value, torch.Tensor) and value.shape == param.shape
                    and value.stride() != param.stride()):
                state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)
                converted += 1
    return converted
