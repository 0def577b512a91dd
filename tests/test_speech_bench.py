"""benchmarks/speech_bench.py: what it reports of a run that an earlier command already trained."""
import importlib.util
import sys
from pathlib import Path

from train.loop import _write_history

_BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(_BENCH))     # speech_bench imports its sibling emodb_reference, as a script does
_spec = importlib.util.spec_from_file_location("speech_bench", _BENCH / "speech_bench.py")
speech_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(speech_bench)


def test_a_resumed_run_reports_the_seconds_its_training_took_not_the_call(tmp_path):
    # the history as the training loop writes it: a run interrupted after two epochs and resumed for a third
    _write_history(tmp_path / "metrics.csv", [{"epoch": 1, "train_loss": 2.0, "lr": 1e-3, "seconds": 40.5,
                                               "clips_per_s": 17.0},
                                              {"epoch": 2, "train_loss": 1.5, "lr": 2e-3, "seconds": 41.0,
                                               "clips_per_s": 17.1},
                                              {"epoch": 3, "train_loss": 1.2, "lr": 1e-3, "seconds": 39.25,
                                               "clips_per_s": 18.0}])
    assert abs(speech_bench.training_seconds(tmp_path, fallback=0.5) - 120.75) < 1e-6


def test_a_run_without_a_history_falls_back_to_the_calls_wall_time(tmp_path):
    assert speech_bench.training_seconds(tmp_path, fallback=7.0) == 7.0
    (tmp_path / "metrics.csv").write_text("epoch,train_loss\n1,2.0\n")    # no seconds column
    assert speech_bench.training_seconds(tmp_path, fallback=7.0) == 7.0
