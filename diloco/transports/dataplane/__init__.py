"""The data plane: the payload bytes of a round on one TLS TCP stream per exchange.

grpc stays the control plane (join, deadlines, state); it issues a ticket per exchange, and
the payload itself travels here, at close to the socket's speed, into a fused
decode-and-accumulate on the coordinator. Modules (imported directly; this package imports
nothing, so `config` loads without torch):

    config       DataPlaneConfig: the server's limits and timeouts
    tickets      per-exchange tickets: HMAC-SHA256 under a key derived from the run token
    framing      the wire format (hello, trailer, answer) and bounded socket reads / writes
    tls          ssl contexts from the run's certificate, key and CA
    server       DataPlaneServer and the ExchangeSink protocol it calls
    client       DataPlaneClient: an island's exchange
    codec_chunks every codec's payload read and written one block-aligned chunk at a time
    accumulate   LockstepAccumulator: the weighted mean, bit-identical, chunk by chunk
    lockstep     LockstepExchange: the sink for one exchange group
"""
