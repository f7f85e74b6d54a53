"""Issue #15.2: ``evaluate``'s per-trial results are verified against their digest before they are resumed.

A result with a flipped digit (still valid JSON) or a truncated result is reported by file name and its
victim trained again; the table then equals the undamaged run's.
"""

import json
import re
from pathlib import Path

import pytest

from lightning_defense.core.store import RecordStore
from lightning_defense.evaluate import Evaluation
from lightning_defense.evaluate.protocol import RESULTS_KEY
from tests.evaluate.test_evaluate import URP, tiny_config


def _evaluate(config):
    """``(evaluation, records, summary)`` of one (resumed) run."""
    evaluation = Evaluation(config)
    records = evaluation.run()
    summary, _ = evaluation.report(records)
    return evaluation, records, summary


def _untimed(rows: list[dict]) -> list[dict]:
    """Records or summary rows without their wall times, the one thing a retrained victim may change."""
    return [{k: v for k, v in row.items() if k not in ("victim_seconds", "victim_seconds_mean")} for row in rows]


def _flip_a_digit_of_the_accuracy(path: Path) -> None:
    text = path.read_text()
    damaged = re.sub(r'("accuracy": -?[0-9.]*)([0-9])', lambda m: m[1] + str((int(m[2]) + 1) % 10), text, count=1)
    assert damaged != text
    assert json.loads(damaged)["accuracy"] != json.loads(text)["accuracy"]  # valid JSON, another number
    path.write_text(damaged)


@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_a_damaged_trial_result_is_reported_and_retrained_never_used(tmp_path, how):
    config = tiny_config(tmp_path, attacks=[URP], defenses=[], trials=1)
    first, records, summary = _evaluate(config)
    assert first.executed == 2  # clean and urp, undefended
    out = Path(config.output_dir)
    table = (out / "table.json").read_text()
    damaged = out / "trials" / "urp" / "none" / "trial_0000.json"
    assert (out / "trials" / "urp" / "none" / "trial_0000.json.sha256").is_file()
    if how == "flip":
        _flip_a_digit_of_the_accuracy(damaged)
    else:
        damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])

    with pytest.warns(UserWarning, match=re.escape(str(damaged)) + r" does not match its SHA-256.*training that victim again"):
        second, again, resumed_summary = _evaluate(config)
    assert second.executed == 1  # that one cell alone is trained again
    assert _untimed(again) == _untimed(records) and _untimed(resumed_summary) == _untimed(summary)
    assert _untimed(json.loads((out / "table.json").read_text())) == _untimed(json.loads(table))
    rewritten = RecordStore(out / "trials", RESULTS_KEY).load_json("urp/none/trial_0000.json")
    assert _untimed([rewritten]) == _untimed(records[1:2])

    third, _, _ = _evaluate(config)
    assert third.executed == 0  # the rewritten result is intact


def test_a_result_of_other_settings_or_without_its_digest_is_reported_and_retrained(tmp_path):
    config = tiny_config(tmp_path, attacks=[URP], defenses=[], trials=1)
    _, records, _ = _evaluate(config)
    trials = Path(config.output_dir) / "trials"
    store = RecordStore(trials, RESULTS_KEY)
    store.save_json("urp/none/trial_0000.json", {**records[1], "key": "other"})  # intact, but of another config
    (trials / "clean" / "none" / "trial_0000.json.sha256").unlink()  # half written (killed between the two files)
    with pytest.warns(UserWarning) as caught:
        evaluation, again, _ = _evaluate(config)
    messages = [str(w.message) for w in caught]
    assert any(re.search(re.escape(str(trials / "urp" / "none" / "trial_0000.json")) + r" holds the result of other "
                         r"settings \(key 'other'", m) for m in messages), messages
    assert any(re.search(re.escape(str(trials / "clean" / "none" / "trial_0000.json")) + r" \(or its \.sha256\) is "
                         r"missing", m) for m in messages), messages
    assert evaluation.executed == 2 and _untimed(again) == _untimed(records)
