"""The `neuroar` command: a thin layer over the Python API.

User errors (NeuroARError) print one paragraph and exit with status 2; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from neuroar import __version__
from neuroar.allocator import reuse_freed_memory
from neuroar.errors import NeuroARError


def run() -> None:
    """The `neuroar` program (`neuroar ...`, `python -m neuroar ...`, `torchrun ... -m neuroar ...`)."""
    reuse_freed_memory()  # a program that trains, not a library inside someone else's process
    code = main()
    from neuroar import distributed  # torch only now: `neuroar --help` stays quick

    distributed.exit_program(code)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    # Overrides (key.sub=value) may come before or after options, so collect what argparse leaves over.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(a.startswith("-") or "=" not in a for a in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides += extra
    warnings.formatwarning = lambda message, category, *_: f"warning: {message}\n"
    try:
        args.handler(args)
    except NeuroARError as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished work is kept and a re-run continues from it.", file=sys.stderr)
        return 130
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="neuroar", description="Predict how a brain MRI will look years later "
                                     "(NeuroAR), with baselines and evaluation.")
    parser.add_argument("--version", action="version", version=f"neuroar {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    synth = commands.add_parser("synth", help="write a synthetic longitudinal cohort with ground truth")
    synth.add_argument("--out", type=Path, required=True, help="output folder (BIDS-like)")
    synth.add_argument("--subjects", type=int, default=40)
    synth.add_argument("--visits", type=int, default=3)
    synth.add_argument("--cohort", choices=["elderly", "adolescent"], default="elderly")
    synth.add_argument("--spacing", type=int, choices=[1, 2], default=2, help="voxel size in mm")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--misregistration", action="store_true", help="small random rigid motion between visits")
    synth.add_argument("--raw", action="store_true", help="also write each scan as a scanner would, into "
                       "OUT/raw: a head with skull and scalp, a scanner pose, a strong bias field (preprocess it with "
                       "data.raw=true)")
    synth.add_argument("--workers", type=int, default=0, help="processes (default: one per CPU core)")
    synth.set_defaults(handler=_synth)

    config_help = "key.sub=value settings that override the config file, e.g. data.spacing=1"
    prep = commands.add_parser("preprocess", help="validate and preprocess scans into the cache")
    prep.add_argument("input", type=Path, help="manifest CSV or BIDS folder")
    prep.add_argument("--config", type=Path, default=Path("demo"), help="YAML file or shipped name (demo, paper)")
    prep.add_argument("--out", type=Path, help="run folder for scans.csv, pairs.csv and config.yaml "
                                               "(default: runs/<config name>)")
    prep.add_argument("--seed", type=int, help="seed of the subject split (default: the config's)")
    prep.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=config_help)
    prep.set_defaults(handler=_preprocess)

    train = commands.add_parser("train-tokenizer", help="train (or resume) the MS-VQVAE of a preprocessed run")
    _add_run(train, "run folder made by `neuroar preprocess`")
    train.add_argument("--config", type=Path, help="config file (default: the run's config.yaml)")
    train.add_argument("--retrain", action="store_true", help=RETRAIN_HELP)
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=config_help)
    train.set_defaults(handler=_train_tokenizer)

    tokenize = commands.add_parser("tokenize", help="encode every scan of a run into cached token maps")
    _add_run(tokenize)
    tokenize.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=config_help)
    tokenize.set_defaults(handler=_tokenize)

    decode = commands.add_parser("decode", help="decode a scan's cached tokens into a NIfTI in the scan's space")
    _add_run(decode)
    decode.add_argument("--subject", required=True)
    decode.add_argument("--session", required=True)
    decode.add_argument("--out", type=Path, required=True, help="output .nii.gz (never one of the inputs)")
    decode.set_defaults(handler=_decode)

    train_ar = commands.add_parser("train-ar", help="train (or resume) the NeuroAR transformer on a run's tokens")
    _add_run(train_ar, "run folder with cached tokens (`neuroar tokenize`)")
    train_ar.add_argument("--config", type=Path, help="config file (default: the run's config.yaml)")
    train_ar.add_argument("--name", default="neuroar", help="model folder inside the run, e.g. for an ablation "
                                                            "(default: neuroar)")
    train_ar.add_argument("--retrain", action="store_true", help=RETRAIN_HELP)
    train_ar.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=config_help)
    train_ar.set_defaults(handler=_train_ar)

    baseline = commands.add_parser("train-baseline", help="train (or resume) a baseline: ldm or stargan (first the "
                                                          "run's autoencoder and its cached latents)")
    baseline.add_argument("kind", choices=["ldm", "stargan"])
    _add_run(baseline, "run folder made by `neuroar preprocess`")
    baseline.add_argument("--config", type=Path, help="config file (default: the run's config.yaml)")
    baseline.add_argument("--retrain", action="store_true", help=RETRAIN_HELP)
    baseline.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=config_help)
    baseline.set_defaults(handler=_train_baseline)

    predict = commands.add_parser("predict", help="predict follow-up scans of a NIfTI at later ages")
    predict.add_argument("--checkpoint", type=Path, required=True,
                         help="trained run folder (its NeuroAR model), or a model folder inside it: an "
                              "ablation, RUN/ldm, RUN/stargan")
    predict.add_argument("--input", type=Path, required=True, help="T1-weighted NIfTI (.nii or .nii.gz)")
    predict.add_argument("--age", type=float, required=True, help="age at the input scan, in years")
    predict.add_argument("--target-age", type=float, action="append", required=True, dest="target_ages",
                         help="age to predict at; repeat for several")
    predict.add_argument("--samples", type=int, help="samples per target age (default: the config's)")
    predict.add_argument("--diagnosis", help="the subject's diagnosis, for a model conditioned on it "
                                             "(transformer.diagnoses); default: none")
    predict.add_argument("--seed", type=int, default=0)
    predict.add_argument("--out", type=Path, required=True, help="output folder (not the input's folder)")
    predict.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                         help="sampling settings, e.g. sampling.temperature=0.5 sampling.guidance=2 ldm.ddim_steps=20, "
                              "and data.raw=true for a raw scan (a head in scanner space: skull stripped, registered, "
                              "the prediction put back into the head)")
    predict.set_defaults(handler=_predict)

    evaluate = commands.add_parser("evaluate", help="compare models (and the copy baselines) on held-out pairs")
    evaluate.add_argument("--models", nargs="+", default=[], help="trained run or model folders (RUN, RUN/NAME)")
    _add_run(evaluate, "run whose pairs are evaluated (default: the first model's)", required=False)
    evaluate.add_argument("--split", choices=["train", "val", "test"], help="default: test, else val")
    evaluate.add_argument("--region", help="aging region of the headline and the age sweep, e.g. grey_matter "
                                           "(default: chosen from the pairs' true changes, stated in summary.md)")
    evaluate.add_argument("--samples", type=int, help="NeuroAR samples per prediction (default: the config's)")
    evaluate.add_argument("--subjects", type=int, help="only the split's first N subjects (a quicker look)")
    evaluate.add_argument("--sweep-subjects", type=int, default=10,
                          help="subjects whose first scan is predicted at 1-8 more years (the age sweep)")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--out", type=Path, required=True, help="folder for tables and figures")
    evaluate.add_argument("overrides", nargs="*", metavar="sampling.KEY=VALUE",
                          help="sampling settings for every model, e.g. sampling.top_k=1")
    evaluate.set_defaults(handler=_evaluate)

    age = commands.add_parser("brain-age", help="brain-age regressors trained with and without model-synthetic "
                                                "scans, over several seeds (MAE, R2 on real test scans)")
    _add_run(age, "run folder made by `neuroar preprocess`")
    age.add_argument("--models", type=Path, nargs="+", default=[],
                     help="models that make the synthetic scans, one training set each (default: the run's "
                          "NeuroAR; RUN/ldm, RUN/stargan, an ablation work too)")
    age.add_argument("--config", type=Path, help="config file (default: the run's config.yaml)")
    age.add_argument("--out", type=Path, help="output folder (default: RUN/brain_age)")
    age.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=config_help + ", brain_age.seeds=5")
    age.set_defaults(handler=_brain_age)

    report = commands.add_parser("report", help="write RUN/report.html: tables, figures, slices, a 3D viewer")
    report.add_argument("run", type=Path, help="run folder with a trained model and RUN/evaluation")
    report.add_argument("--seed", type=int, default=0)
    report.set_defaults(handler=_report)

    plan = commands.add_parser("plan", help="parameters, tokens, FLOPs and memory per GPU of a config; optionally "
                                            "one measured training step at full shape")
    plan.add_argument("--config", type=Path, default=Path("demo"), help="YAML file or shipped name (demo, paper)")
    plan.add_argument("--batch", type=int, help="batch per process (default: each trainer's configured batch)")
    plan.add_argument("--run-step", action="store_true", help="also run one training step of the tokenizer and "
                                                              "NeuroAR at full shape on random data (batch 1)")
    plan.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=config_help)
    plan.set_defaults(handler=_plan)

    show = commands.add_parser("config", help="print the resolved config")
    show.add_argument("--config", type=Path)
    show.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=config_help)
    show.set_defaults(handler=_show_config)

    demo = commands.add_parser("demo", help="run the pipeline end to end on the synthetic cohort")
    demo.add_argument("--out", type=Path, default=Path("runs/demo"))
    demo.add_argument("--quick", action="store_true", help="a smaller cohort, for a first look")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--retrain", action="store_true", help=RETRAIN_HELP)
    demo.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=config_help)
    demo.set_defaults(handler=_demo)

    study = commands.add_parser("study", help="the paper's study on an elderly and an adolescent synthetic cohort")
    study.add_argument("--out", type=Path, default=Path("runs/study"))
    # No argparse `choices`: they would refuse the overrides that follow the cohorts (`--cohorts elderly seed=1`).
    study.add_argument("--cohorts", nargs="+", default=["elderly", "adolescent"], metavar="{elderly,adolescent}")
    study.add_argument("--subjects", type=int, default=150, help="per cohort")
    study.add_argument("--visits", type=int, default=4)
    study.add_argument("--seed", type=int, default=0)
    study.add_argument("--seeds", type=int, default=1,
                       help="train the main NeuroAR model with this many seeds (--seed, --seed + 1, ...): mean and "
                            "std over them in results/seeds.csv")
    study.add_argument("--retrain", action="store_true", help=RETRAIN_HELP)
    study.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=config_help)
    study.set_defaults(handler=_study)
    return parser


RETRAIN_HELP = ("set aside (RUN/NAME.replaced-TIME) models trained on other data than the run now holds "
                "(scans, split, pairs) and train anew; without it they are refused")


def _add_run(parser: argparse.ArgumentParser, help: str = "run folder", required: bool = True) -> None:
    # --run-dir too: under torchrun, whose own parser would take "--run" for its "--run-path".
    parser.add_argument("--run", "--run-dir", dest="run", type=Path, required=required, help=help)


def _synth(args: argparse.Namespace) -> None:
    from neuroar.data.synth.cohort import SynthOptions, make_cohort

    options = SynthOptions(subjects=args.subjects, visits=args.visits, cohort=args.cohort, spacing=args.spacing,
                           seed=args.seed, misregistration=args.misregistration, raw=args.raw,
                           workers=args.workers)
    manifest = make_cohort(args.out, options)
    print(f"wrote {len(manifest)} scans of {manifest['subject_id'].nunique()} subjects to {args.out} "
          f"(manifest.csv, truth.csv, figures/)")


def _preprocess(args: argparse.Namespace) -> None:
    from neuroar.config import load_config
    from neuroar.pipeline import prepare_dataset

    config = load_config(args.config, args.overrides)
    if args.seed is not None:
        config.seed = args.seed
    out = args.out or Path("runs") / config.name
    dataset = prepare_dataset(args.input, config, out)
    print(dataset.summary())


def _run_config(run: Path, config_path: Path | None, overrides: list[str]):
    from neuroar.runs import load_run_config

    return load_run_config(run, config_path, overrides)


def _train_tokenizer(args: argparse.Namespace) -> None:
    from neuroar.train.tokenizer import train_tokenizer

    metrics = train_tokenizer(args.run, _run_config(args.run, args.config, args.overrides), retrain=args.retrain)
    print("validation: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))


def _tokenize(args: argparse.Namespace) -> None:
    from neuroar.data.tokens import tokenize_run

    print(f"tokens: {tokenize_run(args.run, _run_config(args.run, None, args.overrides))}")


def _decode(args: argparse.Namespace) -> None:
    from neuroar.data.tokens import write_decoded_scan

    write_decoded_scan(args.run, _run_config(args.run, None, []), args.subject, args.session, args.out)
    print(f"decoded {args.subject} {args.session} -> {args.out}")


def _train_ar(args: argparse.Namespace) -> None:
    from neuroar.train.transformer import train_transformer

    metrics = train_transformer(args.run, _run_config(args.run, args.config, args.overrides), name=args.name,
                                retrain=args.retrain)
    print("validation (teacher forced): " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))


def _train_baseline(args: argparse.Namespace) -> None:
    from neuroar.train.baselines import train_baseline

    metrics = train_baseline(args.run, _run_config(args.run, args.config, args.overrides), args.kind,
                             retrain=args.retrain)
    print("validation: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))


def _predict(args: argparse.Namespace) -> None:
    from neuroar.predict import write_predictions

    for path in write_predictions(args.checkpoint, args.input, args.age, args.target_ages, args.out, args.samples,
                                  args.seed, sampling=args.overrides, diagnosis=args.diagnosis):
        print(path)


def _evaluate(args: argparse.Namespace) -> None:
    from neuroar.evaluate.compare import evaluate_models

    evaluate_models(args.models, args.out, args.run, args.split, args.samples, args.seed, sampling=args.overrides,
                    subjects=args.subjects, sweep_subjects=args.sweep_subjects, region=args.region)
    print((args.out / "summary.md").read_text())


def _brain_age(args: argparse.Namespace) -> None:
    from neuroar.evaluate.brain_age import run_brain_age

    out = args.out or args.run / "brain_age"
    run_brain_age(args.run, _run_config(args.run, args.config, args.overrides), args.models, out)
    print((out / "summary.md").read_text())


def _report(args: argparse.Namespace) -> None:
    from neuroar.report import build_report

    print(f"report: {build_report(args.run, seed=args.seed)}")


def _plan(args: argparse.Namespace) -> None:
    from neuroar.config import load_config
    from neuroar.plan import measure_steps, plan_markdown

    if args.batch is not None and args.batch < 1:
        raise NeuroARError(f"--batch must be at least 1, got {args.batch}.")
    config = load_config(args.config, args.overrides)
    print(plan_markdown(config, args.batch))
    if args.run_step:
        for result in measure_steps(config, args.batch or 1):
            print(f"measured {result['model']} step, batch {result['batch']} on {result['device']}: "
                  f"{result['step_seconds']:.2f} s, peak memory {result['peak_memory_bytes'] / 2**30:.2f} GiB "
                  f"({result['memory']}; estimate {result['estimated_bytes'] / 2**30:.2f} GiB)")


def _show_config(args: argparse.Namespace) -> None:
    import yaml

    from neuroar.config import load_config

    print(yaml.safe_dump(load_config(args.config, args.overrides).to_dict(), sort_keys=False), end="")


def _demo(args: argparse.Namespace) -> None:
    from neuroar.pipeline import run_demo

    run_demo(args.out, quick=args.quick, seed=args.seed, overrides=args.overrides, retrain=args.retrain)


def _study(args: argparse.Namespace) -> None:
    from neuroar.study import CHANGE_REGION, run_study

    # The list option takes the overrides that follow it; hand them back.
    cohorts = [value for value in args.cohorts if "=" not in value]
    overrides = [*args.overrides, *(value for value in args.cohorts if "=" in value)]
    unknown = sorted(set(cohorts) - set(CHANGE_REGION))
    if unknown or not cohorts:
        raise NeuroARError(f"--cohorts takes {' and/or '.join(CHANGE_REGION)}, not {', '.join(unknown) or 'none'}")
    print(run_study(args.out, cohorts, args.subjects, args.visits, args.seed, overrides, args.retrain,
                    args.seeds).read_text())


if __name__ == "__main__":
    raise SystemExit(main())
