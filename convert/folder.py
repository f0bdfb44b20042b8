"""Writing a whole output folder atomically: build it under a temporary name, then swap it in."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

from .errors import ConvertError


@contextlib.contextmanager
def staged_folder(out_dir: Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside `out_dir`; on success it replaces `out_dir` (an earlier
    one is removed), on any error or interrupt it is deleted and `out_dir` is left as it was."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.partial")
    old = out_dir.with_name(f".{out_dir.name}.old")
    for p in (tmp, old):
        shutil.rmtree(p, ignore_errors=True)
    try:
        tmp.mkdir()
        yield tmp
        if out_dir.exists():
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not out_dir.exists():  # stopped between the two renames: put the earlier output back
            os.replace(old, out_dir)
        if isinstance(e, OSError):
            raise ConvertError(f"cannot write {out_dir}: {e.strerror or e}") from None
        raise
    shutil.rmtree(old, ignore_errors=True)
