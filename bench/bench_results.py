"""Writing bench/RESULTS.md: each benchmark owns one ``## Section`` and replaces only it."""

from __future__ import annotations

from pathlib import Path


def replace_section(path: Path, section: str, lines: list[str]) -> None:
    """Put ``lines`` (starting with the ``section`` heading) in place of that section of
    ``path``, or append them; the other sections stay as they are."""
    text = path.read_text() if path.is_file() else "# Benchmark results\n"
    body = "\n".join(lines).rstrip("\n") + "\n"
    start = text.find(section + "\n")
    if start < 0:
        path.write_text(text.rstrip("\n") + "\n\n" + body)
        return
    end = text.find("\n## ", start + len(section))
    after = "\n" + text[end + 1:] if end >= 0 else ""
    path.write_text(text[:start] + body + after)
