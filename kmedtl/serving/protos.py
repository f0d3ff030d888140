"""TF Serving config messages that the ``tensorflow-serving-api`` wheel does not ship.

The wheel holds ``model_server_config_pb2`` (``--model_config_file``) but neither
``monitoring_config.proto`` (``--monitoring_config_file``) nor ``BatchingParameters``
from ``session_bundle_config.proto`` (``--batching_parameters_file``).  They are rebuilt
here, field for field (names, numbers, types) from the upstream ``.proto`` files of
tensorflow/serving, in a private descriptor pool, so ``serving/*.config`` are checked
with ``google.protobuf.text_format`` exactly as the server parses them.

Example::

    >>> from google.protobuf import text_format
    >>> cfg = text_format.Parse("prometheus_config { enable: true path: '/m' }",
    ...                         MonitoringConfig())
    >>> cfg.prometheus_config.path
    '/m'
"""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, wrappers_pb2

_F = descriptor_pb2.FieldDescriptorProto


def _field(name, number, ftype, type_name=None, repeated=False):
    f = _F(name=name, number=number, type=ftype,
           label=_F.LABEL_REPEATED if repeated else _F.LABEL_OPTIONAL)
    if type_name:
        f.type_name = type_name
    return f


def _pool():
    pool = descriptor_pool.DescriptorPool()
    pool.Add(descriptor_pb2.FileDescriptorProto.FromString(wrappers_pb2.DESCRIPTOR.serialized_pb))
    mon = descriptor_pb2.FileDescriptorProto(
        name="tensorflow_serving/config/monitoring_config.proto",
        package="tensorflow.serving", syntax="proto3")
    mon.message_type.add(name="PrometheusConfig").field.extend([
        _field("enable", 1, _F.TYPE_BOOL), _field("path", 2, _F.TYPE_STRING)])
    mon.message_type.add(name="MonitoringConfig").field.extend([
        _field("prometheus_config", 1, _F.TYPE_MESSAGE, ".tensorflow.serving.PrometheusConfig")])
    pool.Add(mon)
    bat = descriptor_pb2.FileDescriptorProto(
        name="tensorflow_serving/servables/tensorflow/session_bundle_config.proto",
        package="tensorflow.serving", syntax="proto3",
        dependency=["google/protobuf/wrappers.proto"])
    i64, s = ".google.protobuf.Int64Value", ".google.protobuf.StringValue"
    bat.message_type.add(name="BatchingParameters").field.extend([
        _field("max_batch_size", 1, _F.TYPE_MESSAGE, i64),
        _field("batch_timeout_micros", 2, _F.TYPE_MESSAGE, i64),
        _field("max_enqueued_batches", 3, _F.TYPE_MESSAGE, i64),
        _field("num_batch_threads", 4, _F.TYPE_MESSAGE, i64),
        _field("thread_pool_name", 5, _F.TYPE_MESSAGE, s),
        _field("allowed_batch_sizes", 6, _F.TYPE_INT64, repeated=True),
        _field("pad_variable_length_inputs", 7, _F.TYPE_BOOL)])
    pool.Add(bat)
    return pool


_POOL = _pool()
MonitoringConfig = message_factory.GetMessageClass(
    _POOL.FindMessageTypeByName("tensorflow.serving.MonitoringConfig"))
BatchingParameters = message_factory.GetMessageClass(
    _POOL.FindMessageTypeByName("tensorflow.serving.BatchingParameters"))
