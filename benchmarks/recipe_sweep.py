"""Training recipes side by side on the speech benchmark: each config is ``speech_bench.py`` with its
own avemo-train flags, and the table puts every config's UAR next to the first one's (the baseline).

    python benchmarks/recipe_sweep.py --ravdess CACHE [--emodb CACHE] --parts ravdess --seeds 2 \\
        --config base= --config "e80=--epochs 80" --config "wide=--audio-channels 64,128,256,256" \\
        [--jobs 2] [--parallel 1] [--out DIR]

``--config NAME=FLAGS`` (repeatable; the first is the baseline, ``base=`` being avemo-train's
defaults). Each config's runs go to ``OUT/NAME`` (``speech_bench.py``'s own layout, so a config
already run is resumed, not redone); ``--jobs`` training runs per config at a time, ``--parallel``
configs at a time (on a GPU; on a small CPU leave it at 1: two torch jobs at once slow each other far
more than twice). Prints, per part and config: runs, UAR mean +- std over seeds, its difference from
the baseline, WAR, the UAR adapted to each test speaker (``avemo-evaluate --adapt speaker``) and
seconds per training run.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent / "speech_bench.py"


def parse_config(text: str) -> tuple[str, list[str]]:
    name, sep, flags = text.partition("=")
    if not sep or not name or "/" in name or name.startswith("."):
        raise argparse.ArgumentTypeError(f"--config takes NAME=FLAGS (a plain folder name), got {text!r}")
    return name, shlex.split(flags)


def bench_command(args: argparse.Namespace, name: str, flags: list[str]) -> list[str]:
    cmd = [sys.executable, str(BENCH), "--parts", args.parts, "--seeds", str(args.seeds),
           "--first-seed", str(args.first_seed), "--jobs", str(args.jobs), "--out", str(args.out / name)]
    for corpus in ("ravdess", "emodb"):
        if getattr(args, corpus) is not None:
            cmd += [f"--{corpus}", str(getattr(args, corpus))]
    return cmd + (["--", *flags] if flags else [])


def run_all(args: argparse.Namespace, configs: list[tuple[str, list[str]]]) -> dict[str, int]:
    """Every config's speech_bench, ``--parallel`` at a time; each one's output in OUT/NAME.log."""
    args.out.mkdir(parents=True, exist_ok=True)
    waiting, running, codes = list(configs), {}, {}
    while waiting or running:
        while waiting and len(running) < args.parallel:
            name, flags = waiting.pop(0)
            log = open(args.out / f"{name}.log", "w")
            print(f"{name}: {' '.join(flags) or '(defaults)'}", flush=True)
            running[name] = (subprocess.Popen(bench_command(args, name, flags), stdout=log, stderr=subprocess.STDOUT),
                             log, time.perf_counter())
        for name, (proc, log, t0) in list(running.items()):
            if proc.poll() is not None:
                log.close()
                codes[name] = proc.returncode
                print(f"{name}: {'done' if proc.returncode == 0 else f'failed (exit {proc.returncode})'} in "
                      f"{time.perf_counter() - t0:.0f} s; log {args.out / f'{name}.log'}", flush=True)
                del running[name]
        time.sleep(1)
    return codes


def comparison_rows(results: dict[str, dict], base: str) -> list[dict]:
    """One row per (part, config) from each config's results.json; delta against config ``base``."""
    rows = []
    parts = list(dict.fromkeys(p for r in results.values() for p in r.get("table", {})))
    for part in parts:
        ref = results[base].get("table", {}).get(part) if base in results else None
        for name, res in results.items():
            row = res.get("table", {}).get(part)
            if row is None:
                continue
            adapted = row.get("adapted")
            rows.append({"part": part, "config": name, "options": " ".join(res.get("options", [])) or "(defaults)",
                         "runs": row["seeds"], "uar": row["uar_mean"], "uar_std": row["uar_std"],
                         "war": row["war_mean"], "delta": row["uar_mean"] - ref["uar_mean"] if ref else None,
                         "adapted": adapted["uar_mean"] if adapted else None,
                         "seconds": row["seconds_per_run"]})
    return rows


def print_rows(rows: list[dict], baseline: str) -> None:
    part = None
    for r in rows:
        if r["part"] != part:
            part = r["part"]
            print(f"\n{part}\n{'config':<10}{'options':<44}{'runs':>5}{'UAR':>16}{'vs ' + baseline:>12}"
                  f"{'WAR':>7}{'adapted':>9}{'s/run':>7}")
        delta = "" if r["delta"] is None or r["config"] == baseline else f"{r['delta']:+.3f}"
        adapted = f"{r['adapted']:.3f}" if r["adapted"] is not None else "-"
        print(f"{r['config']:<10}{r['options'][:43]:<44}{r['runs']:>5}{r['uar']:>9.3f} +-{r['uar_std']:.3f}"
              f"{delta:>12}{r['war']:>7.3f}{adapted:>9}{r['seconds']:>7.0f}")
    print("\n(UAR: mean over folds per seed, then mean +- std over seeds; adapted: avemo-evaluate --adapt speaker; "
          "s/run: seconds per training run, under whatever ran beside it)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ravdess", type=Path)
    p.add_argument("--emodb", type=Path)
    p.add_argument("--parts", default="ravdess", help="speech_bench parts (ravdess, emodb, pretrained, ...)")
    p.add_argument("--config", dest="configs", action="append", type=parse_config, required=True,
                   metavar="NAME=FLAGS", help="a recipe: avemo-train flags; the first is the baseline")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=1, help="training runs per config at a time")
    p.add_argument("--parallel", type=int, default=1, help="configs at a time")
    p.add_argument("--out", type=Path, default=Path("bench-out/recipes"))
    args = p.parse_args(argv)
    names = [n for n, _ in args.configs]
    if len(set(names)) != len(names):
        p.error(f"config names must differ: {names}")
    if args.parallel < 1 or args.jobs < 1:
        p.error("--jobs and --parallel must be at least 1")
    codes = run_all(args, args.configs)
    results = {}
    for name in names:
        f = args.out / name / "results.json"
        if codes.get(name) == 0 and f.is_file():
            results[name] = json.loads(f.read_text())
    if not results:
        print("no config finished; see the logs in", args.out, file=sys.stderr)
        return 1
    rows = comparison_rows(results, names[0])
    (args.out / "comparison.json").write_text(json.dumps(rows, indent=2))
    print_rows(rows, names[0])
    return 0 if len(results) == len(names) else 1


if __name__ == "__main__":
    sys.exit(main())
