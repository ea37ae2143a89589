"""The command line: the only module that prints, reads argv or exits."""

from __future__ import annotations

import contextlib
import functools
import gc
import itertools
import os
import re
import signal
import sys
from pathlib import Path

import click

from tvrecipe import __version__
from tvrecipe.errors import Interrupted, TvrecipeError
from tvrecipe.store.output import InterruptAfter, OutputFolder, deferred_interrupts

EXIT_BUG = 70
EXIT_PIPE = 141  # 128 + SIGPIPE: stdout was closed (`tvrecipe plan r.yaml | head -1`)


def _stdout_closed(exc: BaseException) -> bool:
    """Whether ``exc`` is the broken pipe of a closed stdout (the reader of `| head` is gone),
    rather than one of a connection (a cluster's): a pipe whose reader left polls as an
    error. Where that cannot be asked (no poll, stdout not a file), a broken pipe is taken as
    stdout's."""
    if not isinstance(exc, BrokenPipeError):
        return False
    try:
        import select
        poll = select.poll()
        poll.register(sys.stdout.fileno(), 0)
        return any(ev & (select.POLLERR | select.POLLHUP) for _fd, ev in poll.poll(0))
    except (AttributeError, OSError, ValueError):
        return True


def _quiet_exit_on_closed_stdout() -> int:
    """End a command whose stdout was closed as other command-line tools do: silently, with
    exit 141 (as if killed by SIGPIPE). What is still buffered for stdout goes nowhere, so the
    interpreter's own flush at exit cannot fail again."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return EXIT_PIPE


def _fail(exc: TvrecipeError) -> None:
    header = f"tvrecipe: {exc.family}"
    click.echo(f"{header}:", err=True)
    for line in str(exc).splitlines():
        click.echo(f"  {line}", err=True)


def _interrupt_inside(exc: BaseException) -> bool:
    """Whether ``exc`` is a Ctrl-C (or SIGTERM) that a library wrapped: pydantic-core raises a
    SchemaError that quotes the KeyboardInterrupt when one lands while it builds a model."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, KeyboardInterrupt) or (
                type(exc).__name__ == "SchemaError" and "KeyboardInterrupt" in str(exc)):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def handle_errors(fn):
    """Map tvrecipe errors to their exit codes; show a traceback only with -v."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        verbose = click.get_current_context().find_root().params.get("verbose", 0)
        previous = signal.getsignal(signal.SIGTERM)

        def on_term(signum, frame):
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, on_term)
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt as stop:
            exc = Interrupted(
                "interrupted once the outputs and their lock were written (they are complete)"
                if isinstance(stop, InterruptAfter) else
                "interrupted; temporary outputs were removed, the cache is intact")
            _fail(exc)
            sys.exit(exc.exit_code)
        except TvrecipeError as exc:
            if verbose:  # the traceback, then the same message and exit code as without -v
                import traceback
                traceback.print_exc()
            _fail(exc)
            sys.exit(exc.exit_code)
        except click.exceptions.ClickException:
            raise
        except Exception as exc:  # noqa: BLE001 (a bug: say so, and how to report it)
            if _stdout_closed(exc):  # `tvrecipe plan r.yaml | head -1`: not a bug
                sys.exit(_quiet_exit_on_closed_stdout())
            if _interrupt_inside(exc):
                exc = Interrupted("interrupted; temporary outputs were removed, the cache is "
                                  "intact")
                _fail(exc)
                sys.exit(exc.exit_code)
            if verbose:
                import traceback
                traceback.print_exc()
            if verbose:
                click.echo(f"tvrecipe: internal error: {type(exc).__name__}: {exc}\n"
                           "  this is a bug in tvrecipe; report it with the traceback above",
                           err=True)
            else:
                click.echo(f"tvrecipe: internal error: {type(exc).__name__}: {exc}\n"
                           "  this is a bug in tvrecipe; rerun with -v for the traceback and "
                           "report it", err=True)
            sys.exit(EXIT_BUG)
        finally:
            # The command is over: a Ctrl-C now must not turn its exit into click's "Aborted!"
            # (exit 1), so it waits, and is dropped, while this cleans up.
            with deferred_interrupts(drop=True):
                # No-op unless an interrupt landed inside the cleanup code itself.
                OutputFolder.abort_all()
                signal.signal(signal.SIGTERM, previous)

    return wrapper


class _UsageError(click.UsageError):
    """A command-line mistake (missing argument, unknown option, bad value), shown with the
    same ``tvrecipe: <family>:`` header as every other error (exit 2)."""

    def __init__(self, original: click.UsageError):
        super().__init__(original.format_message(), original.ctx)

    def show(self, file=None) -> None:
        click.echo("tvrecipe: usage error:", err=True)
        for line in self.format_message().splitlines():
            click.echo(f"  {line}", err=True)
        if self.ctx is not None:
            click.echo(f"  {self.ctx.get_usage()}", err=True)
            click.echo(f"  see `{self.ctx.command_path} --help`", err=True)


class _Group(click.Group):
    """The root command: usage errors of any subcommand get tvrecipe's error header."""

    def make_context(self, *args, **kwargs):
        try:
            return super().make_context(*args, **kwargs)
        except _NO_ARGS as exc:  # bare `tvrecipe`: the help, exit 0
            click.echo(exc.ctx.get_help())
            exc.ctx.exit(0)
        except click.UsageError as exc:
            raise exc if isinstance(exc, _UsageError) else _UsageError(exc) from None

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except _NO_ARGS as exc:  # bare `tvrecipe cache`: its help, exit 0
            click.echo(exc.ctx.get_help())
            exc.ctx.exit(0)
        except click.UsageError as exc:
            raise exc if isinstance(exc, _UsageError) else _UsageError(exc) from None


# A group called without a command: click 8.2 on raises this usage error (before, it printed
# the help and exited 0, as tvrecipe does again).
_NO_ARGS = getattr(click.exceptions, "NoArgsIsHelpError", ())


def _set_verbose(ctx: click.Context, _param, value: int) -> None:
    """``-v`` after a subcommand counts as ``-v`` before it."""
    if value:
        root = ctx.find_root()
        root.params["verbose"] = root.params.get("verbose", 0) + value


def _check_device(_ctx, _param, value: str | None) -> str | None:
    import re
    if value is not None and not re.fullmatch(r"auto|cpu|cuda|cuda:\d+", value):
        raise click.BadParameter(f"{value!r}: use auto, cpu, cuda or cuda:N")
    return value


def _device_option(help_text: str):
    return click.option("--device", callback=_check_device, help=help_text)


def _check_size(ctx, param, value: str) -> int:
    from click.core import ParameterSource

    from tvrecipe.store.writer import parse_size
    if str(value).strip() == "0":
        return 0
    try:
        return parse_size(value)
    except ValueError as exc:
        source = ctx.get_parameter_source(param.name)
        where = (f" (from the environment variable {param.envvar})"
                 if source == ParameterSource.ENVIRONMENT else "")
        raise click.BadParameter(f"{exc}{where}") from None


