"""Exported UNets for forward-only passes (placeholder until export/ lands)."""


def load_forward_backend(pipe, kind: str, precision: str, cache_dir=None):
    from engine.config import NTIError
    raise NTIError(f"forward backend {kind!r} is not available in this build")
