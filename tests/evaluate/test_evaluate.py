"""The evaluation harness and the ``poison`` / ``evaluate`` commands, on tiny settings."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from lightning_defense.evaluate import Evaluation, EvaluationConfig, evaluate
from lightning_defense.evaluate import protocol as evaluate_module
from lightning_defense.cli import main
from lightning_defense.datamodules import DigitsDataModule, PoisonSet

DATA = {"class_path": "lightning_defense.datamodules.DigitsDataModule",
        "init_args": {"image_size": 8, "batch_size": 128, "val_fraction": 0.1, "test_fraction": 0.2}}
URP = {"name": "urp", "class_path": "lightning_defense.attacks.UniversalRandomPerturbation",
       "init_args": {"eps": 0.1}}
WB = {"name": "wb", "class_path": "lightning_defense.attacks.WitchesBrew",
      "init_args": {"eps": 0.1, "budget": 0.01, "steps": 2, "restarts": 1, "surrogate_epochs": 1,
                    "backbone_kwargs": {"width": 4}, "progress": False}}
GAUSS = {"name": "gauss", "wrapper": {"class_path": "lightning_defense.datamodules.GaussianNoiseDataModule",
                                      "init_args": {"sigma": 0.1}}}


def tiny_config(tmp_path, **overrides):
    settings = dict(
        data=DATA, attacks=[URP, WB], defenses=[GAUSS], trials=2, seed=0, output_dir=str(tmp_path / "eval"),
        model={"backbone": "small_cnn", "backbone_kwargs": {"width": 4}, "lr": 0.05, "crop_padding": 1, "flip": False},
        trainer={"accelerator": "cpu", "devices": 1, "max_epochs": 1, "limit_train_batches": 2, "limit_val_batches": 0,
                 "limit_test_batches": 1},
        progress=False,
    )
    settings.update(overrides)
    return EvaluationConfig(**settings)


def train_split():
    dm = DigitsDataModule(**DATA["init_args"])
    dm.setup()
    return dm.train_tensors()


def stored_poisons(directory):
    """The poison sets an evaluation stored under ``directory``, in trial order, validated against the data."""
    return [PoisonSet.load(p, *train_split()) for p in sorted(Path(directory).glob("trial_*.safetensors"))]


def test_evaluate_writes_tables_and_resumes(tmp_path, monkeypatch):
    config = tiny_config(tmp_path)
    out = Path(config.output_dir)
    # Crash on the 7th victim: the first six results must already be on disk.
    real, calls = evaluate_module.train_victim, []

    def crashing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 7:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluate_module, "train_victim", crashing)
    with pytest.raises(KeyboardInterrupt):
        evaluate(config)
    assert len(list(out.glob("trials/*/*/*.json"))) == 6
    monkeypatch.setattr(evaluate_module, "train_victim", real)

    evaluation = Evaluation(config)
    records = evaluation.run()
    # 2 trials x (clean + 2 attacks) x (none + gauss) = 12 victims; 6 were done before the crash.
    assert len(records) == 12 and evaluation.executed == 6
    again = Evaluation(config)
    assert again.run() == records and again.executed == 0  # a finished run is all resumed

    summary, table = evaluate(config)
    assert (out / "table.md").read_text().startswith("| attack | kind | none | gauss |")
    assert "| wb | targeted | (" in table and "| urp | indiscriminate | (" in table
    assert all(r["victim_seconds"] > 0 for r in records)  # each victim's own wall time, kept through the resume
    assert "Wall time per victim (the defense's data preparation and the fit)" in table and "gauss " in table
    cells = {(s["attack"], s["defense"]): s for s in summary}
    assert cells[("wb", "none")]["trials"] == 2
    wb = [r for r in records if r["attack"] == "wb"]
    assert all(r["success"] in (0.0, 1.0) for r in wb)
    urp = [r for r in records if r["attack"] == "urp" and r["defense"] == "none"]
    clean = {r["trial"]: r["accuracy"] for r in records if r["attack"] == "clean" and r["defense"] == "none"}
    assert all(r["success"] == pytest.approx(clean[r["trial"]] - r["accuracy"]) for r in urp)
    assert json.loads((out / "table.json").read_text()) == summary
    assert (out / "table.csv").read_text().splitlines()[0].startswith("attack,defense,kind,trials")
    # Trials draw different targets (the stored poison sets' own targets); poisons are cached per trial.
    targets = {r["trial"]: (r["target_label"], r["adversarial_label"]) for r in wb if r["defense"] == "none"}
    stored = stored_poisons(out / "poisons" / "wb")
    assert len(stored) == 2 and set(targets) == {0, 1}
    assert stored[0].metadata["target_index"] != stored[1].metadata["target_index"]
    assert not torch.equal(stored[0].target_images, stored[1].target_images)
    dm = DigitsDataModule(**DATA["init_args"])
    dm.setup()
    test_images = dm.test_set.tensors()[0]
    for trial, poisons in enumerate(stored):  # each trial's record scores that trial's stored target
        assert torch.equal(poisons.target_images[0], test_images[int(poisons.metadata["target_index"])])
        assert targets[trial] == (int(poisons.target_labels[0]), int(poisons.adversarial_labels[0]))

    # Changing a setting that determines the results invalidates them (the key covers it).
    changed = Evaluation(tiny_config(tmp_path, trials=1, defenses=[], attacks=[URP],
                                     trainer={**config.trainer, "max_epochs": 2}))
    changed.run()
    assert changed.executed == 2


def test_clean_row_false_trains_only_the_attack_rows(tmp_path, monkeypatch):
    """Without the clean row a targeted table trains one victim per attack, defense and trial, and scores them
    the same as with it; an indiscriminate attack, whose success is the drop from the clean row, is refused."""
    real, trained = evaluate_module.train_victim, []

    def counting(config, defense, poisons, *args, **kwargs):
        trained.append(None if poisons is None else poisons.kind)
        return real(config, defense, poisons, *args, **kwargs)

    monkeypatch.setattr(evaluate_module, "train_victim", counting)
    without = Evaluation(tiny_config(tmp_path, attacks=[WB], clean_row=False, output_dir=str(tmp_path / "a")))
    records = without.run()
    assert trained == ["targeted"] * 4 and without.executed == 4  # 2 trials x (none + gauss), no clean victim
    assert {r["attack"] for r in records} == {"wb"}
    with_clean = Evaluation(tiny_config(tmp_path, attacks=[WB], output_dir=str(tmp_path / "b"))).run()
    scored = {(r["trial"], r["defense"]): (r["accuracy"], r["success"]) for r in with_clean if r["attack"] == "wb"}
    assert {(r["trial"], r["defense"]): (r["accuracy"], r["success"]) for r in records} == scored
    summary, table = Evaluation(tiny_config(tmp_path, attacks=[WB], clean_row=False,
                                            output_dir=str(tmp_path / "a"))).report(records)
    assert "| wb | targeted |" in table and "| clean |" not in table
    with pytest.raises(ValueError, match=r"attacks\[0\] \(urp\): an indiscriminate attack's success is the drop "
                                         r"from the clean row; set clean_row: true"):
        Evaluation(tiny_config(tmp_path, attacks=[URP, WB], clean_row=False))
    given = given_file(tmp_path)
    with pytest.raises(ValueError, match="given is an indiscriminate poison set: .* set clean_row: true"):
        Evaluation(tiny_config(tmp_path, attacks=[], defenses=[], trials=1, poison=str(given), clean_row=False,
                               output_dir=str(tmp_path / "c"))).run()
    with pytest.raises(ValueError, match="clean_row must be true or false; got 'no'"):
        tiny_config(tmp_path, clean_row="no")


def test_evaluate_a_given_poison_file(tmp_path):
    dm = DigitsDataModule(**DATA["init_args"])
    dm.setup()
    x, y = dm.train_tensors()
    path = tmp_path / "given.npz"
    idx = torch.arange(10)
    PoisonSet(idx, (x[idx] + 0.05).clamp(0, 1), y[idx], "linf", 0.05, kind="indiscriminate").save(path)
    config = tiny_config(tmp_path, attacks=[], defenses=[], trials=1, poison=str(path))
    summary, table = evaluate(config)
    assert {s["attack"] for s in summary} == {"clean", "given"}
    assert "| given | indiscriminate |" in table


def no_victim(*args, **kwargs):
    raise AssertionError("a victim was trained before the poison sets were checked")


def given_file(tmp_path, name="given.npz", eps=0.05, norm="linf", kind="indiscriminate", **fields):
    """A poison file for the tiny digits: 10 poisons perturbed by +0.05 per pixel (clipped), declaring ``eps``."""
    x, y = train_split()
    idx = torch.arange(10)
    path = tmp_path / name
    PoisonSet(idx, (x[idx] + 0.05).clamp(0, 1), y[idx], norm, eps, kind=kind, **fields).save(path)
    return path


@pytest.mark.parametrize("eps, norm, match", [
    (1.0, "linf", r"--poison .*given.npz declares linf eps=1 \(255/255\), above the allowed 0.0313"),
    (0.05, "linf", r"--poison .*given.npz declares linf eps=0.05 .*above the allowed 0.0313"),
    (1.0, "l2", r"--poison .*given.npz declares an l2 bound but an linf bound was asked for"),
])
def test_poison_eps_bounds_a_given_poison_set_file(tmp_path, monkeypatch, eps, norm, match):
    """``--poison_eps`` is a bound the file's declared eps must not exceed, checked before any victim trains."""
    from lightning_defense.cli.evaluate import evaluation_config
    from lightning_defense.datamodules import PoisonSetError

    path = given_file(tmp_path, eps=eps, norm=norm)
    monkeypatch.setattr(evaluate_module, "train_victim", no_victim)
    config = evaluation_config(["--data", json.dumps(DATA), "--poison", str(path), "--poison_eps", "0.0313",
                                "--output_dir", str(tmp_path / "eval"), "--trials", "1"])
    with pytest.raises(PoisonSetError, match=match):
        Evaluation(config).run()


