"""A short, seed-fixed run of the fuzz harness (tests/fuzz_targets.py; the long run is bench/fuzz.py): every input
a user can give is accepted with a sane result or refused with a project error and a message."""
import warnings

import pytest

from tests.fuzz_targets import TARGETS, Target, run_target

CASES = {"run_folder": 6}  # each loads a Predictor
DEFAULT_CASES = 40


@pytest.mark.parametrize("name", list(TARGETS))
def test_every_generated_input_is_accepted_or_refused_with_a_message(name, tmp_path):
    target = TARGETS[name]
    target.stats.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_target(target, CASES.get(name, DEFAULT_CASES), 0, tmp_path)
    assert sum(target.stats.values()) == CASES.get(name, DEFAULT_CASES)


def test_the_harness_reports_a_traceback_as_a_failure(tmp_path):
    def crashes(value, work):
        raise KeyError("a bug")

    broken = Target("broken", "a loader with a bug", TARGETS["captions_csv"].strategy, crashes)
    with pytest.raises(KeyError):
        run_target(broken, 5, 0, tmp_path)
