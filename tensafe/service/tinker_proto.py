"""The Tinker protocol's protobuf messages: a forward_backward request in, ForwardBackwardOutput and
SampleResponse out. The schema is the one the official SDK ships (`tinker.proto.tinker_public_pb2`,
the `tensafe[service]` extra); nothing here retypes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from tensafe.service import wire
from tensafe.service.errors import UserFault

PROTOBUF = "application/x-protobuf"


def _pb() -> Any:
    try:
        from tinker.proto import tinker_public_pb2
    except ImportError:
        raise UserFault(
            415,
            "this service cannot read protobuf requests: install tensafe[service] "
            "(the tinker SDK's schema), or send JSON",
            code="protobuf_unavailable",
        ) from None
    return tinker_public_pb2


@dataclass(frozen=True)
class StepRequest:
    """A forward_backward (or forward) request, whatever its encoding."""

    model_id: str
    seq_id: int | None
    loss_fn: str
    loss_fn_config: dict[str, Any]
    forward_only: bool
    examples: list[wire.Example]


def _tensor(msg: Any, pb: Any, where: str) -> np.ndarray:
    dtypes = {pb.DTYPE_FLOAT32: np.float32, pb.DTYPE_INT64: np.int64, pb.DTYPE_INT32: np.int32}
    if msg.dtype not in dtypes:
        raise UserFault(400, f"{where}: tensor dtype {msg.dtype} is not float32, int64 or int32", param=where)
    if msg.HasField("sparse_csr"):
        raise UserFault(
            400, f"{where}: sparse tensors are not accepted; send a dense 1-D tensor", param=where
        )
    itemsize = np.dtype(dtypes[msg.dtype]).itemsize
    if len(msg.dense) % itemsize:
        raise UserFault(
            400, f"{where}: {len(msg.dense)} bytes is not a whole number of elements", param=where
        )
    array = np.frombuffer(msg.dense, dtype=dtypes[msg.dtype])
    shape = list(msg.shape)
    if shape and int(np.prod(shape)) != array.size:
        raise UserFault(400, f"{where}: shape {shape} does not match its {array.size} elements", param=where)
    if len(shape) > 1:
        raise UserFault(400, f"{where}: must be 1-D (one value per position), got shape {shape}", param=where)
    return array


def decode_step(body: bytes) -> StepRequest:
    """A protobuf ForwardBackwardRequest as a StepRequest; malformed bytes are a 400."""
    pb = _pb()
    msg = pb.ForwardBackwardRequest()
    try:
        msg.ParseFromString(body)
    except Exception as err:  # protobuf raises DecodeError (and others for truncated input)
        raise UserFault(
            400,
            f"the body is not a protobuf ForwardBackwardRequest ({type(err).__name__})",
            code="malformed_protobuf",
        ) from None
    examples = []
    for i, datum in enumerate(msg.data):
        tokens: list[int] = []
        for j, chunk in enumerate(datum.model_input):
            kind = chunk.WhichOneof("chunk")
            if kind != "encoded_text":
                raise UserFault(
                    400,
                    f"data[{i}].model_input[{j}]: only encoded_text chunks are accepted "
                    f"(got {kind}); this service trains text models",
                    param=f"data[{i}].model_input",
                )
            raw = chunk.encoded_text.tokens
            if len(raw) % 4:
                raise UserFault(400, f"data[{i}].model_input[{j}]: tokens are not int32s", param=f"data[{i}]")
            tokens += np.frombuffer(raw, dtype=np.int32).tolist()
        inputs = {
            name: _tensor(t, pb, f"data[{i}].loss_fn_inputs.{name}")
            for name, t in datum.loss_fn_inputs.items()
        }
        unknown = sorted(set(inputs) - {"target_tokens", "weights"})
        if unknown:
            raise UserFault(
                400,
                f"data[{i}].loss_fn_inputs: {unknown} are not inputs of cross_entropy "
                "(target_tokens, weights)",
                param=f"data[{i}].loss_fn_inputs",
            )
        if "target_tokens" not in inputs:
            raise UserFault(
                400, f"data[{i}].loss_fn_inputs.target_tokens is required", param=f"data[{i}].loss_fn_inputs"
            )
        weights = inputs.get("weights")
        examples.append(
            _example(
                i,
                tokens,
                inputs["target_tokens"].astype(np.int64).tolist(),
                None if weights is None else weights.astype(np.float64).tolist(),
            )
        )
    config: dict[str, Any] = {k: v for k, v in msg.loss_fn_config.items()}
    for key, value in msg.loss_fn_config_v2.items():
        config[key] = value.text if value.WhichOneof("value") == "text" else value.number
    return StepRequest(msg.model_id, msg.seq_id, msg.loss_fn, config, msg.forward_only, examples)


def _example(i: int, tokens: list[int], targets: list[int], weights: list[float] | None) -> wire.Example:
    if not tokens:
        raise UserFault(400, f"data[{i}]: the model input is empty", param=f"data[{i}].model_input")
    return wire.Example(tokens=tokens, target_tokens=targets, weights=weights)


def encode_step_result(result: wire.ForwardBackwardResult) -> bytes:
    """ForwardBackwardOutput: one ArrayRecord with every datum's fields batched (byte offsets)."""
    pb = _pb()
    out = pb.ForwardBackwardOutput(loss_fn_output_type=result.loss_fn_output_type)
    for key, value in result.metrics.items():
        out.metrics[key] = value
    record = out.loss_fn_outputs.add()
    record.num_datums = len(result.loss_fn_outputs)
    names = list(result.loss_fn_outputs[0]) if result.loss_fn_outputs else []
    for name in names:
        arrays = [np.asarray(d[name].data, dtype=np.float32) for d in result.loss_fn_outputs]
        offsets = np.concatenate([[0], np.cumsum([a.nbytes for a in arrays])]).astype(np.int64)
        field = record.fields[name]
        field.data = b"".join(a.tobytes() for a in arrays)
        field.offsets = offsets.tobytes()
        field.dtype = pb.DTYPE_FLOAT32
    return out.SerializeToString()


def encode_sample_result(result: wire.SampleResult) -> bytes:
    pb = _pb()
    out = pb.SampleResponse()
    reasons = {"stop": pb.STOP_REASON_STOP, "length": pb.STOP_REASON_LENGTH}
    for seq in result.sequences:
        out.sequences.add(
            stop_reason=reasons[seq.stop_reason],
            tokens=np.asarray(seq.tokens, dtype=np.int32).tobytes(),
            logprobs=np.asarray(seq.logprobs, dtype=np.float32).tobytes(),
        )
    return out.SerializeToString()
