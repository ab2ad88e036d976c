"""Where a build writes: the destination check, the staging folder, the swap into place, and the sweep of
what an interrupted build (kill -9, power loss) left behind.

A build writes into ``.NAME.build-PID.XXXX`` beside the destination ``NAME``; the folder holds a marker file
(``.graphopt-staging``) with the builder's pid. ``--force`` moves the old artifact aside as ``.NAME.old-PID``
before the new one takes its name, then deletes it. Either folder outlives its build only when the process
died in between; the next build into the same parent removes those whose pid is no longer running (an
``.old-PID`` folder whose name is free again is put back instead: it is the last good artifact).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

from graphopt.core.errors import ArtifactError
from graphopt.core.manifest import FORMAT, MANIFEST

log = logging.getLogger(__name__)

MARKER = ".graphopt-staging"
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>build|old)-(?P<pid>\d+)(\.[^.]+)?$")


def check_destination(output: Path, force: bool) -> None:
    """Refuse ``-o`` when it is a file, exists without ``force``, or is a folder that is not a graphopt artifact."""
    if output.is_symlink() or (output.exists() and not output.is_dir()):
        raise ArtifactError(f"output {output} is a file, not a folder; pass a folder path to -o")
    if not output.exists():
        return
    if not force:
        raise ArtifactError(f"output {output} already exists; pass --force to replace it or choose another -o")
    if any(output.iterdir()) and not is_artifact(output):
        raise ArtifactError(f"output {output} exists and is not a graphopt artifact (its {MANIFEST} does not say "
                            f"format {FORMAT!r}); refusing to replace it: move it away or choose another -o")


def is_artifact(directory: Path) -> bool:
    """True when ``directory/manifest.json`` parses as a JSON object whose ``format`` is graphopt's."""
    path = directory / MANIFEST
    if path.is_symlink() or not path.is_file():
        return False
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(raw, dict) and raw.get("format") == FORMAT


def make_staging(output: Path) -> Path:
    """A fresh hidden folder beside ``output`` (same file system, so the final rename is atomic)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.build-{os.getpid()}.", dir=output.parent))
    staging.chmod(0o755)
    (staging / MARKER).write_text(str(os.getpid()))
    return staging


def swap_into_place(staging: Path, output: Path) -> None:
    """Rename ``staging`` to ``output``, moving an existing artifact aside first and deleting it after."""
    (staging / MARKER).unlink()
    if not output.exists():
        os.replace(staging, output)
        return
    old = output.with_name(f".{output.name}.old-{os.getpid()}")
    os.replace(output, old)
    os.replace(staging, output)
    shutil.rmtree(old, ignore_errors=True)


def sweep_leftovers(parent: Path) -> list[str]:
    """Remove staging and moved-aside folders in ``parent`` whose build process is dead; returns their names."""
    if not parent.is_dir():
        return []
    swept = []
    for entry in sorted(parent.iterdir()):
        match = _LEFTOVER.match(entry.name)
        if match is None or entry.is_symlink() or not entry.is_dir() or _alive(int(match["pid"])):
            continue
        if match["kind"] == "build" and (entry / MARKER).is_file():
            shutil.rmtree(entry, ignore_errors=True)
        elif match["kind"] == "old" and is_artifact(entry):
            _restore_or_remove(entry, parent / match["name"])
        else:
            continue  # not ours: leave it
        swept.append(entry.name)
    if swept:
        log.warning("removed what interrupted builds left in %s: %s", parent, ", ".join(swept))
    return swept


def _restore_or_remove(old: Path, original: Path) -> None:
    if original.exists() or original.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:  # the build died between its two renames: the previous artifact is the one to keep
        os.replace(old, original)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a process of another user holds the pid
        return True
    return True
