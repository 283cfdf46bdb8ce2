"""Command line: ``clpoison train|eval ...``. A thin layer over the Python API.

Every user mistake surfaces as one line ``clpoison: error: ...`` and exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
from pathlib import Path

from clpoison.errors import ClpoisonError


def _common(p: argparse.ArgumentParser, with_preset: bool = True) -> None:
    if with_preset:
        p.add_argument("--preset", default="mini", help="preset name (mini, cpu, paper) or YAML file")
        p.add_argument("--algorithm", default=None, help="simclr | mocov2 | byol | supervised")
    p.add_argument("--data-root", default=None,
                   help="dataset folder (default: $CLPOISON_DATA, else ./data)")
    p.add_argument("--download", action="store_true",
                   help="download the official dataset archive (checksum-verified) if missing")
    p.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any setting, e.g. --set train.epochs=20 (repeatable)")


def _overrides(args) -> list[str]:
    out = list(args.overrides)
    if args.data_root is not None:
        out.append(f"data.root={args.data_root}")
    if args.device is not None:
        out.append(f"train.device={args.device}")
    if getattr(args, "defense", None):
        out.append(f"defense.names={args.defense}")
    if getattr(args, "download", False):
        out.append("data.download=true")
    if args.seed is not None:
        out.append(f"train.seed={args.seed}")
    for flag, key in (("epochs", "train.epochs"), ("train_size", "data.train_size"),
                      ("batch_size", "train.batch_size")):
        if getattr(args, flag, None) is not None:
            out.append(f"{key}={getattr(args, flag)}")
    return out


def _config(args, algorithm: str | None):
    """The run's config: ``--preset``, ``algorithm`` and every override flag, with the algorithm
    checked up front (before any data is read or any folder written)."""
    from clpoison.config import load_config
    from clpoison.ssl import check_algorithm

    cfg = load_config(args.preset, algorithm, _overrides(args))
    check_algorithm(cfg.ssl.algorithm)
    return cfg


def cmd_train(args) -> int:
    from clpoison.train import train_victim

    cfg = _config(args, args.algorithm)
    kwargs = {}
    if args.poison:
        from clpoison.attacks.poison import poison_meta, poisoned_dataset
        from clpoison.engine import load_data

        clean_train, test = load_data(cfg)
        attack = poison_meta(args.poison).get("attack")
        kwargs = dict(train_set=poisoned_dataset(args.poison, clean_train), probe_set=clean_train,
                      test_set=test, extra_summary={"poison": str(args.poison),
                                                    "poison_attack": attack})
    summary = train_victim(cfg, args.out, resume=args.resume, progress=not args.quiet, **kwargs)
    print(json.dumps({"out": str(args.out), "final": summary.get("final"),
                      "random_init": summary.get("random_init"),
                      "wall_seconds": summary["wall_seconds"]}, indent=2))
    return 0


def cmd_eval(args) -> int:
    import torch

    from clpoison.config import apply_overrides, config_from_dict
    from clpoison.data import normalization_stats
    from clpoison.eval import evaluate_encoder
    from clpoison.engine import (build_method, check_signature, load_checkpoint, load_data,
                                       setup_runtime)

    if args.checkpoint:
        state = load_checkpoint(Path(args.checkpoint))
        if isinstance(state, dict) and "model" in state and "method" not in state:
            raise ClpoisonError(f"{args.checkpoint} is a supervised classifier's checkpoint; eval "
                                f"probes contrastive encoders (the classifier's clean-test accuracy "
                                f"is in its run's summary.json)")
        if not isinstance(state, dict) or not {"config", "method", "signature"} <= set(state):
            raise ClpoisonError(f"{args.checkpoint} is not a clpoison checkpoint (no config/method); "
                                f"pass the checkpoint.pt of a `clpoison train` run")
        cfg = config_from_dict(json.loads(state["config"]))
        apply_overrides(cfg, _overrides(args))
    else:
        cfg = _config(args, args.algorithm)
    if args.probe:
        cfg.eval.probe = args.probe
    device = setup_runtime(cfg)
    torch.manual_seed(cfg.train.seed)
    method = build_method(cfg)
    if args.checkpoint:
        check_signature(state["signature"], cfg, Path(args.checkpoint))
        try:
            method.load_state_dict(state["method"])
        except RuntimeError:
            raise ClpoisonError(f"{args.checkpoint}: weights do not fit the model it names; the "
                                f"file is damaged or was edited") from None
    train, test = load_data(cfg)
    mean, std = normalization_stats(cfg.data.dataset)
    metrics = evaluate_encoder(method.to(device).encoder, train, test, cfg.eval, mean, std, device,
                               seed=cfg.train.seed)
    metrics["checkpoint"] = args.checkpoint or "random-init"
    print(json.dumps(metrics, indent=2))
    if args.out:
        from clpoison.utils import write_json_atomic

        write_json_atomic(args.out, metrics)
    return 0


def cmd_attack(args) -> int:
    import shutil

    from clpoison.attacks import attacker_algorithm, generate_poison
    from clpoison.utils import atomic_path

    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise ClpoisonError(f"--out must name a .safetensors file, got {out}")
    if out.exists() and not args.resume:
        raise ClpoisonError(f"{out} exists; choose another --out or pass --resume")
    cfg = _config(args, attacker_algorithm(args.attack, args.algorithm))
    run_dir = out.with_suffix(".run")
    written = generate_poison(args.attack, cfg, run_dir, init=args.init,
                              init_generator=args.init_generator, resume=args.resume,
                              progress=not args.quiet)
    with atomic_path(out) as tmp:
        shutil.copyfile(written, tmp)
    print(json.dumps({"poison": str(out), "run": str(run_dir)}, indent=2))
    return 0


def cmd_matrix(args) -> int:
    from clpoison.matrix import run_matrix

    if args.algorithm is not None:
        raise ClpoisonError("matrix takes --victims (and cp-s@ALGORITHM rows), not --algorithm")
    seeds = _seeds(args.seeds)
    table = run_matrix(args.preset, args.out, attacks=args.attacks.split(","),
                       victims=[v for v in args.victims.split(",") if v], seeds=seeds,
                       defenses=args.defenses.split(","),
                       overrides=_overrides(args),
                       reuse=_folders(args.reuse), table_only=args.table_only,
                       progress=not args.quiet, log=_log)
    print(table.read_text())
    print(f"table: {table} (and matrix.csv beside it)")
    return 0


def _folders(text: str | None) -> list[Path]:
    """``--reuse A,B`` -> [Path(A), Path(B)] (none when not given)."""
    return [Path(r) for r in text.split(",") if r] if text else []


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _floats(text: str, flag: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ClpoisonError(f"{flag} takes comma-separated numbers, e.g. 4,8,16; got {text!r}") from None


def cmd_sweep(args) -> int:
    from clpoison.sweep import run_sweep

    if args.algorithm is not None:
        raise ClpoisonError("sweep takes --victims (and cp-s@ALGORITHM attacks), not --algorithm")
    table = run_sweep(args.preset, args.out, attacks=args.attacks.split(","),
                      victims=[v for v in args.victims.split(",") if v],
                      epsilons=_floats(args.epsilons, "--epsilons"),
                      lengths=_floats(args.lengths, "--lengths"), seeds=_seeds(args.seeds),
                      controls=[c for c in args.controls.split(",") if c],
                      overrides=_overrides(args),
                      reuse=_folders(args.reuse), table_only=args.table_only,
                      progress=not args.quiet, log=_log)
    print(table.read_text())
    print(f"table: {table} (sweep.csv and the figures beside it)")
    return 0


def cmd_report(args) -> int:
    from clpoison.report import write_report

    page = write_report(args.runs, args.out, pictures=not args.no_pictures,
                        data_overrides=[f"data.root={args.data_root}"] if args.data_root else [])
    print(f"report: {page}")
    return 0


def _poisoned_data(args):
    """The poison of ``--poison`` and the clean data it was made for (from its recorded config,
    with the override flags): (poison, clean training set, clean test set)."""
    from clpoison.attacks.poison import check_dataset, load_poison, recorded_config
    from clpoison.config import apply_overrides
    from clpoison.engine import load_data

    poison = load_poison(args.poison)            # validates the file before any data work
    cfg = apply_overrides(recorded_config(poison, args.poison), _overrides(args))
    clean_train, test = load_data(cfg)
    check_dataset(poison, clean_train, path=args.poison)
    return poison, clean_train, test


def cmd_export(args) -> int:
    from clpoison.export import export_dataset

    poison, clean_train, test = _poisoned_data(args)
    written = export_dataset(poison.poison_dataset(clean_train), test, args.out,
                             formats=[f.strip() for f in args.format.split(",") if f.strip()])
    print(json.dumps(written, indent=2))
    return 0


def cmd_show(args) -> int:
    from clpoison.visualize import render_poison

    poison, clean_train, _ = _poisoned_data(args)
    print(render_poison(poison, clean_train, args.out, per_class=args.per_class))
    return 0


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ClpoisonError(f"--seeds takes comma-separated integers, e.g. 0,1; got {text!r}") from None
    if not seeds:
        raise ClpoisonError("--seeds needs at least one integer, e.g. --seeds 0")
    return seeds


def cmd_story(args) -> int:
    from clpoison.story import run_story

    seeds = _seeds(args.seeds)
    attacks = [a for a in args.attacks.split(",") if a]
    report = run_story(args.preset, args.out, algorithm=args.algorithm or "simclr", seeds=seeds,
                       attacks=attacks, overrides=_overrides(args), progress=not args.quiet,
                       log=_log)
    print(report.read_text())
    print(f"report: {report}")
    return 0


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a victim (contrastive or --algorithm supervised) and "
                       "evaluate it on clean test data")
    _common(p)
    p.add_argument("--out", required=True, type=Path, help="run folder")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--train-size", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--poison", default=None, help="train the victim on data poisoned by this file")
    p.add_argument("--defense", default=None, metavar="NAME[,NAME]",
                   help="defenses for this victim: matrix-completion, matrix-completion-online, "
                        "jpeg, grayscale, bit-depth, cutout, noise, blur, strong-crop, adversarial "
                        "(parameters: --set defense.KEY=VALUE)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_train)


def _add_attack(sub) -> None:
    from clpoison.attacks.settings import ATTACK_NAMES

    p = sub.add_parser("attack", help="generate a poison: cp-c, cp-s (Contrastive Poisoning), ue-c, "
                       "ue-s (unlearnable examples), ap (adversarial poisoning), random, random-c")
    p.add_argument("attack", choices=list(ATTACK_NAMES))
    _common(p)
    p.add_argument("--out", required=True, help="poison file to write (.safetensors); the run "
                   "folder (logs, checkpoint) is the same path with .run")
    p.add_argument("--init", default=None, help="start from this poison (CP-S from a CP-C file)")
    p.add_argument("--init-generator", default=None,
                   help="start the generator from this generation.pt (e.g. CP-S continuing the "
                        "CP-C run in CPC.run/generation.pt; skips the warm start)")
    p.add_argument("--train-size", type=int, default=None)
    p.add_argument("--resume", action="store_true", help="continue an interrupted generation")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_attack)


def _add_matrix(sub) -> None:
    p = sub.add_parser("matrix", help="attack x victim table: every poison against every victim")
    _common(p)
    p.add_argument("--out", required=True, type=Path, help="folder for everything (rerun to resume)")
    p.add_argument("--attacks", default="clean,random,cp-c",
                   help="comma list of rows: clean, random, random-c, ue-c, ue-s, ap, cp-c, cp-s, "
                        "cp-s@byol (CP made with another algorithm), NAME=PATH (a poison file)")
    p.add_argument("--victims", default="supervised,simclr,mocov2,byol",
                   help="comma list of supervised, simclr, mocov2, byol")
    p.add_argument("--defenses", default="none",
                   help="defense axis: comma list of none or defenses joined by + (e.g. "
                        "none,jpeg,matrix-completion,cutout,adversarial)")
    p.add_argument("--seeds", default="0", help="victim seeds, comma-separated")
    p.add_argument("--reuse", default=None,
                   help="comma list of earlier story/matrix/train folders: finished victims there "
                        "trained on the same images with the same settings are copied in, not "
                        "retrained")
    p.add_argument("--table-only", action="store_true",
                   help="train and generate nothing: write the table of the cells finished so far "
                        "(the others as —), e.g. while another call is still filling --out")
    p.add_argument("--train-size", type=int, default=None)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_matrix)


def _add_sweep(sub) -> None:
    p = sub.add_parser("sweep", help="response curves: attacks against victims over epsilon and "
                       "generation length, with random controls, clean victims and the floor")
    _common(p)
    p.add_argument("--out", required=True, type=Path, help="folder for everything (rerun to resume)")
    p.add_argument("--attacks", default="cp-c,cp-s",
                   help="comma list of poisons to sweep: cp-c, cp-s, cp-s@mocov2, ue-s, ap, ...")
    p.add_argument("--victims", default="simclr", help="comma list of supervised, simclr, mocov2, byol")
    p.add_argument("--epsilons", default="4,8,16,32",
                   help="budget axis, in /255 (at 1x generation length); empty for none")
    p.add_argument("--lengths", default="0.5,1,2,4",
                   help="compute axis: generation rounds as multiples of the preset's (at the "
                        "preset's epsilon); empty for none")
    p.add_argument("--controls", default="random",
                   help="random-noise controls at each epsilon: random, random-c (comma list)")
    p.add_argument("--seeds", default="0", help="victim seeds, comma-separated")
    p.add_argument("--reuse", default=None,
                   help="comma list of earlier story/matrix/sweep/train folders whose finished "
                        "victims of the same images and settings are copied in")
    p.add_argument("--table-only", action="store_true",
                   help="train and generate nothing: tabulate and draw the cells finished so far")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_sweep)


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="one Markdown page with figures from finished story, "
                       "matrix and sweep folders, with the paper's numbers beside ours")
    p.add_argument("runs", nargs="+", type=Path, help="story, matrix or sweep folders")
    p.add_argument("--out", required=True, type=Path,
                   help="folder for report.md and its PNG figures (new, or an earlier report's)")
    p.add_argument("--data-root", default=None,
                   help="where the clean data of the poison pictures is, when not where the "
                        "poisons were made (default: their recorded data settings)")
    p.add_argument("--no-pictures", action="store_true",
                   help="skip the poison pictures (they need the clean data the poisons were "
                        "made for)")
    p.set_defaults(func=cmd_report)


def _add_story(sub) -> None:
    p = sub.add_parser("story", help="the whole story: clean victim, CP poisons, poisoned victims, report")
    _common(p)
    p.add_argument("--out", required=True, type=Path, help="folder for everything (rerun to resume)")
    p.add_argument("--seeds", default="0", help="victim seeds, comma-separated (paired clean/poisoned)")
    p.add_argument("--attacks", default="cp-c",
                   help="comma list of cp-c, cp-s (cp-s starts from cp-c or from uniform noise, "
                        "as the preset's attack.cp-s.start_from_cpc says)")
    p.add_argument("--train-size", type=int, default=None)
    p.add_argument("--epochs", type=int, default=None, help="victim epochs")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_story)


def _add_poison_readers(sub) -> None:
    for name, func, helptext in (("export", cmd_export, "write the poisoned training set (+ clean test)"),
                                 ("show", cmd_show, "render a PNG of a poison")):
        p = sub.add_parser(name, help=helptext + "; data settings come from the poison's record")
        _common(p, with_preset=False)
        p.add_argument("--poison", required=True)
        if name == "export":
            p.add_argument("--out", required=True, help="output folder")
            p.add_argument("--format", default="png,npz,cifar", help="comma list of png, npz, cifar")
        else:
            p.add_argument("--out", required=True, help="PNG file to write")
            p.add_argument("--per-class", type=int, default=2)
        p.set_defaults(func=func)


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="linear probe + kNN of a checkpoint (or a random-init encoder)")
    _common(p)
    p.add_argument("--checkpoint", default=None,
                   help="checkpoint.pt of a train run (its recorded config is used; --preset and "
                        "--algorithm are then ignored); omit for the random-init floor of --preset")
    p.add_argument("--train-size", type=int, default=None)
    p.add_argument("--probe", choices=["fast", "paper"], default=None)
    p.add_argument("--out", default=None, help="also write the metrics to this JSON file")
    p.set_defaults(func=cmd_eval)


def build_parser() -> argparse.ArgumentParser:
    """The ``clpoison`` parser: one subcommand per ``cmd_*`` function above."""
    parser = argparse.ArgumentParser(prog="clpoison", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_train, _add_attack, _add_matrix, _add_sweep, _add_story, _add_report,
                _add_poison_readers, _add_eval):
        add(sub)
    return parser


def _outputs(args) -> list[Path]:
    """What a command writes: its ``--out`` (and an attack's ``OUT.run`` folder)."""
    if getattr(args, "out", None) is None:
        return []
    out = Path(args.out)
    return [out, out.with_suffix(".run")] if args.func is cmd_attack else [out]


def _first_missing(path: Path) -> Path | None:
    """The highest folder on the way to ``path`` (``path`` included) that does not exist yet."""
    missing = None
    for p in [path, *path.parents]:
        if p.exists():
            break
        missing = p
    return missing


# Commands whose work is shared by the processes of a torchrun launch; the others (export,
# show, ...) run on rank 0 alone.
COLLECTIVE = ("train", "attack", "eval", "matrix", "sweep", "story")


def _run(args) -> int:
    """The command, holding the lock on its ``--out`` (one writer per output); when it fails, an
    output it created that holds no file yet (an empty run folder) is removed again. Under
    torchrun the process group opens first; rank 0 takes the lock, prints and cleans up, and
    the other ranks join collective commands once rank 0 holds the lock."""
    from clpoison.distributed import agree, env_world_size, shutdown
    from clpoison.utils import env_rank, output_lock

    collective = args.command in COLLECTIVE and env_world_size() > 1
    try:
        if collective:
            _open_group(args)
        if env_rank() != 0:
            if not collective or not agree(False):      # rank 0 could not take the lock
                return 0 if not collective else 2
            with contextlib.redirect_stdout(io.StringIO()):     # rank 0 prints the result
                return args.func(args)
        return _run_rank0(args, output_lock, agree if collective else None)
    finally:
        shutdown()


def _open_group(args) -> None:
    from clpoison.distributed import init_from_env
    from clpoison.engine import resolve_device

    init_from_env(resolve_device(getattr(args, "device", None) or "auto"))


def _run_rank0(args, output_lock, agree) -> int:
    """Rank 0 (or the only process): take the lock, tell the other ranks (``agree``, None in
    one process) whether it did, run the command; on failure remove the empty folders made."""
    created = [m for m in (_first_missing(o.absolute()) for o in _outputs(args)) if m is not None]
    try:
        with contextlib.ExitStack() as stack:
            if getattr(args, "out", None) is not None:
                try:
                    stack.enter_context(output_lock(Path(args.out), is_file=args.func in (
                        cmd_attack, cmd_show, cmd_eval)))
                except BaseException:
                    if agree is not None:
                        agree(False)
                    raise
            if agree is not None:
                agree(True)
            return args.func(args)
    except BaseException:
        for folder in created:      # empty folders only, deepest first: never a file
            for sub, _, _ in os.walk(folder, topdown=False):
                try:
                    os.rmdir(sub)
                except OSError:
                    pass
        raise


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except ClpoisonError as exc:
        print(f"clpoison: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("clpoison: interrupted; rerun with --resume to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
