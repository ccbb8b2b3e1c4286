"""The collector: proxy nodes' event streams in, committed PostgreSQL rows and acks out.

`server` runs the gRPC server, `servicer` speaks the `traffic.v1.IngestService` stream,
`normalize` turns wire messages into rows, `publisher` batches them into the database, and
`main` wires them together for `socks5-analytics collector`.
"""