def test_poison_eps_accepts_a_file_within_it(tmp_path):
    from lightning_defense.evaluate import load_poison_file

    path = given_file(tmp_path, eps=0.05)
    x, y = train_split()
    for bound in (0.05, 0.1):
        assert len(load_poison_file(tiny_config(tmp_path, attacks=[], poison=str(path), poison_eps=bound), x, y)) == 10
    with pytest.raises(ValueError, match="holds a PoisonSet of kind 'indiscriminate' but --poison_kind is 'targeted'"):
        load_poison_file(tiny_config(tmp_path, attacks=[], poison=str(path), poison_kind="targeted"), x, y)


@pytest.mark.parametrize("kind, fields, missing", [
    ("targeted", {}, "target_images, adversarial_labels"),
    ("targeted", {"target_images": torch.rand(1, 1, 8, 8)}, "adversarial_labels"),
    ("backdoor", {"source_class": 1, "target_class": 2}, "trigger"),
    ("backdoor", {"trigger": torch.ones(1, 2, 2)}, "source_class, target_class"),
])
def test_an_unscorable_poison_file_fails_before_any_victim_trains(tmp_path, monkeypatch, kind, fields, missing):
    path = given_file(tmp_path, kind=kind, **fields)
    monkeypatch.setattr(evaluate_module, "train_victim", no_victim)
    with pytest.raises(ValueError, match=rf"--poison .*given.npz: a {kind} PoisonSet needs .* but has no {missing};"):
        Evaluation(tiny_config(tmp_path, attacks=[], poison=str(path))).run()


