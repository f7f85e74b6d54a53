"""One device choice for every attack stage (``core.device.resolve_device``), proven on the CPU.

Every stage that computes on a model resolves its device through :func:`resolve_device` under a stage name;
:func:`record_devices` shows which stage resolved what, and each stage's model and outputs are checked to
sit where it resolved. Nothing here needs (or uses) a GPU: CUDA is patched away where "auto" is resolved.
"""

import pytest
import torch
import yaml

from lightning_defense.attacks import (
    AttackGoal,
    AutoregressivePerturbation,
    BullseyePolytope,
    ClasswiseLinearSeparablePerturbation,
    ErrorMinimizingNoise,
    LinearSeparablePerturbation,
    LSPNoiseControl,
    PoisonFrogs,
    RandomNoiseControl,
    SleeperAgent,
    UniversalRandomPerturbation,
    WitchesBrew,
    train_surrogate,
)
from lightning_defense.core import Collective, autocast, record_devices, resolve_device
from lightning_defense.core.device import check_device

CPU = torch.device("cpu")
SMALL = {"backbone_kwargs": {"width": 4}, "progress": False}
GM = dict(steps=2, restarts=1, surrogate_epochs=1, **SMALL)
FC = dict(steps=2, extractor_epochs=1, **SMALL)

#: Every attack family, tiny, and the stages it must resolve.
FAMILIES = {
    "witches_brew": (lambda d: WitchesBrew(eps=16 / 255, budget=0.05, device=d, **GM), {"craft", "surrogate"}),
    "sleeper_agent": (lambda d: SleeperAgent(eps=16 / 255, budget=0.05, patch_size=4, retrain_rounds=1, device=d, **GM),
                      {"craft", "surrogate"}),
    "em": (lambda d: ErrorMinimizingNoise(eps=8 / 255, max_rounds=1, train_steps=1, perturb_steps=1, batch_size=64,
                                          device=d, **SMALL), {"craft"}),
    "poison_frogs": (lambda d: PoisonFrogs(eps=16 / 255, budget=0.05, device=d, **FC), {"craft", "extractor"}),
    "bullseye_polytope": (lambda d: BullseyePolytope(eps=16 / 255, budget=0.05, device=d, **FC), {"craft", "extractor"}),
    "lsp": (lambda d: LinearSeparablePerturbation(eps=1.0, patch_size=4, device=d), {"craft"}),
    "lsp_noise": (lambda d: LSPNoiseControl(eps=1.0, patch_size=4, device=d), {"craft"}),
    "classwise_lsp": (lambda d: ClasswiseLinearSeparablePerturbation(eps=8 / 255, patch_size=4, device=d), {"craft"}),
    "ar": (lambda d: AutoregressivePerturbation(eps=1.0, progress=False, device=d), {"craft"}),
    "urp": (lambda d: UniversalRandomPerturbation(eps=8 / 255, device=d), {"craft"}),
    "random_noise": (lambda d: RandomNoiseControl(eps=8 / 255, device=d), {"craft"}),
}


