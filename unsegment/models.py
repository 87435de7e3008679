"""The models of the Segment Anything family: one registry, checkpoints, strict loading.

MODEL_FAMILIES is the one table of families: where each comes from, how its predictor sees an
image, its random-init builder, whether a uad Surrogate class attacks its encoder, and its
models with their official checkpoints. MODELS and CHECKPOINT_URLS are derived from it. Adding a
family is one entry here, plus, if it is to be a surrogate, the Surrogate class in uad.py that
the entry names.

    from unsegment.models import load_model, load_sam, resolve_device
    sam = load_sam("vit_b", "sam_vit_b_01ec64.pth", device=resolve_device("auto"))
    model = load_model("sam2.1_t")   # the official checkpoint, downloaded on first use

Every problem (unknown name, missing package, unreadable checkpoint, a checkpoint of another
model) is a one-line uad.UADError. Checkpoints are read weights-only.
"""

import hashlib
import importlib
import os
import socket
import stat
import sys
import urllib.error
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
from PIL import Image

import unsegment.sam3_compat
from uad import UADError

# encoder width, depth, heads and global-attention blocks, as in segment_anything.build_sam; the
# ViT encoders of SAM-HQ (hq_vit_b, hq_vit_l, hq_vit_h) have the same shapes
SAM_ARCHS = {
    "vit_b": dict(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11)),
    "vit_l": dict(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23)),
    "vit_h": dict(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31)),
}


@dataclass(frozen=True)
class ModelSpec:
    """One model name that load_model accepts (see MODELS)."""

    family: str  # key of MODEL_FAMILIES
    arch: str  # the package's builder key, or SAM 2's config file
    url: Optional[str] = None  # the official checkpoint
    sha256: Optional[str] = None  # its published SHA-256; None where the authors publish none
    # blocks per stage of a hierarchical encoder as its package builds it (a test checks them),
    # to check --stage-layers before any model loads; () for a ViT (depth in SAM_ARCHS)
    stages: Tuple[int, ...] = ()
    overrides: tuple = ()  # SAM 2: hydra overrides to its config (tests shrink it)

    @property
    def info(self) -> "Family":
        return MODEL_FAMILIES[self.family]


@dataclass(frozen=True)
class Family:
    """What every model of one family shares: where it comes from and how it sees an image."""

    title: str  # as the model tables (README.md, docs/models.md) name it
    module: str  # the package's import name, imported only when one of its models is asked for
    install: str  # the command that provides the module and everything it imports
    preprocessing: str  # what its predictor does to an (H, W, 3) uint8 RGB image
    build: Callable[[ModelSpec], torch.nn.Module]  # a random-init model, on the CPU
    models: Dict[str, ModelSpec] = field(default_factory=dict)
    surrogate: Optional[str] = None  # the uad Surrogate class that attacks its image encoder
    predictor: str = "sam"  # the API eval.py prompts: "sam" (SamPredictor), "sam2", "sam3", ...
    state_key: Optional[str] = None  # official checkpoints nest the state dict under this key


def build_sam(model_type: str = "vit_b", arch: Optional[dict] = None):
    """A random-init segment_anything Sam of SAM_ARCHS[model_type] (or of `arch`), in eval mode."""
    from segment_anything.build_sam import _build_sam

    a = arch or SAM_ARCHS[model_type]
    sam = _build_sam(
        encoder_embed_dim=a["embed_dim"],
        encoder_depth=a["depth"],
        encoder_num_heads=a["num_heads"],
        encoder_global_attn_indexes=list(a["global_attn_indexes"]),
    )
    return sam.eval()


ANY_VIT = "any"  # ModelSpec.arch of sam_vit: a SAM v1 of any ViT shape, read from its checkpoint


