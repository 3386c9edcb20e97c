"""The node's web page: dashboard, study pages with the audit trail, upload of a study to grade,
sign-in, Prometheus ``/metrics`` and ``/healthz``, served by ``lumbar-node serve`` (Starlette on
uvicorn in a thread of its own; it reads and writes the ledger through the Ledger API, on a
connection of its own, and never holds up C-STORE).

``server`` (uvicorn in its thread), ``app`` (the application: routes of ``routes/`` assembled),
``site`` (templates, the signed-in user, the ``page()`` guard), ``context`` (``WebContext`` and
``NodeActions``: the web page depends on that protocol, never on the service), ``security``
(cookies, CSRF, HTTP Basic), ``sessions`` (the server-side sessions, a SQLite file beside the
ledger), ``throttle`` (failed sign-ins), ``accounts`` (the accounts file, argon2id) and ``views``
(a run as the page shows it). An upload is streamed and admitted by ``dicom_node.ingest``, the node's one
way in (``routes/uploads``)."""

from dicom_node.web.accounts import (
    Account,
    AccountError,
    Role,
    add_account,
    authenticate,
    change_password,
    load_accounts,
    remove_account,
)
from dicom_node.web.app import build_app
from dicom_node.web.context import NodeActions, WebContext
from dicom_node.web.security import AccountsFile
from dicom_node.web.server import WebServer
from dicom_node.web.sessions import SessionStore

__all__ = ["Account", "AccountError", "AccountsFile", "NodeActions", "Role", "SessionStore", "WebContext", "WebServer",
           "add_account", "authenticate", "build_app", "change_password", "load_accounts", "remove_account"]