def _check_cluster(_ctx, _param, value: str | None) -> str | None:
    if value is None:
        return None
    from tvrecipe.exec.cluster_address import parse_address
    try:
        parse_address(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    return value.strip()


def _cluster_option(help_text: str):
    return click.option("--cluster", metavar="ADDRESS", callback=_check_cluster, help=help_text)


@click.group("tvrecipe", cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tvrecipe")
@click.option("-v", "--verbose", count=True, help="Show tracebacks and more detail.")
@click.pass_context
def main(ctx: click.Context, verbose: int) -> None:
    """Declarative merge recipes for task vectors.

    Write a recipe (YAML), then `tvrecipe validate`, `tvrecipe plan` and `tvrecipe run` it.
    """
    ctx.ensure_object(dict)


def _cache_root(recipe_dir: Path, option: str | None) -> Path:
    import os
    chosen = option or os.environ.get("TVRECIPE_CACHE")
    return Path(chosen) if chosen else recipe_dir / ".tvrecipe" / "cache"


@contextlib.contextmanager
def _importing(module: str):
    """Import the engine module ``module`` (torch, networkx, pydantic) with the cyclic
    collector paused, unless it is imported already.

    Importing torch allocates some 10^5 objects that live as long as the process; collector
    passes over them took 0.15-0.3 s of torch's 1.2 s import on the 2-core benchmark machine,
    a tenth of a cached rerun. Garbage is collected first (cheap before the import), and what
    the import left is then frozen out of later collections (``gc.freeze``): it is never
    garbage, and no garbage is frozen with it. Collection resumes for the run itself.
    """
    if module in sys.modules:
        yield
        return
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


def _compile(recipe: str, targets: tuple[str, ...] = ()):
    with _importing("tvrecipe.plan.graph"):
        from tvrecipe.plan.graph import load_and_compile
    return load_and_compile(recipe, targets)


def _rule_warnings(compiled) -> list[str]:
    """Per-tensor rules that match no tensor, when the recipe has rules and its models'
    headers can be read (validate works without the checkpoints, and then says nothing)."""
    from tvrecipe.errors import InputError, MissingPackage
    from tvrecipe.plan.summary import per_tensor_params, rule_warnings
    from tvrecipe.plan.tensors import build_tensor_plan
    from tvrecipe.spec.pertensor import is_rules
    if not any(is_rules(v) for *_rest, v in per_tensor_params(compiled)):
        return []
    try:
        plan = build_tensor_plan(compiled)
    except (InputError, MissingPackage):
        return []
    try:
        return rule_warnings(compiled, list(plan.tensors))
    finally:
        plan.close()


def _missing_model_notes(compiled) -> list[str]:
    """Local model paths that do not exist (yet): validate checks the recipe alone and says
    ok, but plan and run will stop there (a recipe from `tvrecipe new`, data not pulled)."""
    out = []
    for name, model in compiled.models.items():
        where = compiled.loaded.resolve(model.path)
        if isinstance(where, Path) and not os.path.lexists(where):
            line, col = compiled.loaded.source.locate(("models", name))
            at = f"{compiled.loaded.path.name}:{line}:{col}: " if line else ""
            out.append(f"note: {at}models.{name}: {model.path} does not exist (yet); validate "
                       "checks the recipe alone, plan and run need the model there")
    return out


def _kind_warnings(compiled) -> list[str]:
    """A `kind: task_vector` model that looks like a fine-tuned checkpoint (config.json
    beside weights tvrecipe did not write) would be added whole, not as a delta: warn."""
    from tvrecipe.errors import InputError, MissingPackage
    from tvrecipe.plan.graph import VECTORS_INDEX
    from tvrecipe.store.checkpoint import open_checkpoint
    out = []
    for name, model in compiled.models.items():
        folder = compiled.loaded.resolve(model.path)
        if (model.kind != "task_vector" or not isinstance(folder, Path)
                or not (folder / "config.json").is_file()
                or (folder / VECTORS_INDEX).is_file()):
            continue
        try:
            with open_checkpoint(folder) as ck:
                if ck.metadata.get("tvrecipe.kind") in ("vector", "vectors"):  # a run's
                    continue
        except (InputError, MissingPackage):
            continue  # (the run says what is wrong with it)
        line, col = compiled.loaded.source.locate(("models", name))
        where = f"{compiled.loaded.path.name}:{line}:{col}: " if line else ""
        out.append(f"warning: {where}models.{name}: {model.path} holds a config.json and "
                   "weights tvrecipe did not write, as a fine-tuned checkpoint does, yet "
                   "kind: task_vector adds them whole as a delta; if it is a fine-tuned model, "
                   f"drop the kind and take its task vector with {{op: extract, base: ..., "
                   f"finetuned: [{name}]}}")
    return out


@main.command()
@click.argument("recipes", nargs=-1, required=True, type=click.Path(dir_okay=False))
@handle_errors
def validate(recipes: tuple[str, ...]) -> None:
    """Check recipes: schema, references, kinds, cycles; reads no tensor data (only the
    models' headers, to warn of per-tensor rules that match no tensor)."""
    from tvrecipe.errors import InputError, RecipeError
    from tvrecipe.plan.tensors import adapter_problems
    failed: list[RecipeError | InputError] = []
    for recipe in recipes:
        try:
            compiled = _compile(recipe)
        except RecipeError as exc:
            failed.append(exc)
            _fail(exc)
            continue
        adapters = adapter_problems(compiled)
        if adapters:  # a LoRA adapter that does not fit its base, found from headers
            failed.append(InputError("\n".join(adapters)))
            _fail(failed[-1])
            continue
        note = f"; unused steps: {', '.join(compiled.unused)}" if compiled.unused else ""
        click.echo(f"{recipe}: ok ({_plural(len(compiled.steps), 'step')}, "
                   f"{_plural(len(compiled.outputs), 'output')}{note})")
        for warning in (_rule_warnings(compiled) + _kind_warnings(compiled)
                        + _missing_model_notes(compiled)):
            click.echo(warning, err=True)
    if failed:
        sys.exit(failed[0].exit_code)


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--format", "fmt", type=click.Choice(["text", "mermaid", "dot"]), default="text",
              show_default=True, help="Text summary, or the step graph for a diagram tool.")
@click.option("--cache-dir", type=click.Path(file_okay=False), help="The cache to check.")
@handle_errors
def plan(recipe: str, fmt: str, cache_dir: str | None) -> None:
    """Show what a run would do: steps in order, tensors, peak memory and output size."""
    with _importing("tvrecipe.exec.lockfile"):
        from tvrecipe.exec import lockfile
    from tvrecipe.plan.summary import render_plan, run_status
    from tvrecipe.store.cache import TensorCache
    from tvrecipe.store.lock import lock_path
    compiled = _compile(recipe)
    status = None
    if fmt == "text":
        memo = lockfile.hash_memo(compiled)
        state = lockfile.run_state(compiled, memo)
        if (lock_path(compiled.loaded.path).is_file()
                and not lockfile.state_differences(compiled, state)
                and not lockfile.output_differences(compiled, memo)):
            # (then the plan, as --force would run it)
            click.echo(f"{recipe}: up to date: inputs, recipe and outputs match the lock, so "
                       "`tvrecipe run` does nothing (--force writes them again, as below)\n")
        tc = TensorCache(_cache_root(compiled.loaded.root, cache_dir))
        status = run_status(compiled, {n for n, k in state["steps"].items() if tc.usable(k)})
    click.echo(render_plan(compiled, fmt, status))


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--force", is_flag=True, help="Replace outputs that already exist.")
@_device_option("Override settings.device: auto, cpu, cuda, cuda:N.")
@click.option("--allow-nonfinite", is_flag=True, help="Merge inputs that contain NaN or Inf.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False),
              help="Write the run's report to this JSON file: \"run:status\" (ran, or "
                   "up_to_date when there was nothing to do) and the reports of the steps "
                   "that make one (clusters, ranks); see the README.")
@click.option("--cache-dir", type=click.Path(file_okay=False),
              help="Cache of step results (default: $TVRECIPE_CACHE, else .tvrecipe/cache "
                   "beside the recipe).")
@click.option("--no-cache", is_flag=True, help="Neither read nor write cached step results.")
@click.option("--locked", is_flag=True,
              help="Refuse to run when the recipe or inputs differ from the lock file; "
                   "outputs not there yet are made and must match the lock, which stays as "
                   "it is.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
@_cluster_option("Run the tensor work on a Dask cluster: tcp://HOST:PORT (a scheduler whose "
                 "workers see the inputs and the staging folder) or local:N (N worker "
                 "processes here). Same bytes as a local run; needs 'tvrecipe[cluster]'.")
@click.option("--reuse-memory", "reuse_memory", default="0", show_default=True,
              envvar="TVRECIPE_REUSE_MEMORY", callback=_check_size, metavar="SIZE",
              help="Memory (e.g. 8GB) that a local run's similarity pass (cluster_basis, "
                   "model_stock…) may fill with the task vectors it computed, so that the merge "
                   "pass takes them instead of reading and computing them again. Same bytes; "
                   "0 (the default) streams. Faster only where fresh memory costs less than "
                   "reading again: on the 2-core benchmark box it was slower (benchmarks/"
                   "README.md). Also read from TVRECIPE_REUSE_MEMORY.")
@handle_errors
def run(recipe: str, force: bool, device: str | None, allow_nonfinite: bool,
        report_path: str | None, cache_dir: str | None, no_cache: bool, locked: bool,
        quiet: bool, cluster: str | None, reuse_memory: int) -> None:
    """Run a recipe and write its outputs (atomically: all or nothing)."""
    from tvrecipe.errors import VerifyError
    if cluster:
        from tvrecipe.exec.cluster_address import require_dask
        require_dask()
    with _importing("tvrecipe.exec.lockfile"):
        from tvrecipe.exec import lockfile
    from tvrecipe.store.lock import lock_path
    compiled = _compile(recipe)
    if report_path:
        _check_side_file(compiled, report_path, "--report")
    _hold_run_lock(compiled, "run")
    for warning in _kind_warnings(compiled):
        click.echo(f"tvrecipe: {warning}", err=True)
    lockfile.sweep_dead_runs(compiled)
    memo = lockfile.hash_memo(compiled)
    state = lockfile.run_state(compiled, memo)
    has_lock = lock_path(compiled.loaded.path).is_file()
    if has_lock and force and not locked:
        from tvrecipe.store.lock import read_lock
        try:
            read_lock(lock_path(compiled.loaded.path))
        except VerifyError:  # damaged: --force writes the outputs and a new lock
            has_lock = False
    changes = lockfile.state_differences(compiled, state) if has_lock else None
    if locked:
        if changes is None:
            raise VerifyError(f"--locked, but there is no lock file "
                              f"{lock_path(compiled.loaded.path)}; run once without --locked")
        if changes:
            raise VerifyError("--locked, but the run would differ from the lock:\n"
                              + "\n".join(changes))
        # As the locked run did: its released folders record whether it let NaN and Inf in.
        from tvrecipe.store.lock import read_lock
        was = read_lock(lock_path(compiled.loaded.path)).get("allow_nonfinite") is True
        if allow_nonfinite and not was:
            raise VerifyError("--locked, but the lock was written by a run without "
                              "--allow-nonfinite (which refused NaN and Inf in its inputs): "
                              "leave the option out to repeat it")
        allow_nonfinite = was
    # Outputs not there (a fresh checkout) are made; under --locked they must come out as
    # locked (checked before they are moved into place), while one that is there but differs
    # from the lock was changed by hand and needs --force.
    # (stale: as a run here wrote them under an earlier lock, a `git pull` or checkout ago;
    # made again as absent ones are)
    stale = lockfile.stale_outputs(compiled, memo) if has_lock else set()
    absent = (lockfile.absent_outputs(compiled) | stale) if has_lock else set()
    damaged = lockfile.output_differences(compiled, memo, skip=absent) if has_lock else []
    if locked and damaged and not force:
        raise VerifyError("--locked, but the outputs differ from the lock (--force writes them "
                          "again):\n" + "\n".join(damaged))
    if changes == [] and not force and not damaged and not absent:
        if report_path:  # (not left missing, or stale from another run: it says so)
            _write_report(report_path, {"run:status": "up_to_date"})
        if not quiet:
            click.echo("outputs are up to date with the lock; nothing to do "
                       "(--force recomputes them)")
        return
    if (changes and not force and not locked and not damaged and not absent
            and lockfile.only_the_text_changed(compiled, state)):
        lockfile.relock_text(compiled, state)
        if report_path:
            _write_report(report_path, {"run:status": "relocked"})
        if not quiet:
            click.echo(f"{recipe}: only the recipe's text changed (comments, layout), not what "
                       "it computes: the lock records the new text; the outputs stay as they "
                       "are (--force writes them again)")
        return
    from tvrecipe.store.lock import check_writable
    # (not after the outputs are in place; an up-to-date run in a read-only folder is fine,
    # and so is --locked, which leaves the lock as it is)
    if not locked:
        check_writable(lock_path(compiled.loaded.path))
    # Output folders this recipe's lock says it wrote: unchanged ones are replaced without
    # --force; a changed one is refused, saying what changed, before anything runs.
    written = lockfile.written_outputs(compiled, memo, stale) if has_lock else {}
    replaceable = frozenset(name for name, changes in written.items() if not changes)
    if not force:
        for name, changes in written.items():
            if changes:
                from tvrecipe.errors import OutputError
                raise OutputError(f"output {compiled.outputs[name][0].path} was changed since "
                                  "this recipe wrote it:\n" + "\n".join(changes)
                                  + "\npass --force to write it again")
    from tvrecipe.exec.light import run_light
    from tvrecipe.exec.results import RunOptions
    from tvrecipe.report import render_reports
    from tvrecipe.store.cache import TensorCache
    progress = not quiet and sys.stderr.isatty()
    cache = None
    if not no_cache:
        root = _cache_root(compiled.loaded.root, cache_dir)
        _cache_apart_from_outputs(compiled, root)
        cache = TensorCache(root)
    if locked:  # the lock stays as it is; the outputs must match it
        def committed(_staged, digests, _where):
            return lockfile.StagedLock(None, None, memo, digests)
    else:
        def committed(staged, digests, where):
            return lockfile.stage_run_lock(compiled, state, staged, memo, digests, where,
                                           allow_nonfinite)
    options = RunOptions(force=force, device=device, progress=progress,
                         allow_nonfinite=allow_nonfinite, cache=cache, keys=state["steps"],
                         state=state, replaceable=replaceable, cluster=cluster,
                         committed=committed, reuse_memory=reuse_memory,
                         check_staged=(lambda staged, where: _check_locked_outputs(
                             compiled, staged, where)) if locked else None)
    # A rerun that only applies cached deltas runs in numpy, without importing torch.
    result = run_light(compiled, options)
    if result is None:
        with _importing("tvrecipe.exec.runner"):
            from tvrecipe.exec.runner import run_recipe  # torch: not for no-ops
        with _closing_clients(cluster):
            result = run_recipe(compiled, options)
    for warning in cache.warnings if cache else ():
        click.echo(f"tvrecipe: warning: {warning}", err=True)
    if report_path:
        reports = {**result.reports,
                   **{f"output:{n}": r for n, r in result.output_reports.items()}}
        if result.workers:  # a cluster run: time and bytes per worker
            reports["cluster:workers"] = result.workers
        reports["run:status"] = "ran"
        _write_report(report_path, reports)
    if quiet:
        return
    for text in render_reports(compiled, result.reports):
        click.echo(text)
    from tvrecipe.exec.results import left_out_files
    for name, path in result.outputs.items():
        click.echo(f"wrote {name}: {path}")
        for file, why in left_out_files(compiled, name).items():
            click.echo(f"  left out {file}: {why}")
        adapter = result.output_reports.get(name)
        if adapter:
            ranks = [t["rank"] for t in adapter["tensors"].values() if t["rank"]]
            left = (f"; left out {len(adapter['left_out'])} nonzero tensors that are not 2-D "
                    f"(norms, biases), {adapter['left_out_share']:.4f} of the vector's norm, "
                    "where peft keeps the base's") if adapter["left_out"] else ""
            click.echo(f"  peft adapter: {adapter['modules']} modules, rank "
                       f"{min(ranks, default=0)}-{max(ranks, default=0)}, relative error "
                       f"{adapter['relative_error']:.4f} (Frobenius, of the 2-D deltas){left}")
    if result.cache_hits:
        click.echo(f"from cache: {', '.join(result.cache_hits)}")
    where = (f" (cluster {cluster}, {len(result.workers)} workers)" if result.workers
             else "")
    click.echo(f"done in {result.seconds:.2f} s on {result.device}{where}: read "
               f"{result.bytes_read / 1e6:.1f} MB, wrote {result.bytes_written / 1e6:.1f} MB")


def _write_report(path: str, reports: dict) -> None:
    """``run --report``'s file: strict JSON (a NaN or infinite figure is null)."""
    from tvrecipe.report import json_text
    Path(path).write_text(json_text(reports) + "\n")


def _hold_run_lock(compiled, command: str) -> None:
    """Keep other processes from running the recipe until this command ends (one that tries
    fails at once, naming this one: OutputError, exit 4). See ``take_run_lock``."""
    from tvrecipe.store.lock import take_run_lock
    fd = take_run_lock(compiled.loaded.path, command)
    if fd is not None:
        click.get_current_context().call_on_close(functools.partial(os.close, fd))


def _cache_apart_from_outputs(compiled, root: Path) -> None:
    """A cache folder inside an output (which a run replaces whole) or holding one (which
    ``cache clear`` then refuses) is refused before anything runs."""
    from tvrecipe.errors import OutputError
    from tvrecipe.store.output import overlap
    cache = root.resolve()
    for name, (spec, _res) in compiled.outputs.items():
        out = Path(compiled.loaded.resolve(spec.path)).resolve()
        relation = overlap(cache, out)
        if relation is not None:
            inner, outer = (f"the cache folder {cache}", f"output {name!r} ({out})")
            if relation == "contains":
                inner, outer = outer, inner
            raise OutputError(f"{inner} lies inside {outer}, which "
                              + ("a run replaces whole" if inner.startswith("the cache")
                                 else "holds the cache")
                              + ": choose a --cache-dir (or TVRECIPE_CACHE) outside every "
                              "output (nothing was run)")


@contextlib.contextmanager
def _closing_clients(cluster: str | None):
    """Around a run on ``cluster``: its Dask clients are closed after it (a local:N cluster's
    worker processes stop before the command exits, with nothing left to warn about)."""
    try:
        yield
    finally:
        if cluster and "tvrecipe.exec.cluster" in sys.modules:
            sys.modules["tvrecipe.exec.cluster"].close_clients()


def _check_locked_outputs(compiled, staged: dict, where: dict) -> None:
    """``run --locked``: the outputs just made (still in their staging folders) must be, file
    for file, as the lock says; else nothing is moved into place (VerifyError)."""
    from tvrecipe.errors import VerifyError
    from tvrecipe.exec import lockfile
    from tvrecipe.store.lock import lock_path, read_lock
    lines = lockfile.staged_differences(compiled, staged)
    if lines:
        why = lockfile.machine_differences(read_lock(lock_path(compiled.loaded.path)), where)
        raise VerifyError("--locked, but the outputs this run made differ from the lock, so "
                          "none was written:\n" + "\n".join(lines + why))


def _check_side_file(compiled, path: str, option: str) -> None:
    """A file a command writes beside its outputs (``--report``, ``--plot``) must have a
    folder, and must not be (or lie inside) the recipe, its lock, an input, an output or
    tvrecipe's own folder: it would overwrite them (OutputError, before anything runs)."""
    from tvrecipe.errors import OutputError
    from tvrecipe.store.lock import lock_path
    from tvrecipe.store.output import overlap
    target = Path(path).resolve()
    if not target.parent.is_dir():
        raise OutputError(f"{option} {path}: folder {Path(path).parent} does not exist; create "
                          "it or choose another path")
    loaded = compiled.loaded
    taken = [("the recipe", loaded.path), ("its lock file", lock_path(loaded.path)),
             ("tvrecipe's folder", loaded.root / ".tvrecipe")]
    taken += [(f"input '{name}'", loaded.resolve(m.path)) for name, m in compiled.models.items()]
    taken += [(f"output '{name}'", loaded.resolve(spec.path))
              for name, (spec, _res) in compiled.outputs.items()]
    for what, where in taken:
        where = getattr(where, "local", where)  # a URL: only a file:// one is here
        if where is None:
            continue
        where = Path(where).resolve()
        if overlap(target, where) in ("is", "is inside"):
            raise OutputError(f"{option} {path} would overwrite {what} ({where}); write it "
                              "elsewhere")


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.argument("step")
@click.option("--json", "as_json", is_flag=True, help="Print the raw figures as JSON.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False),
              help="Also draw it as a PNG (needs matplotlib: pip install 'tvrecipe[plot]').")
@_device_option("Override settings.device: auto, cpu, cuda, cuda:N.")
@handle_errors
def inspect(recipe: str, step: str, as_json: bool, plot_path: str | None,
            device: str | None) -> None:
    """Show cosine similarities of a vectors value, the clusters of a cluster_basis step, the
    rebuild errors of a compress_basis step, or the singular spectra and subspace overlaps of
    the inputs of a tsv_merge, iso or decompose step (with its ranks and shared dimensions)."""
    import importlib.util
    if plot_path and importlib.util.find_spec("matplotlib") is None:
        from tvrecipe.errors import MissingPackage
        raise MissingPackage("--plot needs matplotlib, which is not installed: "
                             "pip install 'tvrecipe[plot]'")
    with _importing("tvrecipe.exec.runner"):
        from tvrecipe.exec.runner import RunOptions, inspect_step
    from tvrecipe.report import json_text, render_inspection
    compiled = _compile(recipe, (step.split(".")[0],))
    if plot_path:
        _check_side_file(compiled, plot_path, "--plot")
        if Path(plot_path).suffix.lower() != ".png":
            from tvrecipe.errors import OutputError
            raise OutputError(f"--plot {plot_path}: the plot is a PNG; name a .png file")
    result = inspect_step(compiled, RunOptions(device=device, progress=sys.stderr.isatty()),
                          step)
    click.echo(json_text(result) if as_json
               else render_inspection(step, result))
    if plot_path:
        from tvrecipe.report import plot_inspection
        plot_inspection(step, result, plot_path)
        click.echo(f"wrote {plot_path}")


@main.command()
@click.argument("recipe", metavar="RECIPE|FOLDER", type=click.Path())
@click.option("--recompute", is_flag=True,
              help="Also run the recipe again, without the cache, into a temporary folder and "
                   "compare its bytes with the lock.")
@_device_option("Device for --recompute: auto, cpu, cuda, cuda:N.")
@click.option("--input", "inputs", multiple=True, metavar="NAME=PATH",
              help="FOLDER --recompute only: read input NAME from PATH instead of the path in "
                   "the folder's tvrecipe.yaml (its pinned sha256 still applies). Repeatable.")
@_cluster_option("--recompute on a Dask cluster: tcp://HOST:PORT or local:N (see `run`).")
@handle_errors
def verify(recipe: str, recompute: bool, device: str | None, inputs: tuple[str, ...],
           cluster: str | None) -> None:
    """Check that inputs, recipe and outputs still match the lock file, byte for byte.

    Given a recipe, its outputs are hashed again in full; inputs are hashed again when their
    size, mtime or inode changed since they were last hashed. Given a checkpoint output
    folder, its files are checked against the tvrecipe.lock it carries, and --recompute
    rebuilds it from its own tvrecipe.yaml.
    """
    from tvrecipe.errors import RecipeError, VerifyError
    if cluster and not recompute:
        raise click.UsageError("--cluster runs --recompute on a cluster; without --recompute, "
                               "verify only hashes files here: add --recompute, or leave "
                               "--cluster out")
    if cluster and recompute:
        from tvrecipe.exec.cluster_address import require_dask
        require_dask()
    if Path(recipe).is_dir():
        from tvrecipe.exec.release import LOCK_FILE
        if not (Path(recipe) / LOCK_FILE).is_file():  # a wrong argument, not a mismatch
            raise click.UsageError(
                f"{recipe} is a folder without {LOCK_FILE}: `tvrecipe verify` takes a recipe "
                "file, or a checkpoint output folder written with its model card (an output "
                "without `model_card: false`)", click.get_current_context())
        with _closing_clients(cluster if recompute else None):
            _verify_folder(Path(recipe), recompute, device, _input_paths(inputs), cluster)
        return
    if inputs and Path(recipe).is_file():
        raise RecipeError(f"--input is for a released output folder; {recipe} is a recipe: "
                          "edit its model paths instead")
    with _importing("tvrecipe.exec.lockfile"):
        from tvrecipe.exec import lockfile
    from tvrecipe.store.hashing import HashMemo
    compiled = _compile(recipe)
    if recompute:  # (its run must not see the outputs replaced under it)
        _hold_run_lock(compiled, "verify --recompute")
    # (--recompute reads every input again in full, so it hashes them in full too: an input
    # edited in place with its size, mtime and inode kept is found, not blamed on the machine;
    # the memo learns it, so that the commands after this one see the change too)
    memo = lockfile.hash_memo(compiled, reuse=not recompute)
    state = lockfile.run_state(compiled, memo)
    problems = lockfile.state_differences(compiled, state)
    problems += lockfile.output_differences(compiled, HashMemo(None))
    if problems:
        raise VerifyError("does not match the lock:\n" + "\n".join(problems))
    n = len(compiled.outputs)
    if not recompute:
        click.echo(f"{recipe}: ok, inputs, recipe and {_plural(n, 'output')} match the lock")
        return
    import shutil
    import tempfile

    with _importing("tvrecipe.exec.runner"):
        from tvrecipe.exec.runner import RunOptions, run_recipe
    work = compiled.loaded.root / ".tvrecipe"
    try:
        work.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix="verify-", dir=work))
    except OSError as exc:
        from tvrecipe.store.output import output_oserror
        raise output_oserror(exc, work) from exc
    from tvrecipe.store.lock import lock_path, read_lock
    lock = read_lock(lock_path(compiled.loaded.path))
    try:
        folders = {name: tmp / name for name in compiled.outputs}
        # (NaN or Inf in the inputs pass as they did for the run that wrote the lock)
        with _closing_clients(cluster):
            result = run_recipe(compiled, RunOptions(
                device=device, progress=sys.stderr.isatty(), targets=folders, cluster=cluster,
                state=state, allow_nonfinite=lock.get("allow_nonfinite") is True))
        problems = lockfile.output_differences(compiled, HashMemo(None), folders)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if problems:
        # (where the recompute ran: its workers, for a cluster run)
        why = lockfile.machine_differences(lock, result.machine)
        raise VerifyError("recomputing the outputs gave other bytes than the lock:\n"
                          + "\n".join(problems + why))
    click.echo(f"{recipe}: ok, inputs, recipe and {_plural(n, 'output')} match the lock, and "
               "recomputing them without the cache gave the same bytes")


