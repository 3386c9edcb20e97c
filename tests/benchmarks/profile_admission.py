"""Profile: the node's admission of received instances (``Admission.admit``: the checks, the header
read, the digest, the spool write and its fsyncs, the ledger record), one thread, as C-STORE hands
them over (the data set after the file meta), under cProfile.

    .venv/bin/python tests/benchmarks/profile_admission.py [--data DIR] [--studies 8] [--code DIR] [--top 15]

Prints per instance: Python function calls (deterministic: the same code and files give the same
count, whatever the machine's load), user CPU ms (the interpreter's own work) and system CPU ms
(the kernel's: writes, fsyncs), then the functions with the most time of their own. ``--code DIR``
profiles another checkout's ``dicom_node`` (e.g. a worktree of an earlier commit: a "before") with
this environment's packages. The phantom studies are made with ``lumbar-node phantom --seed 5``
unless --data names a folder.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import subprocess
import sys
import tempfile
from pathlib import Path


def _received(path: Path) -> tuple[bytes, str, str, str]:
    """A file as C-STORE carries it: the data set after the file meta, its transfer syntax, SOP class and instance."""
    import pydicom
    from pydicom.filereader import read_preamble

    with open(path, "rb") as fp:
        read_preamble(fp, False)
        meta = pydicom.filereader._read_file_meta_info(fp)
        body = fp.read()
    return (body, str(meta.TransferSyntaxUID), str(meta.MediaStorageSOPClassUID),
            str(meta.MediaStorageSOPInstanceUID))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None, help="an RSNA-layout folder (has train_images/)")
    parser.add_argument("--studies", type=int, default=8)
    parser.add_argument("--code", type=Path, default=None, help="profile this checkout's dicom_node instead")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    sys.path.insert(0, str((args.code or Path(__file__).resolve().parents[2]).resolve()))
    from dicom_node.config import load_settings
    from dicom_node.dicom.scp import file_meta_bytes
    from dicom_node.ingest import Admission, Candidate, Source
    from dicom_node.observability import NodeMetrics, configure_logging
    from dicom_node.store import Ledger

    configure_logging("json", "INFO")
    with tempfile.TemporaryDirectory(prefix="profile-admission-") as tmp:
        data = args.data
        if data is None:
            data = Path(tmp) / "phantom"
            exe = Path(sys.executable).with_name("lumbar-node")
            subprocess.run([str(exe), "phantom", "--studies", str(args.studies), "--seed", "5", "--out", str(data)],
                           check=True, capture_output=True)
        folders = sorted(d for d in (data / "train_images").iterdir() if d.is_dir())[:args.studies]
        items = [_received(f) for d in folders for f in sorted(d.rglob("*.dcm"))]
        settings = load_settings(environ={"LUMBAR_NODE__STORAGE__SPOOL_DIR": f"{tmp}/spool",
                                          "LUMBAR_NODE__STORAGE__LEDGER_PATH": f"{tmp}/ledger.sqlite"})
        ledger = Ledger(Path(settings.storage.ledger_path))
        admission = Admission(settings, ledger, NodeMetrics())
        batch = admission.batch(Source.DICOM, "PROFILE")
        profile = cProfile.Profile()
        before = os.times()
        profile.enable()
        for body, syntax, sop_class, sop_instance in items:
            candidate = Candidate.received(body, syntax, sop_class, sop_instance, "PROFILE",
                                           lambda c=sop_class, i=sop_instance, s=syntax: file_meta_bytes(c, i, s))
            verdict = admission.admit(candidate, batch)
            if not verdict.admitted:
                raise RuntimeError(f"not admitted: {verdict}")
        profile.disable()
        after = os.times()
        ledger.close()
    out = io.StringIO()
    stats = pstats.Stats(profile, stream=out)
    n = len(items)
    print(f"{n} instances ({sum(len(i[0]) for i in items) / n / 1e3:.0f} KB each) of {len(folders)} studies; "
          f"code: {args.code or 'this checkout'}; load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    calls = stats.total_calls  # type: ignore[attr-defined]  # set by pstats, not declared
    user_ms, system_ms = 1000 * (after.user - before.user) / n, 1000 * (after.system - before.system) / n
    print(f"per instance: {calls / n:.0f} Python function calls, user CPU {user_ms:.2f} ms, system CPU "
          f"{system_ms:.2f} ms (under the profiler)")
    stats.sort_stats("tottime").print_stats(args.top)
    print("\n".join(line for line in out.getvalue().splitlines() if line.strip())[:6000])


if __name__ == "__main__":
    main()
