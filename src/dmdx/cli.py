"""The ``dmdx`` command line.

Exit statuses (docs/scaling.md, "On a cluster"): 0 done; 1 an unexpected error (a traceback); 2 a bad command or
config; 3 a non-finite loss; 4 a collective failed (a rank stopped answering within ``train.dist_timeout`` or was
lost); 75 preempted (SIGTERM / SIGUSR1: a checkpoint at the last finished step was written; run the same command
with ``--resume``); 130 interrupted (Ctrl-C).  ``--nproc`` returns its workers' status."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import fields
from pathlib import Path

import torch

from .config import EvalRequest, SampleRequest, apply_overrides, from_dict, set_path, to_dict
from .data import list_datasets, load_dataset
from .demo import run_demo
from .export import CARD, comfyui_notes
from .export import usage as export_usage
from .methods import METHODS
from .models import device_of, read_info
from .pairs import collect_pairs
from .recipes import format_settings
from .sampling import SOLVERS
from .pipelines.folder import TEACHER_FORMS
from .teachers import (apply_recipe, check_run, distill, export_run, kind_for, load_model, student_call,
                       teacher_kind)
from .train import dist
from .train.health import inspect_run
from .train.loop import NonFiniteLossError, Preempted, RankLostError
from .train.plan import H100_BF16_TFLOPS, format_plan, plan_run
from .train.run import (TeacherConfig, absolute_paths, absolute_spec, check_run_config, default_run_config,
                        load_run_config, train_teacher)
from .train.run_folder import check_start, find_run
from .viz import format_table

EXIT_NONFINITE, EXIT_RANK_LOST, EXIT_PREEMPTED, EXIT_INTERRUPTED = 3, 4, 75, 130
# under --nproc, each worker writes its exit status into this folder for the launcher (torchrun itself exits 1
# whenever a worker fails, whatever the status)
STATUS_DIR_ENV = "DMDX_STATUS_DIR"
FORWARDED_SIGNALS = ("SIGINT", "SIGTERM", "SIGUSR1")


def _main_rank() -> bool:
    """True in a plain process and on torchrun's global rank 0: messages are printed once, not by every rank."""
    return os.environ.get("RANK", "0") == "0"


def _add_common_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="run folder (created; holds config, checkpoints, logs, the model; "
                   "locked while the run trains)")
    p.add_argument("--config", help="JSON file with config values (applied before --set)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value, e.g. --set train.lr=1e-4 (repeatable)")
    p.add_argument("--steps", type=int, help="training iterations (train.steps)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint "
                   "(its config.json; without --resume a folder that holds a run is refused)")
    p.add_argument("--dry-run", action="store_true", help="validate and print the resolved config, then exit")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--nproc", type=int, metavar="N", help="train on N processes of this machine: re-runs the command "
                   "under torchrun --standalone --nproc_per_node N (see docs/scaling.md)")


def torchrun_command(argv: list[str], nproc: int) -> list[str]:
    """``argv`` (a dmdx command line) as a one-machine torchrun launch of ``python -m dmdx``, without --nproc."""
    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            rest.append(a)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            *_torchrun_signal_flags(), "-m", "dmdx", *rest]


def _torchrun_signal_flags() -> list[str]:
    """torchrun passes SIGTERM and SIGINT on to its workers; SIGUSR1 (a preemption signal) too where this torch's
    torchrun can be told to (``--signals_to_handle``): otherwise SIGUSR1 would end torchrun alone."""
    from torch.distributed.launcher.api import LaunchConfig

    if "signals_to_handle" not in {f.name for f in fields(LaunchConfig)}:
        return []
    return ["--signals_to_handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"]


