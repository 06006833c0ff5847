"""Text that ships in Debian packages: where kdtool keeps it and how to fetch it without installing.

`apt-get download PKG` fetches a .deb without root rights or installation; we unpack it with a
small pure-Python reader (a .deb is an `ar` archive holding `data.tar.*`), so the only system
tool needed is apt-get. Layout:

    $KDTOOL_HOME/sources/debs/PKG_VERSION_all.deb    the downloaded archives
    $KDTOOL_HOME/sources/PKG/usr/share/...            each package unpacked (as `dpkg-deb -x` would)

KDTOOL_HOME defaults to ~/.cache/kdtool. `scripts/fetch-concept-sources` is the shell front end;
`fetch()` is the same thing for Python callers (the concept builder, a corpus fetcher).
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

from kdtool.embedded import kdtool_home
from kdtool.errors import BadInput, RuntimeFailure

#: The packages the default probe concepts are built from (see docs/probe.md for licences); the
#: Python docs package is versioned (python3.11-doc on Debian 12): see newest_python_doc().
CONCEPT_PACKAGES = ("r-cran-janeaustenr", "manpages", "manpages-fr", "python3.11-doc", "wordnet-base")


def sources_dir(root: str | os.PathLike | None = None) -> Path:
    """Where unpacked packages live: ROOT, or $KDTOOL_HOME/sources."""
    return Path(root).expanduser() if root is not None else kdtool_home() / "sources"


def package_dir(pkg: str, root: str | os.PathLike | None = None) -> Path | None:
    """The unpacked tree of PKG under the sources folder, or None when it has not been fetched."""
    d = sources_dir(root) / pkg
    return d if (d / "usr").is_dir() else None


def _ar_members(data: bytes) -> dict[str, bytes]:
    """Members of a (GNU/BSD-simple) ar archive, the container format of a .deb."""
    if not data.startswith(b"!<arch>\n"):
        raise BadInput("not an ar archive (a .deb starts with '!<arch>')")
    out, pos = {}, 8
    while pos + 60 <= len(data):
        header = data[pos : pos + 60]
        name = header[:16].decode("ascii", "replace").strip().rstrip("/")
        size = int(header[48:58].decode("ascii").strip())
        pos += 60
        out[name] = data[pos : pos + size]
        pos += size + (size % 2)  # members are 2-byte aligned
    return out


def extract_deb(deb: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Unpack the files of a .deb into DEST (like `dpkg-deb -x`), atomically: DEST appears complete or not at all."""
    deb, dest = Path(deb), Path(dest)
    try:
        members = _ar_members(deb.read_bytes())
    except BadInput as exc:
        raise BadInput(f"{deb}: {exc}") from None
    data_name = next((n for n in members if n.startswith("data.tar")), None)
    if data_name is None:
        raise BadInput(f"{deb}: no data.tar member; not a Debian package")
    if data_name.endswith(".zst"):
        raise RuntimeFailure(f"{deb}: zstd-compressed package; unpack it with `dpkg-deb -x {deb} {dest}`")
    tmp = dest.with_name(f".{dest.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(members[data_name]), mode="r:*") as tar:
        if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4 / 3.10.12
            tar.extractall(tmp, filter="data")  # refuses absolute paths and links out of the tree
        else:
            safe = [m for m in tar.getmembers() if not (m.name.startswith("/") or ".." in Path(m.name).parts)]
            tar.extractall(tmp, members=safe)
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
    return dest


def newest_python_doc() -> str:
    """The newest python3.X-doc package apt knows about (python3.11-doc on Debian 12)."""
    try:
        r = subprocess.run(["apt-cache", "pkgnames", "python3."], capture_output=True, text=True, timeout=60)
        names = [n for n in r.stdout.split() if re.fullmatch(r"python3\.\d+-doc", n)]
    except (OSError, subprocess.SubprocessError):
        names = []
    if not names:
        return "python3.11-doc"
    return max(names, key=lambda n: int(n.split(".")[1].split("-")[0]))


def fetch(
    packages: list[str] | tuple[str, ...] = CONCEPT_PACKAGES,
    root: str | os.PathLike | None = None,
    *,
    force: bool = False,
) -> dict[str, str]:
    """Download each package with `apt-get download` and unpack it; returns {pkg: 'ok'|'cached'|reason}."""
    base = sources_dir(root)
    debs = base / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    if shutil.which("apt-get") is None:
        return {p: "apt-get not found (not a Debian/Ubuntu system)" for p in packages}
    status = {}
    for pkg in packages:
        if package_dir(pkg, base) is not None and not force:
            status[pkg] = "cached"
            continue
        r = subprocess.run(["apt-get", "download", pkg], cwd=debs, capture_output=True, text=True)
        found = sorted(debs.glob(f"{pkg}_*.deb"), key=lambda p: p.stat().st_mtime)
        if r.returncode != 0 or not found:
            lines = (r.stderr or r.stdout).strip().splitlines()
            status[pkg] = f"apt-get download failed: {lines[-1] if lines else 'no output'}"
            continue
        extract_deb(found[-1], base / pkg)
        status[pkg] = "ok"
    return status
