"""gRPC protocols between pd processes: .proto files in proto/pd/rpc, generated modules here."""

# Version of pd's wire protocol (every service in proto/pd/rpc). Bump it on any change that an
# older peer would misread; the bootstrap registry refuses ranks of another version.
PROTOCOL_VERSION = 1
