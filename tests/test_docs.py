"""Every command of README.md and docs/*.md (issue 30: every documented command must run as written).

The commands are the lines of the shell code blocks (```, ```bash) that start with ``dmdx``, ``torchrun``,
``python``, ``pip`` or ``printf`` (inline code in the prose is not covered).  Each one is listed in ``COMMANDS`` with
how it is checked, and a command added to the docs fails :func:`test_every_documented_command_is_listed` until it
is given one:

- ``run``: run here as written, in a scratch folder (``dmdx ...`` through ``dmdx.cli.main``, the others by bash);
- ``dry``: a full run takes minutes to hours on a CPU, so it is run as written plus ``--dry-run`` (the config, the
  teacher and every file the run reads are validated, nothing is trained);
- ``parse``: it cannot run in CI (the reason says why: a GPU, a real model from the hub, the output of a long run),
  so only its ``dmdx`` arguments are checked, by dmdx's own parser (placeholders such as ``adm|dmd2`` take their
  first choice, ``[--data VIDEOS]`` is dropped);
- ``elsewhere``: run as written by another test (named) or not a dmdx command (installs, the suite itself).

The SLURM script and the Kubernetes Job of docs/scaling.md are run as written by
``tests/test_dist.py::test_on_a_cluster``.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from dmdx.cli import build_parser, main

ROOT = Path(__file__).resolve().parent.parent
PROGRAMS = ("dmdx", "torchrun", "python", "pip", "printf")
SD = "a real SD1.5 pipeline folder (a hub download) and a GPU"
PLAN = ("plans a full-size architecture on fake tensors, 1-5 min of CPU; dmdx plan runs as a command on tiny "
        "pipelines in tests/test_real_size.py::test_plan_command")
LORA64 = ("--set real.student_lora.rank=64 --set real.fake_lora.rank=64 --set real.shared_base=true "
          "--set real.grad_checkpointing=true --set train.bf16=true")
LONG = "needs the model of the 5000-step teacher / the distillation above (hours on a CPU)"

# command (as written, without its trailing comment) -> (how, reason)
COMMANDS = {
    "README.md": {
        "pip install torch==2.13.0 && pip install -e . && dmdx demo":
            ("elsewhere", "installs from PyPI (no network in CI); the demo (about 10 min on 2 cores) runs with --small "
                          "in tests/test_demo.py"),
        'pip install torch==2.13.0 && pip install -e ".[test]" && python -m pytest -q':
            ("elsewhere", "installs from PyPI, then runs this suite"),
        "dmdx data list": ("run", ""),
        "dmdx teacher train --data digits --out runs/teacher --steps 5000": ("dry", "5000 steps"),
        "dmdx sample --model runs/teacher --steps 50 --n 64 --out grid.png":
            ("parse", "64 samples of 99 network evaluations of the digits UNet, 1-2 min on a loaded 2-core CPU; "
                      "dmdx sample runs in tests/test_cli.py"),
        "dmdx eval   --model runs/teacher --steps 50 --n 2000 --json teacher.json":
            ("parse", "2,000 samples of 99 network evaluations, minutes on a CPU; dmdx eval runs in tests/test_cli.py"),
        "dmdx distill --method dmd2 --teacher runs/teacher --out runs/dmd2 --steps 3000 --set method.critic_every=5":
            ("dry", "3000 steps"),
        "dmdx distill --method dmd2 --teacher runs/teacher --out runs/dmd2-4step --set student.times=1,0.75,0.5,0.25":
            ("dry", "the recipe's steps"),
        "dmdx distill --method dmdx --teacher runs/teacher --out runs/dmdx": ("dry", "the recipe's steps"),
        "dmdx eval   --model runs/dmdx": ("parse", LONG),
        "dmdx inspect runs/dmdx": ("parse", LONG + "; inspect runs on constructed runs in tests/test_health.py"),
        "dmdx pairs  --teacher runs/teacher --n 4000 --steps 50 --out runs/pairs":
            ("parse", "4,000 teacher ODEs of 50 Heun steps, minutes on a CPU; dmdx pairs runs in tests/test_cli.py"),
        "dmdx distill --method dmd2 --teacher gmm:unequal --out runs/toy": ("dry", "the recipe's steps"),
        "dmdx distill --method dmdx --teacher gmm:ring8 --out runs/ring8 --nproc 2":
            ("parse", "a full run on two processes (minutes); --nproc 2 runs on short runs in tests/test_dist.py"),
        "torchrun --standalone --nproc_per_node=2 -m dmdx distill --method dmd2 --teacher gmm:ring8 --out "
        "runs/ring8-dmd2 --steps 200":
            ("parse", "two processes for 200 steps and the surrogate's fit (minutes); torchrun runs in "
                      "tests/test_dist.py"),
    },
    "docs/real-models.md": {
        "dmdx distill --method dmd2 --teacher ./sd15 --prompts prompts.txt --data ./images --out runs/sd15-dmd2 "
        "--set real.student_lora.rank=64 --set real.fake_lora.rank=64 --set real.grad_checkpointing=true "
        "--set train.bf16=true": ("parse", SD + "; tiny SD folders run in tests/test_diffusers.py"),
        "dmdx export --run runs/sd15-dmd2 --format diffusers --out sd15-student":
            ("parse", SD + "; exports of tiny runs run in tests/test_export.py"),
        "dmdx export --run runs/sd15-dmd2 --format lora --out sd15-lora": ("parse", SD),
        "dmdx export --run runs/sd15-dmd2 --format comfyui --out sd15-comfy.safetensors": ("parse", SD),
        "dmdx sample --model runs/sd15-dmd2 --prompts prompts.txt --out samples/student --per-prompt 4":
            ("parse", SD),
        "dmdx sample --model ./sd15 --prompts prompts.txt --out samples/teacher --steps 50 --guidance 7.5":
            ("parse", SD),
        "dmdx eval --model runs/sd15-dmd2 --prompts prompts.txt --per-prompt 4 --clip ./clip-vit-large-patch14 "
        "--pickscore ./PickScore_v1 --ref ./coco-val-1k --inception ./inception-2015-12-05.pt --lpips "
        "./lpips_alex.pth --json sd15-dmd2.json": ("parse", SD + ", CLIP, PickScore, Inception, LPIPS and COCO "
                                                         "downloads"),
        "dmdx eval --model ./sd15 --prompts prompts.txt --per-prompt 4 --clip ./clip-vit-large-patch14 --ref "
        "./coco-val-1k --inception ./inception-2015-12-05.pt --lpips ./lpips_alex.pth":
            ("parse", SD + ", CLIP, Inception, LPIPS and COCO downloads"),
        **{f"python benchmarks/real_size.py write --arch {a} --out {a}-configs":
           ("elsewhere", "writes the configs tests/test_real_size.py::test_published_architectures_on_meta builds")
           for a in ("sdxl", "sd15", "sd3-medium", "wan2.1-1.3b", "cogvideox-2b")},
        **{cmd: ("parse", PLAN) for cmd in (
            "dmdx plan --method dmdx --teacher sdxl-configs --memory 24GB " + LORA64 + " --set train.batch_size=1",
            "dmdx plan --method dmd2 --teacher sd15-configs --memory 24GB " + LORA64 + " --set train.batch_size=1",
            "dmdx plan --method dmd2 --teacher sd3-medium-configs " + LORA64 + " --set train.batch_size=4",
            "dmdx plan --method dmd2 --teacher wan2.1-1.3b-configs " + LORA64 + " --set train.batch_size=1",
            "dmdx plan --method dmd2 --teacher cogvideox-2b-configs " + LORA64 + " --set train.batch_size=1",
            "dmdx plan --method dmd2 --teacher sdxl-configs --gpus 8 --set train.parallel=fsdp "
            "--set real.grad_checkpointing=true --set train.bf16=true --set train.batch_size=8")},
    },
    "docs/scaling.md": {
        "dmdx distill --method dmdx --teacher gmm:ring8 --out runs/ring8": ("dry", "the recipe's steps"),
        "dmdx distill --method dmdx --teacher gmm:ring8 --out runs/ring8-2proc --nproc 2":
            ("parse", "a full run on two processes (minutes); --nproc 2 runs on short runs in tests/test_dist.py"),
        "torchrun --standalone --nproc_per_node=2 -m dmdx distill --method dmdx --teacher gmm:ring8 --out "
        "runs/ring8-torchrun": ("parse", "a full run on two processes (minutes); torchrun runs in tests/test_dist.py"),
        "torchrun --nnodes=4 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST0:29500 --rdzv-id=run1 "
        "-m dmdx distill --method dmd2 --teacher path/to/sdxl --prompts prompts.txt --out /shared/runs/sdxl "
        "--set train.parallel=fsdp --set train.bf16=true --set real.grad_checkpointing=true":
            ("parse", "four machines of 8 GPUs and a real SDXL folder"),
    },
    "docs/video.md": {
        "dmdx distill --method adm|dmd2|dmdx --teacher FOLDER --prompts p.txt --out RUN [--data VIDEOS]":
            ("parse", "a template (FOLDER, RUN, VIDEOS); the example below runs"),
        "dmdx sample --model RUN --prompts p.txt --out DIR": ("parse", "a template; the example below runs"),
        "dmdx export --run RUN --format diffusers|lora --out OUT": ("parse", "a template; the example below runs"),
        "python -c \"from dmdx.teachers.video.tiny import make_tiny_video_pipeline as m; m('cogvideox', "
        "'tiny-cog')\"": ("run", ""),
        "printf 'a red cat runs\\nsunset over the sea\\n' > p.txt": ("run", ""),
        "dmdx distill --method adm --teacher tiny-cog --prompts p.txt --out run-cog --steps 2": ("run", ""),
        "dmdx sample --model run-cog --prompts p.txt --out run-cog/videos": ("run", ""),
        "dmdx export --run run-cog --format diffusers --out cog-student": ("run", ""),
    },
}


def _strip_comment(line: str) -> str:
    """``line`` without a trailing ``# comment`` (a ``#`` outside quotes after a space)."""
    quote = None
    for i, c in enumerate(line):
        if quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def doc_commands(name: str) -> list[str]:
    """The commands of file ``name``'s shell code blocks, continuation lines joined, in order."""
    text = (ROOT / name).read_text()
    out = []
    for lang, body in re.findall(r"^```(\w*)\n(.*?)^```", text, re.S | re.M):
        if lang not in ("", "bash", "sh"):
            continue
        body = re.sub(r"\\\n\s*", "", body)
        for line in body.splitlines():
            line = _strip_comment(line.strip())
            if line.split(" ", 1)[0] in PROGRAMS:
                out.append(line)
    return out