def test_a_npy_export_takes_its_kind_from_poison_kind(tmp_path, monkeypatch):
    """A .npy export declares neither bound nor kind: the importer's default (targeted) cannot be scored."""
    import numpy as np

    from lightning_defense.evaluate import load_poison_file

    x, y = train_split()
    np.save(tmp_path / "export.npy", (x + 0.05).clamp(0, 1).numpy())
    monkeypatch.setattr(evaluate_module, "train_victim", no_victim)
    with pytest.raises(ValueError, match=r"export.npy: a targeted PoisonSet needs target_images, adversarial_labels"):
        Evaluation(tiny_config(tmp_path, attacks=[], poison=str(tmp_path / "export.npy"), poison_eps=0.05)).run()
    config = tiny_config(tmp_path, attacks=[], poison=str(tmp_path / "export.npy"), poison_eps=0.05,
                         poison_kind="indiscriminate")
    assert load_poison_file(config, x, y).kind == "indiscriminate"


def test_an_unscorable_backdoor_is_refused_by_its_classes_and_trigger_position(tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate_module, "train_victim", no_victim)
    wrong_class = given_file(tmp_path, "class.npz", kind="backdoor", trigger=torch.ones(1, 2, 2), source_class=1,
                             target_class=12)
    with pytest.raises(ValueError, match=r"class.npz: target_class \[12\] must be classes in 0..9"):
        Evaluation(tiny_config(tmp_path, attacks=[], poison=str(wrong_class))).run()
    off_image = given_file(tmp_path, "xy.npz", kind="backdoor", trigger=torch.ones(1, 2, 2), source_class=1,
                           target_class=2, metadata={"trigger_xy": "7,7"})
    with pytest.raises(ValueError, match=r"xy.npz: trigger of size 2x2 at x,y=7,7 does not fit 8x8 images"):
        Evaluation(tiny_config(tmp_path, attacks=[], poison=str(off_image))).run()


def test_crafted_poisons_are_checked_before_any_victim_trains(tmp_path, monkeypatch):
    """A (broken) attack whose targeted poisons carry no target fails right after crafting, not after training."""
    from lightning_defense.attacks import UniversalRandomPerturbation

    monkeypatch.setattr(UniversalRandomPerturbation, "kind", "targeted")
    monkeypatch.setattr(evaluate_module, "train_victim", no_victim)
    with pytest.raises(ValueError, match=r"attack 'urp' \(trial 0: .*trial_0000.safetensors\): a targeted PoisonSet"):
        Evaluation(tiny_config(tmp_path, attacks=[URP], defenses=[])).run()


