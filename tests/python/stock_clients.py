"""A stock gRPC client of the agent's API: Python's grpcio and grpcio-reflection, as a Python user
would write it, with no stubs generated from limiter.proto (the messages come from the agent's
reflection service, v1alpha, the version grpcio-reflection speaks).

Run by tests/tests/stock_clients.rs with the venv that `cargo xtask setup` makes
(/opt/limiter-grpcio). Prints one JSON object on stdout:

    stock_clients.py TARGET [--authority A] [--token-file F] services
        {"services": [...]}                      the services reflection lists
    stock_clients.py TARGET [--authority A] [--token-file F] check CLIENT HITS
        {"allowed": ..., "limit": ..., "remaining": ..., "policy": ...}
    stock_clients.py TARGET [--authority A] [--token-file F] raw-check
        a Check with an empty request, without reflection

A failed call prints {"error": "STATUS_CODE", "details": "..."} instead and exits 0, so that the
test can assert what the failure was.

TARGET is a gRPC target: unix:/path/to/api.sock or 127.0.0.1:PORT.
"""

import argparse
import json
import sys

import grpc
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

CALL_TIMEOUT_S = 10
CHECK = "/limiter.v1.RateLimiter/Check"


class Bearer(grpc.UnaryUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds `authorization: Bearer TOKEN` to every call (reflection's included)."""

    def __init__(self, token):
        self._metadata = (("authorization", f"Bearer {token}"),)

    def _details(self, details):
        metadata = tuple(details.metadata or ()) + self._metadata
        return details._replace(metadata=metadata)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_stream(self, continuation, details, requests):
        return continuation(self._details(details), requests)


def channel(args):
    options = []
    if args.authority:
        # The one-line option the README documents for grpc-core clients on the Unix socket.
        options.append(("grpc.default_authority", args.authority))
    ch = grpc.insecure_channel(args.target, options=options)
    if args.token_file:
        with open(args.token_file, encoding="utf-8") as f:
            ch = grpc.intercept_channel(ch, Bearer(f.read().strip()))
    return ch


def services(ch):
    db = ProtoReflectionDescriptorDatabase(ch)
    return {"services": sorted(db.get_services())}


def check(ch, client, hits):
    pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(ch))
    method = pool.FindMethodByName("limiter.v1.RateLimiter.Check")
    request_class = message_factory.GetMessageClass(method.input_type)
    response_class = message_factory.GetMessageClass(method.output_type)
    call = ch.unary_unary(
        CHECK,
        request_serializer=request_class.SerializeToString,
        response_deserializer=response_class.FromString,
    )
    response = call(request_class(client_id=client, hits=hits), timeout=CALL_TIMEOUT_S)
    return json_format.MessageToDict(
        response,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
    )


def raw_check(ch):
    call = ch.unary_unary(CHECK)
    reply = call(b"", timeout=CALL_TIMEOUT_S)
    return {"bytes": len(reply)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("target")
    parser.add_argument("--authority")
    parser.add_argument("--token-file")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("services")
    checking = sub.add_parser("check")
    checking.add_argument("client")
    checking.add_argument("hits", type=int)
    sub.add_parser("raw-check")
    args = parser.parse_args()
    ch = channel(args)
    try:
        if args.command == "services":
            out = services(ch)
        elif args.command == "check":
            out = check(ch, args.client, args.hits)
        else:
            out = raw_check(ch)
    except grpc.RpcError as e:
        out = {"error": e.code().name, "details": e.details()}
    json.dump(out, sys.stdout)
    print()


if __name__ == "__main__":
    main()
