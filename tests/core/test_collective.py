"""The CLI releases the process group a DDP run leaves, so no process races gloo's threads at exit."""

import torch.distributed as dist

from lightning_defense.core.collective import release_process_group


def test_release_process_group_destroys_the_default_group_and_is_a_no_op_without_one(tmp_path, monkeypatch):
    release_process_group()  # nothing initialised: nothing to do, no error
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    assert dist.is_initialized()
    release_process_group()
    assert not dist.is_initialized()


def test_the_cli_releases_the_group_after_its_command(monkeypatch):
    from lightning_defense import cli

    calls = []
    monkeypatch.setitem(cli.COMMANDS, "certify", lambda argv: calls.append(("certify", argv)))
    monkeypatch.setattr(cli, "release_process_group", lambda: calls.append("released"))
    cli.main(["certify", "--config", "x.yaml"])
    assert calls == [("certify", ["--config", "x.yaml"]), "released"]