def test_configuration_errors(tmp_path):
    with pytest.raises(ValueError, match="trials must be an int >= 1; got 0"):
        tiny_config(tmp_path, trials=0)
    with pytest.raises(ValueError, match="attacks is empty"):
        tiny_config(tmp_path, attacks=[])
    with pytest.raises(ValueError, match=r"poison_eps must be a finite number > 0 .*; got 0.0"):
        tiny_config(tmp_path, poison_eps=0.0)
    with pytest.raises(ValueError, match=r"poison_eps must be .*; got nan"):
        tiny_config(tmp_path, poison_eps=float("nan"))
    with pytest.raises(ValueError, match=r"poison_norm must be one of \('linf', 'l2'\); got 'l1'"):
        tiny_config(tmp_path, poison_norm="l1")
    with pytest.raises(ValueError, match=r"poison_kind must be one of .*; got 'availability'"):
        tiny_config(tmp_path, poison_kind="availability")
    with pytest.raises(ValueError, match="defense names must be unique and not 'none'"):
        tiny_config(tmp_path, defenses=[{"name": "none"}])
    with pytest.raises(ValueError, match=r"defenses\[0\] needs a non-empty 'name'"):
        Evaluation(tiny_config(tmp_path, defenses=[{"callbacks": []}]))
    with pytest.raises(ValueError, match=r"unknown keys \['wraper'\]"):
        Evaluation(tiny_config(tmp_path, defenses=[{"name": "x", "wraper": {}}]))
    with pytest.raises(ValueError, match="cannot import class_path 'lightning_defense.attacks.Nope'"):
        Evaluation(tiny_config(tmp_path, attacks=[{"name": "a", "class_path": "lightning_defense.attacks.Nope"}]))
    with pytest.raises(ValueError, match=r"attacks\[0\] \(a\): 'lightning_defense.attacks.AttackSuccessRate' is not a "
                                         "Attack class"):
        Evaluation(tiny_config(tmp_path, attacks=[{"name": "a", "class_path": "lightning_defense.attacks.AttackSuccessRate"}]))


def test_victim_configuration_errors(tmp_path):
    with pytest.raises(ValueError, match=r"attacks\[0\] \(urp\).victim: unknown keys \['modle'\]"):
        Evaluation(tiny_config(tmp_path, attacks=[{**URP, "victim": {"modle": {}}}]))
    with pytest.raises(ValueError, match=r"victim.transfer must be a bool; got 'yes'"):
        Evaluation(tiny_config(tmp_path, attacks=[{**URP, "victim": {"transfer": "yes"}}]))
    with pytest.raises(ValueError, match="victim.transfer needs an attack with a fixed feature extractor.*"
                                         "UniversalRandomPerturbation has none"):
        Evaluation(tiny_config(tmp_path, attacks=[{**URP, "victim": {"transfer": True}}]))


SA = {"name": "sa", "class_path": "lightning_defense.attacks.SleeperAgent",
      "init_args": {"eps": 0.1, "budget": 0.01, "patch_size": 2, "steps": 2, "retrain_rounds": 0,
                    "surrogate_epochs": 1, "backbone_kwargs": {"width": 4}, "progress": False}}


def test_a_backdoor_goal_fixed_in_the_config_is_used_in_every_trial(tmp_path):
    config = tiny_config(tmp_path, attacks=[{**SA, "goal": {"source_class": 8, "target_class": 5}}], defenses=[])
    records = Evaluation(config).run()
    poisons = stored_poisons(Path(config.output_dir) / "poisons" / "sa")
    assert len(poisons) == 2 and {(p.source_class, p.target_class) for p in poisons} == {(8, 5)}
    assert all((p.labels == 5).all() for p in poisons)  # clean-label: the poisons are target-class images
    assert not torch.equal(poisons[0].images, poisons[1].images)  # trials still differ (their seeds)
    assert sorted(r["attack"] for r in records) == ["clean", "clean", "sa", "sa"]
    # without the goal, the trials draw their own pairs
    drawn = Evaluation(tiny_config(tmp_path / "drawn", attacks=[SA], defenses=[], trials=3))
    drawn.run()
    pairs = {(p.source_class, p.target_class) for p in stored_poisons(drawn.out / "poisons" / "sa")}
    assert len(pairs) > 1