def _input_paths(options: tuple[str, ...]) -> dict[str, str]:
    from tvrecipe.errors import RecipeError
    out = {}
    for item in options:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise RecipeError(f"--input {item!r}: expected NAME=PATH, e.g. --input base=./models/base")
        from tvrecipe.store.remote import is_url
        out[name] = path if is_url(path) else str(Path(path).resolve())
    return out


def _verify_folder(folder: Path, recompute: bool, device: str | None,
                   moved: dict[str, str], cluster: str | None = None) -> None:
    """``verify FOLDER``: a released output folder against the lock entry it carries."""
    import shutil
    import tempfile

    from tvrecipe.errors import RecipeError, VerifyError
    from tvrecipe.exec import release
    data = release.read_release(folder)
    problems = release.folder_differences(folder, data["files"], str(folder))
    if problems:
        raise VerifyError(f"{folder} does not match its {release.LOCK_FILE}:\n"
                          + "\n".join(problems))
    built = data.get("built_from", {}).get("file", "?")
    n = len(data["files"])
    if not recompute:
        if moved:
            raise RecipeError("--input only applies with --recompute")
        click.echo(f"{folder}: ok, {n} files match its {release.LOCK_FILE} (built from {built})")
        return
    recipe = folder / release.RECIPE_FILE
    if not recipe.is_file():
        raise VerifyError(f"{folder} has no {release.RECIPE_FILE} to rebuild it from")
    try:
        tmp = Path(tempfile.mkdtemp(prefix=".tvrecipe-verify-", dir=folder.resolve().parent))
    except OSError:  # a read-only parent (a downloaded snapshot): the system's temp folder
        tmp = Path(tempfile.mkdtemp(prefix="tvrecipe-verify-"))
    try:
        _recompute_folder(folder, recipe, tmp, data, device, moved, cluster)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    skipped = (f" ({release.CARD_FILE} and {release.RECIPE_FILE} aside: they name the "
               "original input paths)") if moved else ""
    click.echo(f"{folder}: ok, {n} files match its {release.LOCK_FILE}, and rebuilding them from "
               f"{release.RECIPE_FILE} gave the same bytes{skipped}")


