"""Names that uad.py held before the method and the plumbing were separated, forwarded to their
new modules for one release with a DeprecationWarning: `uad.load_sam` still works, and says to
use `unsegment.models.load_sam`."""

import importlib
import warnings

MOVED = {
    "unsegment.models": (
        "SAM_ARCHS Family MODEL_FAMILIES ModelSpec SAM2_SIZES MODELS CHECKPOINT_URLS HIERA_STAGES "
        "SURROGATE_FAMILIES SURROGATE_STAGES build_sam check_checkpoint_file read_checkpoint "
        "cache_dir download find_checkpoint import_family checkpoint_arch check_vit_arch "
        "load_weights build_model check_model_checkpoint read_ultralytics_checkpoint load_model "
        "load_sam resolve_device"
    ),
    "unsegment.cost": (
        "CPU_PASS_SECONDS CPU_PASS_GFLOPS forward_gflops cpu_estimate native_bfloat16"
    ),
    "unsegment.images": (
        "Picture to_picture matching_profile GREY_MODES ALPHA_MODES MAX_PIXELS read_image psnr LOSSY_FORMATS output_format check_format check_writable "
        "write_atomically check_destination write_image"
    ),
    "unsegment.progress": "format_duration Progress",
    "unsegment.cli": (
        "Job jobs_for check_job check_model batches_of protect_files surrogate_names Parser "
        "build_parser config_from_args header main"
    ),
}
HOME = {name: module for module, names in MOVED.items() for name in names.split()}


def forward(old_module: str, name: str):
    """The object `old_module.name` now is, with a DeprecationWarning naming its new home;
    AttributeError for a name that never moved."""
    if name not in HOME:
        raise AttributeError(f"module {old_module!r} has no attribute {name!r}")
    warnings.warn(
        f"{old_module}.{name} moved to {HOME[name]}.{name}; the old name goes in the next release",
        DeprecationWarning,
        stacklevel=3,
    )
    return getattr(importlib.import_module(HOME[name]), name)
