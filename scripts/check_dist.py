"""Check a built sdist and wheel against the source tree (scripts/lowest_versions.sh runs it).

python scripts/check_dist.py DIST_DIR     # DIST_DIR holds one adapterops-*.tar.gz and one adapterops-*.whl

sdist: every file git tracks or would track (but .gitignore), so `make test` runs in it unpacked; no outputs or caches.
wheel: exactly the package's modules, py.typed and the bundled examples (byte for byte the files of
recipes/), the license, and metadata that says what pyproject.toml says.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tarfile
import zipfile
from email.parser import Parser
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parent.parent
NOT_IN_SDIST = {".gitignore"}
GENERATED_IN_SDIST = re.compile(r"(PKG-INFO|setup\.cfg|adapterops\.egg-info/.*)")
NEVER = re.compile(
    r"(^|/)(__pycache__|\.pytest_cache|\.mypy_cache|\.ruff_cache|\.hypothesis|out)/|\.py[cod]$"
)
EXAMPLE_PATTERNS = re.compile(r"[^/]+\.yaml|inputs/[^/]+/[^/]+")


def tracked() -> set[str] | None:
    try:
        result = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return None  # not a git checkout (an unpacked sdist): check the required folders only
    return {name for name in result.stdout.split("\0") if name and (REPO / name).is_file()}


def examples() -> set[str]:
    recipes = REPO / "recipes"
    return {
        p.relative_to(recipes).as_posix()
        for p in recipes.rglob("*")
        if p.is_file() and EXAMPLE_PATTERNS.fullmatch(p.relative_to(recipes).as_posix())
    }


def check_sdist(path: Path, problems: list[str]) -> None:
    with tarfile.open(path) as tar:
        names = [m.name for m in tar.getmembers() if m.isfile()]
    top = f"{path.name.removesuffix('.tar.gz')}/"
    files = {n.removeprefix(top) for n in names if n.startswith(top)}
    problems += [f"sdist: {n} is outside {top}" for n in names if not n.startswith(top)]
    problems += [f"sdist: {n} should not ship" for n in sorted(files) if NEVER.search(n)]
    required = {"LICENSE", "README.md", "Makefile", "pyproject.toml", "MANIFEST.in", "docs/guide.md"}
    required |= {f"recipes/{name}" for name in examples()}
    required |= {
        p.relative_to(REPO).as_posix()
        for d in ("tests", "scripts", "bench")
        for p in (REPO / d).rglob("*.py")
    }
    git = tracked()
    if git is not None:
        required |= git - NOT_IN_SDIST
        extra = {n for n in files - git if not GENERATED_IN_SDIST.fullmatch(n)}
        problems += [f"sdist: {n} is ignored by git" for n in sorted(extra)]
    problems += [f"sdist: {n} is missing (MANIFEST.in)" for n in sorted(required - files)]


def check_wheel(path: Path, problems: list[str]) -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    with zipfile.ZipFile(path) as whl:
        names = set(whl.namelist())
        info = f"adapterops-{path.name.split('-')[1]}.dist-info/"
        package = {n for n in names if not n.startswith(info)}
        expected = {p.relative_to(REPO).as_posix() for p in (REPO / "adapterops").rglob("*.py")}
        expected = {n for n in expected if "__pycache__" not in n} | {"adapterops/py.typed"}
        expected |= {f"adapterops/examples/{name}" for name in examples()} | {
            "adapterops/examples/__init__.py"
        }
        problems += [f"wheel: {n} is missing" for n in sorted(expected - package)]
        problems += [f"wheel: {n} should not ship" for n in sorted(package - expected)]
        for name in sorted(examples()):
            member = f"adapterops/examples/{name}"
            if member in names and whl.read(member) != (REPO / "recipes" / name).read_bytes():
                problems.append(f"wheel: {member} differs from recipes/{name}")
        if f"{info}licenses/LICENSE" not in names:
            problems.append("wheel: no LICENSE in the dist-info")
        meta = Parser().parsestr(whl.read(f"{info}METADATA").decode())
    if meta["License-Expression"] != project["license"]:
        problems.append(f"wheel: License-Expression is {meta['License-Expression']!r}")
    runtime = [r for r in meta.get_all("Requires-Dist", []) if "extra ==" not in r]
    if runtime != project["dependencies"]:
        problems.append(f"wheel: Requires-Dist {runtime} != pyproject's {project['dependencies']}")
    urls = {u.split(",")[0] for u in meta.get_all("Project-URL", [])}
    if not {"Homepage", "Documentation", "Issues"} <= urls:
        problems.append(f"wheel: project URLs {sorted(urls)}")


def main() -> int:
    dist = Path(sys.argv[1])
    sdists, wheels = sorted(dist.glob("adapterops-*.tar.gz")), sorted(dist.glob("adapterops-*.whl"))
    if len(sdists) != 1 or len(wheels) != 1:
        print(f"{dist}: expected one sdist and one wheel, found {sdists + wheels}", file=sys.stderr)
        return 1
    problems: list[str] = []
    check_sdist(sdists[0], problems)
    check_wheel(wheels[0], problems)
    for problem in problems:
        print(problem, file=sys.stderr)
    if not problems:
        print(f"{sdists[0].name} and {wheels[0].name}: contents and metadata as expected")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
