"""The hand-written protobuf reader and writer, against onnxruntime and silero_vad.onnx."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from service.vad import onnx_proto as pb
from service.vad.silero import model_path


def test_written_model_runs_and_reads_back() -> None:
    weight = np.arange(6, dtype=np.float32).reshape(2, 3) - 2.5
    shape = np.array([-1, 3])  # a negative int64 needs the ten-byte varint
    model = pb.model(
        nodes=[
            pb.node("Reshape", ["x", "shape"], ["flat"]),
            pb.node("Add", ["flat", "weight"], ["sum"]),
            pb.node("Relu", ["sum"], ["y"]),
        ],
        initializers=[pb.tensor("weight", weight), pb.tensor("shape", shape)],
        inputs=[pb.value_info("x", ["batch", 2, 3])],
        outputs=[pb.value_info("y", ["rows", 3])],
        name="test",
    )
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    x = np.ones((1, 2, 3), dtype=np.float32)
    (y,) = session.run(None, {"x": x})
    np.testing.assert_array_equal(y, np.maximum(x.reshape(-1, 3) + weight, 0))

    tensors = pb.read_tensors(model)
    np.testing.assert_array_equal(tensors["weight"], weight)
    np.testing.assert_array_equal(tensors["shape"], shape)
    assert tensors["weight"].dtype == np.float32 and tensors["shape"].dtype == np.int64


def test_reads_silero_weights_from_subgraphs_and_constants() -> None:
    tensors = pb.read_tensors(model_path().read_bytes())
    prefix = "If_0_then_branch__Inline_0__"  # the 16 kHz branch of the If node
    assert tensors[prefix + "stft.forward_basis_buffer"].shape == (258, 1, 256)
    assert tensors[prefix + "decoder.rnn.weight_ih"].shape == (512, 128)
    # Biases of two encoder layers are Constant nodes, not initializers.
    assert tensors[prefix + "encoder.1.reparam_conv.bias"].shape == (64,)