def _docs() -> list[str]:
    return ["README.md"] + sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md"))


def test_every_documented_command_is_listed():
    found = {name: doc_commands(name) for name in _docs()}
    for name, cmds in found.items():
        listed = COMMANDS.get(name, {})
        new = [c for c in cmds if c not in listed]
        gone = [c for c in listed if c not in cmds]
        assert not new, f"{name}: commands this check does not know; list them in tests/test_docs.py: {new}"
        assert not gone, f"{name}: listed commands no longer in the file: {gone}"
    for name, listed in COMMANDS.items():
        for cmd, (how, reason) in listed.items():
            assert how in ("run", "dry", "parse", "elsewhere"), cmd
            assert how == "run" or reason, f"{cmd}: a command that is not run as written needs its reason"


def _dmdx_args(cmd: str) -> list[list[str]]:
    """The argument lists given to dmdx by command ``cmd`` (after ``dmdx`` or ``torchrun ... -m dmdx``)."""
    cmd = re.sub(r"\s\[[^\]]*\]", "", cmd)  # optional parts of a template
    out = []
    for part in cmd.split(" && "):
        tokens = shlex.split(part)
        tokens = [t.split("|")[0] if "|" in t and not t.startswith("-") else t for t in tokens]
        if tokens[0] == "dmdx":
            out.append(tokens[1:])
        elif tokens[0] == "torchrun":
            i = tokens.index("-m")
            assert tokens[i + 1] == "dmdx", cmd
            out.append(tokens[i + 2:])
    return out


