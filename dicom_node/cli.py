"""The ``lumbar-node`` command line."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from importlib.metadata import entry_points
from pathlib import Path

import click
import yaml

from dicom_node.config import ConfigError, Settings, load_settings
from dicom_node.errors import NodeError
from dicom_node.observability import PHI_VALUES, configure_logging
from inference import __version__


def settings_of(ctx: click.Context) -> Settings:
    """Load (once) the settings named by ``--config`` and the environment; configure logging."""
    obj = ctx.ensure_object(dict)
    if "settings" not in obj:
        try:
            obj["settings"] = load_settings(obj.get("config_file"))
        except ConfigError as exc:
            raise click.ClickException(str(exc)) from None
        log = obj["settings"].logging
        configure_logging(log.format, log.level)
    settings: Settings = obj["settings"]
    return settings


@contextmanager
def node_errors() -> Iterator[None]:
    """A ``NodeError`` (a ledger written by a newer lumbar-node, a path that leaves its folder...)
    ends the command with one line on stderr and exit status 1, as click reports its own errors,
    instead of a traceback."""
    try:
        yield
    except NodeError as exc:
        raise click.ClickException(PHI_VALUES.scrub(str(exc))) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lumbar-node")
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="LUMBAR_NODE_CONFIG",
    help="YAML file merged over conf/default.yaml (env: LUMBAR_NODE_CONFIG). "
    "Keys can also be set as LUMBAR_NODE__SECTION__KEY=value.",
)
@click.pass_context
def main(ctx: click.Context, config_file: Path | None) -> None:
    """AI DICOM node for lumbar spine MRI.

    Receives lumbar spine MRI studies from a PACS, grades spinal canal stenosis, neural
    foraminal narrowing and subarticular stenosis at L1/L2 to L5/S1, and returns a DICOM
    Structured Report and Grad-CAM images into the same study.

    Models trained on the synthetic phantom prove the pipeline; they are not clinical models.
    """
    ctx.ensure_object(dict)["config_file"] = config_file
    configure_logging("auto", "INFO")  # commands that read the settings reconfigure it from them


#: The entry-point group through which the demo's, phantom's, training's and export's commands join
#: this one (pyproject.toml); the node imports none of their code.
COMMAND_GROUP = "lumbar_node.commands"


def add_registered_commands(group: click.Group) -> None:
    """Add every command registered in the ``lumbar_node.commands`` entry-point group."""
    for entry in sorted(entry_points(group=COMMAND_GROUP), key=lambda e: e.name):
        group.add_command(entry.load(), entry.name)


@main.command("config")
@click.pass_context
def show_config(ctx: click.Context) -> None:
    """Validate the configuration and print the effective settings (defaults, file, environment)."""
    settings = settings_of(ctx)
    click.echo(yaml.safe_dump(settings.model_dump(mode="json"), sort_keys=False), nl=False)


@main.command("predict")
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--model", "model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Exported model folder (default: the configured models.dir, else the bundled model).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also write each study's DICOM SR and Grad-CAM Secondary Captures under OUT/<StudyInstanceUID>/.")
@click.pass_context
def predict_command(ctx: click.Context, folder: Path, model_dir: Path | None, as_json: bool, out: Path | None) -> None:
    """Grade the lumbar spine MRI studies in a folder of DICOM files and print the results.

    Synthetic-phantom models are not clinical models: results are not for diagnosis.
    """
    from dicom_node.predict import predict_folder

    settings = settings_of(ctx)
    model_dir = model_dir or settings.models.dir
    try:
        predict_folder(folder, model_dir, tuple(settings.models.providers), as_json, click.echo, out,
                       pdf=settings.outputs.pdf,
                       report_when_nothing_assessed=settings.study.report_when_nothing_assessed,
                       key_images=settings.outputs.key_images)
    except Exception as exc:
        if isinstance(exc, click.ClickException):
            raise
        raise click.ClickException(PHI_VALUES.scrub(f"{type(exc).__name__}: {exc}")) from None


@main.command("serve")
@click.pass_context
def serve_command(ctx: click.Context) -> None:
    """Run the DICOM node until SIGTERM or Ctrl-C.

    Answers C-ECHO and C-STORE from the configured peers, spools each instance (fsync) and records
    it in the ledger before answering, releases a study after the quiet time (earlier when it is
    complete), grades it in worker processes, and sends the SR and Grad-CAM images to every
    destination, retrying with backoff. A restart resumes whatever was not finished.
    """
    import signal
    import threading
    from concurrent.futures.process import BrokenProcessPool

    from dicom_node.service import Node, run_until_signalled

    settings = settings_of(ctx)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    try:
        with node_errors():
            run_until_signalled(Node(settings), stop)
    except (OSError, BrokenProcessPool) as exc:  # the port is taken, the spool unwritable, the model unloadable
        raise click.ClickException(f"cannot start the node: {type(exc).__name__}: {exc}") from None


@main.command("reprocess")
@click.argument("study_uid")
@click.pass_context
def reprocess_command(ctx: click.Context, study_uid: str) -> None:
    """Grade a study the node holds again (after a failure, a skip or a new model).

    The running node picks it up at its next sweep; the new report supersedes the previous one.
    """
    from dicom_node.states import EventKind
    from dicom_node.store import Ledger

    settings = settings_of(ctx)
    with node_errors():
        ledger = Ledger(settings.storage.ledger_path)
        try:
            if not ledger.reopen(study_uid):
                raise click.ClickException(f"the ledger does not know study {study_uid}")
            ledger.add_event(EventKind.GRADE_AGAIN, "lumbar-node reprocess", study_uid, "requested on the command line")
        finally:
            ledger.close()
    click.echo(f"study {study_uid} queued for grading")


@main.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_context
def status_command(ctx: click.Context, as_json: bool) -> None:
    """The studies the node knows, their states and reasons, from the ledger (storage.ledger_path)."""
    import json

    from dicom_node.store import Ledger

    settings = settings_of(ctx)
    if not settings.storage.ledger_path.exists():
        raise click.ClickException(f"no ledger at {settings.storage.ledger_path}: "
                                   "the node has not received anything yet")
    with node_errors():
        ledger = Ledger(settings.storage.ledger_path)
        try:
            studies = ledger.studies()
        finally:
            ledger.close()
    if as_json:
        click.echo(json.dumps([s.__dict__ for s in studies], indent=1))
        return
    click.echo(f"{'study instance UID':64}  {'state':10} {'images':>6}  {'last received (UTC)':19}  reason")
    for s in studies:
        when = datetime.fromtimestamp(s.last_received, UTC).strftime("%Y-%m-%d %H:%M:%S")
        click.echo(f"{s.study_uid:64}  {s.state:10} {s.instances:>6}  {when}  {s.reason or ''}")


class _LineProgress:
    """A progress line on stderr: rewritten in place on a terminal, else a line per tenth."""

    def __init__(self) -> None:
        import sys

        self.stream = sys.stderr
        self.tty = self.stream.isatty()
        self.last: tuple[str, int] = ("", -1)

    def __call__(self, study_uid: str, done: int, expected: int | None) -> None:
        total = f"/{expected}" if expected else ""
        step = (10 * done // expected) if expected else done // 25
        if self.tty:
            self.stream.write(f"\r  {study_uid}: {done}{total} instances retrieved")
        elif (study_uid, step) != self.last:
            self.stream.write(f"  {study_uid}: {done}{total} instances retrieved\n")
        self.last = (study_uid, step)
        self.stream.flush()

    def end(self) -> None:
        if self.tty and self.last[0]:
            self.stream.write("\n")
        self.last = ("", -1)


def _node_listening(settings: Settings) -> bool:
    """Whether something listens on the node's DICOM port (a running ``lumbar-node serve``)."""
    import socket

    host = settings.node.bind_address
    host = "127.0.0.1" if host in ("0.0.0.0", "") else "::1" if host == "::" else host
    try:
        with socket.create_connection((host, settings.node.port), timeout=3):
            return True
    except OSError:
        return False


