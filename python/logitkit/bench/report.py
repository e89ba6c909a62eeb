"""Output of a run: the :class:`Result` rows, the progress bar, the results
table (rich or plain text), the summary and exit status, JSON, CSV and plots."""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple


@dataclass
class Result:
    """One row of the results: one implementation on one case. Fields are the JSON fields."""

    op: str
    dtype: str
    rows: int
    vocab: int
    impl: str
    median_ms: float | None = None
    p20_ms: float | None = None
    p80_ms: float | None = None
    gbps: float | None = None
    gflops: float | None = None
    pct_copy: float | None = None
    pct_peak: float | None = None
    speedup_vs_eager: float | None = None
    max_abs_err: float | None = None
    max_tol_ratio: float | None = None
    atol: float = 0.0
    rtol: float = 0.0
    status: str = "OK"
    error: str | None = None
    peak_mem_bytes: int | None = None
    bytes_moved: int = 0
    input_bytes: int = 0
    buffers: int = 0
    samples: int = 0
    inner: int = 0


@functools.cache
def _rich() -> Any:
    try:
        import rich
    except ImportError:
        return None
    return rich


def _console(file: Any) -> Any:
    """A rich console that does not squeeze the table when the output is not a terminal."""
    from rich.console import Console

    console = Console(file=file)
    return console if console.is_terminal else Console(file=file, width=220)


class Progress:
    """rich progress bar on stderr when rich is importable, else one stderr line per step."""

    def __init__(self, total: int, enabled: bool = True):
        self.total, self.done, self.enabled = total, 0, enabled
        self._bar: Any = None
        if enabled and _rich() is not None and sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn("{task.description:<40}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                transient=True,
                console=_console(sys.stderr),
            )
            self._task = self._bar.add_task("", total=total)
            self._bar.start()

    def step(self, description: str) -> None:
        """Announces the step about to run."""
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, description=description)
        elif self.enabled:
            print(f"[{self.done + 1}/{self.total}] {description}", file=sys.stderr, flush=True)
        self.done += 1

    def close(self) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done)
            self._bar.stop()


# --------------------------------------------------------------------------- #
# the table
# --------------------------------------------------------------------------- #


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}" if value >= 0.1 else f"{value:.4f}"


def _fmt_bytes(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.1f} MiB"


def _has_flops(results: Iterable[Result]) -> bool:
    return any(r.gflops is not None for r in results)


def table_columns(env: dict, results: Iterable[Result] = ()) -> list[str]:
    cols = ["op", "dtype", "rows", "vocab", "impl", "median ms", "p20", "p80", "GB/s", "% copy"]
    if env.get("datasheet_peak_gbps"):
        cols.append("% peak")
    if _has_flops(results):
        cols.append("GFLOP/s")
    return [*cols, "speed-up", "max abs err", "mem", "status"]


def table_rows(env: dict, results: Iterable[Result]) -> list[list[str]]:
    """The table's cells as strings, one list per result, in :func:`table_columns` order."""
    rows = []
    results = list(results)
    flops = _has_flops(results)
    for r in results:
        cells = [
            r.op,
            r.dtype,
            str(r.rows),
            str(r.vocab),
            r.impl,
            _fmt_ms(r.median_ms),
            _fmt_ms(r.p20_ms),
            _fmt_ms(r.p80_ms),
            _fmt(r.gbps, ".1f"),
            _fmt(r.pct_copy, ".0f", "%"),
        ]
        if env.get("datasheet_peak_gbps"):
            cells.append(_fmt(r.pct_peak, ".0f", "%"))
        if flops:
            cells.append(_fmt(r.gflops, ".1f"))
        status = r.status if r.status != "MISMATCH" else "MISMATCH !!"
        cells += [
            _fmt(r.speedup_vs_eager, ".2f", "x"),
            _fmt(r.max_abs_err, ".1e"),
            _fmt_bytes(r.peak_mem_bytes),
            status,
        ]
        rows.append(cells)
    return rows


def environment_summary(env: dict) -> str:
    lines = [
        f"device: {env['device']} ({env['device_name']}), {env['num_threads']} threads, "
        f"torch {env['torch_version']}, CUDA {env['cuda_version']}",
        f"logitkit {env['logitkit_version']} (commit {(env['git_commit'] or 'unknown')[:12]}"
        f"{', dirty' if env['git_dirty'] else ''}), cpu kernels {env['build_info'].get('cpu_capability')}",
        f"ceiling: copy {env['copy_bandwidth_gbps']:.1f} GB/s (dst.copy_(src), {env['copy_buffer_bytes'] >> 20} MiB, "
        f"read+write)" + (f"; datasheet {env['datasheet_peak_gbps']:.0f} GB/s" if env["datasheet_peak_gbps"] else ""),
        f"inputs rotate over >= {env['rotation_target_bytes'] >> 20} MiB; memory: {env['memory_method']}",
    ]
    if env.get("gemm_paths"):
        lines.append("linear_ce GEMM path: " + ", ".join(f"{k} {v}" for k, v in env["gemm_paths"].items()))
    return "\n".join(lines)


