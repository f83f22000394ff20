"""Several lung models trained at once on one GPU, then ranked: the device run of issue #13.

Here, first (the device has no ../shared):

    .venv/bin/xray-lung-prep pack-pairs --data ../shared/data/covid-qu-ex/manifest.csv --out .gpu/covid_qu_ex.npz
    .venv/bin/xray-lung-prep pack-pairs --data ../shared/data/external/jsrt --out .gpu/jsrt.npz --size 1024 --quality 95
    .venv/bin/xray-lung-prep pack-pairs --data ../shared/data/external/shenzhen --out .gpu/shenzhen.npz --size 1024 --quality 95

On the device (carry [".gpu"]; no Ray needed):

    python scripts/gpu_sweep.py --out /tmp/sw --minutes 4 --variants base boundary diseased all

Measured there (H200, docs/MODEL_CARD.md): four runs at once trained at 620 images/s each, 2,480
together, what one run alone gets: the GPU is not shared for free with this model, so several
variants in one budget each get a fraction of a full run. Rank levers with it; train a model to ship
alone (`scripts/gpu_train.sh`).

Every variant is `jobs/train.py --backend local` with the shipped recipe (batch 64, lr 2e-3, bf16, a
wall-clock budget) plus its own flags (VARIANTS), all started together so they share the GPU and the
CPU cores (the loader processes are split between them). Then each is scored on COVID-QU-Ex Val (per
class too) and on the packed external sets by `scripts/eval_lung_model.py` (at the packed size; the
model card's figures come from `xray-lung-prep evaluate` on the real files, after the weights are
back), and so is the average of all of them (the ensemble a distillation could reach). Writes, under
--out: <variant>.pt (best Val epoch, about 4 MB each), <variant>.log, <variant>.eval.json,
summary.json and summary.md.

Debug it here on the CPU in a minute: --minutes 0.3 --limit 64 --loader-workers 0 --variants base boundary.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger("gpu_sweep")

REPO = Path(__file__).resolve().parent.parent
RECIPE = ["--batch-size", "64", "--lr", "2e-3", "--epochs", "100000"]  # the shipped model's (docs/MODEL_CARD.md)
DISEASED = ["--oversample", "^covid_=2", "--oversample", "^non_covid=2"]
VARIANTS: dict[str, list[str]] = {
    "base": [],  # the shipped recipe, another seed: the spread between runs
    "boundary": ["--boundary-weight", "2"],
    "diseased": DISEASED,
    "strong": ["--augment", "strong"],
    "wide": ["--base-width", "24"],
    "all": ["--boundary-weight", "2", *DISEASED, "--augment", "strong"],
}
CLASSES = {"COVID-19": "^covid_", "Non-COVID": "^non_covid", "Normal": "^normal"}  # COVID-QU-Ex names


def repo_env() -> dict[str, str]:
    """This environment with the repository on PYTHONPATH: the device machine has no installed package."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


def train_all(args: argparse.Namespace, out: Path) -> dict[str, dict]:
    """Start every variant's training at once; wait for all. {variant: {returncode, seconds}}."""
    per_run = args.loader_workers if args.loader_workers >= 0 else max(1, ((os.cpu_count() or 2) - 2) // len(args.variants))
    started, procs = time.monotonic(), {}
    env = repo_env()
    for k, name in enumerate(args.variants):
        cmd = [sys.executable, str(REPO / "jobs" / "train.py"), "--backend", "local", "--data", args.data,
               "--minutes", str(args.minutes), "--loader-workers", str(per_run), "--seed", str(args.seed + k),
               "--out", str(out / f"{name}.pt"), *RECIPE, *VARIANTS[name]]
        if args.limit:
            cmd += ["--limit", str(args.limit)]
        log.info("start %s: %s", name, " ".join(cmd))
        procs[name] = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=(out / f"{name}.log").open("w"),
                                       stderr=subprocess.STDOUT)
    return {name: {"returncode": p.wait(), "seconds": round(time.monotonic() - started, 1)} for name, p in procs.items()}


def evaluate(models: list[Path], args: argparse.Namespace) -> dict:
    """scripts/eval_lung_model.py on Val (with per-class means) and the external packs; its JSON."""
    cmd = [sys.executable, str(REPO / "scripts" / "eval_lung_model.py"), "--model", *map(str, models),
           "--val", args.data, "--threads", str(args.eval_threads), "--groups",
           *(f"{name}={regex}" for name, regex in CLASSES.items())]
    if args.external:
        cmd += ["--external", *args.external]
    if args.limit:
        cmd += ["--limit", str(args.limit)]
    done = subprocess.run(cmd, cwd=REPO, env=repo_env(), capture_output=True, text=True, check=False)
    if done.returncode:
        return {"error": done.stderr[-2000:]}
    return json.loads(done.stdout[done.stdout.index("{"):])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", "out/sweep"), help="folder for weights, logs and the summary")
    p.add_argument("--data", default=".gpu/covid_qu_ex.npz", help="packed training data (train + val split)")
    p.add_argument("--external", nargs="*", default=[".gpu/jsrt.npz", ".gpu/shenzhen.npz"],
                   help="packed external sets, scored in full (missing ones are left out)")
    p.add_argument("--variants", nargs="+", default=["base", "boundary", "diseased", "all"], choices=sorted(VARIANTS))
    p.add_argument("--minutes", type=float, default=4.0, help="training budget of each variant (they run together)")
    p.add_argument("--loader-workers", type=int, default=-1, help="DataLoader processes per variant; -1 = the cores shared out")
    p.add_argument("--eval-threads", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--limit", type=int, default=None, help="first N pairs only (a smoke run)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s",
                        handlers=[logging.StreamHandler(sys.stdout), logging.FileHandler(out / "sweep.log")])
    args.external = [e for e in args.external if Path(e).exists()]
    summary: dict = {"args": vars(args), "train": train_all(args, out), "eval": {}}
    trained = [name for name in args.variants if (out / f"{name}.pt").is_file()]
    for name in trained:
        summary["eval"][name] = evaluate([out / f"{name}.pt"], args)
        (out / f"{name}.eval.json").write_text(json.dumps(summary["eval"][name], indent=1))
        log.info("%s: %s", name, json.dumps(summary["eval"][name])[:400])
    if len(trained) > 1:
        summary["eval"]["ensemble"] = evaluate([out / f"{name}.pt" for name in trained], args)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    lines = ["| variant | train s | Val | " + " | ".join(CLASSES) + " | " + " | ".join(Path(e).stem for e in args.external) + " |",
             "|---" * (3 + len(CLASSES) + len(args.external)) + "|"]
    for name, r in summary["eval"].items():
        if "error" in r:
            lines.append(f"| {name} | evaluation failed |")
            continue
        dices = [r["val"]["dice_mean"], *(r["val"]["groups"].get(c, {}).get("dice_mean") for c in CLASSES),
                 *(r[Path(e).stem]["dice_mean"] for e in args.external)]
        cells = ["-" if d is None else f"{d:.4f}" for d in dices]
        lines.append(f"| {name} | {summary['train'].get(name, {}).get('seconds', '-')} | " + " | ".join(cells) + " |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if trained else 1


if __name__ == "__main__":
    raise SystemExit(main())
