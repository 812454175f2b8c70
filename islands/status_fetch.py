"""Where `diloco-island status` reads a remote run: the grpc coordinator's `Status` call (with
the run token, over TLS unless grpc.insecure), or the status records hivemind islands publish
in their DHT (diloco/transports/hivemind/status.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from diloco.status import RunUnreachable, StatusSnapshot, StatusUnavailable

if TYPE_CHECKING:
    from diloco.config import IslandConfig

STATUS_TIMEOUT_S = 10.0


def fetch_coordinator(config: IslandConfig) -> StatusSnapshot:
    """The coordinator's status document.

    Raises:
        RunUnreachable: nothing answers at grpc.address (or not within STATUS_TIMEOUT_S).
        StatusUnavailable: TLS or the token refused, or an answer that is not a status.
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
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            raise RunUnreachable(
                f"the coordinator at {address} is unreachable: {details}"
            ) from None
        raise StatusUnavailable(
            f"the coordinator at {address} refused the Status call: {details}"
        ) from None
    finally:
        channel.close()
    try:
        return StatusSnapshot.from_json(reply.json)
    except (ValueError, KeyError, TypeError) as error:
        raise StatusUnavailable(
            f"the coordinator at {address} answered no status document ({error})"
        ) from None


def fetch_hivemind(config: IslandConfig) -> StatusSnapshot:
    """The run's status from the records its islands publish in the DHT, read by a client
    node that joins through transport.hivemind's initial peers (or island 0's address file),
    with the run token when one is set.

    Raises:
        RunUnreachable: no peer configured, or none answers.
        StatusUnavailable: no island published its status (with a valid tag), or hivemind is
            not installed.
    """
    try:
        from diloco.transports.hivemind.auth import read_run_token
        from diloco.transports.hivemind.status import read_status
    except ImportError as error:
        raise StatusUnavailable(
            f"reading a hivemind run needs hivemind ({error}): pip install -e '.[hivemind]'"
        ) from None
    from islands.status import describe_run

    settings = config.transport.hivemind
    return read_status(settings, describe_run(config), read_run_token(settings))
