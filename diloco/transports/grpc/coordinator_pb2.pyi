from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JoinRequest(_message.Message):
    __slots__ = ("run_id", "rank", "fingerprint", "session", "host")
    class FingerprintEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    rank: int
    fingerprint: _containers.ScalarMap[str, str]
    session: str
    host: str
    def __init__(self, run_id: _Optional[str] = ..., rank: _Optional[int] = ..., fingerprint: _Optional[_Mapping[str, str]] = ..., session: _Optional[str] = ..., host: _Optional[str] = ...) -> None: ...

class JoinReply(_message.Message):
    __slots__ = ("round", "has_state", "islands_active", "session")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    HAS_STATE_FIELD_NUMBER: _ClassVar[int]
    ISLANDS_ACTIVE_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    round: int
    has_state: bool
    islands_active: int
    session: str
    def __init__(self, round: _Optional[int] = ..., has_state: _Optional[bool] = ..., islands_active: _Optional[int] = ..., session: _Optional[str] = ...) -> None: ...

class AverageHeader(_message.Message):
    __slots__ = ("run_id", "rank", "round", "weight", "params_sha256", "payload_bytes", "metrics")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    PARAMS_SHA256_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    rank: int
    round: int
    weight: float
    params_sha256: str
    payload_bytes: int
    metrics: _containers.ScalarMap[str, float]
    def __init__(self, run_id: _Optional[str] = ..., rank: _Optional[int] = ..., round: _Optional[int] = ..., weight: _Optional[float] = ..., params_sha256: _Optional[str] = ..., payload_bytes: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...

class TensorSpec(_message.Message):
    __slots__ = ("name", "dtype", "numel")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    NUMEL_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    numel: int
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., numel: _Optional[int] = ...) -> None: ...

class AverageReply(_message.Message):
    __slots__ = ("round", "participants", "params_sha256", "payload_bytes", "adopt", "late", "state", "ticket", "dataplane_port")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANTS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_SHA256_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    ADOPT_FIELD_NUMBER: _ClassVar[int]
    LATE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    TICKET_FIELD_NUMBER: _ClassVar[int]
    DATAPLANE_PORT_FIELD_NUMBER: _ClassVar[int]
    round: int
    participants: int
    params_sha256: str
    payload_bytes: int
    adopt: bool
    late: bool
    state: StateHeader
    ticket: bytes
    dataplane_port: int
    def __init__(self, round: _Optional[int] = ..., participants: _Optional[int] = ..., params_sha256: _Optional[str] = ..., payload_bytes: _Optional[int] = ..., adopt: _Optional[bool] = ..., late: _Optional[bool] = ..., state: _Optional[_Union[StateHeader, _Mapping]] = ..., ticket: _Optional[bytes] = ..., dataplane_port: _Optional[int] = ...) -> None: ...

class StateRequest(_message.Message):
    __slots__ = ("run_id", "rank", "round", "params_sha256")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PARAMS_SHA256_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    rank: int
    round: int
    params_sha256: str
    def __init__(self, run_id: _Optional[str] = ..., rank: _Optional[int] = ..., round: _Optional[int] = ..., params_sha256: _Optional[str] = ...) -> None: ...

class StateHeader(_message.Message):
    __slots__ = ("round", "numel", "params_sha256", "has_state", "same", "run_id", "rank", "tensors")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    NUMEL_FIELD_NUMBER: _ClassVar[int]
    PARAMS_SHA256_FIELD_NUMBER: _ClassVar[int]
    HAS_STATE_FIELD_NUMBER: _ClassVar[int]
    SAME_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    round: int
    numel: int
    params_sha256: str
    has_state: bool
    same: bool
    run_id: str
    rank: int
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    def __init__(self, round: _Optional[int] = ..., numel: _Optional[int] = ..., params_sha256: _Optional[str] = ..., has_state: _Optional[bool] = ..., same: _Optional[bool] = ..., run_id: _Optional[str] = ..., rank: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("average", "reply", "state", "data")
    AVERAGE_FIELD_NUMBER: _ClassVar[int]
    REPLY_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    average: AverageHeader
    reply: AverageReply
    state: StateHeader
    data: bytes
    def __init__(self, average: _Optional[_Union[AverageHeader, _Mapping]] = ..., reply: _Optional[_Union[AverageReply, _Mapping]] = ..., state: _Optional[_Union[StateHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class PutStateReply(_message.Message):
    __slots__ = ("accepted", "round")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    round: int
    def __init__(self, accepted: _Optional[bool] = ..., round: _Optional[int] = ...) -> None: ...

class LeaveRequest(_message.Message):
    __slots__ = ("run_id", "rank")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    rank: int
    def __init__(self, run_id: _Optional[str] = ..., rank: _Optional[int] = ...) -> None: ...

class LeaveReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("json",)
    JSON_FIELD_NUMBER: _ClassVar[int]
    json: str
    def __init__(self, json: _Optional[str] = ...) -> None: ...
