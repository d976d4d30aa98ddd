"""The edge side, on the second floor: a draft model on the device, its blocks verified by the cloud's target.

Contract: imports the core and the protocol, never the cloud. The speculative loop is the core's
(`tandem.speculate`); this package says how to reach the cloud (`remote/`: gRPC and HTTP verifiers, `client`) and
serves an OpenAI-compatible endpoint on the device (`http_app`, its worker thread in `service`).
"""