_NOT_NUMERIC = ("op", "dtype", "impl", "status")


def print_report(env: dict, results: list[Result], plain: bool = False, file: Any = None) -> None:
    """Prints the environment summary, the results table and any mismatch/error details."""
    file = file or sys.stdout
    if _rich() is not None and not plain:
        _print_rich(env, results, file)
    else:
        _print_plain(env, results, file)


def _print_rich(env: dict, results: list[Result], file: Any) -> None:
    from rich.table import Table

    cols, cells = table_columns(env, results), table_rows(env, results)
    console = _console(file)
    console.print(environment_summary(env), highlight=False, markup=False)
    table = Table(show_lines=False, header_style="bold")
    for c in cols:
        table.add_column(c, justify="left" if c in _NOT_NUMERIC else "right", no_wrap=True)
    keys = [(r.op, r.dtype, r.rows, r.vocab) for r in results]
    for i, (r, row) in enumerate(zip(results, cells)):
        style = {"MISMATCH": "bold white on red", "ERROR": "bold red"}.get(
            r.status, "bold" if r.impl == "logitkit" else ""
        )
        last_of_case = i + 1 < len(keys) and keys[i + 1] != keys[i]
        table.add_row(*row, style=style, end_section=last_of_case)
    console.print(table)
    for r in results:
        if r.status != "OK":
            console.print(_problem_line(r), style="bold red", highlight=False, markup=False)


def _print_plain(env: dict, results: list[Result], file: Any) -> None:
    cols, cells = table_columns(env, results), table_rows(env, results)
    print(environment_summary(env), file=file)
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(cols)]
    just = [str.ljust if c in _NOT_NUMERIC else str.rjust for c in cols]
    for row in [cols, ["-" * w for w in widths], *cells]:
        print("  ".join(j(v, w) for j, v, w in zip(just, row, widths)).rstrip(), file=file)
    for r in results:
        if r.status != "OK":
            print(_problem_line(r), file=file)


def _problem_line(r: Result) -> str:
    what = f"{r.op} {r.dtype} {r.rows}x{r.vocab} [{r.impl}]"
    if r.status == "MISMATCH":
        return (
            f"MISMATCH: {what}: max abs error {r.max_abs_err:.3g} vs the float64 reference exceeds "
            f"atol {r.atol:g} + rtol {r.rtol:g} * |ref| ({r.max_tol_ratio:.3g}x the tolerance)"
        )
    return f"ERROR: {what}: {r.error}"


def summary(results: list[Result]) -> dict:
    """Counts and the exit status: 1 on any mismatch, or on an error of logitkit itself
    (a baseline that fails, e.g. torch.compile without a C++ compiler, is reported but tolerated)."""
    mismatches = sum(r.status == "MISMATCH" for r in results)
    errors = sum(r.status == "ERROR" for r in results)
    fatal = mismatches or any(r.status == "ERROR" and r.impl == "logitkit" for r in results)
    return {
        "cases": len({(r.op, r.dtype, r.rows, r.vocab) for r in results}),
        "mismatches": mismatches,
        "errors": errors,
        "exit_code": 1 if fatal else 0,
    }


# --------------------------------------------------------------------------- #
# files
# --------------------------------------------------------------------------- #


def write_json(path: str | os.PathLike, config: dict, env: dict, results: list[Result]) -> None:
    """The run as JSON (schema in :mod:`logitkit.bench`); ``config`` is ``Config.as_json()``."""
    doc = {
        "schema_version": 1,
        "environment": env,
        "config": config,
        "results": [dataclasses.asdict(r) for r in results],
        "summary": summary(results),
    }
    Path(path).write_text(json.dumps(doc, indent=2, default=str) + "\n")


