"""The clinical gateway (`medpipe gateway`): one authenticated, audited front door in front of TF Serving.

    medpipe gateway --upstream HOST:PORT --grpc-port N --rest-port N [--tls-cert F --tls-key F] [--client-ca F]
                    [--jwt-key F] [--allow-anonymous] --audit-log FILE [--request-log DIR] [--config CONFIG]

Modules: core (Principal, GatewayError, ItemResult, Prediction, Gateway: the one road), auth (mTLS and JWT),
audit (the hash-chained audit log and `medpipe audit verify`), metrics (Prometheus + request summaries),
tensors (TensorProto without TensorFlow ops), decode_pool and decode_worker (images are decoded in worker
processes with a memory limit and a deadline), grpc_door, rest (build_app), server (the CLI). Other doors plug in
as FastAPI routers: serving/gateway/dicomweb.py and serving/viewer/ `build_router(gateway)`.
"""