def _recompute_folder(folder: Path, recipe: Path, tmp: Path, data: dict, device: str | None,
                      moved: dict[str, str], cluster: str | None = None) -> None:
    import yaml

    from tvrecipe.errors import InputError, RecipeError, VerifyError
    from tvrecipe.store.hashing import HashMemo
    with _importing("tvrecipe.exec.lockfile"):
        from tvrecipe.exec import lockfile, release
    from tvrecipe.store.remote import url_scheme
    # Inputs not where the folder's recipe says, and not given: said before the recipe is
    # read as a recipe (a path into the folder itself would read as an output over an input).
    try:
        doc = yaml.safe_load(recipe.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        doc = None
    listed = doc.get("models") if isinstance(doc, dict) else None
    listed = listed if isinstance(listed, dict) else {}
    for name in moved:
        if name not in listed:
            raise RecipeError(f"--input {name}=...: {recipe} has no model {name!r}; it has "
                              f"{', '.join(listed)}")
    absent = []
    for name, spec in listed.items():
        given = spec.get("path") if isinstance(spec, dict) else spec
        if (name not in moved and isinstance(given, str) and url_scheme(given) is None
                and not (folder / Path(given).expanduser()).exists()):
            absent.append(f"{name!r} ({given})")
    if absent:
        raise InputError(
            f"{folder / release.RECIPE_FILE} names inputs that are not there: "
            f"{', '.join(absent)}; pass --input NAME=PATH for each (its pinned sha256 makes "
            "sure it is the same model; a release written to an absolute path names them "
            "relative to the folder of the recipe that built it)")
    if moved:  # the same recipe with some inputs elsewhere (absolute paths)
        for name, path in moved.items():  # (each one a model of it: checked above)
            listed[name]["path"] = path
        # The others, where the folder's recipe says (a relative path is relative to it, not
        # to the temporary folder this copy is written into).
        here = recipe.parent.resolve()
        for name, spec in listed.items():  # (doc's models)
            given = spec.get("path") if isinstance(spec, dict) else None
            if name not in moved and isinstance(given, str) and url_scheme(given) is None:
                spec["path"] = os.path.normpath(here / Path(given).expanduser())
        recipe = tmp / release.RECIPE_FILE
        recipe.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    try:
        compiled = _compile(str(recipe))
        # Hashes are kept in memory: nothing is written into the folder being checked.
        state = lockfile.run_state(compiled, HashMemo(None))
    except InputError as exc:
        raise InputError(f"{exc}\nrebuilding {folder} needs its inputs: pass --input NAME=PATH "
                         "for each one that is not where tvrecipe.yaml says (its pinned sha256 "
                         "makes sure it is the same model)") from None
    locked_inputs, locked_steps = data.get("inputs", {}), data.get("steps", {})
    problems = [f"input {m!r} ({compiled.models[m].path}) has sha256 {e['sha256'][:12]}…; the "
                f"folder was built from {str(locked_inputs.get(m, {}).get('sha256'))[:12]}…"
                for m, e in state["inputs"].items()
                if locked_inputs.get(m, {}).get("sha256") != e["sha256"]]
    if not problems and not lockfile.changed_tools(data.get("tool"), ("tvrecipe",))[0]:
        # Same inputs, yet other steps, and the same tvrecipe: the recipe computes otherwise.
        # (Another tvrecipe may derive its keys otherwise, as 0.2.1 does with task names, and
        # still give the same bytes: those are compared below.)
        problems = [f"step {s!r}: key {k}, locked {locked_steps.get(s)}"
                    for s, k in state["steps"].items() if locked_steps.get(s) != k]
    if problems:
        raise VerifyError(f"{folder / release.RECIPE_FILE} no longer computes what "
                          f"{release.LOCK_FILE} records:\n" + "\n".join(problems))
    with _importing("tvrecipe.exec.runner"):
        from tvrecipe.exec.runner import RunOptions, run_recipe
    (name,) = compiled.outputs
    run_recipe(compiled, RunOptions(
        device=device, progress=sys.stderr.isatty(), targets={name: tmp / name},
        state=state, source=release.Source(**data["built_from"]), cluster=cluster,
        allow_nonfinite=data.get("allow_nonfinite") is True))
    locked = dict(data["files"])
    got = tmp / name
    if moved:  # the card and recipe name the input paths: only the rest is compared
        for f in (release.CARD_FILE, release.RECIPE_FILE):
            locked.pop(f, None)
            (got / f).unlink(missing_ok=True)
    problems = release.folder_differences(got, locked, f"recomputed {folder}", folder)
    if problems:
        raise VerifyError(f"rebuilding {folder} from its {release.RECIPE_FILE} gave other bytes "
                          f"than its {release.LOCK_FILE}:\n"
                          + "\n".join(problems + lockfile.machine_differences(data, None)))


@main.group()
def cache() -> None:
    """Inspect and clean the cache of step results."""


def _cache_for(recipe: str | None, cache_dir: str | None):
    from tvrecipe.store.cache import TensorCache
    if recipe and not Path(recipe).is_file():  # (a typo would show another folder's cache)
        from tvrecipe.errors import RecipeError
        raise RecipeError(f"recipe file not found: {recipe} (its cache is the one beside it; "
                          "--cache-dir names a cache folder directly)")
    base = Path(recipe).resolve().parent if recipe else Path.cwd()
    return TensorCache(_cache_root(base, cache_dir))


_cache_opts = [
    click.argument("recipe", required=False, type=click.Path(dir_okay=False)),
    # The flag form of RECIPE, kept for scripts written before RECIPE was an argument.
    click.option("--recipe", "recipe_opt", type=click.Path(dir_okay=False), hidden=True),
    click.option("--cache-dir", type=click.Path(file_okay=False),
                 help="The cache folder (default: $TVRECIPE_CACHE, else .tvrecipe/cache beside "
                      "RECIPE, or beside the current folder without one)."),
]


def _with_cache_opts(fn):
    @functools.wraps(fn)
    def wrapper(*args, recipe: str | None, recipe_opt: str | None, **kwargs):
        return fn(*args, recipe=recipe or recipe_opt, **kwargs)

    for opt in reversed(_cache_opts):
        wrapper = opt(wrapper)
    return wrapper


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _recipe_entries(recipe: str, tc) -> dict[str, object]:
    """Step name -> cache entry, for the steps of ``recipe`` whose entry (under the key the
    step has now, from its inputs' hashes, as `plan` finds them) is in the cache ``tc``."""
    with _importing("tvrecipe.exec.lockfile"):
        from tvrecipe.exec import lockfile
    compiled = _compile(recipe)
    keys = lockfile.run_state(compiled, lockfile.hash_memo(compiled))["steps"]
    entries = {e.key: e for e in tc.entries()}
    return {name: entries[key] for name, key in keys.items()
            if name in compiled.steps and key in entries}


@cache.command("ls")
@_with_cache_opts
@handle_errors
def cache_ls(recipe: str | None, cache_dir: str | None) -> None:
    """List cached step results, least recently used first; with RECIPE, only its steps'
    entries (under the keys they have now), by step name."""
    import time

    from tvrecipe.plan.summary import human
    tc = _cache_for(recipe, cache_dir)
    entries = tc.entries()
    if not entries:
        click.echo(f"cache is empty: {tc.root}")
        return
    if recipe is None:
        for e in entries:
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.used))
            click.echo(f"{e.key:<34} {human(e.size):>10}  last used {when}")
        return
    mine = _recipe_entries(recipe, tc)
    if not mine:
        click.echo(f"no step of {recipe} is cached in {tc.root} (`tvrecipe cache ls` without "
                   "a recipe lists every entry)")
    width = max((len(name) for name in mine), default=0)
    for name, e in mine.items():
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.used))
        click.echo(f"{name:<{width}}  {e.key:<34} {human(e.size):>10}  last used {when}")


