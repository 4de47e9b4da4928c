"""Time an older megakernel beside the present one in the same GPU call (issue 4: machines differ by ~4%, so only
runs of one call compare).

Here (with git): `python3 scripts/megakernel_ab.py build REV` copies commit REV's `crosspool/kernels/megakernel/`
into `mkb/mk_REV/` (an untracked package: list `mkb/` in `.git/info/exclude` and never commit it), with its imports
renamed, and REV's step bench beside it as `mkb/mk_REV/step_bench.py` with REV's `megakernel_options.py` (the
options REV's `Chain` takes; the other helpers are today's). Carry `mkb` to the device.
There: `python3 scripts/megakernel_ab.py run REV SCRIPT [args]` runs SCRIPT (e.g. `mkb/mk_REV/step_bench.py`) with
that package standing in for `crosspool.kernels.megakernel` and its submodules.
"""

from __future__ import annotations

import importlib
import importlib.util
import runpy
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = "crosspool/kernels/megakernel"


def build(rev: str) -> Path:
    out = ROOT / "mkb" / f"mk_{rev}"
    out.mkdir(parents=True, exist_ok=True)
    (ROOT / "mkb" / "__init__.py").touch()
    names = subprocess.run(["git", "ls-tree", "--name-only", f"{rev}:{PKG}"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split()
    for name in [n for n in names if n.endswith(".py")]:
        text = subprocess.run(["git", "show", f"{rev}:{PKG}/{name}"], cwd=ROOT, check=True, capture_output=True,
                              text=True).stdout
        (out / name).write_text(text.replace("crosspool.kernels.megakernel", f"mkb.mk_{rev}"))
    bench = subprocess.run(["git", "show", f"{rev}:scripts/megakernel_step_bench.py"], cwd=ROOT,
                           capture_output=True, text=True)
    if bench.returncode == 0:                          # (older commits have none)
        (out / "step_bench.py").write_text(bench.stdout.replace(
            "sys.path.insert(0, str(Path(__file__).resolve().parent))",
            "sys.path.insert(0, str(Path(__file__).resolve().parents[2] / 'scripts'))"))
        # REV's options, as its Chain takes them (`run` imports them in place of today's)
        options = subprocess.run(["git", "show", f"{rev}:scripts/megakernel_options.py"], cwd=ROOT,
                                 capture_output=True, text=True)
        if options.returncode == 0:
            (out / "megakernel_options.py").write_text(options.stdout)
    return out


def run(rev: str, script: str, args: list[str]) -> None:
    sys.path.insert(0, str(ROOT))
    pkg = importlib.import_module(f"mkb.mk_{rev}")
    sys.modules["crosspool.kernels.megakernel"] = pkg
    for path in sorted((ROOT / "mkb" / f"mk_{rev}").glob("*.py")):
        if path.stem not in ("__init__", "step_bench", "megakernel_options"):
            sys.modules[f"crosspool.kernels.megakernel.{path.stem}"] = importlib.import_module(
                f"mkb.mk_{rev}.{path.stem}")
    options = ROOT / "mkb" / f"mk_{rev}" / "megakernel_options.py"
    if options.exists():
        spec = importlib.util.spec_from_file_location("megakernel_options", options)
        sys.modules["megakernel_options"] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    import crosspool.kernels as kernels

    kernels.megakernel = pkg
    sys.argv = [script, *args]
    runpy.run_path(script, run_name="__main__")


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "build":
        print(build(sys.argv[2]))
    elif len(sys.argv) >= 4 and sys.argv[1] == "run":
        run(sys.argv[2], sys.argv[3], sys.argv[4:])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