def vit_arch(state: dict, path) -> dict:
    """The whole shape of a SAM v1 with a windowed ViT encoder (relative positions on), read
    from its state dict's tensors: what build_sam_vit takes. UADError if it is not such a SAM."""
    try:
        _, grid, _, embed_dim = state["image_encoder.pos_embed"].shape  # (1, grid, grid, width)
        blocks = [k for k in state if k.startswith("image_encoder.blocks.")]
        depth = 1 + max(int(k.split(".")[2]) for k in blocks)
        spans = [state[f"image_encoder.blocks.{i}.attn.rel_pos_h"].shape[0] for i in range(depth)]
        head_dim = state["image_encoder.blocks.0.attn.rel_pos_h"].shape[1]
        layers = {k.split(".")[3] for k in state if k.startswith("mask_decoder.transformer.layers")}
        return dict(
            img_size=grid * state["image_encoder.patch_embed.proj.weight"].shape[-1],
            patch_size=state["image_encoder.patch_embed.proj.weight"].shape[-1],
            embed_dim=embed_dim,
            depth=depth,
            num_heads=embed_dim // head_dim,
            mlp_ratio=state["image_encoder.blocks.0.mlp.lin1.weight"].shape[0] / embed_dim,
            # a global block's table spans the whole grid, a windowed one's its window
            global_attn_indexes=tuple(i for i, s in enumerate(spans) if s == 2 * grid - 1),
            window_size=max([(s + 1) // 2 for s in spans if s != 2 * grid - 1], default=0),
            prompt_dim=state["prompt_encoder.no_mask_embed.weight"].shape[1],
            decoder_depth=len(layers),
            decoder_mlp_dim=state["mask_decoder.transformer.layers.0.mlp.lin1.weight"].shape[0],
            iou_head_dim=state["mask_decoder.iou_prediction_head.layers.0.weight"].shape[0],
        )
    except (KeyError, ValueError, AttributeError):
        raise UADError(f"{path}: not a SAM v1 checkpoint with a windowed ViT encoder") from None


def build_sam_vit(arch: dict):
    """A random-init segment_anything Sam of any shape `arch` (see vit_arch), from the package's
    own classes as its _build_sam puts them together (decoder attention: SAM's 8 heads)."""
    from functools import partial

    from segment_anything.modeling import (
        ImageEncoderViT,
        MaskDecoder,
        PromptEncoder,
        Sam,
        TwoWayTransformer,
    )

    a, dim, grid = arch, arch["prompt_dim"], arch["img_size"] // arch["patch_size"]
    encoder = ImageEncoderViT(
        img_size=a["img_size"],
        patch_size=a["patch_size"],
        embed_dim=a["embed_dim"],
        depth=a["depth"],
        num_heads=a["num_heads"],
        mlp_ratio=a["mlp_ratio"],
        out_chans=dim,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        use_rel_pos=True,
        window_size=a["window_size"],
        global_attn_indexes=tuple(a["global_attn_indexes"]),
    )
    transformer = TwoWayTransformer(
        depth=a["decoder_depth"], embedding_dim=dim, mlp_dim=a["decoder_mlp_dim"], num_heads=8
    )
    sam = Sam(
        image_encoder=encoder,
        prompt_encoder=PromptEncoder(dim, (grid, grid), (a["img_size"],) * 2, mask_in_chans=16),
        mask_decoder=MaskDecoder(
            transformer_dim=dim, transformer=transformer, iou_head_hidden_dim=a["iou_head_dim"]
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    return sam.eval()


def _build_vit(spec: ModelSpec) -> torch.nn.Module:
    if spec.arch == ANY_VIT:
        raise UADError("sam_vit has no shape of its own: it is built from its checkpoint's")
    return build_sam(spec.arch)


def _build_sam_hq(spec: ModelSpec) -> torch.nn.Module:
    if spec.arch in SAM_ARCHS:  # SAM-HQ's ViTs: its registry's builder, with SAM_ARCHS's shapes
        from segment_anything_hq.build_sam import _build_sam

        a = SAM_ARCHS[spec.arch]
        return _build_sam(
            a["embed_dim"], a["depth"], a["num_heads"], list(a["global_attn_indexes"])
        )
    return _build_tinyvit(spec)


def _build_tinyvit(spec: ModelSpec) -> torch.nn.Module:
    """The TinyViT models (MobileSAM, Light HQ-SAM), from their package's registry."""
    return importlib.import_module(spec.info.module).sam_model_registry[spec.arch](checkpoint=None)


def _build_sam2(spec: ModelSpec) -> torch.nn.Module:
    from sam2.build_sam import build_sam2

    return build_sam2(spec.arch, None, device="cpu", hydra_overrides_extra=list(spec.overrides))


def _build_fastsam(spec: ModelSpec, description=None) -> torch.nn.Module:
    """ultralytics' YOLOv8 segmentation model from `description` (a dict, as a checkpoint's model
    carries it), or from spec.arch with one class (FastSAM-x's) for a random-init build."""
    from ultralytics.nn.tasks import SegmentationModel, yaml_model_load

    if description is None:
        description = {**yaml_model_load(spec.arch), "nc": 1}
    return SegmentationModel(description, verbose=False)


def _build_sam3(spec: ModelSpec) -> torch.nn.Module:
    """SAM 3's tracker with its image encoder: the model behind its SAM-style point and box
    prompting (SAM3InteractiveImagePredictor), built by its package on the CPU (see sam3_compat)."""
    from sam3.model_builder import build_tracker

    from unsegment.sam3_compat import building

    with building() as built:
        built.append(build_tracker(apply_temporal_disambiguation=False, with_backbone=True))
    return built[0]


def sam3_state(state: dict) -> dict:
    """The tracker's weights in SAM 3's official checkpoint (sam3.pt: the detector's under
    "detector.", the tracker's under "tracker."): the tracker's, and the detector's image encoder
    and necks, which the tracker shares; the text encoder and detection heads are left out. A
    state dict without those prefixes (a saved tracker) is returned as it is."""
    if not any(k.startswith(("tracker.", "detector.")) for k in state):
        return state
    encoder = "detector.backbone.vision_backbone."
    return {
        k.removeprefix("detector.").removeprefix("tracker."): v
        for k, v in state.items()
        if k.startswith(("tracker.", encoder))
    }


SAM3_HUB = "facebook/sam3"  # gated Hugging Face repository of sam3.pt (SAM License)
SAM3_DEPTH = 32  # blocks of SAM 3's ViT (global attention at 7, 15, 23, 31)


def sam3_cached_checkpoint() -> Path:
    """sam3.pt in the Hugging Face cache; UADError saying how to get it when it is not there."""
    from huggingface_hub import try_to_load_from_cache

    path = try_to_load_from_cache(SAM3_HUB, "sam3.pt")
    if not isinstance(path, str):
        raise UADError(
            f"sam3: no checkpoint given and none in the Hugging Face cache; its weights are gated: "
            f"request access at https://huggingface.co/{SAM3_HUB}, log in (hf auth login, or set "
            f"HF_TOKEN), run `hf download {SAM3_HUB} sam3.pt`, or pass its path (sam3=PATH)"
        )
    return Path(path)


_SAM_PIXELS = (
    "longest side resized to 1024 (bilinear), 0-255 scale normalised by the ImageNet mean and "
    "std times 255, zero-padded to 1024 x 1024"
)
_SAM_URL = "https://dl.fbaipublicfiles.com/segment_anything/sam_{}.pth"
_HQ_URL = "https://huggingface.co/lkeab/hq-sam/resolve/main/sam_hq_{}.pth"
_SAM2_URL = "https://dl.fbaipublicfiles.com/segment_anything_2/{}/sam2{}_hiera_{}.pt"
SAM2_SIZES = {"t": "tiny", "s": "small", "b+": "base_plus", "l": "large"}
HIERA_STAGES = {"t": (1, 2, 7, 2), "s": (1, 2, 11, 2), "b+": (2, 3, 16, 3), "l": (2, 6, 36, 4)}
# Official checkpoints: Meta publishes checksums for SAM's three only; SAM 2's release script,
# SAM-HQ's model card, MobileSAM's repository and ultralytics' assets give none, so a download of
# theirs prints the SHA-256 it got.
MODEL_FAMILIES = {
    "sam": Family(
        "SAM",
        "segment_anything",
        "pip install segment-anything",
        _SAM_PIXELS,
        build=_build_vit,
        surrogate="ViTSurrogate",
        # sam_vit: any shape and input size, read from its checkpoint; no official file (the
        # small models trained on synthetic composites, docs/trained.md)
        models={
            "vit_b": ModelSpec(
                "sam",
                "vit_b",
                _SAM_URL.format("vit_b_01ec64"),
                "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
            ),
            "vit_l": ModelSpec(
                "sam",
                "vit_l",
                _SAM_URL.format("vit_l_0b3195"),
                "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
            ),
            "vit_h": ModelSpec(
                "sam",
                "vit_h",
                _SAM_URL.format("vit_h_4b8939"),
                "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
            ),
            "sam_vit": ModelSpec("sam", ANY_VIT),
        },
    ),
    "sam_hq": Family(
        "SAM-HQ",
        "segment_anything_hq",
        "pip install segment-anything-hq timm",
        _SAM_PIXELS,
        build=_build_sam_hq,
        models={
            f"hq_{t}": ModelSpec("sam_hq", t, _HQ_URL.format(t)) for t in (*SAM_ARCHS, "vit_tiny")
        },
    ),
    # mobilesam-mirror is the registry's copy of MobileSAM; it provides the `mobile_sam` module
    "mobile_sam": Family(
        "MobileSAM",
        "mobile_sam",
        "pip install mobilesam-mirror timm",
        _SAM_PIXELS,
        build=_build_tinyvit,
        surrogate="TinyViTSurrogate",
        models={
            "mobile_sam": ModelSpec(
                "mobile_sam",
                "vit_t",
                "https://github.com/ChaoningZhang/MobileSAM/raw/master/weights/mobile_sam.pt",
                stages=(2, 2, 6, 2),
            )
        },
    ),
    # sam2 compiles a CUDA extension unless SAM2_BUILD_CUDA=0; the image predictor does not use it
    "sam2": Family(
        "SAM 2 / SAM 2.1",
        "sam2",
        "SAM2_BUILD_CUDA=0 pip install sam2",
        "resized to 1024 x 1024 (bilinear, aspect ratio not kept), [0, 1] scale normalised by "
        "the ImageNet mean and std",
        build=_build_sam2,
        surrogate="HieraSurrogate",
        predictor="sam2",
        state_key="model",
        models={
            f"sam2{v}_{s}": ModelSpec(
                "sam2",
                f"configs/sam2{v}/sam2{v}_hiera_{s}.yaml",
                _SAM2_URL.format(date, v, size),
                stages=HIERA_STAGES[s],
            )
            for v, date in (("", "072824"), (".1", "092824"))
            for s, size in SAM2_SIZES.items()
        },
    ),
    # SAM License (not Apache-2.0): never vendored; the gated checkpoint comes from the user's
    # Hugging Face cache or a path. sam3 imports psutil and triton without declaring them
    "sam3": Family(
        "SAM 3",
        "sam3",
        "pip install sam3 psutil scikit-image",
        "resized to 1008 x 1008 (bilinear, aspect ratio not kept), [0, 1] scale normalised by "
        "mean and std 0.5",
        build=_build_sam3,
        surrogate="SAM3Surrogate",
        predictor="sam3",
        state_key="model",
        models={"sam3": ModelSpec("sam3", "sam3")},
    ),
    # AGPL-3.0: never vendored; imported only when FastSAM is asked for. ultralytics' YOLOv8
    # segmentation model, built from the description its checkpoint carries (yolov8x-seg with
    # one class for FastSAM-x, the default; arch is what a random-init build takes)
    "fastsam": Family(
        "FastSAM",
        "ultralytics",
        "pip install ultralytics",
        "BGR, letterboxed: longest side resized to imgsz = max(H, W) rounded up to a multiple of "
        "32 (bilinear), short side padded with grey 114 to a multiple of 32, [0, 1] scale",
        build=_build_fastsam,
        predictor="fastsam",
        models={
            "fastsam": ModelSpec(
                "fastsam",
                "yolov8x-seg.yaml",
                # ultralytics' own download location for it (ultralytics.utils.downloads, v8.4.0)
                "https://github.com/ultralytics/assets/releases/download/v8.4.0/FastSAM-x.pt",
            )
        },
    ),
}
MODELS = {name: spec for f in MODEL_FAMILIES.values() for name, spec in f.models.items()}
# name -> (URL, SHA-256 or None): where find_checkpoint downloads from (tests point it elsewhere)
CHECKPOINT_URLS = {name: (spec.url, spec.sha256) for name, spec in MODELS.items() if spec.url}
SURROGATE_FAMILIES = tuple(name for name, f in MODEL_FAMILIES.items() if f.surrogate)
SURROGATE_STAGES = {name: spec.stages for name, spec in MODELS.items() if spec.stages}


def surrogate_models() -> list:
    """The names --surrogate accepts: the models of the families a uad Surrogate attacks."""
    return [n for n, spec in MODELS.items() if spec.info.surrogate]


def model_list(text: str, known: Sequence[str], what: str, flag: str = "") -> list:
    """Parses NAME[=PATH],... (the value of `flag`, which errors name) into [(name, path or
    None), ...]; UADError for a name not in `known`, a name given twice, an empty path or no
    name at all."""
    prefix, specs = f"{flag}: " if flag else "", []
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, equals, path = item.partition("=")
        if name not in known:
            raise UADError(f"unknown {what} {name!r}; choose from {', '.join(known)}")
        if name in (n for n, _ in specs):
            raise UADError(f"{prefix}{name} is named twice")
        if equals and not path:
            raise UADError(f"{prefix}{item}: no checkpoint after '='")
        specs.append((name, path or None))
    if not specs:
        raise UADError(f"{prefix}names no {what}")
    return specs


def encoder_depth(name: str, checkpoint=None) -> Tuple[int, Optional[int]]:
    """(blocks, first block of the third stage or None for a ViT) of surrogate `name`'s encoder,
    known before it loads (sam_vit's from its `checkpoint`), to check --layers and
    --stage-layers."""
    stages = MODELS[name].stages
    if stages:
        return sum(stages), sum(stages[:2])
    if MODELS[name].arch == ANY_VIT:
        path = checkpoint if checkpoint is not None else find_checkpoint(name)
        return vit_arch(read_checkpoint(path), path)["depth"], None
    if MODELS[name].family == "sam3":
        return SAM3_DEPTH, None
    return SAM_ARCHS[MODELS[name].arch]["depth"], None


def check_checkpoint_file(path) -> Path:
    """`path` as a Path if it is a regular file (or a link to one); UADError naming the problem
    if not: missing, a folder, or a device, FIFO or socket (/dev/null holds no weights, and
    reading a FIFO would wait for a writer)."""
    path = Path(path)
    if not path.is_file():
        if path.is_dir():
            problem = "is a folder"
        elif path.exists():
            mode = path.stat().st_mode
            kind = next((k for test, k in _FILE_KINDS if getattr(stat, test)(mode)), "special file")
            problem = f"not a regular file but a {kind}"
        else:
            problem = "no such checkpoint file"
        raise UADError(f"{path}: {problem}")
    return path


_FILE_KINDS = [
    ("S_ISCHR", "character device"),
    ("S_ISBLK", "block device"),
    ("S_ISFIFO", "FIFO"),
    ("S_ISSOCK", "socket"),
]


def unreadable_reason(path: Path, error: Exception, objects: str) -> str:
    """Why a checkpoint reader failed on `path` with `error`, from the file's first bytes and, for
    a zip archive, the globals its pickle names; `objects` says what such globals are."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:1] == b"\x80":  # a bare pickle: an old format, or arbitrary Python objects
        return "not weights-only: it holds Python objects that are not tensors"
    if not head.startswith(b"PK"):
        return "not a PyTorch file"
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:
        return "truncated or corrupt"
    if names:
        return f"not weights-only: {objects} ({few(names)})"
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


def read_checkpoint(path) -> object:
    """torch.load(path) on the CPU, weights only; any problem is one UADError line."""
    path = check_checkpoint_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = unreadable_reason(path, e, "it holds Python objects that are not tensors")
        raise UADError(f"{path}: not a readable PyTorch checkpoint ({reason})") from None


def cache_dir() -> Path:
    """Where downloaded checkpoints live: $UNSEGMENT_CACHE, else ~/.cache/unsegment."""
    return Path(os.environ.get("UNSEGMENT_CACHE", "~/.cache/unsegment")).expanduser()


DOWNLOAD_TIMEOUT = 60  # seconds without a byte before a download gives up


def download(url: str, dest: Path, sha256: Optional[str], quiet: bool = False) -> Path:
    """Downloads `url` to `dest` through torch.hub.download_url_to_file (a temporary file in
    dest's folder, renamed into place when complete), checking its SHA-256 unless None, in which
    case the digest it got is printed; returns `dest`. Any problem is one UADError line."""
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UADError(f"{dest.parent}: cannot write the checkpoint cache ({e.strerror})") from None
    if not quiet:
        print(f"downloading {url} to {dest}", file=sys.stderr)
    timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT)  # torch.hub's urlopen takes none of its own
    try:
        torch.hub.download_url_to_file(url, str(dest), hash_prefix=sha256, progress=not quiet)
    except (
        RuntimeError
    ) as e:  # torch.hub's hash check: "invalid hash value (expected ..., got ...)"
        raise UADError(f"{url}: SHA-256 mismatch ({e})") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise UADError(
            f"{url}: download failed ({reason}); download it by hand to {dest} or pass its "
            "path (--checkpoint PATH; NAME=PATH in eval.py's --models)"
        ) from None
    finally:
        socket.setdefaulttimeout(timeout)
    if sha256 is None and not quiet:
        digest = hashlib.sha256()
        with open(dest, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        print(f"{dest}: no published checksum; SHA-256 {digest.hexdigest()}", file=sys.stderr)
    return dest


def find_checkpoint(name: str, quiet: bool = False) -> Path:
    """The official checkpoint of model `name` in the cache folder, downloaded if missing."""
    if name not in CHECKPOINT_URLS:
        raise UADError(f"no official checkpoint for model {name!r}; pass its checkpoint's path")
    url, sha256 = CHECKPOINT_URLS[name]
    path = cache_dir() / url.rsplit("/", 1)[1]
    return path if path.is_file() else download(url, path, sha256, quiet=quiet)


def import_family(name: str):
    """The package module of model `name` (a key of MODELS), imported now; UADError naming the
    module that is really missing (SAM-HQ and MobileSAM import timm without declaring it)."""
    family = MODELS[name].info
    try:
        with unsegment.sam3_compat.keep_backend_flags():  # sam3 turns TF32 on when imported
            module = importlib.import_module(family.module)
    except ImportError as e:
        missing = (e.name or family.module).split(".")[0]  # the package, not a submodule
        via = "" if missing == family.module else f" (imported by {family.module})"
        raise UADError(
            f"model {name} needs the {missing} package{via}, which is not installed: "
            f"{family.install}"
        ) from None
    if family.module == "ultralytics":
        unpatch_ultralytics()
    return module


def unpatch_ultralytics() -> None:
    """Undoes what importing ultralytics does to other packages: it replaces PIL's Image.open
    with one that pip-installs pi-heif when PIL cannot identify a file, and torch.save with its
    own. Its code keeps calling the originals, which it saved."""
    from ultralytics.utils import patches

    if Image.open is patches.image_open:
        Image.open = patches._image_open
    if torch.save is patches.torch_save:
        torch.save = patches._torch_save


def checkpoint_arch(state: dict) -> dict:
    """Encoder width and depth of a SAM state dict, read from its tensor shapes."""
    depth = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("image_encoder.blocks."))
    return dict(embed_dim=state["image_encoder.pos_embed"].shape[-1], depth=depth)


def checkpoint_family(state: dict) -> Optional[Tuple[str, str]]:
    """(what it is, the model name to load it as) for a checkpoint of an encoder other than a
    ViT, read from its tensor names: a TinyViT (image_encoder.layers.*) is MobileSAM's, or Light
    HQ-SAM's with HQ-SAM's extra token; a Hiera (image_encoder.trunk.*, SAM 2's checkpoints nest
    it under "model") is SAM 2's or 2.1's, its size from the trunk's blocks. None if neither."""
    if isinstance(state.get("model"), dict):
        state = state["model"]
    keys = [k for k in state if isinstance(k, str)]
    if any(k.startswith("image_encoder.layers.") for k in keys):
        if any(k.startswith("mask_decoder.hf_token") for k in keys):
            return "Light HQ-SAM (TinyViT encoder)", "hq_vit_tiny"
        return "MobileSAM (TinyViT encoder)", "mobile_sam"
    blocks = {k.split(".")[3] for k in keys if k.startswith("image_encoder.trunk.blocks.")}
    if blocks:  # SAM 2.1 added a learned no-object embedding to SAM 2's
        version = ".1" if "no_obj_embed_spatial" in keys else ""
        size = {sum(v): s for s, v in HIERA_STAGES.items()}.get(len(blocks), "SIZE")
        return f"SAM 2{version} (Hiera encoder, {len(blocks)} blocks)", f"sam2{version}_{size}"
    return None


def check_vit_arch(state: dict, path: Path, name: str, prefix: str = "") -> None:
    """For the ViT encoders of SAM_ARCHS: UADError naming the model type a checkpoint is of, when
    it is not `name`'s (a clearer line than the shape mismatch load_weights would find)."""
    if "image_encoder.pos_embed" not in state:
        family = checkpoint_family(state)
        if family is not None:
            title, model = family
            how = f"eval.py --models {model}=PATH"
            if model in MODELS and MODELS[model].info.surrogate:
                how = f"uad.py --surrogate {model}=PATH, " + how
            raise UADError(f"{path}: a {title} checkpoint, not {name}; load it as {model} ({how})")
        raise UADError(f"{path}: not a {MODELS[name].info.title} checkpoint (no image encoder)")
    if MODELS[name].arch not in SAM_ARCHS:
        return
    arch, want = checkpoint_arch(state), SAM_ARCHS[MODELS[name].arch]
    if (arch["embed_dim"], arch["depth"]) != (want["embed_dim"], want["depth"]):
        match = [
            t for t, a in SAM_ARCHS.items() if (a["embed_dim"], a["depth"]) == tuple(arch.values())
        ]
        what = f"a {prefix}{match[0]} checkpoint" if match else "of an unknown architecture"
        cure = "pass the matching model type" if match or prefix else "load it as sam_vit"
        raise UADError(
            f"{path}: checkpoint is {what} (width {arch['embed_dim']}, {arch['depth']} blocks), "
            f"not {name}; {cure}"
        )


def few(keys: Sequence[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def load_weights(model: torch.nn.Module, state, path, name: str) -> None:
    """Loads a state dict into `model` strictly; the one place every model's weights go through.

    Unlike the packages' own loaders (which drop unexpected keys), a checkpoint of another model
    is refused: a tensor the model lacks, a tensor it has that the checkpoint lacks, or a shape
    that differs is a UADError line naming how many, and the first few or the first tensor with
    both shapes.
    """
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UADError(f"{path}: not a state dict of tensors")
    own = model.state_dict()
    extra = [k for k in state if k not in own]
    if extra:
        raise UADError(
            f"{path}: not a {name} checkpoint: {len(extra)} tensor(s) that {name} does not have "
            f"({few(extra)})"
        )
    missing = [k for k in own if k not in state]
    if missing:
        raise UADError(
            f"{path}: not a {name} checkpoint: {len(missing)} of {name}'s tensor(s) missing "
            f"({few(missing)})"
        )
    for key, tensor in state.items():
        if tensor.shape != own[key].shape:
            raise UADError(
                f"{path}: weights do not fit {name}: {key} is {tuple(tensor.shape)} in the "
                f"checkpoint, {tuple(own[key].shape)} in the model"
            )
    model.load_state_dict(state, strict=True)


def build_model(name: str, description=None) -> torch.nn.Module:
    """A random-init model `name` (a key of MODELS) from its package's own builder, on the CPU.

    `description` is FastSAM's only: the ultralytics model description (a dict, as a checkpoint's
    model carries it) to build instead of MODELS["fastsam"].arch with one class.
    """
    spec = MODELS[name]
    import_family(name)
    if description is not None:
        return _build_fastsam(spec, description)
    return spec.info.build(spec)


def check_model_checkpoint(name: str, path) -> Optional[Path]:
    """`path` as a Path if it can be model `name`'s checkpoint file; UADError if not. Without a
    path: SAM 3's from the Hugging Face cache (UADError saying how to get it), None for the
    others (their official files download on first use)."""
    if path is None:
        return sam3_cached_checkpoint() if MODELS[name].family == "sam3" else None
    path = check_checkpoint_file(path)
    if MODELS[name].family == "fastsam" and path.suffix != ".pt":  # ultralytics reads no other
        raise UADError(f"{path}: a FastSAM checkpoint is an ultralytics .pt file")
    return path


def read_ultralytics_checkpoint(path: Path) -> tuple:
    """(model description, state dict) of an ultralytics segmentation checkpoint.

    Its checkpoints are pickled models, which torch's plain weights-only reader refuses;
    ultralytics' own reader (torch_safe_load with safe_only) reads them weights-only too, against
    its allow-list of its model classes, so a file still cannot run code. UADError for any
    problem.
    """
    from ultralytics.nn.tasks import SegmentationModel, torch_safe_load
    from ultralytics.utils import LOGGER

    path = check_model_checkpoint("fastsam", path)
    level = LOGGER.level
    try:
        LOGGER.setLevel("ERROR")  # its warnings about odd files would break the one-line error
        ckpt, _ = torch_safe_load(path, safe_only=True)
    except Exception as e:  # ultralytics raises TypeError, RuntimeError, AttributeError, ...
        reason = unreadable_reason(path, e, "objects outside ultralytics' model classes")
        raise UADError(f"{path}: not a readable ultralytics checkpoint ({reason})") from None
    finally:
        LOGGER.setLevel(level)
    model = (ckpt.get("ema") or ckpt.get("model")) if isinstance(ckpt, dict) else None
    if not isinstance(model, SegmentationModel):
        what = type(model).__name__ if model is not None else "no model"
        raise UADError(f"{path}: not a FastSAM checkpoint ({what}, not a segmentation model)")
    return model.yaml, model.float().state_dict()


def load_model(name: str, checkpoint=None, device="cpu", quiet: bool = False) -> torch.nn.Module:
    """Builds model `name` with its package's builder and loads its weights.

    Args:
      name: a key of MODELS (vit_b, hq_vit_tiny, mobile_sam, sam2.1_t, ...).
      checkpoint: path to its checkpoint; None takes the official one from the cache folder (see
        `cache_dir`), downloading it on first use (SHA-256 checked where one is published).
      device: where the model lives.
      quiet: no download progress line.

    Returns:
      The package's model (segment_anything's Sam, SAM2Base, ...) in eval mode, parameters
      frozen, on `device`. Any problem (unknown name, missing package, unreadable checkpoint, a
      checkpoint of another model) is a one-line UADError.
    """
    if name not in MODELS:
        raise UADError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    spec = MODELS[name]
    import_family(name)  # before any download: a missing package is the first thing to say
    if checkpoint is not None:
        path = Path(checkpoint)
    else:
        path = sam3_cached_checkpoint() if spec.family == "sam3" else find_checkpoint(name, quiet)
    if spec.family == "fastsam":
        description, state = read_ultralytics_checkpoint(path)
        model = build_model(name, description)
    else:
        state = read_checkpoint(path)
        key = spec.info.state_key
        if key is not None and isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
        if not isinstance(state, dict):
            raise UADError(f"{path}: not a state dict")
        if spec.family == "sam3":
            state = sam3_state(state)
        if spec.arch in SAM_ARCHS or spec.arch == ANY_VIT:
            check_vit_arch(state, path, name, prefix="hq_" if spec.family == "sam_hq" else "")
        model = build_sam_vit(vit_arch(state, path)) if spec.arch == ANY_VIT else build_model(name)
    load_weights(model, state, path, name)
    return model.eval().requires_grad_(False).to(device)


def load_sam(model_type: str = "vit_b", checkpoint=None, device="cpu", quiet: bool = False):
    """Builds SAM `model_type` ("vit_b" | "vit_l" | "vit_h") and loads its weights.

    Args:
      model_type: the architecture; a checkpoint of another one is an error.
      checkpoint: path to a .pth state dict; None takes the official one from the cache folder
        (see `cache_dir`), downloading it from Meta's URL on first use.
      device: where the model lives.
      quiet: no download progress line.

    Returns:
      segment_anything.modeling.Sam in eval mode with frozen parameters (see `load_model`).
    """
    if model_type not in SAM_ARCHS:
        raise UADError(f"unknown model type {model_type!r}; choose from {', '.join(SAM_ARCHS)}")
    return load_model(model_type, checkpoint, device, quiet)


def resolve_device(name: str) -> torch.device:
    """A torch.device from "auto" (CUDA when available, else the CPU), "cpu", "cuda[:N]" or
    "mps"; UADError for anything else or for a device this machine does not have."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise UADError(
            f"device {name!r}: not a device; use auto, cpu, cuda, cuda:N or mps"
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UADError(f"device {name!r} requested but CUDA is not available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UADError(f"device {name!r}: this machine has {torch.cuda.device_count()} GPU(s)")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise UADError(f"device {name!r} requested but MPS is not available")
    elif device.type != "cpu":
        raise UADError(f"device {name!r}: not supported; use auto, cpu, cuda, cuda:N or mps")
    return device
