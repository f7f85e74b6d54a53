"""``lightning-defense certify`` and ``lightning-defense certify-plot``.

``certify --config configs/digits/certify.yaml`` runs :func:`~lightning_defense.certify.loop.run_certification`;
with ``sigmas: [...]`` it runs once per sigma (into ``output_dir/sigma_<s>``) and plots all of them together.
``certify-plot RUN_DIR ... --output fig.png`` draws finished runs on one plot.

The models are ImageClassifier (its arguments under ``model``), FastImageClassifier (``model: {class_path:
lightning_defense.models.FastImageClassifier, init_args: ...}``; trained by the loop itself, several at once, as
ImageClassifier), or a user's own LightningModule named by class path (``--model my_pkg.MyModule`` or ``model:
{class_path: ..., init_args: ...}``) trained on a user's own datamodule (``--data my_pkg.MyDataModule``) by its own
``training_step`` and ``configure_optimizers``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import lightning as L
from jsonargparse import ActionConfigFile, ArgumentParser

from lightning_defense.certify.loop import (
    CURVE_PNG,
    DEFAULT_SMOOTHING,
    TrainingOptions,
    plot_runs,
    run_certification,
)
from lightning_defense.certify.training import RECIPES
from lightning_defense.cli.fit import model_class_path
from lightning_defense.core.config import resolve_class
from lightning_defense.models.classifier import ImageClassifier


def build_parser(user_model: bool = False) -> ArgumentParser:
    """The ``certify`` parser: ``data`` / ``smoothing`` / ``model`` / ``trainer`` sections and the loop's options.

    ``user_model``: the ``model`` section names a LightningModule by ``class_path``/``init_args`` (else it holds
    ImageClassifier's arguments)."""
    parser = ArgumentParser(prog="lightning-defense certify", description=__doc__.splitlines()[0],
                            default_meta=False)
    parser.add_argument("--config", action=ActionConfigFile, help="A YAML config (see configs/*/certify.yaml).")
    parser.add_argument("--seed", type=int, default=0, help="Seeds every model (with its index).")
    parser.add_argument("--output_dir", type=str, default="runs/certify", help="Votes and outputs; a rerun resumes.")
    parser.add_argument("--mode", type=str, default="smoothing",
                        help="'smoothing' (Hong et al.: m smoothed training sets, clean test inputs), 'rab' (Weber et al.: "
                             "also per-model test-time noise) or 'dpa' (Levine & Feizi: k partitions).")
    parser.add_argument("--num_models", type=int, default=32, help="m models (smoothing) or k partitions (dpa).")
    parser.add_argument("--n0", type=int, default=8, help="Selection models; the other m - n0 estimate pA.")
    parser.add_argument("--selection", type=str, default="split",
                        help="'split' (Cohen: n0 select, n estimate) or 'all' (the paper: all m do both; not a strict bound).")
    parser.add_argument("--alpha", type=float, default=0.001, help="Failure probability.")
    parser.add_argument("--sigma", type=Optional[float], default=None,
                        help="The smoothing wrapper's sigma (overrides smoothing.init_args.sigma) where it takes one; "
                             "otherwise it must equal the sigma the wrapper certifies. The radius always uses the "
                             "wrapper's certified_sigma (e.g. EclipseDataModule's t* noise level).")
    parser.add_argument("--sigmas", type=Optional[list[float]], default=None,
                        help="A sigma grid (overrides smoothing.init_args.sigma, as --sigma): one run per sigma under "
                             "output_dir/sigma_<s>, plotted together.")
    parser.add_argument("--num_test_points", type=Optional[int], default=None, help="Certify the first N test points.")
    parser.add_argument("--test_indices", type=Optional[list[int]], default=None, help="Or exactly these test indices.")
    parser.add_argument("--max_models", type=Optional[int], default=None, help="Stop after training this many models.")
    parser.add_argument("--report_radii", type=list[float], default=[0.0, 0.1, 0.25, 0.5, 1.0],
                        help="Radii (DPA: certified sizes, in insertions+deletions and in modified samples) "
                             "reported in the summary.")
    parser.add_argument("--progress_bar", type=bool, default=True)
    parser.add_argument("--collective_data_setup", type=Optional[bool], default=None,
                        help="Under DDP, all ranks set up every model's smoothed data together (diffusion purification).")
    parser.add_subclass_arguments(L.LightningDataModule, "data", required=True, help="The (possibly poisoned) data.")
    parser.add_subclass_arguments(
        L.LightningDataModule, "smoothing", required=False, instantiate=False, skip={"base", "seed"},
        help="Smoothing wrapper (class_path/init_args), built per model as cls(base=data, seed=i, **init_args); "
             "default GaussianNoiseDataModule (Gaussian-only, Hong et al.; RAB's training noise in rab mode); "
             "null in dpa mode.")
    parser.set_defaults(smoothing=DEFAULT_SMOOTHING)
    if user_model:
        parser.add_subclass_arguments(L.LightningModule, "model", required=True, instantiate=False,
                                      help="Your LightningModule (class_path/init_args), built per model.")
    else:
        parser.add_class_arguments(ImageClassifier, "model", skip={"num_classes", "in_chans"})
    parser.add_argument("--num_classes", type=Optional[int], default=None,
                        help="Your LightningModule: the number of classes (default: data.num_classes, else the "
                             "largest label + 1).")
    parser.add_class_arguments(TrainingOptions, "trainer")
    return parser


def _print_summary(result, label: str = "") -> None:
    s = result.summary
    head = f"certify{label}: "
    if s["mode"] in ("smoothing", "rab"):
        name = "RAB, " if s["mode"] == "rab" else ""
        source = f" ({s['sigma_from']})" if s.get("sigma_from") else ""
        print(f"{head}{name}sigma={s['sigma']:g}{source}, m={s['num_models']} (n0={s['n0']}, n={s['n']}, {s['selection']}), "
              f"alpha={s['alpha']:g}, {s['num_test_points']} test points")
        print(f"  certifies: {s['certifies']}")
        print("  certified accuracy at radius " + ", ".join(f"{r}: {a:.3f}" for r, a in s["certified_accuracy"].items()))
        print(f"  abstain rate {s['abstain_rate']:.3f}; smoothed classifier (majority vote) accuracy "
              f"{s['smoothed_accuracy']:.3f}; mean single-model accuracy {s['mean_model_accuracy']:.3f}; "
              f"largest radius n={s['n']} votes can certify: {s['max_certifiable_radius']:.3f}")
    else:
        print(f"{head}DPA, k={s['num_partitions']} partitions (sizes {s['partition_sizes']['min']}-"
              f"{s['partition_sizes']['max']}), {s['num_test_points']} test points")
        print(f"  certifies: {s['certifies']}")
        for unit, what in (("insertions_deletions", "training samples inserted + deleted"),
                           ("modified_samples", "modified training samples")):
            print(f"  certified accuracy at {what}: "
                  + ", ".join(f"{r}: {a:.3f}" for r, a in s[f"certified_accuracy_{unit}"].items()))
        print(f"  median certified size: {s['median_certified_insertions_deletions']} inserted + deleted = "
              f"{s['median_certified_modified_samples']} modified samples; ensemble accuracy "
              f"{s['smoothed_accuracy']:.3f}; mean single-model accuracy {s['mean_model_accuracy']:.3f}")
    for name, path in result.files.items():
        print(f"  {name}: {path}")


def run_certify(argv: list[str]) -> None:
    """``lightning-defense certify --config configs/digits/certify.yaml``."""
    parser = build_parser(user_model=model_class_path(argv) is not None)
    cfg = parser.parse_args(argv)
    init = parser.instantiate_classes(cfg)
    model = cfg.model.as_dict()
    if "class_path" in model and resolve_class(model["class_path"], L.LightningModule, "model") in RECIPES:
        for linked in ("num_classes", "in_chans"):  # from the data, as without class_path
            (model.get("init_args") or {}).pop(linked, None)
    kwargs = dict(
        model=model, num_classes=cfg.num_classes, mode=cfg.mode, num_models=cfg.num_models, n0=cfg.n0,
        selection=cfg.selection, alpha=cfg.alpha, num_test_points=cfg.num_test_points, test_indices=cfg.test_indices,
        training=init.trainer, seed=cfg.seed, max_models=cfg.max_models, report_radii=cfg.report_radii,
        progress_bar=cfg.progress_bar, collective_data_setup=cfg.collective_data_setup,
    )
    smoothing = None
    if cfg.mode in ("smoothing", "rab") and cfg.smoothing is not None:
        init_args = cfg.smoothing.get("init_args")
        smoothing = {"class_path": cfg.smoothing["class_path"],
                     "init_args": init_args.as_dict() if hasattr(init_args, "as_dict") else dict(init_args or {})}
        if cfg.sigma is not None or cfg.sigmas is not None:  # sigma / sigmas override the wrapper's own
            smoothing["init_args"].pop("sigma", None)
    if cfg.sigmas is None:
        runs = [(cfg.sigma, smoothing, Path(cfg.output_dir), "")]
    else:
        if cfg.sigma is not None:
            sys.exit("lightning-defense certify: give sigmas (a grid) or sigma, not both")
        if not cfg.sigmas:
            sys.exit("lightning-defense certify: sigmas must list at least one sigma, e.g. [0.1, 0.25, 0.5, 1.0]")
        runs = [(s, smoothing, Path(cfg.output_dir) / f"sigma_{s:g}", f" [sigma={s:g}]") for s in cfg.sigmas]
    results = []
    for sigma, smooth, out, label in runs:
        try:
            result = run_certification(init.data, smoothing=smooth, sigma=sigma, output_dir=out, **kwargs)
        except ValueError as err:
            sys.exit(f"lightning-defense certify: {err}")
        results.append(result)
        if result.summary:
            _print_summary(result, label)
        elif result.complete is False and result.trained is not None and _is_rank_zero():
            print(f"certify{label}: stopped after {len(result.trained)} models (max_models); rerun to resume in {out}")
    if len(results) > 1 and all(r.complete for r in results) and _is_rank_zero():
        path = plot_runs([r.output_dir for r in results], Path(cfg.output_dir) / CURVE_PNG)
        print(f"certify: all sigmas plotted in {path}")


def _is_rank_zero() -> bool:
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def run_certify_plot(argv: list[str]) -> None:
    """``lightning-defense certify-plot RUN_DIR [RUN_DIR ...] --output fig.png [--labels a b]``."""
    parser = ArgumentParser(prog="lightning-defense certify-plot",
                            description="Plot the certified accuracy of several finished certify runs together.")
    parser.add_argument("run_dirs", type=str, nargs="+", help="Output directories of `certify`.")
    parser.add_argument("--output", type=str, required=True, help="The PNG to write.")
    parser.add_argument("--labels", type=Optional[list[str]], default=None, help="One label per run.")
    parser.add_argument("--title", type=Optional[str], default=None)
    cfg = parser.parse_args(argv)
    try:
        path = plot_runs(cfg.run_dirs, cfg.output, labels=cfg.labels, title=cfg.title)
    except ValueError as err:
        sys.exit(f"lightning-defense certify-plot: {err}")
    print(f"certify-plot: {path}")
