"""nti-engine: fast, faithful null-text inversion for Stable Diffusion editing."""
from .version import __version__  # noqa: F401

# The public API, imported on first use (PEP 562): `nti` starts without loading torch, so a Ctrl-C in its first
# seconds is handled by the CLI (exit 130, one line) instead of interrupting an import with a traceback.
_EXPORTS = {
    "NTIConfig": "config", "NTIError": "config",
    "Pipeline": "models", "load_pipeline": "models", "build_tiny_pipeline": "models", "save_pipeline_folder": "models",
    "Inversion": "artifact", "load_inversion": "artifact", "save_inversion": "artifact",
    "invert": "api", "edit": "api", "edit_latents": "api", "generate": "api", "reconstruct": "api",
    "SampleWords": "p2p",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    import importlib
    import importlib.util

    if name not in _EXPORTS:
        # a submodule (nti.models) as after an eager import; before, it was there only once an export had loaded it
        if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
            return importlib.import_module(f".{name}", __name__)
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value