@pytest.fixture
def no_cuda(monkeypatch):
    """A machine without CUDA, whatever this one has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture(scope="module")
def split(digits16):
    x, y, _, _ = digits16
    return x[:100].clone(), y[:100].clone()


def _poison_tensors(poisons):
    return [t for t in (poisons.indices, poisons.images, poisons.labels, poisons.target_images, poisons.trigger)
            if t is not None]


# -- resolve_device ---------------------------------------------------------------------------------------


def test_named_devices_resolve_to_themselves():
    assert resolve_device("cpu") == CPU
    assert resolve_device(CPU) == CPU


def test_auto_is_the_cpu_without_cuda(no_cuda):
    assert resolve_device() == CPU
    assert resolve_device("auto", Collective()) == CPU


def test_auto_follows_the_collectives_gpu_then_the_current_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)

    class Strategy:  # a Lightning strategy's rank device
        root_device = torch.device("cuda", 3)
        global_rank, world_size = 0, 1

    assert resolve_device("auto", Collective(Strategy())) == torch.device("cuda", 3)
    assert resolve_device("auto", Strategy()) == torch.device("cuda", 3)
    assert resolve_device("auto") == torch.device("cuda", 2)
    Strategy.root_device = CPU  # a CPU trainer on a GPU machine: "auto" is still the current GPU
    assert resolve_device("auto", Strategy()) == torch.device("cuda", 2)


@pytest.mark.parametrize("bad", ["gpu", "cuda:x", "tpu", "", 0, None])
def test_an_invalid_device_setting_is_a_clear_error(bad):
    with pytest.raises(ValueError, match=r"attack\.init_args\.device must be one of 'auto', 'cpu', 'cuda', "
                                         r"'cuda:<index>' \(e\.g\. 'cuda:1'\) or 'mps'; got"):
        resolve_device(bad, what="attack.init_args.device")
    with pytest.raises(ValueError, match="device must be one of"):
        check_device(bad)


def test_a_device_this_machine_lacks_is_a_clear_error(no_cuda, monkeypatch):
    with pytest.raises(ValueError, match=r"device='cuda' but torch sees no CUDA GPU on this machine; use 'auto' or 'cpu'"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"device='cuda:3' but this machine has 1 CUDA device\(s\) \(0\.\.0\)"):
        resolve_device("cuda:3")


def test_record_devices_logs_named_stages_only_while_open():
    resolve_device("cpu", stage="before")
    with record_devices() as outer:
        resolve_device("cpu", stage="a")
        resolve_device("cpu")  # unnamed: not recorded
        with record_devices() as inner:
            resolve_device("cpu", stage="b")
    resolve_device("cpu", stage="after")
    assert outer == [("a", CPU), ("b", CPU)] and inner == [("b", CPU)]
    assert outer.stages() == {"a": CPU, "b": CPU}


def test_autocast_is_bf16_on_cuda_only():
    with autocast(CPU, "32"):
        assert not torch.is_autocast_enabled("cpu")
    with pytest.warns(UserWarning, match="precision='bf16' runs in float32 on cpu"):
        context = autocast(CPU, "bf16")
    with context:
        assert not torch.is_autocast_enabled("cpu")
    with pytest.raises(ValueError, match="precision must be '32' .* or 'bf16'"):
        autocast(CPU, "16")


# -- every attack stage ----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_attack_stage_resolves_and_runs_on_its_device(family, split, one_thread):
    x, y = split
    build, stages = FAMILIES[family]
    attack = build("cpu")
    goal = attack.sample_goal(x, y, num_classes=10, seed=1)
    with record_devices() as log:
        poisons = attack.craft(x, y, goal=goal, seed=0)
    assert {stage for stage, _ in log} == {f"{family}.{s}" for s in stages}
    assert all(device == CPU for _, device in log)
    assert all(t.device == CPU for t in _poison_tensors(poisons))  # the PoisonSet is on the CPU
    if "extractor" in stages:  # the extractor sits where its stage resolved
        assert {p.device for p in attack.extractor.parameters()} == {log.stages()[f"{family}.extractor"]}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_attack_honours_a_device_it_cannot_have(family, split, no_cuda):
    """``device='cuda'`` is not ignored: on a machine without CUDA every attack stops at the first stage."""
    x, y = split
    attack = FAMILIES[family][0]("cuda")
    goal = attack.sample_goal(x, y, num_classes=10, seed=1)
    with pytest.raises(ValueError, match="device='cuda' but torch sees no CUDA GPU"):
        attack.craft(x, y, goal=goal, seed=0)


def test_auto_crafts_on_the_cpu_without_cuda(split, no_cuda):
    x, y = split
    attack = WitchesBrew(eps=16 / 255, budget=0.05, **GM)
    assert attack.device == "auto"
    with record_devices() as log:
        attack.craft(x, y, goal=attack.sample_goal(x, y, 10, seed=1), seed=0)
    assert log.stages() == {"witches_brew.craft": CPU, "witches_brew.surrogate": CPU}


def test_the_surrogate_trains_and_stays_on_its_device(split):
    x, y = split
    with record_devices() as log:
        model = train_surrogate(x, y, backbone_kwargs={"width": 4}, epochs=1, device="cpu", stage="mine")
    assert log == [("mine", CPU)]
    assert {p.device for p in model.parameters()} == {CPU}


def test_bf16_is_float32_on_the_cpu(split):
    """Mixed precision never touches the CPU: ``precision='bf16'`` there warns and gives the float32 bytes."""
    x, y = split
    settings = dict(backbone_kwargs={"width": 4}, epochs=1, device="cpu", seed=3)
    plain = train_surrogate(x, y, **settings)
    with pytest.warns(UserWarning, match="precision='bf16' runs in float32 on cpu"):
        mixed = train_surrogate(x, y, precision="bf16", **settings)
    for a, b in zip(plain.state_dict().values(), mixed.state_dict().values()):
        assert torch.equal(a, b)


def test_given_and_saved_extractors_are_recorded_and_moved(split, tmp_path):
    x, y = split
    trained = PoisonFrogs(eps=16 / 255, budget=0.05, device="cpu", **FC)
    path = trained.save_extractor(tmp_path / "extractor.safetensors", x, y)
    goal = AttackGoal(x[0], int(y[0]), int((y[0] + 1) % 10))
    for attack in (PoisonFrogs(eps=16 / 255, budget=0.05, device="cpu", extractor_path=str(path), **SMALL, steps=2),
                   PoisonFrogs(eps=16 / 255, budget=0.05, device="cpu", extractor=trained.extractor, **SMALL, steps=2)):
        with record_devices() as log:
            attack.craft(x, y, goal=goal, seed=0)
        assert log.stages() == {"poison_frogs.extractor": CPU, "poison_frogs.craft": CPU}


def test_attack_device_and_precision_errors():
    with pytest.raises(ValueError, match="WitchesBrew device must be one of 'auto', 'cpu', 'cuda'"):
        WitchesBrew(device="gpu")
    attack = UniversalRandomPerturbation(eps=0.1)
    with pytest.raises(ValueError, match="UniversalRandomPerturbation device must be one of"):
        attack.device = "tpu"
    with pytest.raises(ValueError, match="precision must be '32' .* or 'bf16'"):
        ErrorMinimizingNoise(eps=0.1, precision="fp16")


# -- evaluate and poison pass the device through ---------------------------------------------------------

DATA = {"class_path": "lightning_defense.datamodules.DigitsDataModule",
        "init_args": {"image_size": 8, "batch_size": 128, "val_fraction": 0.1, "test_fraction": 0.2}}
URP = {"name": "urp", "class_path": "lightning_defense.attacks.UniversalRandomPerturbation", "init_args": {"eps": 0.1}}


def _evaluation(tmp_path, attacks, **settings):
    from lightning_defense.evaluate import Evaluation, EvaluationConfig

    return Evaluation(EvaluationConfig(data=DATA, attacks=attacks, output_dir=str(tmp_path), progress=False, **settings))


def test_evaluate_crafts_on_the_configured_device(tmp_path, no_cuda):
    own = {**URP, "name": "own", "init_args": {"eps": 0.1, "device": "auto"}}
    cpu_victim = _evaluation(tmp_path, [URP, own], trainer={"accelerator": "cpu"})
    assert cpu_victim.attacks["urp"].device == "cpu"  # "auto" follows the victim trainer's accelerator
    assert cpu_victim.attacks["own"].device == "auto"  # an attack's own device is kept
    assert _evaluation(tmp_path, [URP]).attacks["urp"].device == "auto"
    assert _evaluation(tmp_path, [URP], device="cpu").attacks["urp"].device == "cpu"
    with pytest.raises(ValueError, match=r"device \(where attacks craft\) must be one of"):
        _evaluation(tmp_path, [URP], device="gpu")
    with pytest.raises(ValueError, match=r"attacks\[0\] \(urp\) device='cuda' but torch sees no CUDA GPU"):
        _evaluation(tmp_path, [URP], device="cuda")


def test_the_evaluate_command_reads_a_top_level_device(tmp_path):
    from lightning_defense.cli.evaluate import evaluation_config

    path = tmp_path / "evaluate.yaml"
    path.write_text(yaml.safe_dump({"data": DATA, "attacks": [URP], "device": "cpu"}))
    assert evaluation_config(["--config", str(path)]).device == "cpu"
    assert evaluation_config(["--config", str(path), "--device", "auto"]).device == "auto"


def test_the_poison_command_crafts_on_the_given_device(tmp_path, no_cuda):
    from lightning_defense.cli import main

    config = tmp_path / "poison.yaml"
    config.write_text(yaml.safe_dump({"data": DATA, "attack": {k: v for k, v in URP.items() if k != "name"}}))
    output = str(tmp_path / "p.safetensors")
    with record_devices() as log:
        main(["poison", "--config", str(config), "--output", output, "--device", "cpu"])
        main(["poison", "--config", str(config), "--output", output, "--attack.init_args.device=cpu"])
    assert log == [("urp.craft", CPU), ("urp.craft", CPU)]
    with pytest.raises(SystemExit, match="device must be one of"):
        main(["poison", "--config", str(config), "--output", output, "--device", "gpu"])
    with pytest.raises(SystemExit, match="device='cuda' but torch sees no CUDA GPU"):
        main(["poison", "--config", str(config), "--output", output, "--attack.init_args.device=cuda"])
