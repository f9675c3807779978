"""Silero VAD v5 (16 kHz) rebuilt as a few large matrix products, for batches of streams.

Why: onnxruntime runs a ``Conv`` one batch row at a time, and Silero's convolutions are tiny
(the STFT has 4 output frames, the encoder 4, 2, 1 and 1): at batch 256 every row is a GEMM
with N = 4, and the shipped graph spends ~65 us per row, 85% of it in four Conv nodes. The same
arithmetic as batch-wide GEMMs is several times cheaper, and batching across streams is the whole
point of the VAD stage.

What: the weights are read from the package's ``silero_vad.onnx`` (its 16 kHz branch), so the
ONNX file stays the only source of the model. The graph computes exactly what the 16 kHz branch
does, for ``K`` consecutive frames of each of ``B`` streams in one run: ``input``
``[B, K, 576]`` (each frame with the 64 samples before it), ``state`` ``[2, B, 128]`` and
``lengths`` ``[B]`` int32 (stream ``b`` has ``lengths[b]`` frames, the rest is padding) ->
``output`` ``[B, K]`` and ``stateN`` (each stream's state after its last frame). One run for all
the frames of a batch means one release of the GIL by the VAD thread instead of one per frame
step, and bigger matrix products:

- STFT: reflection-pad 64 samples on the right, 4 windows of 256 with hop 128, a 258-filter
  projection (real and imaginary parts of 129 bins), magnitude. The 640 padded samples are 5
  blocks of 128 and window ``t`` is blocks ``t`` and ``t + 1``, so the projection is two
  ``MatMul`` over blocks 0-3 and 1-4 (with each half of the filters), added. Cutting windows
  with a ``Gather`` instead costs more than the projection itself.
- Encoder: four Conv1d(k=3, pad=1) + ReLU layers over 4 -> 4 -> 2 -> 1 -> 1 time steps. With so
  few steps each layer is a linear map of the flattened ``(time, channel)`` features, so it is
  one dense ``MatMul`` (zeros where the kernel does not reach) plus bias.
- Encoder and head run on all ``B * K`` frames at once; only the LSTM is sequential: one ONNX
  ``LSTM`` node over the ``K`` steps, with ``sequence_lens`` so padding never reaches a state.

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


def _axis(axis: int) -> bytes:
    return pb.attribute_int("axis", axis)


def _perm(*perm: int) -> bytes:
    return pb.attribute_ints("perm", perm)


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
        pb.tensor("flat_frames", np.array([-1, SAMPLES])),
    ]
    nodes = [
        pb.node("Reshape", ["input", "flat_frames"], ["frames"]),  # [B*K, 576]
        pb.node(
            "Pad",
            ["frames", "pad_right"],
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
    # ONNX's LSTM orders the gates i, o, f, c; PyTorch's cell i, f, g(=c), o.
    order = [0, 3, 1, 2]

    def gates(array: Floats) -> Floats:
        return np.concatenate([np.split(array, 4)[g] for g in order])

    init += [
        pb.tensor("lstm_w", gates(weights[_LSTM.format("weight_ih")])[None]),  # [1, 512, 128]
        pb.tensor("lstm_r", gates(weights[_LSTM.format("weight_hh")])[None]),
        pb.tensor(
            "lstm_b",
            np.concatenate(
                [gates(weights[_LSTM.format("bias_ih")]), gates(weights[_LSTM.format("bias_hh")])]
            )[None],
        ),
        pb.tensor("head_w", weights[_HEAD.format("weight")][0]),  # [128, 1]
        pb.tensor("head_b", weights[_HEAD.format("bias")]),
        pb.tensor("two", np.array([2])),
        pb.tensor("hidden", np.array([HIDDEN])),
    ]
    nodes += [
        # Back to [B, K, 128], then time-major for the LSTM: [K, B, 128].
        pb.node("Shape", ["input"], ["input_shape"]),
        pb.node("Slice", ["input_shape", "zero", "two"], ["batch_steps"]),
        pb.node("Concat", ["batch_steps", "hidden"], ["seq_shape"], attributes=[_axis(0)]),
        pb.node("Reshape", [features, "seq_shape"], ["encoded"]),
        pb.node("Transpose", ["encoded"], ["sequence"], attributes=[_perm(1, 0, 2)]),
        pb.node("Slice", ["state", "zero", "one"], ["h0"]),  # [1, B, 128]
        pb.node("Slice", ["state", "one", "two"], ["c0"]),
        pb.node(
            "LSTM",
            ["sequence", "lstm_w", "lstm_r", "lstm_b", "lengths", "h0", "c0"],
            ["hs", "h_last", "c_last"],
            attributes=[pb.attribute_int("hidden_size", HIDDEN)],
        ),
        pb.node("Squeeze", ["hs", "one"], ["hs3"]),  # [K, 1, B, 128] -> [K, B, 128]
        pb.node("Relu", ["hs3"], ["h_relu"]),
        pb.node("MatMul", ["h_relu", "head_w"], ["logit_mm"]),  # [K, B, 1]
        pb.node("Add", ["logit_mm", "head_b"], ["logit"]),
        pb.node("Sigmoid", ["logit"], ["prob3"]),
        pb.node("Squeeze", ["prob3", "two"], ["prob_kb"]),
        pb.node("Transpose", ["prob_kb"], ["output"], attributes=[_perm(1, 0)]),  # [B, K]
        pb.node("Concat", ["h_last", "c_last"], ["stateN"], attributes=[_axis(0)]),
    ]
    return pb.model(
        nodes=nodes,
        initializers=init,
        inputs=[
            pb.value_info("input", ["batch", "steps", SAMPLES]),
            pb.value_info("state", [2, "batch", HIDDEN]),
            pb.value_info("lengths", ["batch"], pb.INT32),
        ],
        outputs=[
            pb.value_info("output", ["batch", "steps"]),
            pb.value_info("stateN", [2, "batch", HIDDEN]),
        ],
        name="silero_vad_v5_16k_dense",
    )
