"""A minimal PEP 517 / PEP 660 build backend for the pure-Python nsad package,
stdlib only, so `pip install ./client/python` needs no network: pip's isolated
build environment has nothing to download (build-system.requires = []).

It packs nsad/*.py into a py3-none-any wheel, plus nsad/_buildinfo.py with the
repository root it was built from (used to find build*/lib/libnsaclient.so).
"""
import base64
import hashlib
import io
import os
import tarfile
import time
import zipfile

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # client/python
PKG = "nsad"


def _meta():
    name, version, summary, requires_python = PKG, "0.1.0", "", ">=3.8"
    try:
        import tomllib
        with open(os.path.join(HERE, "pyproject.toml"), "rb") as f:
            p = tomllib.load(f)["project"]
        name, version = p["name"], p["version"]
        summary = p.get("description", "")
        requires_python = p.get("requires-python", requires_python)
    except Exception:
        pass
    return name, version, summary, requires_python


def _dist_info():
    name, version, _, _ = _meta()
    return "%s-%s.dist-info" % (name, version)


def _metadata_text():
    name, version, summary, rp = _meta()
    text = ("Metadata-Version: 2.1\nName: %s\nVersion: %s\nSummary: %s\nRequires-Python: %s\n"
            "Provides-Extra: numpy\nRequires-Dist: numpy; extra == \"numpy\"\n"
            "Provides-Extra: torch\nRequires-Dist: torch; extra == \"torch\"\n"
            "Requires-Dist: numpy; extra == \"torch\"\n" % (name, version, summary, rp))
    readme = os.path.join(HERE, "README.md")
    if os.path.exists(readme):
        with open(readme) as f:
            text += "Description-Content-Type: text/markdown\n\n" + f.read()
    return text


def _wheel_text():
    return ("Wheel-Version: 1.0\nGenerator: nsad_build\nRoot-Is-Purelib: true\n"
            "Tag: py3-none-any\n")


def _repo_root():
    root = os.path.dirname(os.path.dirname(HERE))
    return root if os.path.isfile(os.path.join(root, "client", "nsaclient.h")) else None


def _write_wheel(wheel_directory, files):
    """files: [(archive name, bytes)]; adds dist-info and RECORD."""
    name, version, _, _ = _meta()
    di = _dist_info()
    files = list(files) + [(di + "/METADATA", _metadata_text().encode()),
                           (di + "/WHEEL", _wheel_text().encode()),
                           (di + "/top_level.txt", (PKG + "\n").encode())]
    record = []
    fn = "%s-%s-py3-none-any.whl" % (name, version)
    with zipfile.ZipFile(os.path.join(wheel_directory, fn), "w", zipfile.ZIP_DEFLATED) as z:
        for arc, data in files:
            z.writestr(arc, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            record.append("%s,sha256=%s,%d" % (arc, digest, len(data)))
        record.append(di + "/RECORD,,")
        z.writestr(di + "/RECORD", "\n".join(record) + "\n")
    return fn


def _package_files():
    out = []
    pdir = os.path.join(HERE, PKG)
    for fn in sorted(os.listdir(pdir)):
        if fn.endswith(".py") and fn != "_buildinfo.py":
            with open(os.path.join(pdir, fn), "rb") as f:
                out.append((PKG + "/" + fn, f.read()))
    info = "# Written by the build backend.\nREPO_ROOT = %r\n" % _repo_root()
    out.append((PKG + "/_buildinfo.py", info.encode()))
    return out


def get_requires_for_build_wheel(config_settings=None):
    return []


def get_requires_for_build_sdist(config_settings=None):
    return []


def get_requires_for_build_editable(config_settings=None):
    return []


def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    di = _dist_info()
    os.makedirs(os.path.join(metadata_directory, di), exist_ok=True)
    with open(os.path.join(metadata_directory, di, "METADATA"), "w") as f:
        f.write(_metadata_text())
    with open(os.path.join(metadata_directory, di, "WHEEL"), "w") as f:
        f.write(_wheel_text())
    return di


prepare_metadata_for_build_editable = prepare_metadata_for_build_wheel


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    return _write_wheel(wheel_directory, _package_files())


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    # A .pth line puts client/python on sys.path: edits take effect at once.
    return _write_wheel(wheel_directory, [("nsad_editable.pth", (HERE + "\n").encode())])


def build_sdist(sdist_directory, config_settings=None):
    name, version, _, _ = _meta()
    base = "%s-%s" % (name, version)
    fn = base + ".tar.gz"
    with tarfile.open(os.path.join(sdist_directory, fn), "w:gz") as t:
        for rel in ["pyproject.toml", "README.md", "build_backend/nsad_build.py"] + \
                   [PKG + "/" + f for f in sorted(os.listdir(os.path.join(HERE, PKG)))
                    if f.endswith(".py") and f != "_buildinfo.py"]:
            t.add(os.path.join(HERE, rel), arcname=base + "/" + rel)
        data = _metadata_text().encode()
        ti = tarfile.TarInfo(base + "/PKG-INFO")
        ti.size, ti.mtime = len(data), int(time.time())
        t.addfile(ti, io.BytesIO(data))
    return fn
