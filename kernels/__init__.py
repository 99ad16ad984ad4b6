"""Fused DDIM / guidance / inner-loss kernels as `nti::` custom ops; Triton when available, torch otherwise."""
if __name__ == "kernels":
    # Imported by its folder name: the checkout's root is on sys.path (`python -m ...` or pytest run from it) and
    # something asked for the top-level `kernels`, which is Hugging Face's package (transformers >= 5 requires and
    # imports it). This folder is installed as nti.kernels; hand the name to the real package, as a missing
    # folder would. importlib returns what sys.modules holds after this file ran, so the importer gets that one.
    import importlib.machinery
    import importlib.util
    import sys
    from pathlib import Path

    _root = Path(__file__).resolve().parent.parent
    _spec = importlib.machinery.PathFinder.find_spec(
        "kernels", [p for p in sys.path if Path(p or ".").resolve() != _root])
    if _spec is None:
        raise ImportError("no module named 'kernels' besides this checkout's kernels/ folder (nti.kernels)",
                          name="kernels")
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module
    _spec.loader.exec_module(_module)
else:
    from nti.kernels.ddim import (
        ddim_step,
        ddim_step_ref,
        guided_ddim_step,
        guided_ddim_step_mse,
        guided_ddim_step_mse_ref,
        guided_ddim_step_ref,
        guided_eps_ref,
        triton_enabled,
    )

    __all__ = [
        "ddim_step",
        "guided_ddim_step",
        "guided_ddim_step_mse",
        "triton_enabled",
        "ddim_step_ref",
        "guided_eps_ref",
        "guided_ddim_step_ref",
        "guided_ddim_step_mse_ref",
    ]