@pytest.mark.parametrize("name", list(COMMANDS))
def test_documented_dmdx_commands_parse(name):
    """Every dmdx command of the docs is valid for dmdx's parser: its subcommand, flags and choices exist."""
    parser = build_parser()
    for cmd in COMMANDS[name]:
        for argv in _dmdx_args(cmd):
            try:
                parser.parse_args(argv)
            except SystemExit:
                pytest.fail(f"{name}: `{cmd}` is refused by dmdx's parser")


def _run(cmd: str, cwd: Path, dry: bool = False) -> None:
    if cmd.startswith("dmdx "):
        argv = shlex.split(cmd)[1:] + (["--dry-run"] if dry else [])
        assert main(argv) == 0, cmd
    else:
        assert not dry
        cmd = re.sub(r"^python ", f"{shlex.quote(sys.executable)} ", cmd)
        r = subprocess.run(["bash", "-c", cmd], cwd=cwd, capture_output=True, text=True)
        assert r.returncode == 0, f"{cmd}: {r.stderr[-2000:]}"


def test_readme_and_scaling_commands_run_or_dry_run(tmp_path, monkeypatch, capsys):
    """README.md's and docs/scaling.md's commands marked run (as written) and dry (as written plus --dry-run), in
    a scratch folder, in the order of the docs; the commands after ``dmdx teacher train`` find a 2-step teacher in
    runs/teacher (the dry runs load it)."""
    monkeypatch.chdir(tmp_path)
    teacher = tmp_path / "runs" / "teacher"
    for name in ("README.md", "docs/scaling.md"):
        for cmd, (how, _) in COMMANDS[name].items():
            if how not in ("run", "dry"):
                continue
            if "runs/teacher" in cmd and not cmd.startswith("dmdx teacher train") and not teacher.exists():
                assert main(["teacher", "train", "--data", "digits", "--out", str(teacher), "--steps", "2",
                             "--quiet", "--set", "train.batch_size=8", "--set", "train.sample_every=0"]) == 0
            _run(cmd, tmp_path, dry=how == "dry")
    assert teacher.is_dir() and not (tmp_path / "runs" / "dmd2").exists()  # a dry run writes nothing