def test_sleeper_agents_noise_control_is_scored_on_the_same_goal_and_trigger(tmp_path):
    """Each trial's BackdoorNoiseControl draws the trial's own pair, as Sleeper Agent does with the same seed, and
    carries its trigger; both rows are scored as backdoors (the triggered source -> target rate)."""
    control = {"name": "sa_noise", "class_path": "lightning_defense.attacks.BackdoorNoiseControl",
               "init_args": {"eps": 0.1, "budget": 0.01, "patch_size": 2, "progress": False}}
    config = tiny_config(tmp_path, attacks=[SA, control], defenses=[], clean_row=False, trials=2)
    records = Evaluation(config).run()
    attack, noise = (stored_poisons(Path(config.output_dir) / "poisons" / row) for row in ("sa", "sa_noise"))
    for a, n in zip(attack, noise):
        assert (a.source_class, a.target_class) == (n.source_class, n.target_class)
        assert torch.equal(a.trigger, n.trigger) and a.metadata["trigger_xy"] == n.metadata["trigger_xy"]
        assert (n.labels == n.target_class).all() and len(n) == len(a)
    assert sorted((r["attack"], r["kind"]) for r in records) == [("sa", "backdoor")] * 2 + [("sa_noise", "backdoor")] * 2
    assert all(0 <= r["success"] <= 1 for r in records)


@pytest.mark.parametrize("attack, goal, match", [
    (URP, {"source_class": 8, "target_class": 5}, r"attacks\[0\] \(urp\).goal fixes a backdoor's.*indiscriminate attack"),
    (SA, {"source_class": 8}, r"goal must be \{source_class: int, target_class: int\}"),
    (SA, {"source_class": 8, "target_class": "5"}, "goal must be"),
    (SA, {"source_class": 3, "target_class": 3}, "must differ; got both 3"),
])
def test_goal_errors(tmp_path, attack, goal, match):
    with pytest.raises(ValueError, match=match):
        Evaluation(tiny_config(tmp_path, attacks=[{**attack, "goal": goal}]))


def test_goal_classes_out_of_range_are_an_error(tmp_path):
    config = tiny_config(tmp_path, attacks=[{**SA, "goal": {"source_class": 8, "target_class": 10}}], defenses=[])
    with pytest.raises(ValueError, match="goal classes 8, 10 must be in 0..9"):
        Evaluation(config).run()


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[2] / "configs").rglob("evaluate*.yaml")),
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_evaluate_configs_build(path):
    """Every ``evaluate`` config parses and builds its attacks, defenses and victims (no data is read)."""
    from lightning_defense.cli.evaluate import evaluation_config

    evaluation = Evaluation(evaluation_config(["--config", str(path)]))
    configured = yaml.safe_load(path.read_text()).get("defenses") or []
    assert evaluation.attacks and [d.name for d in evaluation.defenses] == ["none"] + [d["name"] for d in configured]


def test_poison_command_is_seeded_and_reproducible(tmp_path, capsys):
    config = tmp_path / "poison.yaml"
    config.write_text(yaml.safe_dump({"data": DATA, "attack": {k: v for k, v in WB.items() if k != "name"}, "seed": 3}))
    outputs = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    for output in outputs:
        main(["poison", "--config", str(config), "--output", str(output), "--target_index", "5"])
    assert "witches_brew: 13 poisons of 1258" in capsys.readouterr().out
    a, b = (PoisonSet.load(p, validate=False) for p in outputs)
    assert torch.equal(a.images, b.images) and torch.equal(a.indices, b.indices)
    dm = DigitsDataModule(**DATA["init_args"])
    dm.setup()
    a.validate(*dm.train_tensors())
    assert torch.equal(a.target_images[0], dm.test_set.tensors()[0][5])
    assert (a.labels == a.adversarial_labels[0]).all()  # poisons come from the adversarial class
    with pytest.raises(SystemExit, match="--output must end in .safetensors or .npz"):
        main(["poison", "--config", str(config), "--output", str(tmp_path / "x.pt")])
    with pytest.raises(SystemExit, match="--target_index 9999 is outside"):
        main(["poison", "--config", str(config), "--output", str(outputs[0]), "--target_index", "9999"])