def launch(cmd: list[str]) -> int:
    """Run the torchrun command ``cmd`` in its own process group: SIGINT, SIGTERM and SIGUSR1 sent to this process
    go to that whole group (torchrun passes them on to its workers, which finish their step, checkpoint and stop).
    Returns the workers' status when they agree on a failure (75 preempted, 3, 4, ...), else torchrun's."""
    with tempfile.TemporaryDirectory(prefix="dmdx-status-") as status_dir:
        proc = subprocess.Popen(cmd, start_new_session=True, env={**os.environ, STATUS_DIR_ENV: status_dir})

        def forward(signum, frame):
            try:
                os.killpg(proc.pid, signum)
            except ProcessLookupError:  # the group has just ended
                pass

        old = {}
        for name in FORWARDED_SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                old[sig] = signal.signal(sig, forward)
        try:
            code = proc.wait()
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)
        failed = {int(f.read_text()) for f in Path(status_dir).glob("rank_*")} - {0}
    if code != 0 and len(failed) == 1:
        return failed.pop()
    return 128 - code if code < 0 else code  # killed by a signal: the shell's convention


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dmdx", description="Distil diffusion / flow-matching teachers into few-step "
                                 "students (DMD, DMD2, ADM, ADP, DMDX).")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("demo", help="train or load a digits teacher, distil a one-step student, compare them")
    p.add_argument("--data", default="digits", help="dataset (default digits; mnist16, mnist, or your own)")
    p.add_argument("--method", default="dmdx", choices=list(METHODS))
    p.add_argument("--out", default="dmdx-demo", help="output folder (default ./dmdx-demo)")
    p.add_argument("--steps", type=int, help="distillation iterations (default: the demo's budget)")
    p.add_argument("--teacher", help="use this dmdx teacher folder (from 'dmdx teacher train') instead of the "
                   "shipped / freshly trained one")
    p.add_argument("--n", type=int, default=1000, help="samples per evaluation row")
    p.add_argument("--small", action="store_true", help="a much smaller setting (used by the test suite)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of the distillation config (as for 'dmdx distill')")
    p.add_argument("--quiet", action="store_true")

    p = sub.add_parser("data", help="built-in and user datasets")
    dsub = p.add_subparsers(dest="data_cmd", required=True)
    dsub.add_parser("list", help="list the datasets")

    p = sub.add_parser("teacher", help="train a built-in teacher")
    tsub = p.add_subparsers(dest="teacher_cmd", required=True)
    p = tsub.add_parser("train", help="train a teacher on a dataset by denoising score matching")
    p.add_argument("--data", required=True, help="dataset name (see 'dmdx data list')")
    _add_common_train(p)

    p = sub.add_parser("distill", help="distil a teacher into a few-step student")
    p.add_argument("--method", required=True, choices=list(METHODS))
    p.add_argument("--teacher", help=f"teacher: {TEACHER_FORMS} (required unless --resume)")
    p.add_argument("--data", help="dataset for real data / evaluation (default: the teacher's)")
    p.add_argument("--pairs", help="teacher pairs folder from 'dmdx pairs' (DMD/ADP/DMDX); default: collect in OUT/pairs")
    p.add_argument("--prompts", help="diffusers teachers: a text file, one prompt a line (real.prompts)")
    _add_common_train(p)

    p = sub.add_parser("plan", help="memory per GPU and compute of one distillation iteration, before the run: "
                       "no GPU, no weights (a folder of configs is enough)")
    p.add_argument("--method", required=True, choices=list(METHODS))
    p.add_argument("--teacher", required=True, help="a diffusers pipeline folder (model_index.json and each "
                   "component's config.json; weights are not read)")
    for flag in ("--data", "--pairs", "--prompts"):
        p.add_argument(flag, help="as for 'dmdx distill' (accepted; the plan does not read it)")
    p.add_argument("--config", help="JSON file with config values (applied before --set)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value, as for 'dmdx distill' (LoRA ranks, real.grad_checkpointing, "
                   "train.bf16, train.parallel, train.cpu_offload, train.batch_size, real.resolution, video.frames)")
    p.add_argument("--steps", type=int, help="training iterations (train.steps), for the GPU-hours estimate")
    p.add_argument("--gpus", type=int, default=1, help="world size: the plan is per rank (default 1)")
    p.add_argument("--memory", default="80GB", help="memory of one GPU, e.g. 24GB (GiB; default 80GB)")
    p.add_argument("--tflops", type=float, default=H100_BF16_TFLOPS,
                   help=f"throughput of one GPU for the pass floor (default {H100_BF16_TFLOPS:g}: H100 SXM bf16 dense)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cuda (default): blocks rounded as the CUDA allocator does; cpu: a CPU run")
    p.add_argument("--json", help="also write the plan to this JSON file")

    p = sub.add_parser("inspect", help="summarise a run's training-health signals, say whether it looks healthy, "
                       "and write RUN/health.png")
    p.add_argument("run", help="a run folder (the --out of 'dmdx distill' or 'dmdx teacher train')")

    p = sub.add_parser("export", help="export a student distilled from a diffusers pipeline")
    p.add_argument("--run", required=True, help="the distillation run folder")
    p.add_argument("--format", default="diffusers", choices=["diffusers", "lora", "comfyui"],
                   help="diffusers: a pipeline folder; lora: diffusers-format LoRA folder (+ its scheduler); "
                   "comfyui: one kohya-style LoRA .safetensors file (SD1.5/SD2/SDXL)")
    p.add_argument("--out", required=True, help="output folder (diffusers, lora) or FILE.safetensors (comfyui)")

    p = sub.add_parser("pairs", help="collect teacher ODE pairs (noise, sample, label)")
    p.add_argument("--teacher", required=True, help="a dmdx model folder or gmm:NAME (pipeline runs collect their "
                   "own pairs, with their prompts, in RUN/pairs)")
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--solver", default="heun", choices=list(SOLVERS))
    p.add_argument("--guidance", type=float, help="CFG scale (default: the teacher's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)

    for name, helptext in (("sample", "draw samples from a teacher or student"),
                           ("eval", "evaluate a teacher or student")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--model", required=True, help="a dmdx model or run folder, a diffusers pipeline folder, or "
                       "gmm:NAME")
        p.add_argument("--steps", type=int, help="sampling steps (default: the model's: 1 for one-step students; "
                       "pipeline teachers: their pipeline's usual count, 50 SD/SDXL, 28 SD3/Flux)")
        p.add_argument("--n", type=int, default=64 if name == "sample" else 2000,
                       help="samples (built-in models; pipeline models draw --per-prompt images per prompt)")
        p.add_argument("--seed", type=int, default=0, help="pipeline models: image k of a prompt uses seed + k")
        p.add_argument("--guidance", type=float, help="CFG scale (teachers; default: the model's)")
        p.add_argument("--solver", choices=list(SOLVERS), help="teacher ODE solver (default: the model's)")
        p.add_argument("--device", default="auto")
        p.add_argument("--prompts", help="pipeline models: a text file, one prompt a line")
        p.add_argument("--per-prompt", type=int, default=1 if name == "sample" else 2,
                       help="pipeline models: images per prompt (seeds seed .. seed + K - 1)")
        p.add_argument("--batch-size", type=int, default=4, help="pipeline models: images per batch")
        if name == "sample":
            p.add_argument("--out", required=True, help="built-in models: .png for a grid / scatter plot, .npz for "
                           "raw samples; pipeline models: a folder for the PNGs and grid.png; video models: a folder "
                           "for mp4 + GIF files")
        else:
            p.add_argument("--json", help="also write the metrics to this JSON file")
            p.add_argument("--clip", metavar="DIR", help="CLIP score with this local transformers CLIPModel folder")
            p.add_argument("--pickscore", metavar="DIR", help="PickScore with this local CLIPModel folder "
                           "(yuvalkirstain/PickScore_v1 with its processor files)")
            p.add_argument("--ref", metavar="DIR", help="reference images for FID / KID (needs --inception)")
            p.add_argument("--inception", metavar="FILE", help="the FID Inception TorchScript file "
                           "(inception-2015-12-05.pt)")
            p.add_argument("--lpips", metavar="FILE", help="AlexNet LPIPS weights (lpips package state dict) for "
                           "the per-prompt diversity across seeds")
            p.add_argument("--kid-subset-size", type=int, default=1000)
            p.add_argument("--teacher-steps", type=int, help="students: time the teacher at this many steps for "
                           "the speed-up (default: its usual count; 0: skip)")
            p.add_argument("--hpsv2", metavar="PATH", help="not supported (see docs/real-models.md, Known gaps)")
            p.add_argument("--imagereward", metavar="PATH", help="not supported (see docs/real-models.md)")
    return ap


# -- commands ---------------------------------------------------------------------------------------------------
def _load_overrides(cfg, args) -> set[str]:
    """Apply --config, --set, --steps and --quiet to ``cfg``; returns the config keys the user set."""
    keys: set[str] = set()

    if getattr(args, "config", None):
        path = Path(args.config)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None

        def walk(obj, prefix, d):
            for k, v in d.items():
                sub = getattr(obj, k, None)
                if isinstance(v, dict) and dataclasses.is_dataclass(sub):
                    walk(sub, f"{prefix}{k}.", v)
                else:
                    set_path(cfg, prefix + k, json.dumps(v) if isinstance(v, (list, dict)) else v)
                    keys.add(prefix + k)

        walk(cfg, "", data)
    apply_overrides(cfg, args.overrides)
    keys.update(item.split("=", 1)[0].strip() for item in args.overrides or [] if "=" in item)
    if args.steps is not None:
        cfg.train.steps = args.steps
        keys.add("train.steps")
    if getattr(args, "quiet", False):
        cfg.train.progress = False
    return keys


def _out(args) -> Path:
    return Path(os.path.abspath(Path(args.out).expanduser()))


def _resuming(args, out: Path) -> bool:
    """``--resume``; also a worker that torchrun restarted (``--max-restarts``) in a folder that holds a run."""
    return args.resume or (dist.elastic_restart() and find_run(out) is not None)


def cmd_teacher_train(args) -> int:
    out = _out(args)
    resume = _resuming(args, out)
    if _main_rank():  # the folder is global rank 0's (see cmd_distill)
        check_start(out, resume)  # before anything is read or written
    cfg = TeacherConfig(data=args.data)
    if resume:
        saved = json.loads((out / "config.json").read_text())
        saved.pop("method", None)
        cfg = from_dict(TeacherConfig, saved)
    _load_overrides(cfg, args)
    cfg.data = absolute_spec(cfg.data)
    load_dataset(cfg.data, "train")  # validate the data early
    if args.dry_run:
        print(json.dumps(to_dict(cfg), indent=2))
        return 0
    run = train_teacher(cfg, out, resume=resume)
    if _main_rank():
        print(f"teacher written to {run} (model.json + model.safetensors); try: dmdx sample --model {run} "
              "--out grid.png")
    return 0


def cmd_distill(args) -> int:
    out = _out(args)
    resume = _resuming(args, out)
    # a folder in use, a run already there, or none to resume: before anything else, by global rank 0 only (the
    # folder is its: the other torchrun ranks would race its lock and its config.json; torchrun stops them when it
    # refuses)
    if _main_rank():
        check_start(out, resume)
    if resume:
        cfg = load_run_config(out)
        if cfg.method.name != args.method:
            raise ValueError(f"{out} is a {cfg.method.name!r} run; resume it with --method {cfg.method.name}")
    else:
        cfg = default_run_config(args.method)
        cfg.teacher = args.teacher
        cfg.data = args.data
        if args.pairs:
            cfg.pairs.path = args.pairs
        if args.prompts:
            cfg.real.prompts = args.prompts
    user_keys = _load_overrides(cfg, args)
    if not cfg.teacher:
        raise ValueError(f"--teacher is required ({TEACHER_FORMS})")
    absolute_paths(cfg)
    # a resumed run's config.json already holds its resolved values
    applied = None if resume else apply_recipe(cfg, user_keys)
    check_run(cfg)  # the config, the teacher and every file the run reads, before --out is touched
    if applied is not None and _main_rank():  # said once the teacher is known to be one
        print(format_settings(teacher_kind(cfg.teacher), cfg.method.name, applied), file=sys.stderr)
    if args.dry_run:
        print(json.dumps(to_dict(cfg), indent=2))
        return 0
    run = distill(cfg, out, resume=resume)
    if _main_rank():
        print(f"student written to {run}; try: {kind_for(run).hint(run)}")
    return 0


def cmd_plan(args) -> int:
    cfg = default_run_config(args.method)
    cfg.teacher = args.teacher
    user_keys = _load_overrides(cfg, args)
    check_run_config(cfg)
    applied = apply_recipe(cfg, user_keys)
    print(format_settings(teacher_kind(cfg.teacher), cfg.method.name, applied), file=sys.stderr)
    plan = plan_run(cfg, gpus=args.gpus, memory=args.memory, tflops=args.tflops, device=args.device)
    print(format_plan(plan))
    if args.json:
        Path(args.json).write_text(json.dumps(plan.to_dict(), indent=2) + "\n")
    return 0 if plan.fits else 1


def cmd_export(args) -> int:
    out = export_run(Path(args.run), Path(args.out), args.format)
    info = read_info(Path(args.run))
    call = student_call(info)
    card = (out.with_suffix("") if args.format == "comfyui" else out) / CARD
    print(f"{args.format} export written to {out} (model card: {card}); sample the student with its own sampler:\n")
    print(export_usage(info, args.format, args.out, call))
    if args.format == "comfyui":
        print("\n" + comfyui_notes(info, call))
    return 0


def cmd_inspect(args) -> int:
    text, _, _ = inspect_run(Path(args.run))
    print(text)
    return 0


def cmd_pairs(args) -> int:
    m = load_model(args.teacher)
    out = collect_pairs(m, Path(args.out), args.n, args.steps, args.solver, args.guidance, args.seed)
    print(f"{args.n} pairs in {out}")
    return 0


def _device(name: str) -> torch.device:
    return device_of(name)


def _request(cls, args):
    """The sample / eval options of the CLI as the teacher kinds' request dataclass (never the namespace itself)."""
    vals = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
    return cls(**{**vals, "device": _device(args.device)})


def cmd_sample(args) -> int:
    print(kind_for(args.model).sample(_request(SampleRequest, args)))
    return 0


def cmd_eval(args) -> int:
    rows = kind_for(args.model).evaluate(_request(EvalRequest, args))
    cols = [k for k in rows[0] if not isinstance(rows[0][k], (list, dict))]
    cols += [k for r in rows[1:] for k in r if k not in cols]
    print(format_table(rows, cols))
    if args.json:
        Path(args.json).write_text(json.dumps(rows[0] if len(rows) == 1 else rows, indent=2) + "\n")
        print(f"metrics written to {args.json}")
    return 0


def cmd_data_list(args) -> int:
    rows = list_datasets()
    cols = [c for c in ("name", "kind", "shape", "classes", "about") if c in rows[0]] if rows else []
    print(format_table(rows, cols))
    return 0


def cmd_demo(args) -> int:
    run_demo(data=args.data, method=args.method, out=Path(args.out), steps=args.steps, teacher=args.teacher,
             n=args.n, small=args.small, progress=not args.quiet, overrides=args.overrides)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    if getattr(args, "nproc", None) is not None and not args.dry_run:
        try:
            if "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1:
                raise ValueError("--nproc launches torchrun itself; under torchrun, leave it out")
            cmd = torchrun_command(argv, args.nproc)
        except ValueError as e:
            print(f"dmdx {args.cmd}: error: {e}", file=sys.stderr)
            return 2
        return launch(cmd)
    code = 1
    try:
        code = _run(args)
        return code
    finally:
        status_dir = os.environ.get(STATUS_DIR_ENV)
        if status_dir and "RANK" in os.environ and os.path.isdir(status_dir):  # a worker of --nproc
            Path(status_dir, f"rank_{os.environ['RANK']}").write_text(str(code))


def _run(args) -> int:
    handlers = {"demo": cmd_demo, "distill": cmd_distill, "pairs": cmd_pairs, "sample": cmd_sample,
                "eval": cmd_eval, "export": cmd_export, "inspect": cmd_inspect, "plan": cmd_plan}
    try:
        if args.cmd == "teacher":
            return cmd_teacher_train(args)
        if args.cmd == "data":
            return cmd_data_list(args)
        return handlers[args.cmd](args)
    except (ValueError, FileNotFoundError) as e:
        print(f"dmdx {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        print(f"dmdx {args.cmd}: error: cannot write {e.filename}: {e.strerror}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; the last finished checkpoint is kept (continue with --resume)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # noqa: BLE001 - NonFiniteLossError and friends get a one-line message
        if isinstance(e, Preempted):
            if _main_rank():
                again = ("run the same command again to continue" if args.cmd == "demo"
                         else "continue with the same command and --resume")
                print(f"dmdx {args.cmd}: {e}; {again}", file=sys.stderr, flush=True)
            return EXIT_PREEMPTED
        if isinstance(e, (NonFiniteLossError, RankLostError)):
            print(f"dmdx {args.cmd}: {e}", file=sys.stderr, flush=True)
            return EXIT_NONFINITE if isinstance(e, NonFiniteLossError) else EXIT_RANK_LOST
        raise
    finally:
        dist.teardown()  # leave a torch.distributed group (if the command joined one)


if __name__ == "__main__":
    sys.exit(main())
