"""Silero VAD v5 (16 kHz) rebuilt as a few large matrix products, for batches of streams.

Why: onnxruntime runs a ``Conv`` one batch row at a time, and Silero's convolutions are tiny
(the STFT has 4 output frames, the encoder 4, 2, 1 and 1): at batch 256 every row is a GEMM
with N = 4, and the shipped graph spends ~65 us per row, 85% of it in four Conv nodes. The same
arithmetic as batch-wide GEMMs is several times cheaper, and batching across streams is the whole
point of the VAD stage.

What: the weights are read from the package's ``silero_vad.onnx`` (its 16 kHz branch), so the
ONNX file stays the only source of the model. The graph computes exactly what the 16 kHz branch
does, with the same interface: ``input`` ``[B, 576]``, ``state`` ``[2, B, 128]`` and ``sr`` ->
``output`` ``[B, 1]`` and ``stateN``. ``sr`` is accepted so callers need not know which graph they
run, and not read: this graph is the 16 kHz branch only, and our audio is always 16 kHz.

- STFT: reflection-pad 64 samples on the right, 4 windows of 256 with hop 128, a 258-filter
  projection (real and imaginary parts of 129 bins), magnitude. The 640 padded samples are 5
  blocks of 128 and window ``t`` is blocks ``t`` and ``t + 1``, so the projection is two
  ``MatMul`` over blocks 0-3 and 1-4 (with each half of the filters), added. Cutting windows
  with a ``Gather`` instead costs more than the projection itself.
- Encoder: four Conv1d(k=3, pad=1) + ReLU layers over 4 -> 4 -> 2 -> 1 -> 1 time steps. With so
  few steps each layer is a linear map of the flattened ``(time, channel)`` features, so it is
  one dense ``MatMul`` (zeros where the kernel does not reach) plus bias.
- Decoder: one LSTM cell step (PyTorch gate order i, f, g, o) as one ``MatMul`` over
  ``[x, h]``, then ReLU, the 1x1 conv and a sigmoid.

Only the order of float additions changes, so probabilities agree with the shipped graph to
~1e-5 (tested on speech, together with the segments the VAD finds).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from service.vad import onnx_proto as pb

SAMPLES = 576  # 64 samples of context + a 512-sample frame
WINDOW, HOP, PAD, BINS = 256, 128, 64, 129
STEPS = 4  # STFT windows over SAMPLES + PAD
HIDDEN = 128

# Names of the 16 kHz branch's tensors in silero_vad.onnx (v5).
_PREFIX = "If_0_then_branch__Inline_0__"
_STFT = "stft.forward_basis_buffer"
_CONV = "encoder.{}.reparam_conv.{}"
_LSTM = "decoder.rnn.{}"
_HEAD = "decoder.decoder.2.{}"

Floats = npt.NDArray[np.float32]


def silero_weights(model: bytes) -> dict[str, Floats]:
    """The 16 kHz weights of a Silero v5 ``.onnx`` file, by their PyTorch names."""
    tensors = pb.read_tensors(model)
    names = [_STFT, _HEAD.format("weight"), _HEAD.format("bias")]
    names += [_CONV.format(i, part) for i in range(4) for part in ("weight", "bias")]
    names += [_LSTM.format(part) for part in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
    weights: dict[str, Floats] = {}
    for name in names:
        array = tensors.get(_PREFIX + name)
        if array is None:
            raise ValueError(f"not a Silero v5 model: tensor {_PREFIX + name!r} is missing")
        weights[name] = np.asarray(array, dtype=np.float32)
    return weights


def dense_conv(weight: Floats, steps_in: int, stride: int) -> Floats:
    """Conv1d(k=3, padding=1, ``stride``) over ``steps_in`` steps as a matrix from flattened
    ``(step, in channel)`` to flattened ``(step, out channel)`` features."""
    out_ch, in_ch, kernel = weight.shape
    steps_out = (steps_in + 2 - kernel) // stride + 1
    dense = np.zeros((steps_in, in_ch, steps_out, out_ch), dtype=np.float32)
    for t in range(steps_out):
        for k in range(kernel):
            source = t * stride + k - 1  # padding=1
            if 0 <= source < steps_in:
                dense[source, :, t, :] = weight[:, :, k].T
    return dense.reshape(steps_in * in_ch, steps_out * out_ch)


def build(weights: dict[str, Floats]) -> bytes:
    """The serialized ONNX model (see the module docstring)."""
    basis = weights[_STFT][:, 0, :]  # [258, 256]: 129 real filters, then 129 imaginary
    init = [
        pb.tensor("pad_right", np.array([0, 0, 0, PAD])),
        pb.tensor("as_blocks", np.array([-1, STEPS + 1, HOP])),
        pb.tensor("block0", np.array([0])),
        pb.tensor("block1", np.array([1])),
        pb.tensor("block4", np.array([STEPS])),
        pb.tensor("block5", np.array([STEPS + 1])),
        pb.tensor("stft_first", basis[:, :HOP].T),  # [128, 258]: applied to block t
        pb.tensor("stft_second", basis[:, HOP:].T),  # applied to block t + 1
        pb.tensor("split_bins", np.array([BINS, BINS])),
        pb.tensor("flat_mag", np.array([-1, STEPS * BINS])),
        pb.tensor("zero", np.array([0])),
        pb.tensor("one", np.array([1])),
        pb.tensor("split_gates", np.array([HIDDEN] * 4)),
    ]
    nodes = [
        pb.node(
            "Pad",
            ["input", "pad_right"],
            ["padded"],
            attributes=[pb.attribute_str("mode", "reflect")],
        ),
        pb.node("Reshape", ["padded", "as_blocks"], ["blocks"]),  # [B, 5, 128]
        pb.node("Slice", ["blocks", "block0", "block4", "one"], ["firsts"]),  # blocks 0-3
        pb.node("Slice", ["blocks", "block1", "block5", "one"], ["seconds"]),  # blocks 1-4
        pb.node("MatMul", ["firsts", "stft_first"], ["spectrum_a"]),
        pb.node("MatMul", ["seconds", "stft_second"], ["spectrum_b"]),
        pb.node("Add", ["spectrum_a", "spectrum_b"], ["spectrum"]),  # [B, 4, 258]
        pb.node(
            "Split",
            ["spectrum", "split_bins"],
            ["real", "imag"],
            attributes=[pb.attribute_int("axis", 2)],
        ),
        pb.node("Mul", ["real", "real"], ["real2"]),
        pb.node("Mul", ["imag", "imag"], ["imag2"]),
        pb.node("Add", ["real2", "imag2"], ["power"]),
        pb.node("Sqrt", ["power"], ["magnitude"]),
        pb.node("Reshape", ["magnitude", "flat_mag"], ["enc_in"]),  # [B, 4*129], (step, bin)
    ]
    steps, features = STEPS, "enc_in"
    for i, stride in enumerate((1, 2, 2, 1)):
        weight = weights[_CONV.format(i, "weight")]
        bias = weights[_CONV.format(i, "bias")]
        steps_out = (steps - 1) // stride + 1
        init.append(pb.tensor(f"enc{i}_w", dense_conv(weight, steps, stride)))
        init.append(pb.tensor(f"enc{i}_b", np.tile(bias, steps_out)))
        nodes += [
            pb.node("MatMul", [features, f"enc{i}_w"], [f"enc{i}_mm"]),
            pb.node("Add", [f"enc{i}_mm", f"enc{i}_b"], [f"enc{i}_pre"]),
            pb.node("Relu", [f"enc{i}_pre"], [f"enc{i}"]),
        ]
        steps, features = steps_out, f"enc{i}"
    assert steps == 1
    w_ih, w_hh = weights[_LSTM.format("weight_ih")], weights[_LSTM.format("weight_hh")]
    init += [
        pb.tensor("lstm_w", np.concatenate([w_ih, w_hh], axis=1).T),  # [256, 512]
        pb.tensor("lstm_b", weights[_LSTM.format("bias_ih")] + weights[_LSTM.format("bias_hh")]),
        pb.tensor("head_w", weights[_HEAD.format("weight")][0]),  # [128, 1]
        pb.tensor("head_b", weights[_HEAD.format("bias")]),
    ]
    nodes += [
        pb.node("Gather", ["state", "zero"], ["h3"], attributes=[pb.attribute_int("axis", 0)]),
        pb.node("Gather", ["state", "one"], ["c3"], attributes=[pb.attribute_int("axis", 0)]),
        pb.node("Squeeze", ["h3", "zero"], ["h"]),
        pb.node("Squeeze", ["c3", "zero"], ["c"]),
        pb.node("Concat", [features, "h"], ["xh"], attributes=[pb.attribute_int("axis", 1)]),
        pb.node("MatMul", ["xh", "lstm_w"], ["gates_mm"]),
        pb.node("Add", ["gates_mm", "lstm_b"], ["gates"]),
        pb.node(
            "Split",
            ["gates", "split_gates"],
            ["gate_i", "gate_f", "gate_g", "gate_o"],
            attributes=[pb.attribute_int("axis", 1)],
        ),
        pb.node("Sigmoid", ["gate_i"], ["i"]),
        pb.node("Sigmoid", ["gate_f"], ["f"]),
        pb.node("Tanh", ["gate_g"], ["g"]),
        pb.node("Sigmoid", ["gate_o"], ["o"]),
        pb.node("Mul", ["f", "c"], ["fc"]),
        pb.node("Mul", ["i", "g"], ["ig"]),
        pb.node("Add", ["fc", "ig"], ["c_new"]),
        pb.node("Tanh", ["c_new"], ["c_act"]),
        pb.node("Mul", ["o", "c_act"], ["h_new"]),
        pb.node("Relu", ["h_new"], ["h_relu"]),
        pb.node("MatMul", ["h_relu", "head_w"], ["logit_mm"]),
        pb.node("Add", ["logit_mm", "head_b"], ["logit"]),
        pb.node("Sigmoid", ["logit"], ["output"]),
        pb.node("Unsqueeze", ["h_new", "zero"], ["h_out"]),
        pb.node("Unsqueeze", ["c_new", "zero"], ["c_out"]),
        pb.node("Concat", ["h_out", "c_out"], ["stateN"], attributes=[pb.attribute_int("axis", 0)]),
    ]
    return pb.model(
        nodes=nodes,
        initializers=init,
        inputs=[
            pb.value_info("input", ["batch", SAMPLES]),
            pb.value_info("state", [2, "batch", HIDDEN]),
            pb.value_info("sr", [], pb.INT64),
        ],
        outputs=[
            pb.value_info("output", ["batch", 1]),
            pb.value_info("stateN", [2, "batch", HIDDEN]),
        ],
        name="silero_vad_v5_16k_dense",
    )