@main.command("fetch")
@click.option("--study", "study_uid", help="The Study Instance UID.")
@click.option("--accession", help="The accession number.")
@click.option("--patient-id", "patient_id", help="The patient ID (every study of the patient; see --since).")
@click.option("--since", type=click.DateTime(formats=["%Y-%m-%d", "%Y%m%d"]),
              help="Only studies from this date on (YYYY-MM-DD).")
@click.option("--source", "source_name", help="Ask only this query_retrieve source (default: each in turn until "
              "one holds a match).")
@click.option("--wait/--no-wait", default=True, show_default=True,
              help="Wait for the node to grade and deliver what was fetched.")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=1), default=900, show_default=True,
              help="Seconds to wait for the grading and delivery of every study fetched.")
@click.pass_context
def fetch_command(ctx: click.Context, study_uid: str | None, accession: str | None, patient_id: str | None,
                  since: datetime | None, source_name: str | None, wait: bool, timeout_s: float) -> None:
    """Find a study on the PACS, retrieve it, and have the running node grade and deliver it.

    Asks the configured query_retrieve sources (C-FIND or QIDO-RS) for the study; retrieves its MR
    series that the node does not hold: by C-MOVE to the node's own AE title (the running node's
    storage SCP receives them, as when the PACS sends), or by C-GET or WADO-RS (this command files
    them in the node's spool and ledger through the node's admission). The running node (`lumbar-node
    serve`, same configuration) then grades the study and sends the results to its destinations;
    this command shows the progress until each study is done (exit status 0) or failed or skipped (1).
    """
    import time

    from dicom_node.config import RetrieveMethod
    from dicom_node.dicom import StudyQuery
    from dicom_node.ingest import Admission
    from dicom_node.observability import NodeMetrics
    from dicom_node.pipeline import FetchedStudy, Fetcher, FetchError
    from dicom_node.states import StudyState
    from dicom_node.store import Ledger

    settings = settings_of(ctx)
    try:
        query = StudyQuery(study_uid or None, accession or None, patient_id or None,
                           since.date() if since is not None else None)
    except ValueError:
        raise click.UsageError("give one of --study, --accession or --patient-id") from None
    if not settings.query_retrieve:
        raise click.ClickException("no query/retrieve source is configured (query_retrieve in the configuration)")
    running = _node_listening(settings)
    with node_errors():
        ledger = Ledger(settings.storage.ledger_path)
        try:
            fetcher = Fetcher(settings, ledger, Admission(settings, ledger, NodeMetrics()))
            sources = fetcher.named(source_name)
            if not running and any(s.dicomweb is None and s.method is RetrieveMethod.C_MOVE for s in sources):
                raise click.ClickException(
                    f"the node is not running (nothing listens on its DICOM port {settings.node.port}): a C-MOVE "
                    "sends the study there. Start `lumbar-node serve` with this configuration first.")
            progress = _LineProgress()
            before = {s.study_uid: s.generation for s in ledger.studies()}

            def found(studies: list[FetchedStudy]) -> None:
                click.echo(f"found {len(studies)} {'study' if len(studies) == 1 else 'studies'} "
                           f"on {studies[0].source}", err=True)

            try:
                studies = fetcher.fetch(query, "lumbar-node fetch", source_name,
                                        lambda uid, tally: progress(uid, tally.done, tally.expected), found)
            except FetchError as exc:
                raise click.ClickException(str(exc)) from None
            finally:
                progress.end()
            for study in studies:
                tally = study.tally
                click.echo(f"{study.study_uid}: {study.series} series, {tally.completed} instances retrieved"
                           + (f", {tally.failed} failed" if tally.failed else "")
                           + (f" ({study.error})" if study.error else "")
                           + ("" if study.new else " (the node already holds every MR series)"))
            pending = {s.study_uid for s in studies if s.error is None}
            if not wait or not pending:
                raise SystemExit(0 if not [s for s in studies if s.error] else 1)
            if not running:
                click.echo("the node is not running: the studies are graded when `lumbar-node serve` starts", err=True)
                raise SystemExit(0)
            deadline, shown, ok = time.monotonic() + timeout_s, dict[str, str](), True
            retrieved = {s.study_uid: s.tally.completed for s in studies}
            while pending and time.monotonic() < deadline:
                for uid in sorted(pending):
                    held = ledger.study(uid)
                    if held is None:  # nothing of it was stored
                        if not retrieved[uid]:
                            pending.discard(uid)
                            ok = False
                        continue
                    nothing_new = held.generation == before.get(uid)
                    state = held.state.value + (" (nothing new)" if nothing_new and held.state.final else "")
                    if shown.get(uid) != state:
                        click.echo(f"{uid}: {state}" + (f" ({held.reason})" if held.reason else ""), err=True)
                        shown[uid] = state
                    if held.state.final:
                        pending.discard(uid)
                        ok = ok and held.state is StudyState.DONE
                if pending:
                    time.sleep(0.5)
            if pending:
                click.echo(f"still not graded after {timeout_s:g} s: {', '.join(sorted(pending))}", err=True)
            raise SystemExit(0 if ok and not pending and not [s for s in studies if s.error] else 1)
        finally:
            ledger.close()


