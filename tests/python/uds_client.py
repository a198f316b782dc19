"""A Python grpcio client on Tollgate's data-plane Unix socket, with the
default channel options (grpcio sends the socket path as :authority).

Usage: uds_client.py SOCKET STUBS_DIR
Reserves, settles and reads the balance of account "rich"; prints one JSON
line with what it saw. Stubs are generated from proto/ by the test.
"""

import json
import sys

import grpc

socket_path, stubs = sys.argv[1], sys.argv[2]
sys.path.insert(0, stubs)

from tollgate.v1 import common_pb2, quota_pb2, quota_pb2_grpc  # noqa: E402

with grpc.insecure_channel(f"unix:{socket_path}") as channel:
    quota = quota_pb2_grpc.QuotaStub(channel)
    reserved = quota.Reserve(
        quota_pb2.ReserveRequest(
            account_id="rich",
            request_id="py-1",
            model="m",
            input_tokens=100,
            max_output_tokens=50,
        ),
        timeout=10,
    )
    settled = quota.Settle(
        quota_pb2.SettleRequest(
            account_id="rich",
            reservation_id=reserved.reservation_id,
            usage=common_pb2.Usage(input_tokens=100, output_tokens=20),
        ),
        timeout=10,
    )
    balance = quota.GetBalance(quota_pb2.GetBalanceRequest(account_id="rich"), timeout=10)
    print(
        json.dumps(
            {
                "decision": quota_pb2.Decision.Name(reserved.decision),
                "granted": reserved.granted_output_tokens,
                "record_request": settled.record.request_id,
                "output_tokens": settled.record.usage.output_tokens,
                "account": balance.account_id,
            }
        )
    )
