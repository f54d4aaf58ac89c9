"""What a trained NeuroAR learnt, per scale, where its accuracy cannot show it.

    python benchmarks/teacher_forced.py RUN [--model NAME]   -> printed, one line per scale

The teacher-forced validation of RUN/NAME (as `neuroar train-ar` logs it in RUN/NAME_val.csv): per scale the
cross-entropy and accuracy beside copy's accuracy and the cross-entropy of the training targets' code
frequencies (`scaleK_prior_loss`). For a model trained before the validation logged the prior loss.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from neuroar.config import load_config
from neuroar.predict import Predictor
from neuroar.runs import MODEL_NAME
from neuroar.train.transformer import evaluate_teacher_forced, token_statistics, training_data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--model", default=MODEL_NAME)
    args = parser.parse_args()
    config = load_config(args.run / args.model / "config.yaml")
    model = Predictor.from_checkpoint(args.run / args.model if args.model != MODEL_NAME else args.run).model
    sequences, train_pairs, val_pairs = training_data(args.run, config, model)
    for pairs in (train_pairs, val_pairs):
        pairs["diagnosis_id"] = model.diagnosis_ids(list(pairs.get("diagnosis", [""] * len(pairs)))).numpy()
    _, log_priors = token_statistics(model, sequences, train_pairs)
    metrics = evaluate_teacher_forced(model, sequences, val_pairs, torch.device("cpu"), log_priors=log_priors)
    print(f"{args.run / args.model}, {len(val_pairs)} validation pairs")
    print("scale | loss | prior loss | accuracy | copy accuracy")
    for k in range(len(model.starts)):
        print(f"{k} | {metrics[f'scale{k}_loss']:.4f} | {metrics[f'scale{k}_prior_loss']:.4f} | "
              f"{metrics[f'scale{k}_accuracy']:.4f} | {metrics[f'scale{k}_copy_accuracy']:.4f}")


if __name__ == "__main__":
    main()
