"""Print pip's own package-source settings as uv options (scripts/setup.sh installs with uv).

uv reads no pip.conf and no ``PIP_*`` variable. This machine's pip may have find-links, extra
indexes or constraint files (``pip config list``: files and environment); uv gets the same, and
looks at every index as pip does (``--index-strategy unsafe-best-match``), so both install the
same wheels.
"""

from __future__ import annotations

import shlex
import subprocess
import sys

OPTIONS = {"find-links": "--find-links", "index-url": "--index-url",
           "extra-index-url": "--extra-index-url", "constraint": "--constraint"}


def uv_options(config: str) -> list[str]:
    """uv options from ``pip config list`` output (``global.find-links='/opt/wheels'``, ...).

    >>> uv_options("global.find-links='/w'\\n:env:.find-links='/w'\\nglobal.cert='/c'")
    ['--index-strategy', 'unsafe-best-match', '--find-links', '/w']
    """
    pairs: dict[tuple[str, str], None] = {}
    for line in config.splitlines():
        key, sep, value = line.partition("=")
        option = OPTIONS.get(key.rsplit(".", 1)[-1])
        if sep and option:
            for item in " ".join(shlex.split(value)).split():
                pairs[(option, item)] = None
    return ["--index-strategy", "unsafe-best-match", *(x for pair in pairs for x in pair)]


if __name__ == "__main__":
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], check=True,
                            capture_output=True, text=True).stdout
    print(shlex.join(uv_options(listed)))
