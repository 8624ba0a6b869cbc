"""Generated gRPC code for jobwire.v1. Do not edit: run scripts/generate_protos.py."""