@main.group("user")
def user_group() -> None:
    """Accounts of the web page (the file named by web.accounts_file)."""


def _read_password() -> str:
    """A new password: prompted twice on a terminal, else one line of standard input."""
    import sys

    if sys.stdin.isatty():
        return str(click.prompt("Password", hide_input=True, confirmation_prompt=True))
    return sys.stdin.readline().rstrip("\r\n")


def _end_sessions(settings: Settings, name: str) -> int:
    """End the account's web sessions at once (the running node's too: they share the sessions file)."""
    from dicom_node.web.sessions import SessionStore

    store = SessionStore.of(settings)
    try:
        return store.end_all(name)
    finally:
        store.close()


@user_group.command("add")
@click.argument("name")
@click.option("--role", type=click.Choice(["admin", "viewer", "sender"]), required=True,
              help="admin: also grades and sends again; viewer: looks and uploads; sender: stores by STOW-RS "
                   "only (a PACS or archive), no page.")
@click.pass_context
def user_add_command(ctx: click.Context, name: str, role: str) -> None:
    """Add (or replace) the account NAME; its password is read from standard input (one line).
    Replacing an account ends its sessions on the web page."""
    from dicom_node.web.accounts import AccountError, Role, add_account, load_accounts

    settings = settings_of(ctx)
    password = _read_password()
    try:
        existed = name in load_accounts(settings.web.accounts_file)
        add_account(settings.web.accounts_file, name, Role(role), password)
    except AccountError as exc:
        raise click.ClickException(str(exc)) from None
    ended = _end_sessions(settings, name) if existed else 0
    click.echo(f"account {name} ({role}) written to {settings.web.accounts_file}"
               + (f"; {ended} session(s) ended" if existed else ""))


@user_group.command("passwd")
@click.argument("name")
@click.pass_context
def user_passwd_command(ctx: click.Context, name: str) -> None:
    """Give the account NAME a new password (read from standard input, one line); its sessions end."""
    from dicom_node.web.accounts import AccountError, change_password

    settings = settings_of(ctx)
    password = _read_password()
    try:
        change_password(settings.web.accounts_file, name, password)
    except AccountError as exc:
        raise click.ClickException(str(exc)) from None
    ended = _end_sessions(settings, name)
    click.echo(f"password of {name} changed in {settings.web.accounts_file}; {ended} session(s) ended")


@user_group.command("remove")
@click.argument("name")
@click.pass_context
def user_remove_command(ctx: click.Context, name: str) -> None:
    """Remove the account NAME; its sessions end."""
    from dicom_node.web.accounts import AccountError, remove_account

    settings = settings_of(ctx)
    try:
        remove_account(settings.web.accounts_file, name)
    except AccountError as exc:
        raise click.ClickException(str(exc)) from None
    ended = _end_sessions(settings, name)
    click.echo(f"account {name} removed from {settings.web.accounts_file}; {ended} session(s) ended")


add_registered_commands(main)

if __name__ == "__main__":  # pragma: no cover
    main()