def test_backdoor_success_counts_triggered_source_images():
    """attack_success pastes the trigger on the source-class test images and counts target-class predictions."""
    from lightning_defense.attacks import apply_trigger
    from lightning_defense.evaluate import attack_success
    from lightning_defense.datamodules import IndexedDataset

    class PatchDetector(torch.nn.Module):  # predicts class 7 iff the bottom-right pixel is 1, else class 0
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            hit = (x[:, 0, -1, -1] == 1).float()
            return torch.stack([1 - hit] + [torch.zeros_like(hit)] * 6 + [hit], dim=1)

    images, labels = torch.zeros(6, 1, 8, 8), torch.tensor([2, 2, 2, 3, 3, 3])
    images[0, 0, -2:, -2:] = 0.5  # one source image with a pre-existing mark, no effect
    trigger = torch.ones(1, 2, 2)
    assert torch.equal(apply_trigger(images, trigger)[:, :, -2:, -2:], torch.ones(6, 1, 2, 2))
    assert torch.equal(apply_trigger(images, trigger, "0,0")[:, :, :2, :2], torch.ones(6, 1, 2, 2))
    with pytest.raises(ValueError, match="does not fit"):
        apply_trigger(images, trigger, "7,0")
    poisons = PoisonSet(torch.tensor([0]), images[:1], labels[:1], "linf", 0.1, kind="backdoor", trigger=trigger,
                        source_class=2, target_class=7)
    assert attack_success(PatchDetector(), poisons, IndexedDataset(images, labels), 1.0, 1.0) == 1.0
    poisons.metadata["trigger_xy"] = "0,0"  # the detector looks bottom-right: a top-left trigger fails
    assert attack_success(PatchDetector(), poisons, IndexedDataset(images, labels), 1.0, 1.0) == 0.0


def test_every_loader_the_strategy_processes_becomes_a_rank_shard():
    """Loaders a callback swaps in mid-fit (WarmStart) pass the strategy too, so they are sharded as well."""
    from types import SimpleNamespace

    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    from lightning_defense.evaluate import shard_loaders

    processed = []
    strategy = SimpleNamespace(process_dataloader=lambda loader: processed.append(loader) or loader)
    trainer = SimpleNamespace(strategy=strategy, global_rank=1, world_size=2)
    shard_loaders(trainer)
    data = TensorDataset(torch.arange(10))
    shard = trainer.strategy.process_dataloader(DataLoader(data, batch_size=4))
    assert [b[0].tolist() for b in shard] == [[1, 3], [5, 7], [9]]  # rank 1's half of batches 0-3, 4-7, 8-9
    distributed = DataLoader(data, batch_size=4, sampler=DistributedSampler(data, num_replicas=2, rank=1, shuffle=False))
    assert trainer.strategy.process_dataloader(distributed) is distributed  # already split by rank
    assert len(processed) == 2  # the strategy's own processing still runs first


def test_a_rank_shard_lets_lightning_set_the_epoch_of_its_sampler():
    """Lightning's ``set_epoch`` reaches the shuffling sampler through the shard, so every rank's share of an
    epoch is cut from the 1-process loader's order of that epoch."""
    from lightning.fabric.utilities.data import _set_sampler_epoch
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_defense.datamodules.base import EpochShuffle
    from lightning_defense.evaluate import shard_loader

    data = TensorDataset(torch.arange(10))
    one = DataLoader(data, batch_size=4, sampler=EpochShuffle(data, seed=3))
    shards = [shard_loader(DataLoader(data, batch_size=4, sampler=EpochShuffle(data, seed=3)), rank, 2)
              for rank in range(2)]
    for loader in (one, *shards):
        _set_sampler_epoch(loader, 5)
    assert all(shard.batch_sampler.sampler.epoch == 5 for shard in shards)
    batches = [b[0].tolist() for b in one]  # epoch 5's order
    for rank, shard in enumerate(shards):
        assert [b[0].tolist() for b in shard] == [batch[rank::2] for batch in batches]