@cache.command("du")
@_with_cache_opts
@handle_errors
def cache_du(recipe: str | None, cache_dir: str | None) -> None:
    """Total size of the cache."""
    from tvrecipe.plan.summary import human
    tc = _cache_for(recipe, cache_dir)
    entries = tc.entries()
    leftovers = tc.leftovers()
    click.echo(f"{tc.root}: {_plural(len(entries), 'entry').replace('entrys', 'entries')}, "
               f"{human(sum(e.size for e in entries))}; "
               f"{_plural(len(leftovers), 'leftover file')} of interrupted runs")


@cache.command("gc")
@_with_cache_opts
@click.option("--older-than", help="Also remove entries unused for this long: 30d, 12h, 90m.")
@handle_errors
def cache_gc(recipe: str | None, cache_dir: str | None, older_than: str | None) -> None:
    """Remove leftovers of interrupted runs (and, with --older-than, stale entries)."""
    import re
    seconds = None
    if older_than:
        m = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd])", older_than.strip())
        if not m:
            raise click.BadParameter("use a number and a unit: 30d, 12h, 90m, 45s",
                                     param_hint="'--older-than'")
        seconds = float(m[1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m[2]]
    young: list[Path] = []
    removed = _cache_for(recipe, cache_dir).gc(seconds, kept=young)
    kept = (f"; kept {_plural(len(young), 'leftover file')} under an hour old (a run may still "
            "be writing them: gc removes them once they are an hour old)") if young else ""
    click.echo(f"removed {_plural(len(removed), 'file')}{kept}")


@cache.command("clear")
@_with_cache_opts
@handle_errors
def cache_clear(recipe: str | None, cache_dir: str | None) -> None:
    """Remove every cache entry (a folder holding anything else is refused); with RECIPE,
    only its steps' entries (under the keys they have now), which leaves those of other
    recipes sharing the cache."""
    tc = _cache_for(recipe, cache_dir)
    if not tc.root.is_dir():
        click.echo(f"cache is empty: {tc.root}")
        return
    if recipe is not None:
        mine = _recipe_entries(recipe, tc)
        removed = sum(tc.remove_entry(e.key) for e in mine.values())
        if not mine:
            click.echo(f"no step of {recipe} is cached in {tc.root}; nothing was removed")
        else:
            click.echo(f"removed the cache entries of {recipe} from {tc.root}: "
                       f"{', '.join(mine)} ({_plural(removed, 'file')})")
        return
    removed = tc.clear()
    click.echo(f"cleared {tc.root}: removed {_plural(removed, 'file')}")


@main.command()
@handle_errors
def schema() -> None:
    """Print the recipe JSON schema (schemas/recipe.schema.json is generated by this)."""
    from tvrecipe.spec.schema import recipe_schema_json
    click.echo(recipe_schema_json(), nl=False)


@main.command("import")
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("-o", "--output", "recipe", required=True, type=click.Path(dir_okay=False),
              help="The recipe to write.")
@click.option("--output-path", help="Folder of the merged model (default: ./merged beside the "
                                    "recipe); a relative path is written relative to the "
                                    "recipe, an absolute one as it is.")
@click.option("--force", is_flag=True, help="Replace the recipe if it exists.")
@handle_errors
def import_(config: str, recipe: str, output_path: str | None, force: bool) -> None:
    """Write a recipe that computes what a mergekit CONFIG does (linear, slerp, task_arithmetic,
    ties, dare_ties, dare_linear, breadcrumbs, breadcrumbs_ties, della, della_linear,
    model_stock). Fields it cannot express are errors, never dropped; settings mergekit itself
    ignores are left out with a note."""
    from tvrecipe.errors import OutputError, RecipeError
    from tvrecipe.importers.mergekit import import_mergekit
    target = Path(recipe)
    if target.exists() and not force:
        raise OutputError(f"{recipe} exists; pass --force to replace it")
    notes: list = []
    text = import_mergekit(config, target, output_path, notes)
    staging = target.with_name(f".{target.name}.importing")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging.write_text(text)
    try:
        compiled = _compile(str(staging))
    except RecipeError as exc:  # the importer wrote what tvrecipe cannot read: a bug
        staging.unlink()
        raise RuntimeError(f"the imported recipe does not validate:\n{exc}") from None
    except BaseException:
        staging.unlink()
        raise
    os.replace(staging, target)
    click.echo(f"wrote {recipe}: {_plural(len(compiled.steps), 'step')} from {config}; run it with "
               f"`tvrecipe run {recipe}`")
    for note in notes:
        click.echo(f"note: {note}", err=True)


def _bundled_recipes() -> dict[str, str]:
    """Name -> text of the canonical recipes shipped with the package."""
    from importlib.resources import files
    folder = files("tvrecipe") / "recipes"
    return {p.name[:-5]: p.read_text(encoding="utf-8")
            for p in sorted(folder.iterdir(), key=lambda p: p.name) if p.name.endswith(".yaml")}


@main.command("new")
@click.argument("name", required=False)
@click.option("--list", "list_", is_flag=True, help="List the bundled recipes.")
@handle_errors
def new(name: str | None, list_: bool) -> None:
    """Print a bundled recipe to start from: `tvrecipe new ties > my.yaml`, then edit its
    model paths."""
    from tvrecipe.errors import RecipeError
    from tvrecipe.spec.load import did_you_mean
    bundled = _bundled_recipes()
    if list_ or name is None:
        width = max(map(len, bundled))
        for key, text in bundled.items():
            # The first sentence of the recipe's opening comment (it runs over lines).
            lines = [line for line in text.splitlines() if "$schema" not in line]
            head = " ".join(line[1:].strip() for line in
                            itertools.takewhile(lambda ln: ln.startswith("#"), lines))
            about = re.split(r"(?<=[.!?])\s", head, maxsplit=1)[0]
            click.echo(f"{key:<{width}}  {about}")
        if name is None and not list_:
            click.echo("\nprint one with `tvrecipe new NAME > my.yaml`")
        return
    if name not in bundled:
        raise RecipeError(f"no bundled recipe {name!r}; "
                          + (did_you_mean(name, bundled) or "`tvrecipe new --list` lists them"))
    # The schema comment points into this repository's tree, which a user's folder lacks.
    click.echo("".join(line for line in bundled[name].splitlines(keepends=True)
                       if "yaml-language-server: $schema=" not in line), nl=False)


@main.command("ops")
@click.argument("name", required=False)
@click.option("--markdown", is_flag=True, help="The whole reference as Markdown (docs/ops.md).")
@handle_errors
def ops_(name: str | None, markdown: bool) -> None:
    """List the ops a recipe can use, or show one op's fields and behaviour."""
    from tvrecipe.errors import RecipeError
    from tvrecipe.spec.load import did_you_mean
    from tvrecipe.spec.reference import entry, listing, reference
    from tvrecipe.spec.registry import ops
    if name is None:
        click.echo(reference() if markdown else listing(), nl=not markdown)
        return
    known = ops()
    if name not in known:
        raise RecipeError(f"unknown op {name!r}; "
                          + (did_you_mean(name, known) or "known ops: " + ", ".join(known)))
    click.echo(entry(known[name]), nl=False)


@main.command("hash")
@click.argument("path", type=click.Path())
@handle_errors
def hash_(path: str) -> None:
    """Print the content hash of a model, for a `sha256:` pin in a recipe (PATH may be a
    URL: s3://, gs://, hf://, https://, file://)."""
    from tvrecipe.exec.lockfile import hashed_files
    from tvrecipe.plan.graph import VECTORS_INDEX, _index_members
    from tvrecipe.store.hashing import checkpoint_digest
    from tvrecipe.store.lora import CONFIG_FILE
    # The files a run hashes for the model, of the kind its folder shows: a vectors folder
    # (kind: task_vector) by its vectors.json, a peft adapter (kind: lora) by its config.
    index = Path(path) / VECTORS_INDEX
    if index.is_file():
        files = hashed_files(Path(path), "task_vector", _index_members(index))
    elif (Path(path) / CONFIG_FILE).is_file():
        files = hashed_files(Path(path), "lora")
    else:
        files = hashed_files(path, "checkpoint")
    click.echo(checkpoint_digest(files))


def _verbose_everywhere(group: click.Group) -> None:
    """Give every subcommand ``-v`` too, so ``tvrecipe run r.yaml -v`` works like
    ``tvrecipe -v run r.yaml``."""
    for cmd in group.commands.values():
        cmd.params.append(click.Option(["-v", "--verbose"], count=True, expose_value=False,
                                       callback=_set_verbose,
                                       help="Show tracebacks and more detail."))
        if isinstance(cmd, click.Group):
            _verbose_everywhere(cmd)


_verbose_everywhere(main)


def entry() -> None:
    """The console script: ``main``, with Ctrl-C ignored once the command has finished, and
    no interpreter teardown.

    A command's own interrupt handling ends when it returns; an interrupt during interpreter
    shutdown would otherwise print a traceback after the work is already done and saved.
    Tearing down an interpreter that imported torch takes ~0.5 s (measured on the 2-core
    benchmark machine), more than a cached rerun's compute; every file a command writes is
    closed (and synced where it matters) before it returns, so the process exits at once.
    Before the command starts any thread, glibc's malloc is set to reuse freed tensor memory
    (:mod:`tvrecipe.exec.allocator`).
    """
    from tvrecipe.exec.allocator import tune_malloc

    tune_malloc()
    try:
        main()
    except SystemExit as exc:
        code = exc.code
    except BrokenPipeError:  # stdout closed while click wrote (`tvrecipe --help | head -1`)
        code = _quiet_exit_on_closed_stdout()
    else:  # pragma: no cover (click's standalone mode always raises SystemExit)
        code = 0
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    elif code == 1 and "PacifyFlushWrapper" in type(sys.stdout).__name__:
        # click met a closed stdout outside a command (its help) and exited 1: 141 as above
        code = _quiet_exit_on_closed_stdout()
    try:
        sys.stdout.flush()
    except BrokenPipeError:  # (what was buffered last found stdout closed)
        code = _quiet_exit_on_closed_stdout()
    with contextlib.suppress(OSError):
        sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    entry()
