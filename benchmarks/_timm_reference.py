"""The reference of ``train_end_to_end.py``: a training script built the way timm's ``train.py`` is built.

torchvision ``ImageFolder`` with timm's ``create_transform``, ``timm.create_model``,
``create_optimizer_v2``, a plain loop, a validation pass per epoch (loss, top-1), timm's
``update_summary`` (its CSV tracker) and ``CheckpointSaver`` (a checkpoint every epoch, the best
kept), the training loader dropping the last partial batch as timm's does. Its settings follow
pixelmill's defaults so both sides do the same work per image: the preprocessing timm resolves
for the model (``resolve_data_config``), AdamW at 1e-3 with weight decay 1e-4, no scheduler, a
horizontal flip and no colour jitter; timm's random resized crop is pinned to the whole image
(``scale=ratio=(1, 1)``: a centre square resized to the input size, the work of pixelmill's
resize and centre crop).

Run as a script: ``python _timm_reference.py --data DIR --out DIR ...``; prints one JSON line
(images trained, epochs, the last validation top-1, when the training loop started and ended).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="A folder with train/<class>/ and val/<class>/.")
    parser.add_argument("--out", type=Path, required=True, help="Where the checkpoints and summary.csv go.")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--img-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=42)
    return parser.parse_args()


def train_one_epoch(model, loader, optimizer, loss_fn) -> dict:
    model.train()
    total, images = 0.0, 0
    for x, y in loader:
        loss = loss_fn(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item() * len(y)
        images += len(y)
    return {"loss": total / max(images, 1), "images": images}


def validate(model, loader, loss_fn) -> dict:
    import torch
    from timm.utils import accuracy

    model.eval()
    loss_sum, top1_sum, n = 0.0, 0.0, 0
    with torch.no_grad():
        for x, y in loader:
            out = model(x)
            loss_sum += loss_fn(out, y).item() * len(y)
            top1_sum += accuracy(out, y, topk=(1,))[0].item() * len(y)
            n += len(y)
    return {"loss": loss_sum / n, "top1": top1_sum / n}


def main() -> None:
    args = parse_args()
    import timm
    import torch
    from timm.data import create_transform, resolve_data_config
    from timm.optim import create_optimizer_v2
    from timm.utils import CheckpointSaver, update_summary
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    torch.manual_seed(args.seed)
    train_classes = sorted(p.name for p in (args.data / "train").iterdir() if p.is_dir())
    model = timm.create_model(args.model, pretrained=False, num_classes=len(train_classes))
    config = resolve_data_config({"input_size": (3, args.img_size, args.img_size)}, model=model)
    common = {"input_size": config["input_size"], "interpolation": config["interpolation"], "mean": config["mean"], "std": config["std"]}
    train_tf = create_transform(**common, is_training=True, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.5, color_jitter=None)
    eval_tf = create_transform(**common, is_training=False, crop_pct=config["crop_pct"])
    train_set, val_set = ImageFolder(args.data / "train", train_tf), ImageFolder(args.data / "val", eval_tf)
    loader = {"num_workers": args.workers, "persistent_workers": args.workers > 0}
    train_loader = DataLoader(train_set, args.batch_size, shuffle=True, drop_last=True, **loader)
    val_loader = DataLoader(val_set, args.batch_size, shuffle=False, **loader)

    optimizer = create_optimizer_v2(model, opt="adamw", lr=args.lr, weight_decay=args.weight_decay)
    loss_fn = torch.nn.CrossEntropyLoss()
    args.out.mkdir(parents=True, exist_ok=True)
    saver = CheckpointSaver(model, optimizer, args=args, checkpoint_dir=str(args.out), recovery_dir=str(args.out), decreasing=False, max_history=1)
    trained, metrics = 0, {}
    loop_start = time.time()
    for epoch in range(args.epochs):
        train_metrics = train_one_epoch(model, train_loader, optimizer, loss_fn)
        trained += train_metrics.pop("images")
        metrics = validate(model, val_loader, loss_fn)
        update_summary(epoch, train_metrics, metrics, filename=str(args.out / "summary.csv"), lr=args.lr, write_header=epoch == 0)
        saver.save_checkpoint(epoch, metric=metrics["top1"])
    print(json.dumps({"trained_images": trained, "epochs": args.epochs, "val_top1": metrics.get("top1"), "loop_start": loop_start, "loop_end": time.time()}))


if __name__ == "__main__":
    main()