def _ddp_config(tmp_path, name, devices):
    """One trial of URP at 8x8 with a BatchNorm-free, augmentation-free victim (see the DDP test), undefended
    and with warm start (1 epoch on the poisoned data, then Gaussian-noised data)."""
    config = {
        "data": {"class_path": "lightning_defense.datamodules.DigitsDataModule",
                 "init_args": {"image_size": 8, "batch_size": 64, "val_fraction": 0.1, "test_fraction": 0.2}},
        "attacks": [URP], "trials": 1, "seed": 0, "progress": False,
        "defenses": [{"name": "warm_start", "callbacks": [{
            "class_path": "lightning_defense.callbacks.WarmStart",
            "init_args": {"epochs": 1, "wrapper": "lightning_defense.datamodules.GaussianNoiseDataModule",
                          "wrapper_kwargs": {"sigma": 0.1}}}]}],
        "output_dir": str(tmp_path / name),
        "model": {"backbone": "small_cnn", "backbone_kwargs": {"width": 8, "norm": "group"}, "lr": 0.1,
                  "crop_padding": 0, "flip": False},
        "trainer": {"accelerator": "cpu", "devices": devices, "max_epochs": 2,
                    "limit_val_batches": 0, **({"strategy": "ddp"} if devices > 1 else {})},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_evaluate_under_two_process_ddp_matches_one_process(tmp_path):
    """``evaluate`` with ``strategy: ddp, devices: 2`` (gloo) gives the 1-process table, and resumes.

    Each rank trains on half of every 1-process batch (DDP averages the halves' gradients into the full
    batch's), the victim has no BatchNorm and no random crop (their per-rank statistics and draws are the
    only things that differ by construction), and the test accuracy is reduced over both ranks' halves of
    the test split. What is left is floating-point summation order, hence the small tolerance.
    """
    import logging
    import os
    import subprocess
    import sys

    from lightning_defense.cli.evaluate import BANNER_LOGGERS

    root = Path(__file__).resolve().parents[2]
    levels = {name: logging.getLogger(name).level for name in BANNER_LOGGERS}
    main(["evaluate", "--config", str(_ddp_config(tmp_path, "one", 1))])
    # its banners were quiet while victims trained; the process's logging is as it was (later info still shows)
    assert {name: logging.getLogger(name).level for name in BANNER_LOGGERS} == levels
    one = json.loads((tmp_path / "one" / "table.json").read_text())
    cmd = [sys.executable, "-m", "lightning_defense.cli", "evaluate", "--config", str(_ddp_config(tmp_path, "two", 2))]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert "victims trained with DDP on 2 processes" in output
    assert output.count("| attack | kind | none |") == 1  # only rank 0 prints the table
    two = json.loads((tmp_path / "two" / "table.json").read_text())
    assert [(s["attack"], s["defense"]) for s in two] == [(s["attack"], s["defense"]) for s in one]
    for a, b in zip(one, two):
        assert b["accuracy_mean"] == pytest.approx(a["accuracy_mean"], abs=0.01), (a, b)
        if a["success_mean"] is not None:
            assert b["success_mean"] == pytest.approx(a["success_mean"], abs=0.01), (a, b)
    assert one[0]["accuracy_mean"] > 0.2  # the victim learned something: the comparison is not vacuous

    # Resume under DDP: the clean result is kept, the deleted URP result is trained again (by both ranks).
    clean, urp = (tmp_path / "two" / "trials" / row / "none" / "trial_0000.json" for row in ("clean", "urp"))
    clean_stat, urp_record = clean.stat().st_mtime_ns, json.loads(urp.read_text())
    urp.unlink()
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "victims trained with DDP on 2 processes" in proc.stdout
    untimed = lambda record: {k: v for k, v in record.items() if k != "victim_seconds"}  # noqa: E731 (wall time differs)
    assert clean.stat().st_mtime_ns == clean_stat and untimed(json.loads(urp.read_text())) == untimed(urp_record)


def _run(marker):
    return {"class_path": "subprocess.run", "init_args": {"args": ["touch", str(marker)]}}


@pytest.mark.parametrize("slot", ["data", "attack", "wrapper", "callbacks", "victim_callbacks"])
def test_a_config_naming_a_callable_that_is_not_its_slots_class_is_refused_before_any_call(tmp_path, slot):
    """``subprocess.run`` in any class slot is refused by its type (datamodule, attack, callback) unexecuted."""
    marker = tmp_path / "ran"
    overrides = {
        "data": dict(data=_run(marker)),
        "attack": dict(attacks=[{"name": "x", **_run(marker)}]),
        "wrapper": dict(defenses=[{"name": "d", "wrapper": _run(marker)}]),
        "callbacks": dict(defenses=[{"name": "d", "callbacks": [_run(marker)]}]),
        "victim_callbacks": dict(attacks=[{**URP, "victim": {"callbacks": [_run(marker)]}}]),
    }[slot]
    expected = "LightningDataModule" if slot in ("data", "wrapper") else "Attack" if slot == "attack" else "Callback"
    with pytest.raises(ValueError, match=f"'subprocess.run' is not a {expected} class"):
        Evaluation(tiny_config(tmp_path, **overrides))
    assert not marker.exists()


def test_the_poison_command_refuses_a_callable_that_is_not_an_attack(tmp_path):
    marker = tmp_path / "ran"
    config = tmp_path / "poison.yaml"
    config.write_text(yaml.safe_dump({"data": DATA, "attack": _run(marker)}))
    with pytest.raises(SystemExit, match="--attack: 'subprocess.run' is not a Attack class"):
        main(["poison", "--config", str(config), "--output", str(tmp_path / "p.safetensors")])
    assert not marker.exists()


def test_dotted_command_line_overrides_reach_the_config_sections():
    from lightning_defense.cli.evaluate import evaluation_config

    path = Path(__file__).resolve().parents[2] / "configs" / "digits" / "evaluate.yaml"
    config = evaluation_config(["--config", str(path), "--attacks.witches_brew.init_args.steps=2",
                                "--attacks.1.init_args.patch_size", "4", "--data.init_args.data_dir=/x",
                                "--trainer.max_epochs", "2", "--model.flip=true",
                                "--defenses.friends.callbacks.0.init_args.steps=1",
                                "--attacks.0.victim.trainer.max_epochs=3"])
    assert config.attacks[0]["init_args"]["steps"] == 2 and config.attacks[0]["init_args"]["restarts"] == 1
    assert config.attacks[1]["init_args"]["patch_size"] == 4
    assert config.data["init_args"] == {"image_size": 16, "batch_size": 64, "seed": 0, "data_dir": "/x"}
    assert config.trainer["max_epochs"] == 2 and config.model["flip"] is True
    assert config.defenses[1]["callbacks"][0]["init_args"] == {"begin_epoch": 2, "steps": 1}
    assert config.attacks[0]["victim"] == {"trainer": {"max_epochs": 3}}
    for bad, match in [("--data.class_path.x=1", "data.class_path is 'lightning_defense"),
                       ("--attacks.nope.init_args.steps=2", "attacks has no entry 'nope'"),
                       ("--attacks.7.init_args.steps=2", "attacks has no entry '7'"),
                       ("--trainer.max_epochs", "--trainer.max_epochs needs a value")]:
        with pytest.raises(SystemExit, match=match):
            evaluation_config(["--config", str(path), bad])


def test_the_poison_command_applies_dotted_overrides(tmp_path, capsys):
    config = tmp_path / "poison.yaml"
    config.write_text(yaml.safe_dump({"data": DATA, "attack": {k: v for k, v in URP.items() if k != "name"}}))
    main(["poison", "--config", str(config), "--output", str(tmp_path / "p.safetensors"),
          "--attack.init_args.budget=0.5", "--data.init_args.image_size", "16"])
    assert PoisonSet.load(tmp_path / "p.safetensors", validate=False).images.shape[1:] == (1, 16, 16)
    assert "629 poisons of 1258" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"cannot apply --attack.init_args.eps.x=1: attack.init_args.eps is 0.1"):
        main(["poison", "--config", str(config), "--output", str(tmp_path / "p.safetensors"),
              "--attack.init_args.eps.x=1"])


