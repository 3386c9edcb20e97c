"""``lumbar-node demo``: the whole loop on one machine. A real Orthanc plays the PACS and routes each
stable study to the node (its own Lua routing); a phantom study is sent to Orthanc; the node grades
it with the bundled model and sends the SR and Grad-CAM images back into the same study."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pydicom

from demo.orthanc import ORTHANC_AET, free_port, running_orthanc
from dicom_node.config import Destination, Settings, load_settings
from dicom_node.dicom import send_files
from dicom_node.results import RunFolder
from dicom_node.service import Node
from dicom_node.states import StudyState
from dicom_node.store import Study
from inference.rsna_layout import IMAGES_DIR
from phantom.generate import generate_dataset

MODALITY_AET = "PHANTOM_MR"


def demo_settings(workdir: Path, node_port: int, orthanc_port: int, config_file: Path | None = None) -> Settings:
    """The node's settings for the demo: loopback ports, Orthanc as peer and destination, state under workdir."""
    environ = {
        "LUMBAR_NODE__NODE__BIND_ADDRESS": "127.0.0.1", "LUMBAR_NODE__NODE__PORT": str(node_port),
        "LUMBAR_NODE__NODE__ALLOWED_PEERS": f"[{{ae_title: {ORTHANC_AET}, host: 127.0.0.1}}]",
        "LUMBAR_NODE__DESTINATIONS":
            f"[{{name: pacs, ae_title: {ORTHANC_AET}, host: 127.0.0.1, port: {orthanc_port}}}]",
        "LUMBAR_NODE__STORAGE__SPOOL_DIR": str(workdir / "node" / "spool"),
        "LUMBAR_NODE__STORAGE__RESULTS_DIR": str(workdir / "node" / "results"),
        "LUMBAR_NODE__STORAGE__LEDGER_PATH": str(workdir / "node" / "ledger.sqlite"),
        "LUMBAR_NODE__STUDY__QUIET_TIME_S": "10",
        "LUMBAR_NODE__DELIVERY__BACKOFF_INITIAL_S": "1",
        "LUMBAR_NODE__WEB__PORT": str(free_port()),  # the web page on a free loopback port (8080 may be taken)
        "LUMBAR_NODE__WEB__ACCOUNTS_FILE": str(workdir / "node" / "accounts.yaml"),
    }
    return load_settings(config_file, environ)


def run_demo(workdir: Path, seed: int, echo: Callable[[str], None], config_file: Path | None = None,
             timeout_s: float = 300.0) -> Path:
    """Run the loop once; print the graded table and where the results are; return the SR's path."""
    workdir = workdir.resolve()
    [study] = generate_dataset(workdir / "phantom", 1, seed)
    files = sorted((workdir / "phantom" / IMAGES_DIR / str(study.study_id)).rglob("*.dcm"))
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    echo(f"phantom study {study_uid}: {len(files)} MR images (synthetic, no patient)")
    node_port = free_port()
    settings = demo_settings(workdir, node_port, orthanc_port := free_port(), config_file)
    node = Node(settings)
    with running_orthanc(workdir / "orthanc", peers={"lumbar": (settings.node.ae_title, node_port)},
                         route_to="lumbar", dicom_port=orthanc_port) as pacs:
        echo(f"Orthanc (PACS) at DICOM port {pacs.dicom_port}, http://127.0.0.1:{pacs.http_port}/app/explorer.html; "
             f"node {settings.node.ae_title} at port {node_port}")
        node.start()
        try:
            started = time.monotonic()
            send_files(Destination(name="orthanc", ae_title=ORTHANC_AET, host="127.0.0.1", port=pacs.dicom_port),
                       MODALITY_AET, files)
            echo(f"sent the study to Orthanc; Orthanc routes it to the node once stable "
                 f"({pacs.workdir / 'routing.lua'})")
            state = _wait(node, study_uid, started + timeout_s)
            if state.state is not StudyState.DONE:
                raise RuntimeError(f"study ended {state.state}: {state.reason}")
            series = pacs.study_series(study_uid)
            echo(f"results back in Orthanc after {time.monotonic() - started:.1f} s; the study now holds:")
            for s in sorted(series, key=lambda s: int(s["MainDicomTags"].get("SeriesNumber", 0) or 0)):
                tags = s["MainDicomTags"]
                echo(f"  series {tags.get('SeriesNumber', '?'):>4} {tags.get('Modality', '?'):3} "
                     f"{len(s['Instances']):3} instances  {tags.get('SeriesDescription', '')}")
            report = node.ledger.last_report(study_uid)
            if report is None:
                raise RuntimeError(f"study {study_uid} is done but the ledger holds no report")
            run = RunFolder.of_sr(report.sr_path)
            echo("")
            echo(run.table_path.read_text())
            echo(f"Structured Report: {report.sr_path}")
            echo(f"Grad-CAM Secondary Captures: {run.sc_dir} ({len(run.sc_files())} images)")
            for pdf in run.pdf_files():
                echo(f"PDF summary (Encapsulated PDF): {pdf}")
            for kos in run.kos_files():
                echo(f"Key images (Key Object Selection): {kos}")
            echo("node status: lumbar-node status  with  "
                 f"LUMBAR_NODE__STORAGE__LEDGER_PATH={settings.storage.ledger_path}")
            return Path(report.sr_path)
        finally:
            node.stop()


def _wait(node: Node, study_uid: str, deadline: float) -> Study:
    """Poll the ledger until the study is done, failed or skipped."""
    while time.monotonic() < deadline:
        state = node.ledger.study(study_uid)
        if state is not None and state.state.final:
            return state
        time.sleep(0.2)
    raise TimeoutError(f"study {study_uid} not done in time: {node.ledger.study(study_uid)}")
