"""Where `diloco-island status` reads a remote run: the grpc coordinator's `Status` call (with
the run token, over TLS unless grpc.insecure), or the DHT records hivemind islands publish."""

from __future__ import annotations

from typing import TYPE_CHECKING

from diloco.status import StatusSnapshot, StatusUnavailable

if TYPE_CHECKING:
    from diloco.config import IslandConfig

STATUS_TIMEOUT_S = 10.0


def fetch_coordinator(config: IslandConfig) -> StatusSnapshot:
    """The coordinator's status document.

    Raises:
        StatusUnavailable: unreachable, TLS or token refused, or an answer that is not one.
    """
    import grpc

    from diloco.transports.grpc import coordinator_pb2 as pb
    from diloco.transports.grpc import coordinator_pb2_grpc as pb_grpc
    from diloco.transports.grpc.security import (
        TLS_TARGET_NAME,
        channel_credentials,
        read_token,
        token_metadata,
    )

    settings = config.transport.grpc
    token = read_token(settings)
    credentials = channel_credentials(settings)
    address = settings.address
    if credentials is None:
        channel = grpc.insecure_channel(address)
    else:
        options = [("grpc.ssl_target_name_override", TLS_TARGET_NAME)]
        channel = grpc.secure_channel(address, credentials, options=options)
    stub = pb_grpc.CoordinatorStub(channel)  # type: ignore[no-untyped-call]
    try:
        reply = stub.Status(
            pb.StatusRequest(), metadata=token_metadata(token), timeout=STATUS_TIMEOUT_S
        )
    except grpc.RpcError as error:
        code = error.code() if hasattr(error, "code") else None
        if code == grpc.StatusCode.UNAUTHENTICATED:
            raise StatusUnavailable(
                f"the coordinator at {address} refused the run token "
                f"(${settings.token_env} or transport.grpc.token_file)"
            ) from None
        details = (error.details() if hasattr(error, "details") else "") or str(code)
        raise StatusUnavailable(f"the coordinator at {address} is unreachable: {details}") from None
    finally:
        channel.close()
    try:
        return StatusSnapshot.from_json(reply.json)
    except (ValueError, KeyError, TypeError) as error:
        raise StatusUnavailable(
            f"the coordinator at {address} answered no status document ({error})"
        ) from None


fetch_hivemind = None
"""Reading a hivemind run's status from the DHT: not wired yet (a run's islands' own
run.dir/island-*/metrics.jsonl can be read with transport.kind=torch meanwhile)."""
