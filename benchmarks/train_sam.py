"""Trains a small SAM v1 on composites of real photos (benchmarks/composites.py), with SAM's
recipe in miniature, into an ordinary checkpoint that `--surrogate sam_vit=PATH` and eval.py's
`--models sam_vit=PATH` load.

    python benchmarks/train_sam.py a sam_small_a.pth     # model a; b is the transfer model
    python benchmarks/train_sam.py tiny tests/data/sam_tiny.pth --steps 1500 --half

The model is segment_anything's own ImageEncoderViT, PromptEncoder and MaskDecoder at a small
width, depth and input size (MODELS; unsegment.models.build_sam_vit builds it, and
unsegment.models.vit_arch reads the shape back from the checkpoint). The recipe, after SAM's
paper (Kirillov et al. 2023, section 3 and appendix A): each step draws BATCH fresh composites
of the train photos; each image gets PROMPTS prompts on its objects' masks, all points (one
positive point uniformly inside the mask) or all boxes (the mask's box, each side moved by
noise of std 10% of the box's side, at most MAX_BOX_NOISE pixels); the loss is 20 x focal +
dice on the single predicted mask (multimask_output=False, the mask eval.py scores) at the
input resolution, plus the mean-square error of the IoU head against the mask's real IoU;
AdamW (SAM's lr 8e-4 and weight decay 0.1), linear warm-up then cosine decay. Left out at this
scale: the interactive rounds of points from the error region, the mask prompt, and
multimask training (a composite's objects have no nested parts).

Seeded and deterministic: the weights are a function of the model, the seed, the steps and the
number of threads (float sums depend on it; TrainConfig.threads, 1 by default: the two
models train at once, one per core).
"""

import argparse
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import eval as ev
import uad
import unsegment.models

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ holds scripts
import composites  # noqa: E402

# Two shapes: `a` is the surrogate, `b` the transfer target (another width, depth, window and
# seed). Input 128 x 128 at patch 8: a 16 x 16 token grid, masks predicted at 64 x 64.
MODELS = {
    "a": dict(
        img_size=128,
        patch_size=8,
        embed_dim=96,
        depth=8,
        num_heads=3,
        mlp_ratio=4.0,
        global_attn_indexes=(3, 7),
        window_size=8,
        prompt_dim=64,
        decoder_depth=2,
        decoder_mlp_dim=256,
        iou_head_dim=64,
    ),
    "b": dict(
        img_size=128,
        patch_size=8,
        embed_dim=128,
        depth=6,
        num_heads=4,
        mlp_ratio=3.0,
        global_attn_indexes=(2, 5),
        window_size=4,
        prompt_dim=64,
        decoder_depth=2,
        decoder_mlp_dim=256,
        iou_head_dim=64,
    ),
    # tests/test_trained.py's model, committed as tests/data/sam_tiny.pth (float16, 240 kB):
    # 64 x 64 input, an 8 x 8 grid, depth 7 for the default feature blocks 3..6
    "tiny": dict(
        img_size=64,
        patch_size=8,
        embed_dim=32,
        depth=7,
        num_heads=2,
        mlp_ratio=2.0,
        global_attn_indexes=(3, 6),
        window_size=4,
        prompt_dim=32,
        decoder_depth=2,
        decoder_mlp_dim=64,
        iou_head_dim=32,
    ),
}
SEEDS = {"a": 0, "b": 1, "tiny": 2}
MAX_BOX_NOISE = 20  # pixels, as SAM's recipe caps its box noise


@dataclass
class TrainConfig:
    arch: dict  # the model's shape (MODELS)
    seed: int = 0  # weights' init and every data draw
    steps: int = 1500  # optimiser steps
    batch: int = 8  # composites per step
    prompts: int = 8  # prompts per composite
    lr: float = 8e-4  # SAM's base learning rate
    weight_decay: float = 0.1  # SAM's
    warmup: int = 100  # steps of linear warm-up
    focal_weight: float = 20.0  # SAM's 20:1 focal to dice
    threads: int = 1  # torch threads: the weights depend on it (two models train at once)

    def key(self) -> dict:
        return dataclasses.asdict(self)


