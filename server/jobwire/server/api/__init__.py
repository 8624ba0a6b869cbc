"""The gRPC layer: translates jobwire.v1 messages to JobManager calls and domain errors to statuses.

The only package of the server that imports grpc or the generated code.
"""
