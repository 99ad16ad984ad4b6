"""nti-engine: fast, faithful null-text inversion for Stable Diffusion editing."""
from .version import __version__  # noqa: F401
from .config import NTIConfig, NTIError  # noqa: E402
from .models import Pipeline, load_pipeline, build_tiny_pipeline, save_pipeline_folder  # noqa: E402
from .artifact import Inversion, load_inversion, save_inversion  # noqa: E402
from .api import edit, edit_latents, generate, invert, reconstruct  # noqa: E402

__all__ = ["NTIConfig", "NTIError", "Pipeline", "load_pipeline", "build_tiny_pipeline", "save_pipeline_folder",
           "Inversion", "load_inversion", "save_inversion", "invert", "edit", "edit_latents", "reconstruct",
           "generate"]
