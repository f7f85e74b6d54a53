"""The ``lightning-defense`` command line, built on LightningCLI.

``fit``, ``validate``, ``test`` and ``predict`` take ``--config configs/...yaml`` with ``model``, ``data``
and ``trainer`` sections; ``--print_config`` prints a starting config.

The model is :class:`~lightning_defense.models.ImageClassifier` (its arguments directly under ``model``, as
in every config of ``configs/``), or a user's own LightningModule named by class path: ``--model
my_pkg.MyModule``, ``--model.class_path my_pkg.MyModule`` or a config's ``model: {class_path: ...,
init_args: ...}``. The defenses come from the config as ``trainer.callbacks`` (``--trainer.callbacks+=
lightning_defense.callbacks.FriendsNoise``) or as a data wrapper (``--data
lightning_defense.datamodules.GaussianNoiseDataModule --data.base my_pkg.MyDataModule``).
"""

from __future__ import annotations

import inspect
import re
import sys
from functools import partial
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import lightning as L
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightning_defense.core.config import resolve_class
from lightning_defense.models.classifier import ImageClassifier

#: The data's attribute -> the model argument it is linked into.
LINKS = (("num_classes", "num_classes"), ("num_channels", "in_chans"))

_CLASS_PATH = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)+$")


#: Trainer arguments that Lightning types ``Optional[Union[int, float]]``: an int is a number of batches, a float
#: a fraction (``1.0``: every batch).
BATCH_LIMITS = ("limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches")


def _options(argv: Any) -> Iterator[tuple[str, Optional[str]]]:
    """``(option, value)`` of each ``--option value`` or ``--option=value`` of a command line, in order."""
    if not isinstance(argv, (list, tuple)):
        return
    for i, token in enumerate(argv):
        if not isinstance(token, str) or not token.startswith("-"):
            continue
        name, eq, value = token.partition("=")
        if not eq:
            value = argv[i + 1] if i + 1 < len(argv) and isinstance(argv[i + 1], str) else None
        yield name, value


def model_class_path(argv: Any) -> Optional[str]:
    """The model class that a command line names, if any (the last one wins, as for the parser): ``--model
    my_pkg.MyModule``, ``--model.class_path my_pkg.MyModule``, ``--model`` or ``--config`` naming a YAML
    (file or text) with a ``class_path`` under ``model``. None: the model is ImageClassifier."""
    found = None
    for name, value in _options(argv):
        if name in ("--config", "-c"):
            config = _yaml(value)
            found = _class_path(config.get("model") if isinstance(config, dict) else None) or found
        elif name == "--model":
            found = _class_path(_yaml(value)) or found
        elif name == "--model.class_path" and value:
            found = value
    return found


def _yaml(value: Optional[str]) -> Any:
    if value is None:
        return None
    try:
        path = Path(value)
        return yaml.safe_load(path.read_text() if path.is_file() else value)
    except (OSError, ValueError, yaml.YAMLError):
        return None


def _class_path(value: Any) -> Optional[str]:
    if isinstance(value, dict):
        value = value.get("class_path")
    return value if isinstance(value, str) and _CLASS_PATH.match(value) else None


class BatchLimitsParser(LightningArgumentParser):
    """LightningArgumentParser that reads each of :data:`BATCH_LIMITS` written as an int as that int.

    Lightning annotates them ``Optional[Union[int, float]]``, but ``typing`` caches unions by equality, so the
    annotation the parser sees can be an equal ``Union[float, int, None]`` made earlier. The parser then tries
    float first and reads ``1`` as ``1.0``: every batch where one was asked for, in the Trainer, in
    ``--print_config`` and in the saved ``config.yaml``. Here they are typed int first.
    """

    def add_lightning_class_args(self, lightning_class: Any, nested_key: str, subclass_mode: bool = False,
                                 required: bool = True) -> list[str]:
        if subclass_mode or not (isinstance(lightning_class, type) and issubclass(lightning_class, L.Trainer)):
            return super().add_lightning_class_args(lightning_class, nested_key, subclass_mode, required)
        added = self.add_class_arguments(lightning_class, nested_key, fail_untyped=False, instantiate=False,
                                         sub_configs=True, skip=set(BATCH_LIMITS))
        for name in BATCH_LIMITS:
            self.add_argument(f"--{nested_key}.{name}", type=Union[int, float, None], default=None,
                              help="int: that many batches; float: that fraction of them (1.0: all); null: all")
        return added + [f"{nested_key}.{name}" for name in BATCH_LIMITS]


