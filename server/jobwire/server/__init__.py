"""The Jobwire server: domain (job, state machine, scheduler, events, manager), stores, and the gRPC layer.

Dependencies run one way: ``api`` (gRPC) -> ``manager`` -> domain modules and the ``stores`` interface.
Nothing outside ``api`` imports grpc or protobuf; nothing outside ``stores`` speaks SQL.
"""
