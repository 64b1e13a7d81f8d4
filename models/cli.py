"""The torch side of the `polysense` command: the runtime's CLI parses, this module runs training."""

from __future__ import annotations

import argparse

from polysense.models.options import TrainOptions
from polysense.models.train import train


def options_from_args(args: argparse.Namespace) -> TrainOptions:
    modalities = (
        tuple(m.strip() for m in args.modalities.split(",") if m.strip()) if args.modalities else None
    )
    return TrainOptions(
        data=args.data,
        out=args.out,
        modalities=modalities,
        strategy=args.strategy,
        epochs=args.epochs,
        pretrain_epochs=args.pretrain_epochs,
        finetune_encoders=args.finetune_encoders,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        modality_dropout=args.modality_dropout,
        patience=args.patience,
        seed=args.seed,
        device=args.device,
        image_size=args.image_size,
        image_width=args.image_width,
        embed_dim=args.embed_dim,
        text_encoder=args.text_encoder,
        fusion=args.fusion,
        max_text_length=args.max_text_length,
        builtin_n=args.builtin_n,
        progress=not args.no_progress,
    )


def run_train(args: argparse.Namespace) -> int:
    result = train(options_from_args(args), resume=args.resume)
    stop = "stopped early, " if result.stopped_early else ""
    print(f"\ntest split of {result.run_dir} ({stop}best epoch {result.best_epoch} of {result.epochs_run}):")
    print(result.table())
    print(f"\nmetrics: {result.run_dir / 'metrics.json'}  model: {result.run_dir / 'model.pt'}")
    return 0