class IntBatchLimitsCLI(LightningCLI):
    """LightningCLI whose parser reads a batch limit written as an int as that int (:class:`BatchLimitsParser`)."""

    def __init__(self, *args: Any, parser_class: type = BatchLimitsParser, **kwargs: Any) -> None:
        super().__init__(*args, parser_class=parser_class, **kwargs)


class DefenseCLI(IntBatchLimitsCLI):
    """LightningCLI with the data's ``num_classes`` / ``num_channels`` linked into the model.

    With ``test_after_fit: true`` the ``fit`` command ends by testing the fitted model.

    The fit configs name a ``ModelCheckpoint(save_last=True)`` in place of Lightning's default one (its
    ``last.ckpt`` is what a run resumes from); like the default one it goes away with
    ``--trainer.enable_checkpointing=false``.

    Args:
        user_model: A user's LightningModule class (the model is then a ``class_path``/``init_args`` argument):
            ``num_classes``/``num_channels`` are linked into its ``num_classes``/``in_chans`` only where it takes
            them and the data has them (otherwise its own configured value stands); a configured value other
            than its default that disagrees with the data's is an error. None: ImageClassifier, linked always.
    """

    def __init__(self, *args: Any, user_model: Optional[type] = None, **kwargs: Any) -> None:
        self.user_model = user_model
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--test_after_fit", type=bool, default=False, help="Run the test split after fit.")
        if self.user_model is None:
            parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
            parser.link_arguments("data.num_channels", "model.in_chans", apply_on="instantiate")
            return
        params = inspect.signature(self.user_model.__init__).parameters
        for source, target in LINKS:
            if target in params:
                parser.link_arguments("data", f"model.init_args.{target}", apply_on="instantiate",
                                      compute_fn=partial(self._linked, source, target, params[target].default))

    def _linked(self, source: str, target: str, default: Any, data: L.LightningDataModule) -> Any:
        """The value linked into the user's model: the data's, else the model's configured one."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        configured = config["model"]["init_args"].get(target)
        value = getattr(data, source, None)
        if value is None:
            return configured
        if configured is not None and configured != value and configured != default:
            raise ValueError(f"model.init_args.{target}={configured} disagrees with data.{source}={value}; "
                             f"drop model.init_args.{target} (it comes from the data)")
        return value

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = config.get("trainer")
        if trainer is None or trainer.get("enable_checkpointing") is not False or not trainer.get("callbacks"):
            return
        trainer["callbacks"] = [
            callback for callback in trainer["callbacks"]
            if not (isinstance(getattr(callback, "class_path", None), str)
                    and issubclass(resolve_class(callback.class_path, object, "trainer.callbacks"), ModelCheckpoint))
        ]

    def after_fit(self) -> None:
        if self.config[self.subcommand].get("test_after_fit"):
            self.trainer.test(self.model, datamodule=self.datamodule)


def build_cli(args: Optional[list[str]] = None, run: bool = True) -> DefenseCLI:
    """Build (and by default run) the LightningCLI for ``args``: ImageClassifier, or the LightningModule the
    arguments name (see :func:`model_class_path`)."""
    common = dict(subclass_mode_data=True, args=args, run=run, save_config_kwargs={"overwrite": True},
                  auto_configure_optimizers=False)
    named = model_class_path(sys.argv[1:] if args is None else args)
    if named is None:
        return DefenseCLI(ImageClassifier, L.LightningDataModule, **common)
    try:
        user_model = resolve_class(named, L.LightningModule, "--model")
    except ValueError:
        user_model = L.LightningModule  # no links; the parser reports the class path
    return DefenseCLI(L.LightningModule, L.LightningDataModule, subclass_mode_model=True, user_model=user_model,
                      **common)
