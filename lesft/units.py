"""Units and names that the meters, the wire, the plan and the reports share (imports nothing heavy)."""

MB = 1 << 20  # bytes in a mebibyte: the "MB" of every byte count and memory figure lesft prints
#: the four directions in which bytes are counted (``Meter``, ``summary.json`` ``comm_bytes``)
DIRECTIONS = ("client_to_server", "server_to_client", "client_to_aggregator", "aggregator_to_client")
