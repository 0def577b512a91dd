"""benchmarks/recipe_sweep.py: configs run through the speech benchmark and compared with the first."""
import argparse
import importlib.util
import json
import sys
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "recipe_sweep", Path(__file__).resolve().parents[1] / "benchmarks" / "recipe_sweep.py")
recipe_sweep = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(recipe_sweep)

PART = "RAVDESS 4 folds"

# stands in for speech_bench.py: writes OUT/results.json with a UAR that depends on the flags it got
FAKE_BENCH = """
import json, sys
from pathlib import Path
argv = sys.argv[1:]
out = Path(argv[argv.index("--out") + 1])
flags = argv[argv.index("--") + 1:] if "--" in argv else []
if "--crash" in flags:
    sys.exit(3)
uar = 0.5 + 0.1 * len(flags)
out.mkdir(parents=True, exist_ok=True)
(out / "results.json").write_text(json.dumps({"options": flags, "table": {"%s": {
    "seeds": 2, "uar_mean": uar, "uar_std": 0.01, "war_mean": uar, "seconds_per_run": 5.0,
    "adapted": {"uar_mean": uar + 0.02}}}}))
""" % PART


def test_config_parsing():
    assert recipe_sweep.parse_config("base=") == ("base", [])
    assert recipe_sweep.parse_config("e80=--epochs 80 --mixup 0.4") == ("e80", ["--epochs", "80", "--mixup", "0.4"])
    for bad in ("no-equals", "=--epochs 80", "a/b=--epochs 80"):
        with pytest.raises(argparse.ArgumentTypeError):
            recipe_sweep.parse_config(bad)


def test_sweep_runs_every_config_and_compares_with_the_first(tmp_path, monkeypatch, capsys):
    fake = tmp_path / "fake_bench.py"
    fake.write_text(FAKE_BENCH)
    monkeypatch.setattr(recipe_sweep, "BENCH", fake)
    out = tmp_path / "sweep"
    code = recipe_sweep.main(["--ravdess", "CACHE", "--out", str(out), "--parallel", "2", "--config", "base=",
                              "--config", "two=--epochs 80", "--config", "broken=--crash"])
    assert code == 1                                   # one config failed: said so, the others still compared
    rows = json.loads((out / "comparison.json").read_text())
    by = {r["config"]: r for r in rows}
    assert set(by) == {"base", "two"}
    assert by["two"]["uar"] == pytest.approx(0.7) and by["two"]["delta"] == pytest.approx(0.2)
    assert by["base"]["delta"] == pytest.approx(0.0) and by["two"]["adapted"] == pytest.approx(0.72)
    printed = capsys.readouterr().out
    assert "broken: failed (exit 3)" in printed and "+0.200" in printed
    assert (out / "broken.log").is_file()


def test_bench_command_passes_flags_after_the_separator(tmp_path):
    args = argparse.Namespace(parts="ravdess,emodb", seeds=2, first_seed=1, jobs=3, out=tmp_path,
                              ravdess=Path("R"), emodb=None)
    cmd = recipe_sweep.bench_command(args, "e80", ["--epochs", "80"])
    assert cmd[0] == sys.executable and cmd[-3:] == ["--", "--epochs", "80"]
    assert cmd[cmd.index("--out") + 1] == str(tmp_path / "e80") and "--emodb" not in cmd
    assert cmd[cmd.index("--first-seed") + 1] == "1"
