"""Turns the wheel maturin built with the `cuda` feature into ferrotune's CUDA wheel: the
version gets a local label (0.1.0 -> 0.1.0+cu12: the same project, so installing it replaces
the CPU wheel and vice versa) and the metadata declares the NVIDIA runtime wheels the
extension loads at run time. Written with zipfile (no `wheel` package needed); RECORD is
rewritten with the new hashes.

    python scripts/cuda_wheel_metadata.py IN.whl OUT_DIR --label cu12 \\
        --requires "nvidia-cublas-cu12>=12.1,<13" --requires "nvidia-nccl-cu12>=2.18"

Prints the path of the new wheel.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import re
import sys
import zipfile
from pathlib import Path


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def relabel(wheel: Path, out_dir: Path, label: str, requires: list) -> Path:
    name = wheel.name
    m = re.match(r"^(?P<dist>[^-]+)-(?P<ver>[^-]+)-(?P<rest>.+)\.whl$", name)
    if not m:
        raise SystemExit(f"error: {name} is not a wheel file name")
    dist, ver, rest = m["dist"], m["ver"], m["rest"]
    if "+" in ver:
        raise SystemExit(f"error: {name} already has a local version label")
    new_ver = f"{ver}+{label}"
    old_info, new_info = f"{dist}-{ver}.dist-info/", f"{dist}-{new_ver}.dist-info/"
    with zipfile.ZipFile(wheel) as z:
        entries = [(i, z.read(i.filename)) for i in z.infolist() if not i.is_dir()]
    names = [i.filename for i, _ in entries]
    if old_info + "METADATA" not in names:
        raise SystemExit(f"error: {name} has no {old_info}METADATA")
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{dist}-{new_ver}-{rest}.whl"
    records = []
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for info, data in entries:
            path = info.filename
            if path.startswith(old_info):
                path = new_info + path[len(old_info):]
            if path == new_info + "RECORD":
                continue
            if path == new_info + "METADATA":
                head, sep, body = data.decode("utf-8").partition("\n\n")
                head = re.sub(r"(?m)^Version: .*$", f"Version: {new_ver}", head)
                for r in requires:
                    head += f"\nRequires-Dist: {r}"
                data = (head + sep + body).encode("utf-8")
            zi = zipfile.ZipInfo(path, date_time=info.date_time)
            zi.external_attr = info.external_attr
            zi.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(zi, data)
            records.append(f"{path},{_record_hash(data)},{len(data)}")
        records.append(f"{new_info}RECORD,,")
        z.writestr(new_info + "RECORD", "\n".join(records) + "\n")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("wheel", type=Path)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--label", default="cu12")
    ap.add_argument("--requires", action="append", default=[])
    a = ap.parse_args(argv)
    print(relabel(a.wheel, a.out_dir, a.label, a.requires))
    return 0


if __name__ == "__main__":
    sys.exit(main())