def focal_loss(logits, target, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Per-mask sigmoid focal loss (Lin et al.), mean over pixels: (N,)."""
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = p * target + (1 - p) * (1 - target)
    weight = alpha * target + (1 - alpha) * (1 - target)
    return (weight * ce * (1 - p_t) ** gamma).flatten(1).mean(1)


def dice_loss(logits, target) -> torch.Tensor:
    """Per-mask soft dice loss: (N,)."""
    p, t = logits.sigmoid().flatten(1), target.flatten(1)
    return 1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)


def draw_prompts(rng: np.random.Generator, masks, n: int, box: bool):
    """n prompts on randomly chosen masks of one image: (chosen masks (n, H, W) bool, points
    (n, 1, 2) or boxes (n, 4), float32, pixels)."""
    chosen = [masks[i] for i in rng.integers(len(masks), size=n)]
    prompts = []
    for mask in chosen:
        if box:
            x, y, w, h = ev.mask_bbox(mask)
            noise = rng.normal(0, 0.1, 4) * np.array([w, h, w, h])
            box_xyxy = np.array([x, y, x + w, y + h]) + noise.clip(-MAX_BOX_NOISE, MAX_BOX_NOISE)
            prompts.append(box_xyxy)
        else:
            ys, xs = np.nonzero(mask)
            i = rng.integers(len(xs))
            prompts.append([[xs[i], ys[i]]])
    return np.stack(chosen), np.asarray(prompts, dtype=np.float32)


def training_batch(rng: np.random.Generator, photos, config: TrainConfig):
    """BATCH composites of side img_size: (images (B, 3, S, S) float in [0, 1], [masks (H, W)
    bool lists]); a composite with no object left visible is drawn again."""
    size, images, masks = config.arch["img_size"], [], []
    while len(images) < config.batch:
        image, objects = composites.composite(rng, photos, size)
        if objects:
            images.append(image)
            masks.append(objects)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
    return x, masks


def predict(sam, embedding, prompts: np.ndarray, box: bool):
    """Mask logits at the input resolution (N, S, S) and IoU predictions (N,) of one image's
    embedding (1, C, g, g) for N point or box prompts, as SamPredictor.predict runs the
    prompt encoder and mask decoder (multimask_output=False)."""
    coords = torch.from_numpy(prompts)
    if box:
        sparse, dense = sam.prompt_encoder(points=None, boxes=coords, masks=None)
    else:
        labels = torch.ones(coords.shape[:2], dtype=torch.int64)
        sparse, dense = sam.prompt_encoder(points=(coords, labels), boxes=None, masks=None)
    low, iou = sam.mask_decoder(
        image_embeddings=embedding,
        image_pe=sam.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=False,
    )  # (N, 1, 4g, 4g), (N, 1)
    size = sam.image_encoder.img_size
    logits = F.interpolate(low, (size, size), mode="bilinear", align_corners=False)
    return logits[:, 0], iou[:, 0]


def step_loss(sam, x, masks, rng: np.random.Generator, config: TrainConfig) -> torch.Tensor:
    embeddings = sam.image_encoder(uad.sam_input(x, sam))  # (B, C, g, g)
    losses = []
    for i, objects in enumerate(masks):
        box = bool(rng.integers(2))  # half the images are prompted by boxes, half by points
        chosen, prompts = draw_prompts(rng, objects, config.prompts, box)
        logits, iou_pred = predict(sam, embeddings[i : i + 1], prompts, box)
        target = torch.from_numpy(chosen).float()
        with torch.no_grad():
            hard = logits > 0
            inter = (hard & (target > 0)).flatten(1).sum(1)
            union = (hard | (target > 0)).flatten(1).sum(1).clamp(min=1)
            iou_true = inter / union
        mask_loss = config.focal_weight * focal_loss(logits, target) + dice_loss(logits, target)
        losses.append(mask_loss + (iou_pred - iou_true) ** 2)
    return torch.cat(losses).mean()


def learning_rate(step: int, config: TrainConfig) -> float:
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    t = (step - config.warmup) / max(1, config.steps - config.warmup)
    return config.lr * 0.5 * (1 + math.cos(math.pi * t))


def train(config: TrainConfig, photos=None, log=None):
    """A segment_anything Sam of shape config.arch trained as the module docstring says, in eval
    mode. log(step, loss) is called every 50 steps and after the last."""
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        torch.manual_seed(config.seed)
        sam = unsegment.models.build_sam_vit(config.arch).train()
        # SAM zero-inits its absolute positions because it starts from MAE weights; from scratch
        # they start random, as a ViT's do
        torch.nn.init.trunc_normal_(sam.image_encoder.pos_embed, std=0.02)
        photos = composites.load_photos("train") if photos is None else photos
        decay = [p for n, p in sam.named_parameters() if p.ndim > 1 and "pos" not in n]
        other = [p for n, p in sam.named_parameters() if not (p.ndim > 1 and "pos" not in n)]
        optimiser = torch.optim.AdamW(
            [{"params": decay, "weight_decay": config.weight_decay}, {"params": other}],
            lr=config.lr,
            weight_decay=0.0,
        )
        for step in range(config.steps):
            rng = np.random.default_rng([config.seed, step])
            x, masks = training_batch(rng, photos, config)
            loss = step_loss(sam, x, masks, rng, config)
            for group in optimiser.param_groups:
                group["lr"] = learning_rate(step, config)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(sam.parameters(), 1.0)
            optimiser.step()
            if log is not None and (step % 50 == 0 or step == config.steps - 1):
                log(step, loss.item())
    finally:
        torch.set_num_threads(threads)
    return sam.eval()


def train_to(path: Path, config: TrainConfig, quiet: bool = False, half: bool = False) -> dict:
    """Trains and saves the state dict at `path` (float16 if `half`) and what made it at
    path.json; returns that record."""

    def log(step, loss):
        if not quiet:
            print(f"{path.name}: step {step + 1}/{config.steps}, loss {loss:.4f}", file=sys.stderr)

    started = time.monotonic()
    sam = train(config, log=log)
    record = {"config": config.key(), "seconds": time.monotonic() - started}
    path.parent.mkdir(parents=True, exist_ok=True)
    state = sam.state_dict()
    torch.save(
        {k: v.half() if half and v.is_floating_point() else v for k, v in state.items()}, path
    )
    path.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="train_sam.py", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "model", choices=list(MODELS), help="a: the surrogate; b: the transfer model; tiny: tests'"
    )
    p.add_argument("out", type=Path, help="the checkpoint to write (.pth)")
    p.add_argument("--steps", type=int, default=TrainConfig.steps, help="(%(default)s)")
    p.add_argument("--threads", type=int, default=TrainConfig.threads, help="(%(default)s)")
    p.add_argument("--half", action="store_true", help="save float16 weights")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    config = TrainConfig(
        MODELS[args.model], SEEDS[args.model], steps=args.steps, threads=args.threads
    )
    record = train_to(args.out, config, args.quiet, args.half)
    print(f"wrote {args.out}: {config.steps} steps, {record['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
