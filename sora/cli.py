"""The `sora` command (also `python -m sora`).

    sora run WORKFLOW.json [--set NODE_ID.INPUT=VALUE ...] [--output-dir DIR] [--models-dir DIR] [--smoke]
                           [--devices cuda:0,cuda:1]
    sora inputs WORKFLOW.json      the nodes and the inputs --set can change, with their values
    sora stand-ins DIR             tiny random models under the shipped workflows' file names
    sora --version

runs a workflow of this pack's nodes with no ComfyUI installed. Progress goes to stderr, the paths of the written
files to stdout. Exit codes: 0 success, 1 an error the user can fix (one line, no traceback), 2 bad command-line
usage, 130 stopped by Ctrl-C. Unexpected exceptions (bugs) keep their full traceback.

Each subcommand is a function that adds its parser and sets `handler(args) -> exit code`; more can sit next to
`add_run_command` and be added in `build_parser`.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from . import __version__, runtime
from .errors import Interrupted, SoraError

EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _node_classes() -> dict:
    """This pack's node classes; modules that failed to import are reported and left out."""
    from .nodes import load_node_mappings
    classes, _, failures = load_node_mappings()
    for module, error in failures.items():
        _say(f"warning: node module {module} could not be loaded ({type(error).__name__}: {error}); "
             "its nodes are unavailable")
    return classes


def run_command(args: argparse.Namespace) -> int:
    """`sora run`: validate and run one workflow (with `args.node_classes`, or this pack's nodes when None)."""
    from .workflow import run_workflow
    if args.devices is not None:  # one process per device (sora.parallel_launch); this one supervises them
        from . import parallel_launch
        if not parallel_launch.inside_group():
            return parallel_launch.run_command_on_devices(args)
    runtime.configure(output_dir=args.output_dir, models_dir=args.models_dir)
    classes = _node_classes() if args.node_classes is None else args.node_classes
    if args.devices is not None:  # rank 0 of the processes: the graph's diffusion models run on all of them
        classes = parallel_launch.with_models_on_ranks(classes)
    with runtime.ctrl_c_interrupts():
        result = run_workflow(args.workflow, classes, args.set, report=_say, smoke=args.smoke)
    for path in result.files:
        print(path, flush=True)
    if not result.files:
        _say("done; the output nodes reported no files")
    return 0


def add_run_command(commands: argparse._SubParsersAction) -> None:
    run = commands.add_parser("run", help="run a workflow (API or UI format JSON) of this pack's nodes",
                              description="Validate a workflow, then run its output nodes and what they need.")
    run.add_argument("workflow", help="workflow JSON file, in ComfyUI's API or UI (saved) format")
    run.add_argument("--set", action="append", default=[], metavar="NODE_ID.INPUT=VALUE",
                     help="override one input, e.g. for workflows/nano_t2v.json --set 7.seed=42 --set "
                          "4.prompt='a blue square moving up'; VALUE is read as JSON when it parses, else as text "
                          "(repeatable; `sora inputs WORKFLOW` lists the node ids and inputs)")
    run.add_argument("--output-dir", default="output", help="where outputs are written (default: ./output)")
    run.add_argument("--smoke", action="store_true",
                     help="a smoke run: sizes, lengths and steps shrunk (64x32, 9 frames, 2 steps) so that a Wan "
                          "workflow on `sora stand-ins` runs in seconds; --set still applies on top")
    run.add_argument("--models-dir", default="models",
                     help="model root: files in DIR/diffusion_models (or DIR/unet), DIR/text_encoders, DIR/vae, "
                          "DIR/loras, DIR/clip_vision, DIR/LLM (default: ./models)")
    run.add_argument("--devices", metavar="DEVICE,DEVICE,...",
                     help="run the diffusion model on several devices, one process each, e.g. cuda:0,cuda:1 (cpu,cpu "
                          "for testing): its token sequence and guidance passes split across them; everything else "
                          "runs in the first one's process")
    run.set_defaults(handler=run_command)


def inputs_command(args: argparse.Namespace) -> int:
    """`sora inputs WORKFLOW`: each node and the inputs `--set` can change, with their values and what they take."""
    from .workflow import load_workflow, settable_inputs
    classes = _node_classes() if args.node_classes is None else args.node_classes
    prompt = load_workflow(args.workflow, classes).prompt
    shown = None
    for node_id, class_type, spec, value in settable_inputs(prompt, classes):
        if node_id != shown:
            title = prompt[node_id].get("_meta", {}).get("title")
            print(f"#{node_id} {class_type}" + (f" ({title})" if title and title != class_type else ""))
            shown = node_id
        print(f"    --set {node_id}.{spec.name}={_shown(value)}    {_takes(spec)}")
    return 0


def _shown(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    return repr(text) if isinstance(value, str) and (" " in text or not text) else text


def _takes(spec) -> str:
    """What an input takes, in a few words."""
    if spec.choices is not None:
        choices = [str(c) for c in spec.choices]
        return "one of: " + ", ".join(choices[:8]) + (", ..." if len(choices) > 8 else "")
    low, high = spec.options.get("min"), spec.options.get("max")
    span = f" {low}..{high}" if low is not None and high is not None else ""
    return f"{spec.type}{span}" + ("" if spec.required else ", optional")


def add_inputs_command(commands: argparse._SubParsersAction) -> None:
    inputs = commands.add_parser("inputs", help="list a workflow's nodes and the inputs --set can change",
                                 description="List each node of a workflow (id, class) and its settable inputs "
                                             "with their current values, as `sora run --set` takes them.")
    inputs.add_argument("workflow", help="workflow JSON file, in ComfyUI's API or UI (saved) format")
    inputs.set_defaults(handler=inputs_command)


def standins_command(args: argparse.Namespace) -> int:
    """`sora stand-ins DIR`: write tiny random stand-ins of the shipped workflows' model files."""
    from .standins import write_standins
    for path in write_standins(args.directory):
        print(path, flush=True)
    return 0


def add_standins_command(commands: argparse._SubParsersAction) -> None:
    standins = commands.add_parser(
        "stand-ins", help="write tiny random stand-ins of the model files the shipped workflows use",
        description="Write tiny random models under the real file names into DIR/diffusion_models, "
                    "DIR/text_encoders and DIR/vae, so that `sora run WORKFLOW --models-dir DIR` smoke-tests a "
                    "workflow without the real weights. The videos they make are noise.")
    standins.add_argument("directory", metavar="DIR", help="model root to write into (created if missing)")
    standins.set_defaults(handler=standins_command)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sora", description="Sora-style video DiT: headless tools.")
    parser.add_argument("--version", action="version", version=f"sora {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_run_command(commands)
    add_inputs_command(commands)
    add_standins_command(commands)
    return parser


def main(argv: Sequence[str] | None = None, *, node_classes: dict | None = None) -> int:
    """Entry point of the console script; returns the exit code. `node_classes` replaces the pack's nodes
    (for embedding the runner in another program, or testing it with other node classes)."""
    args = build_parser().parse_args(argv)
    args.node_classes = node_classes
    try:
        return args.handler(args)
    except Interrupted as e:
        _say(f"interrupted: {e}")
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        _say("aborted")
        return EXIT_INTERRUPTED
    except SoraError as e:
        _say(f"error: {e}")
        return EXIT_ERROR