def test_video_quickstart_runs_as_written(tmp_path, monkeypatch):
    """docs/video.md's example, line by line as written: a tiny CogVideoX folder, 2 ADM steps, sample, export."""
    pytest.importorskip("diffusers")
    pytest.importorskip("av")
    monkeypatch.chdir(tmp_path)
    for cmd, (how, _) in COMMANDS["docs/video.md"].items():
        if how == "run":
            _run(cmd, tmp_path)
    assert list((tmp_path / "run-cog" / "videos").glob("*.mp4"))
    assert (tmp_path / "cog-student" / "model_index.json").is_file()


@pytest.mark.parametrize("name", list(COMMANDS))
def test_no_documented_run_reuses_an_earlier_out(name):
    """A fresh run into a folder an earlier command of the same file starts is refused (it already holds a run):
    the docs give every fresh ``distill`` / ``teacher train`` its own --out (docs/scaling.md's "the same, by hand"
    line once reused the line before's)."""
    parser = build_parser()
    seen = {}
    for cmd in doc_commands(name):
        for argv in _dmdx_args(cmd):
            args = parser.parse_args(argv)
            if args.cmd in ("distill", "teacher") and getattr(args, "out", None) and not args.resume:
                assert args.out not in seen, f"{name}: `{cmd}` starts a run in {args.out}, as `{seen[args.out]}` did"
                seen[args.out] = cmd
