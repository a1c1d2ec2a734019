"""Terminal output shared by every fvg command: one-line errors, progress bars, logging."""

from __future__ import annotations

import logging

import typer
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

from fvg.io import FvgError

# stderr keeps stdout clean for machine-readable output (`fvg plan` prints JSON); soft_wrap keeps
# one-line errors on one line whatever the terminal width.
console = Console(stderr=True, soft_wrap=True)


class _DropTorchvisionNotice(logging.Filter):
    """transformers announces its PIL image-processor fallback whenever torchvision is absent; fvg
    wants that fallback (PyPI's torchvision cannot load beside the CPU torch build), so it is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(_DropTorchvisionNotice())


# The planner options of every command that plans (fvg generate / plan / anchor, fvg eval generate).
PlannerOpt = typer.Option(None, "--planner", help="rules, transformers or openai.")
PlannerModelOpt = typer.Option(None, "--planner-model", help="LLM id/path or served name.")
PlannerUrlOpt = typer.Option(None, "--planner-url", help="OpenAI-compatible base URL.")
ApiKeyEnvOpt = typer.Option("OPENAI_API_KEY", "--api-key-env", help="Env var holding the API key.")
PlanCacheOpt = typer.Option(None, "--plan-cache", help="Planner cache folder.")


def planner_options(api_key_env: str, planner_url: str | None = None, plan_cache=None) -> dict:
    """`make_planner` keyword arguments from those options (backend and model are preset fields)."""
    options = {"api_key_env": api_key_env}
    if planner_url:
        options["base_url"] = planner_url
    if plan_cache:
        options["cache_dir"] = plan_cache
    return options


def progress_bar(*extra: ProgressColumn, disable: bool = False, transient: bool = True) -> Progress:
    """Stage, step count, elapsed time and ETA (plus `extra` columns such as the loss)."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), *extra,
                    TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console,
                    transient=transient, disable=disable)


class StageProgress:
    """A `progress(stage, step, total)` callback drawing one bar per pipeline stage."""

    def __init__(self, progress: Progress, label: str = ""):
        self.progress, self.label, self.tasks = progress, label, {}

    def __call__(self, stage: str, step: int, total: int) -> None:
        if stage not in self.tasks:
            self.tasks[stage] = self.progress.add_task(f"{self.label}{stage}", total=total)
        self.progress.update(self.tasks[stage], completed=step, total=total)

    def done(self) -> None:
        for task in self.tasks.values():
            self.progress.remove_task(task)
        self.tasks.clear()


def set_torch_threads(threads: int | None) -> None:
    """`--threads`: torch's CPU threads for this process (None: torch's default, all cores)."""
    if threads is None:
        return
    if threads < 1:
        raise FvgError(f"--threads must be at least 1, got {threads}")
    import torch

    torch.set_num_threads(threads)


def setup_logging(*names: str, level: int = logging.INFO) -> None:
    """Route fvg's loggers through rich on stderr, once."""
    from rich.logging import RichHandler

    for name in names:
        logger = logging.getLogger(name)
        if logger.handlers:
            continue
        handler = RichHandler(console=console, show_path=False, show_time=True)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(level)
        logger.propagate = False


def print_error(message: str) -> None:
    """`error: <message>` on one line: the message's own text verbatim (square brackets are not
    rich markup: "pip install 'fvg[studio]'" keeps its extra), line breaks folded to spaces."""
    from rich.markup import escape

    console.print(f"[red]error:[/] {escape(' '.join(str(message).split()))}", highlight=False)


def run_app(typer_app: typer.Typer, argv: list[str] | None = None, prog_name: str = "fvg") -> int:
    """Run a typer app the fvg way: user mistakes print one line and exit 2, never a traceback.

    An OSError that reaches here (a full disk, a folder that turned read-only mid-run) is the
    machine's answer, not a bug in fvg: it gets the same one line and exit 2.
    """
    try:
        code = typer_app(args=argv, prog_name=prog_name, standalone_mode=False)  # click returns a typer.Exit's code
    except FvgError as exc:
        print_error(str(exc))
        return 2
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        print_error(f"{exc.strerror or exc}{where}")
        return 2
    except KeyboardInterrupt:
        console.print("interrupted")
        return 130
    except typer.Exit as exc:
        return exc.exit_code
    except Exception as exc:  # click usage errors arrive here in non-standalone mode
        if _is_usage_error(exc):
            ctx = getattr(exc, "ctx", None)
            hint = f" (see: {ctx.command_path} --help)" if ctx is not None else ""
            print_error(f"{exc.format_message()}{hint}")
            return exc.exit_code
        if type(exc).__name__ == "Abort":  # ctrl-c or EOF at a prompt
            return 1
        raise
    return code if isinstance(code, int) else 0


def _is_usage_error(exc: Exception) -> bool:
    """A click `ClickException` (unknown option, bad value, missing argument), whichever click raised it:
    typer 0.2x runs a copy of click of its own (`typer._click`), whose exceptions are not click's, so
    they are recognised by what they carry rather than by class."""
    return (callable(getattr(exc, "format_message", None)) and callable(getattr(exc, "show", None))
            and isinstance(getattr(exc, "exit_code", None), int))


# The video stage's speed options (fvg.speed), shared by `fvg generate`, `fvg animate` and `fvg eval generate`.
AttentionBackendOpt = typer.Option(
    None, "--attention-backend", help="diffusers attention backend for the video model: native, flash, sage, "
    "_native_cudnn, ... (default: the model's).")
CompileOpt = typer.Option(False, "--compile", help="Compile the video model's repeated blocks (torch.compile, "
                                                   "regional; the first video pays the compile time).")
ContextParallelOpt = typer.Option(1, "--context-parallel", help="Split each video over N processes (diffusers' "
                                 "context parallelism; run under torchrun --nproc-per-node N).")
ContextParallelModeOpt = typer.Option("ulysses", "--context-parallel-mode", help="ulysses (all-to-all over the "
                                     "attention heads) or ring (needs a flash/cudnn/sage attention backend).")
CacheOpt = typer.Option("none", "--cache", help="Reuse work across denoising steps: fbc (first-block cache), "
                        "magcache (the first video of a model, mode and step count measures its ratios), "
                        "taylorseer, or none.")