def test_the_table_shows_a_standard_error_only_where_there_is_one():
    from lightning_defense.evaluate.tables import markdown_table, summarise

    record = {"attack": "lsp", "kind": "indiscriminate", "defense": "none", "accuracy": 0.5, "success": 0.25}
    one = markdown_table(summarise([{**record, "trial": 0}]))
    assert "(50.0) 25.0 |" in one and "±" not in one.splitlines()[2] and "one trial" in one
    two = markdown_table(summarise([{**record, "trial": 0}, {**record, "trial": 1, "success": 0.35}]))
    assert "(50.0±0.0) 30.0±5.0" in two and "over 2 trials" in two
    assert "Wall time" not in two  # records written before victims were timed
    timed = markdown_table(summarise([{**record, "trial": 0, "victim_seconds": 40.0},
                                      {**record, "trial": 1, "victim_seconds": 50.0},
                                      {**record, "defense": "eclipse", "trial": 0, "victim_seconds": 200.0}]))
    assert "mean over the trained cells of each column: none 45.0 s, eclipse 3 min 20 s." in timed


def test_one_duration_format_for_tables_and_progress():
    from lightning_defense.evaluate.tables import duration

    assert [duration(s) for s in (4.24, 65, 3599.6, 3600, 7384)] == ["4.2 s", "1 min 5 s", "1 h 0 min", "1 h 0 min",
                                                                       "2 h 3 min"]


def test_victim_progress_names_each_victim_and_an_eta(capsys, monkeypatch):
    from lightning_defense.evaluate import protocol

    clock = iter([0.0, 10.0, 10.0, 30.0])
    monkeypatch.setattr(protocol.time, "monotonic", lambda: next(clock))
    progress = protocol.VictimProgress(3)
    progress.start("trial 1/1: clean / none", resumed=True)
    progress.start("trial 1/1: lsp / none", resumed=False)
    progress.done()
    progress.start("trial 1/1: lsp / friends", resumed=False)
    progress.done()
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "[victim 1/3] trial 1/1: clean / none: resumed from its record"
    assert lines[1] == "[victim 2/3] trial 1/1: lsp / none: training"
    assert lines[2] == "[victim 3/3] trial 1/1: lsp / friends: training, ETA 10.0 s"  # 10 s per trained victim, 1 left
