"""tandem: edge-cloud speculative decoding. This package is the transport-free core."""

__version__ = "0.1.0"
