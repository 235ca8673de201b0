"""TensorProto <-> numpy for the few dtypes the gateway handles, without running TensorFlow.

`image_batch` reads a request's string tensor and refuses a declared shape that does not match its content before
anything is allocated (a 108-byte TensorProto declaring 3,000 strings must not cost gigabytes).
"""

from __future__ import annotations

import numpy as np
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2

from serving.gateway.core import GatewayError

_NUMPY = {types_pb2.DT_FLOAT: np.float32, types_pb2.DT_DOUBLE: np.float64, types_pb2.DT_INT32: np.int32,
          types_pb2.DT_INT64: np.int64, types_pb2.DT_BOOL: np.bool_, types_pb2.DT_UINT8: np.uint8}
_FIELDS = {types_pb2.DT_FLOAT: "float_val", types_pb2.DT_DOUBLE: "double_val", types_pb2.DT_INT32: "int_val",
           types_pb2.DT_INT64: "int64_val", types_pb2.DT_BOOL: "bool_val", types_pb2.DT_UINT8: "int_val"}
_DTYPES = {np.dtype(v): k for k, v in _NUMPY.items()}


def image_batch(proto, max_images: int) -> list[bytes]:
    """A DT_STRING tensor of shape [N] (or a scalar) -> N encoded images; shape and content must agree."""
    if proto.dtype != types_pb2.DT_STRING:
        raise GatewayError("INVALID_ARGUMENT", "image_bytes must be a DT_STRING tensor of encoded images")
    dims = [d.size for d in proto.tensor_shape.dim]
    if len(dims) > 1:
        raise GatewayError("INVALID_ARGUMENT", f"image_bytes must have shape [N]; got rank {len(dims)}")
    if proto.tensor_content:
        raise GatewayError("INVALID_ARGUMENT", "image_bytes must use string_val, not tensor_content")
    count = len(proto.string_val)
    if dims and dims[0] != count:
        raise GatewayError("INVALID_ARGUMENT", f"image_bytes declares shape [{dims[0]}] but holds {count} values; "
                           "build it with tf.make_tensor_proto(list_of_bytes, dtype=tf.string)")
    if count > max_images:
        raise GatewayError("INVALID_ARGUMENT", f"{count} images in one request; send at most {max_images} "
                           "per request", reason="max_images")
    return list(proto.string_val)


def to_numpy(proto) -> np.ndarray:
    """An upstream output tensor -> numpy (float, int, bool or object array of bytes)."""
    shape = [d.size for d in proto.tensor_shape.dim]
    size = int(np.prod(shape)) if shape else 1
    if proto.dtype == types_pb2.DT_STRING:
        values = list(proto.string_val)
        array = np.empty(len(values), dtype=object)
        array[:] = values
        return array.reshape(shape) if len(values) == size else array
    dtype = _NUMPY.get(proto.dtype)
    if dtype is None:
        raise GatewayError("INTERNAL", f"the upstream model returned an unsupported dtype {proto.dtype}")
    if proto.tensor_content:
        return np.frombuffer(proto.tensor_content, dtype=dtype).reshape(shape).copy()
    values = np.asarray(getattr(proto, _FIELDS[proto.dtype]), dtype=dtype)
    if values.size == size:
        return values.reshape(shape)
    if values.size == 1:  # TF's compact form: one value repeated
        return np.full(shape, values[0], dtype=dtype)
    return values


def from_numpy(array: np.ndarray):
    array = np.asarray(array)
    proto = tensor_pb2.TensorProto(tensor_shape=tensor_shape_pb2.TensorShapeProto(
        dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in array.shape]))
    if array.dtype == object or array.dtype.kind in "SU":
        proto.dtype = types_pb2.DT_STRING
        proto.string_val.extend(v if isinstance(v, bytes) else str(v).encode() for v in array.reshape(-1))
        return proto
    dtype = _DTYPES.get(array.dtype)
    if dtype is None:
        array = array.astype(np.float32)
        dtype = types_pb2.DT_FLOAT
    proto.dtype = dtype
    proto.tensor_content = np.ascontiguousarray(array).tobytes()
    return proto


def string_tensor(values: list[bytes]):
    proto = tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING, tensor_shape=tensor_shape_pb2.TensorShapeProto(
        dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=len(values))]))
    proto.string_val.extend(values)
    return proto