def write_csv(path: str | os.PathLike, env: dict, results: list[Result]) -> None:
    env_cols = {f"env_{k}": (json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in env.items()}
    fields = [f.name for f in dataclasses.fields(Result)] + list(env_cols)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in results:
            writer.writerow({**dataclasses.asdict(r), **env_cols})


# --------------------------------------------------------------------------- #
# plots
# --------------------------------------------------------------------------- #


def plot_paths(path: str | os.PathLike) -> tuple[Path, Path, Path]:
    """``x.png`` -> (``x_time.png``, ``x_gbps.png``, ``x_memory.png``); a path without ``.png`` is
    a directory."""
    p = Path(path)
    if p.suffix.lower() == ".png":
        return p.with_name(f"{p.stem}_time.png"), p.with_name(f"{p.stem}_gbps.png"), p.with_name(f"{p.stem}_memory.png")
    return p / "bench_time.png", p / "bench_gbps.png", p / "bench_memory.png"


class _Series(NamedTuple):
    """How a plot splits results into lines: one line per value of ``key`` (impl first: logitkit
    solid, baselines dashed) against ``x``, labelled by formatting the key with ``label``."""

    key: Callable[[Result], tuple]
    x: Callable[[Result], int]
    label: str


_VS_VOCAB = _Series(lambda r: (r.impl, r.dtype, r.rows), lambda r: r.vocab, "{} {} rows={}")
_VS_ROWS = _Series(lambda r: (r.impl, r.dtype, r.vocab), lambda r: r.rows, "{} {} V={}")


def _draw_lines(ax: Any, results: list[Result], op: str, series: _Series, y: Callable[[Result], float | None]) -> None:
    """The lines of ``op``'s results that have a ``y``, sorted by x."""
    lines: dict[tuple, list[Result]] = {}
    for r in results:
        if r.op == op and y(r) is not None:
            lines.setdefault(series.key(r), []).append(r)
    for key, rs in lines.items():
        rs.sort(key=series.x)
        ax.plot(
            [series.x(r) for r in rs],
            [y(r) for r in rs],
            marker="o",
            linestyle="-" if key[0] == "logitkit" else "--",
            label=series.label.format(*key),
        )


def _peak_mib(r: Result) -> float | None:
    return None if r.peak_mem_bytes is None else max(r.peak_mem_bytes, 1) / 2**20


def _save_figure(plt: Any, fig: Any, target: Path, env: dict) -> None:
    fig.suptitle(f"logitkit-bench on {env['device_name']}", fontsize="small")
    fig.tight_layout()
    fig.savefig(target, dpi=120)
    plt.close(fig)


def _plot_memory_vs_rows(plt: Any, target: Path, env: dict, results: list[Result]) -> bool:
    """Peak memory against rows (tokens N for linear_ce), one panel per op swept over more than
    one row count, one line per (impl, dtype, vocab). False when no op was swept over rows."""
    ops = [
        op
        for op in dict.fromkeys(r.op for r in results)
        if len({r.rows for r in results if r.op == op and r.peak_mem_bytes is not None}) > 1
    ]
    if not ops:
        return False
    fig, axes = plt.subplots(1, len(ops), figsize=(5 * len(ops), 4), squeeze=False)
    for ax, op in zip(axes[0], ops):
        _draw_lines(ax, results, op, _VS_ROWS, _peak_mib)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(op)
        ax.set_xlabel("rows (tokens)")
        ax.set_ylabel("peak memory (MiB)" + (" above inputs and outputs" if op == "linear_ce" else " above inputs"))
        ax.legend(fontsize="x-small")
    _save_figure(plt, fig, target, env)
    return True


def _plot_vs_vocab(plt: Any, target: Path, env: dict, results: list[Result], attr: str, label: str) -> None:
    """``attr`` (median_ms or gbps) against vocabulary size, one panel per op, one line per
    (impl, dtype, rows)."""
    ops = list(dict.fromkeys(r.op for r in results))
    fig, axes = plt.subplots(1, len(ops), figsize=(5 * len(ops), 4), squeeze=False)
    for ax, op in zip(axes[0], ops):
        _draw_lines(ax, results, op, _VS_VOCAB, lambda r: getattr(r, attr))
        if attr == "gbps":
            ax.axhline(env["copy_bandwidth_gbps"], color="grey", linestyle=":", label="copy bandwidth")
            if env.get("datasheet_peak_gbps"):
                ax.axhline(env["datasheet_peak_gbps"], color="black", linestyle=":", label="datasheet peak")
        else:
            ax.set_yscale("log")
        ax.set_xscale("log")
        ax.set_title(op)
        ax.set_xlabel("vocabulary size")
        ax.set_ylabel(label)
        ax.legend(fontsize="x-small")
    _save_figure(plt, fig, target, env)


def write_plots(path: str | os.PathLike, env: dict, results: list[Result]) -> list[Path] | None:
    """Two PNGs (median time, effective GB/s) against vocabulary size, one panel per op and one
    line per (impl, dtype, rows); a third (peak memory against rows) when an op was run at more
    than one row count. Returns the paths written, or None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(
            "--plot needs matplotlib, which is not installed: pip install matplotlib "
            "(or pip install 'logitkit[bench]'); no plot written",
            file=sys.stderr,
        )
        return None
    time_png, gbps_png, memory_png = plot_paths(path)
    time_png.parent.mkdir(parents=True, exist_ok=True)
    _plot_vs_vocab(plt, time_png, env, results, "median_ms", "median time (ms)")
    _plot_vs_vocab(plt, gbps_png, env, results, "gbps", "effective GB/s")
    swept_rows = _plot_memory_vs_rows(plt, memory_png, env, results)
    return [time_png, gbps_png, *([memory_png] if swept_rows else [])]
