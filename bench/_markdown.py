"""Output of the accuracy scripts: a markdown table printed, and written with a preamble."""

from __future__ import annotations


def emit(lines: list[str], out: str | None, preamble: str) -> None:
    """Prints the table ``lines``; with ``out``, also writes ``preamble``, a blank line and the table there."""
    text = "\n".join(lines)
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(f"{preamble}\n\n{text}\n")
